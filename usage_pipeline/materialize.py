"""Building each layer's files, without Prefect: the flows wrap these, the tests call them too."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import polars as pl

from usage_pipeline import bronze
from usage_pipeline.bronze import is_table, migrate_legacy, replace_dealers, write_all_spilled
from usage_pipeline.detection import DealerStats
from usage_pipeline.lake import GOLD_TABLES, SILVER_TABLES, LakePath, bronze_path, partition_path, write_parquet_atomic
from usage_pipeline.transforms import (
    active_services,
    billing_monthly_usage_by_service,
    billing_usage_aggregated,
    dealer_stats,
    finish_dealer_stats,
    partial_dealer_stats,
    usage_report,
)

# Some dealers' rows as one frame; None: all of them, as a frame or a stream of batches in any order.
Extract = Callable[[list[int] | None], pl.DataFrame | Iterable[pl.DataFrame]]


@dataclass(frozen=True)
class BronzeResult:
    mode: Literal["full", "slice"]  # slice: only `dealers` were re-read and replaced
    dealers: list[int] | None
    extracted_rows: int
    rows: int  # in the table now
    path: str
    version: int  # the table version this write committed: the tick's silver runs read that one
    written_rows: int  # rows in the files the commit added: the slice's cost
    migrated: bool = False  # an old `data.parquet` bronze was turned into the table first
    maintenance: dict | None = None  # what `bronze.maintain` did after this write, if it was due
    # A full refresh's per-dealer stats, counted from its extract: a start-over tick needs no second read.
    stats: dict[int, DealerStats] | None = field(default=None, repr=False, compare=False)

    def describe(self) -> str:
        return "full" if self.mode == "full" else f"{len(self.dealers or [])} dealer(s)"


@dataclass(frozen=True)
class SilverResult:
    partner: str
    dealers: list[int]
    bronze_rows: int
    aggregated_rows: int
    monthly_rows: int
    bronze_version: int | None = None  # None: the newest (a manual run)


@dataclass(frozen=True)
class GoldResult:
    partner: str
    usage_report_rows: int
    active_services_rows: int


def refresh_bronze(root: LakePath, extract: Extract, dealer_ids: list[int] | None,
                   metadata: dict[str, str] | None = None) -> BronzeResult:
    """Full refresh (no dealers, or no table yet), else replace only the dealers' rows: one commit,
    after migrating an old-layout bronze if there is one. The caller holds the bronze slot."""
    migrated = migrate_legacy(root, metadata)
    dealers = None if dealer_ids is None or not is_table(root) else sorted(set(dealer_ids))
    if dealers is not None:
        fresh = extract(dealers)
        write = replace_dealers(root, fresh, dealers, metadata)
        return BronzeResult("slice", dealers, fresh.height, write.rows, str(bronze_path(root)), write.version,
                            write.written_rows, migrated)
    extracted = extract(None)
    partials: list[pl.DataFrame] = []

    def counted() -> Iterator[pl.DataFrame]:
        """Each batch's stats as it streams past: no second read of the extract."""
        for batch in [extracted] if isinstance(extracted, pl.DataFrame) else extracted:
            partials.append(partial_dealer_stats(batch.lazy()).collect())
            yield batch

    write = write_all_spilled(root, counted(), metadata)
    stats = finish_dealer_stats(pl.concat(partials).lazy()) if partials else {}
    return BronzeResult("full", None, write.rows, write.rows, str(bronze_path(root)), write.version,
                        write.written_rows, migrated, stats=stats)


def bronze_dealer_stats(root: LakePath, version: int) -> dict[int, DealerStats]:
    """Every dealer's relevant-row stats from the bronze version a full refresh committed (for a
    deployment run, whose counted stats stay in its own process)."""
    return dealer_stats(bronze.scan(root, version))


def build_silver(root: LakePath, partner: str, dealers: list[int], bronze_version: int | None = None) -> SilverResult:
    """From the partner's dealers' rows of bronze at `bronze_version`: a tick's silver runs read the
    version its bronze run committed, whatever was written since."""
    if not is_table(root):
        raise FileNotFoundError(f"bronze table {bronze_path(root)} is missing; run billing-usage-raw first")
    rows = bronze.read_dealers(root, dealers, bronze_version)
    aggregated = billing_usage_aggregated(rows, partner)
    monthly = billing_monthly_usage_by_service(aggregated, partner)
    for table, frame in zip(SILVER_TABLES, (aggregated, monthly), strict=True):
        write_parquet_atomic(frame, partition_path(root, "silver", table, partner))
    return SilverResult(partner, dealers, rows.height, aggregated.height, monthly.height, bronze_version)


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
