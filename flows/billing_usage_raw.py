"""Bronze: the relevant-usage extract, one partitionless Parquet file.

A full refresh on first run (no `dealer_ids`) or when the file is missing;
otherwise only the given dealers' rows are re-read and their slice replaced,
so a tick's load on the billing database follows the change.
"""

from __future__ import annotations

import time

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.tasks import exponential_backoff

from blocks.setup import BILLING_BLOCK
from flows.lake import bronze_path, lake_root, write_parquet_atomic
from flows.runtime import load_source
from flows.source import bronze_statements, read_frame
from flows.transforms import merge_bronze, normalize_bronze


@task(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5)
def extract_relevant_usage(dealer_ids: list[int] | None) -> pl.DataFrame:
    source = load_source(BILLING_BLOCK)
    statements = bronze_statements(dealer_ids)
    progress = create_progress_artifact(0.0, description="bronze extract: statements done") if len(statements) > 1 else None
    frames = []
    try:
        for done, stmt in enumerate(statements, start=1):
            frames.append(read_frame(source.engine, stmt, source.connectorx_uri))
            if progress is not None:
                update_progress_artifact(progress, 100.0 * done / len(statements))
    except Exception as exc:
        raise source.error(exc) from None
    finally:
        source.engine.dispose()
    return normalize_bronze(pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame())


def bronze_run_name() -> str:
    dealer_ids = flow_run.parameters.get("dealer_ids")
    return "bronze-full" if dealer_ids is None else f"bronze-{len(dealer_ids)}-dealers"


@flow(name="billing-usage-raw", flow_run_name=bronze_run_name)
def billing_usage_raw(dealer_ids: list[int] | None = None) -> dict[str, object]:
    logger = get_run_logger()
    path = bronze_path(lake_root())
    full = dealer_ids is None or not path.exists()
    started = time.perf_counter()
    fresh = extract_relevant_usage(None if full else sorted(set(dealer_ids or [])))
    extracted = time.perf_counter() - started
    frame = fresh if full else merge_bronze(pl.read_parquet(path), fresh, sorted(set(dealer_ids or [])))
    write_parquet_atomic(frame, path)
    mode = "full" if full else f"{len(set(dealer_ids or []))} dealer(s)"
    logger.info(
        "Bronze %s refresh: extracted %d row(s) in %.2fs (%.0f rows/s); %s now holds %d row(s)",
        mode, fresh.height, extracted, fresh.height / extracted if extracted else 0.0, path, frame.height,
    )
    return {"mode": mode, "extracted_rows": fresh.height, "rows": frame.height, "path": str(path)}
