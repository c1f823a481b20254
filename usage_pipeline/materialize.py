"""Building each layer's files, without Prefect: the flows wrap these, the tests call them too."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import polars as pl

from usage_pipeline.detection import DealerStats
from usage_pipeline.lake import GOLD_TABLES, SILVER_TABLES, LakePath, bronze_path, partition_path, write_parquet_atomic
from usage_pipeline.transforms import (
    BRONZE_SCHEMA,
    active_services,
    billing_monthly_usage_by_service,
    billing_usage_aggregated,
    dealer_stats,
    merge_bronze,
    usage_report,
)

Extract = Callable[[list[int] | None], pl.DataFrame]


@dataclass(frozen=True)
class BronzeResult:
    mode: Literal["full", "slice"]  # slice: only `dealers` were re-read and replaced
    dealers: list[int] | None
    extracted_rows: int
    rows: int  # in the bronze file now
    path: str

    def describe(self) -> str:
        return "full" if self.mode == "full" else f"{len(self.dealers or [])} dealer(s)"


@dataclass(frozen=True)
class SilverResult:
    partner: str
    dealers: list[int]
    bronze_rows: int
    aggregated_rows: int
    monthly_rows: int


@dataclass(frozen=True)
class GoldResult:
    partner: str
    usage_report_rows: int
    active_services_rows: int


def refresh_bronze(
    root: LakePath, extract: Extract, dealer_ids: list[int] | None
) -> tuple[BronzeResult, pl.DataFrame]:
    """Full refresh (no dealers, or no bronze yet), else replace only the dealers' slice.
    Returns the frame written too: what the file now holds, for a caller that keeps it."""
    path = bronze_path(root)
    dealers = None if dealer_ids is None or not path.exists() else sorted(set(dealer_ids))
    fresh = extract(dealers)
    frame = fresh if dealers is None else merge_bronze(pl.read_parquet(path), fresh, dealers)
    write_parquet_atomic(frame, path)
    return BronzeResult("full" if dealers is None else "slice", dealers, fresh.height, frame.height, str(path)), frame


def bronze_dealer_stats(root: LakePath, bronze: pl.DataFrame | None = None) -> dict[int, DealerStats]:
    """Every dealer's relevant-row stats from the bronze a full refresh just wrote: the frame it
    returned if the caller kept it, else read back from the file."""
    return dealer_stats(pl.scan_parquet(bronze_path(root)) if bronze is None else bronze.lazy())


def read_bronze_rows(root: LakePath, dealers: list[int], bronze: pl.DataFrame | None = None) -> pl.DataFrame:
    """The dealers' bronze rows, from `bronze` (what the file holds, kept in memory) or from the file,
    where row-group statistics on dealer_id let the scan skip the rest."""
    path = bronze_path(root)
    if bronze is None and not path.exists():
        raise FileNotFoundError(f"bronze file {path} is missing; run billing-usage-raw first")
    if not dealers:
        return pl.DataFrame(schema=BRONZE_SCHEMA)
    rows = pl.scan_parquet(path) if bronze is None else bronze.lazy()
    return rows.filter(pl.col("dealer_id").is_in(dealers)).collect()


def build_silver(root: LakePath, partner: str, dealers: list[int], bronze: pl.DataFrame | None = None) -> SilverResult:
    rows = read_bronze_rows(root, dealers, bronze)
    aggregated = billing_usage_aggregated(rows, partner)
    monthly = billing_monthly_usage_by_service(aggregated, partner)
    for table, frame in zip(SILVER_TABLES, (aggregated, monthly), strict=True):
        write_parquet_atomic(frame, partition_path(root, "silver", table, partner))
    return SilverResult(partner, dealers, rows.height, aggregated.height, monthly.height)


def build_gold(root: LakePath, partner: str) -> GoldResult:
    silver = partition_path(root, "silver", SILVER_TABLES[0], partner)
    if not silver.exists():
        raise FileNotFoundError(f"silver file {silver} is missing; run partner-silver for {partner} first")
    aggregated = pl.read_parquet(silver)
    report = usage_report(aggregated, partner)
    active = active_services(aggregated, partner)
    for table, frame in zip(GOLD_TABLES, (report, active), strict=True):
        write_parquet_atomic(frame, partition_path(root, "gold", table, partner))
    return GoldResult(partner, report.height, active.height)
