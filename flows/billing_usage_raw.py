"""Bronze: the relevant-usage extract, a Delta table (usage_pipeline/bronze.py), one commit per run.

A full refresh on first run (no `dealer_ids`) or when the table is missing;
otherwise only the given dealers' rows are re-read and replaced, so a tick's
load on the billing database and on the lake follows the change. The run holds
the `usage-bronze` slot for its write and the table's maintenance, whoever started it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from orchestration.runtime import load_source, without_task_tags
from orchestration.setup import BILLING_BLOCK
from orchestration.slots import bronze_slot
from usage_pipeline.bronze import RUN_KEY, maintain, remove_stale_spills
from usage_pipeline.checks import ExtractRead
from usage_pipeline.extract import extract_relevant_usage, stream_relevant_usage
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
def write_bronze(dealer_ids: list[int] | None, metadata: dict[str, str]) -> BronzeResult:
    """Read relevant usage from billing-db into the table (a full refresh streams it in batches); a
    failed attempt commits nothing, so transient source errors are retried with backoff."""
    source = load_source(BILLING_BLOCK)
    progress = create_progress_artifact(0.0, description="bronze extract")

    def report(done: int, total: int) -> None:
        update_progress_artifact(progress, 100.0 * done / max(total, 1))

    def from_source(reads: Iterator[pl.DataFrame]) -> Iterator[pl.DataFrame]:
        """Source errors named by the block (never with its password); the rows' own errors as they are."""
        while True:
            try:
                batch = next(reads)
            except StopIteration:
                return
            except BadSourceRows:
                raise
            except Exception as exc:
                raise source.error(exc) from None
            yield batch

    read = ExtractRead()  # new for each attempt: a retry reads every range again

    def extract(dealers: list[int] | None) -> pl.DataFrame | Iterator[pl.DataFrame]:
        if dealers is None:
            return from_source(stream_relevant_usage(source.engine, source.connectorx_uri, on_progress=report,
                                                     read=read))
        try:
            return extract_relevant_usage(source.engine, source.connectorx_uri, dealers, on_progress=report)
        except BadSourceRows:
            raise
        except Exception as exc:
            raise source.error(exc) from None

    started = time.perf_counter()
    try:
        result = refresh_bronze(load_settings().lake_path, extract, dealer_ids, metadata, read)
    finally:
        source.engine.dispose()
    seconds = time.perf_counter() - started
    get_run_logger().info("Extracted and wrote %d relevant usage row(s) in %.2fs (%.0f rows/s)",
                          result.extracted_rows, seconds, result.extracted_rows / max(seconds, 1e-9))
    return result


def bronze_run_name() -> str:
    dealer_ids = flow_run.parameters.get("dealer_ids")
    return "bronze-full" if dealer_ids is None else f"bronze-{len(dealer_ids)}-dealers"


@flow(name="billing-usage-raw", flow_run_name=bronze_run_name)
def billing_usage_raw(dealer_ids: list[int] | None = None) -> BronzeResult:
    settings = load_settings()
    root = settings.lake_path
    logger = get_run_logger()
    with bronze_slot(settings):
        if removed := remove_stale_spills():  # on this host, where the killed refresh spilled
            logger.info("Removed %d spill directory(ies) that killed full refreshes left: %s", len(removed), removed)
        with without_task_tags():
            result = write_bronze(dealer_ids, {RUN_KEY: str(flow_run.id)})
        if result.migrated:
            logger.warning("Migrated the old bronze file %s/data.parquet into the Delta table and removed it",
                           result.path)
        logger.info("Bronze %s refresh: committed version %d of %s (%d row(s) written, %d in the table)",
                    result.describe(), result.version, result.path, result.written_rows, result.rows)
        maintenance = maintain(root)
    if maintenance is not None:
        logger.info("Bronze maintenance: compacted %d file(s) into %d, vacuumed %d file(s)",
                    maintenance["compacted_removed"], maintenance["compacted_added"], maintenance["vacuumed"])
    return replace(result, maintenance=maintenance)
