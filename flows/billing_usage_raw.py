"""Bronze: the relevant-usage extract, one partitionless Parquet file.

A full refresh on first run (no `dealer_ids`) or when the file is missing;
otherwise only the given dealers' rows are re-read and their slice replaced,
so a tick's load on the billing database follows the change.
"""

from __future__ import annotations

import time

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from orchestration.runtime import load_source, tick_shared
from orchestration.setup import BILLING_BLOCK
from usage_pipeline.extract import extract_relevant_usage
from usage_pipeline.materialize import BronzeResult, refresh_bronze
from usage_pipeline.settings import load_settings
from usage_pipeline.transforms import BadSourceRows


def unless_bad_rows(task, task_run, state) -> bool:
    """Retry source errors, not rows that break the contract: reading them again changes nothing."""
    return not isinstance(state.result(raise_on_failure=False), BadSourceRows)


@task(
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=unless_bad_rows,
)
def extract(dealer_ids: list[int] | None) -> pl.DataFrame:
    """Read relevant usage from billing-db; transient source errors are retried with backoff."""
    source = load_source(BILLING_BLOCK)
    progress = create_progress_artifact(0.0, description="bronze extract")

    def report(done: int, total: int) -> None:
        update_progress_artifact(progress, 100.0 * done / total)

    started = time.perf_counter()
    try:
        frame = extract_relevant_usage(source.engine, source.connectorx_uri, dealer_ids, on_progress=report)
    except BadSourceRows:
        raise  # names the rows; the database itself is fine
    except Exception as exc:
        raise source.error(exc) from None
    finally:
        source.engine.dispose()
    seconds = time.perf_counter() - started
    get_run_logger().info(
        "Extracted %d relevant usage row(s) in %.2fs (%.0f rows/s)", frame.height, seconds, frame.height / max(seconds, 1e-9)
    )
    return frame


def bronze_run_name() -> str:
    dealer_ids = flow_run.parameters.get("dealer_ids")
    return "bronze-full" if dealer_ids is None else f"bronze-{len(dealer_ids)}-dealers"


@flow(name="billing-usage-raw", flow_run_name=bronze_run_name)
def billing_usage_raw(dealer_ids: list[int] | None = None) -> BronzeResult:
    result, frame = refresh_bronze(load_settings().lake_path, extract, dealer_ids)
    shared = tick_shared()
    if shared is not None:  # run by a tick in its process: its silver runs read these rows from memory
        shared.bronze = frame
    get_run_logger().info("Bronze %s refresh: %s now holds %d row(s)", result.describe(), result.path, result.rows)
    return result
