"""Silver for one partner: its dealers' bronze rows, aggregated per day and per month and service."""

from __future__ import annotations

from typing import Annotated

import polars as pl
import sqlalchemy as sa
from prefect import flow, get_run_logger, task
from prefect.tasks import exponential_backoff
from pydantic import Field

from blocks.setup import V3_BLOCK
from flows.lake import SILVER_TABLES, bronze_path, lake_root, partition_path, write_parquet_atomic
from flows.partners import PARTNER_UUID_PATTERN, parse_partner_uuid
from flows.runtime import load_source, partner_slot, tag_current_run
from flows.source import dealer_directory
from flows.transforms import BRONZE_SCHEMA, billing_monthly_usage_by_service, billing_usage_aggregated

PartnerUUID = Annotated[str, Field(pattern=PARTNER_UUID_PATTERN, description="Partner UUID (8-4-4-4-12 hex)")]


@task(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5)
def partner_dealers(partner_uuid: str) -> list[int]:
    """The partner's dealers, read from v3 now (not from the tick), so manual runs are right too."""
    source = load_source(V3_BLOCK)
    try:
        with source.engine.connect() as conn:
            directory, warnings = dealer_directory(conn)
    except sa.exc.SQLAlchemyError as exc:
        raise source.error(exc) from None
    finally:
        source.engine.dispose()
    for warning in warnings:
        get_run_logger().warning(warning)
    return sorted(d for d, p in directory.items() if p == partner_uuid)


def read_bronze_rows(dealers: list[int]) -> pl.DataFrame:
    """The dealers' bronze rows; row-group statistics on dealer_id let the scan skip the rest."""
    path = bronze_path(lake_root())
    if not path.exists():
        raise FileNotFoundError(f"bronze file {path} is missing; run billing-usage-raw first")
    if not dealers:
        return pl.DataFrame(schema=BRONZE_SCHEMA)
    return pl.scan_parquet(path).filter(pl.col("dealer_id").is_in(dealers)).collect()


@flow(name="partner-silver", flow_run_name="silver-{partner_uuid}")
def partner_silver(partner_uuid: PartnerUUID) -> dict[str, object]:
    partner = parse_partner_uuid(partner_uuid)
    tag_current_run(partner, "silver")
    with partner_slot(partner):
        dealers = partner_dealers(partner)
        rows = read_bronze_rows(dealers)
        aggregated = billing_usage_aggregated(rows, partner)
        monthly = billing_monthly_usage_by_service(aggregated, partner)
        root = lake_root()
        for table, frame in zip(SILVER_TABLES, (aggregated, monthly)):
            write_parquet_atomic(frame, partition_path(root, "silver", table, partner))
    get_run_logger().info(
        "Silver for partner %s: %d dealer(s), %d bronze row(s) -> %d daily and %d monthly row(s)",
        partner, len(dealers), rows.height, aggregated.height, monthly.height,
    )
    return {"partner": partner, "dealers": dealers, "bronze_rows": rows.height, "aggregated_rows": aggregated.height}
