"""Building each layer's files, without Prefect: the flows wrap these, the tests call them too."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Literal

import polars as pl

from usage_pipeline import bronze
from usage_pipeline.bronze import is_table, migrate_legacy, replace_dealers, write_all_spilled
from usage_pipeline.check_results import RECONCILIATION_SOURCE, CheckResult, SourceMoved, as_json, gate
from usage_pipeline.checks import (
    MONEY_SUM,
    ExtractRead,
    ExtractTotals,
    UsageTotals,
    gold_checks,
    mismatched,
    reconciliation_check,
    silver_checks,
)
from usage_pipeline.detection import DealerStats
from usage_pipeline.lake import (
    GOLD_TABLES,
    SILVER_TABLES,
    LakePath,
    bronze_path,
    partition_path,
    provenance,
    provenance_metadata,
    remove_staging,
    staged_path,
    write_parquet_atomic,
)
from usage_pipeline.lake import publish as lake_publish
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
    bronze_version: int  # the version it read
    publish_id: str  # its staging directory, and the provenance of the files published from it
    published: bool  # False: staged for the gold run that follows, which publishes all four files
    checks: tuple[CheckResult, ...] = ()


@dataclass(frozen=True)
class GoldResult:
    partner: str
    usage_report_rows: int
    active_services_rows: int
    publish_id: str
    published_tables: tuple[str, ...]  # gold's two, and silver's two when it published a staged silver
    checks: tuple[CheckResult, ...] = ()


@dataclass(frozen=True)
class SourceFingerprints:
    """What a tick's source query said of the partner's dealers it checked, before the extract (absent:
    no relevant rows), and how to ask the source again after it."""

    expected: dict[int, DealerStats]
    dealers: list[int]
    read_again: Callable[[list[int]], dict[int, DealerStats]] = field(repr=False, compare=False)


def refresh_bronze(root: LakePath, extract: Extract, dealer_ids: list[int] | None,
                   metadata: dict[str, str] | None = None, read: ExtractRead | None = None) -> BronzeResult:
    """Full refresh (no dealers, or no table yet), else replace only the dealers' rows: one commit,
    after migrating an old-layout bronze if there is one. The caller holds the bronze slot. A full
    refresh's commit records `read`, which its extract added up, for the start-over totals check."""
    migrated = migrate_legacy(root, metadata)
    dealers = None if dealer_ids is None or not is_table(root) else sorted(set(dealer_ids))
    if dealers is not None:
        fresh = extract(dealers)
        write = replace_dealers(root, fresh, dealers, metadata)
        return BronzeResult("slice", dealers, fresh.height, write.rows, str(bronze_path(root)), write.version,
                            write.written_rows, migrated)
    extracted = extract(None)
    partials: list[pl.DataFrame] = []
    commit_metadata = dict(metadata or {})

    def counted() -> Iterator[pl.DataFrame]:
        """Each batch's stats as it streams past: no second read of the extract. After the last batch,
        `read` is complete; write_all_spilled commits only after it."""
        for batch in [extracted] if isinstance(extracted, pl.DataFrame) else extracted:
            partials.append(partial_dealer_stats(batch.lazy()).collect())
            yield batch
        if read is not None:
            commit_metadata[bronze.READ_KEY] = read.to_json()

    write = write_all_spilled(root, counted(), commit_metadata)
    stats = finish_dealer_stats(pl.concat(partials).lazy()) if partials else {}
    return BronzeResult("full", None, write.rows, write.rows, str(bronze_path(root)), write.version,
                        write.written_rows, migrated, stats=stats)


def committed_totals(root: LakePath, version: int) -> ExtractTotals:
    """A full refresh's totals as committed at `version`: what its extract read, and what the table holds.
    A commit that recorded no read (not a full refresh's, or an older version's) raises LookupError."""
    read = bronze.commit_metadata(root, version).get(bronze.READ_KEY)
    if read is None:
        raise LookupError(f"bronze version {version}'s commit records no {bronze.READ_KEY}")
    table = bronze.scan(root, version).select(
        pl.len(), *(pl.col(c).cast(MONEY_SUM).sum() for c in ("quantity", "amount")),
        pl.col("usage_id").cast(pl.Int128).sum(),
    ).collect().row(0)
    rows, quantity, amount, id_sum = table
    return ExtractTotals(ExtractRead.from_json(read), UsageTotals(int(rows), quantity or Decimal(0),
                                                                  amount or Decimal(0)), int(id_sum or 0))


def bronze_dealer_stats(root: LakePath, version: int) -> dict[int, DealerStats]:
    """Every dealer's relevant-row stats from the bronze version a full refresh committed (for a
    deployment run, whose counted stats stay in its own process)."""
    return dealer_stats(bronze.scan(root, version))


def reconcile_with_source(partner: str, rows: pl.DataFrame, source: SourceFingerprints,
                          warn_only: frozenset[str] = frozenset()) -> CheckResult:
    """The bronze rows against the source's fingerprints from before the extract, or, for the dealers
    that differ, from after it (the extract caught a change made meanwhile: the next tick sees that
    change again and redoes it). Matching neither while the source moved between the two reads is the
    source changing during the extract: SourceMoved, deferred, unless the check is warn-only."""
    actual = dealer_stats(rows.lazy().filter(pl.col("dealer_id").is_in(source.dealers)))
    result = reconciliation_check(source.expected, actual, source.dealers)
    if result.passed:
        return result
    wrong = mismatched(source.expected, actual, source.dealers)
    after = source.read_again(wrong)
    if not mismatched(after, actual, wrong):
        return replace(result, passed=True, actual=f"{result.actual} (as the source after the extract)")
    if (moved := mismatched(source.expected, after, wrong)) and RECONCILIATION_SOURCE not in warn_only:
        raise SourceMoved(f"source moved: dealer(s) {moved} of partner {partner} changed during the tick;"
                          " deferred to the next tick")
    return result


def build_silver(root: LakePath, partner: str, dealers: list[int], bronze_version: int | None = None,
                 publish_id: str | None = None, publish: bool = True, warn_only: frozenset[str] = frozenset(),
                 source: SourceFingerprints | None = None) -> SilverResult:
    """From the partner's dealers' rows of bronze at `bronze_version` (None: the newest), checked, then
    staged under `publish_id` (the flows pass their run's id); with `publish`, they replace the partner's
    silver files, else the gold run that follows publishes them with its own (`build_gold`)."""
    publish_id = publish_id or new_publish_id()
    if not is_table(root):
        raise FileNotFoundError(f"bronze table {bronze_path(root)} is missing; run billing-usage-raw first")
    version = bronze.newest_version(root) if bronze_version is None else bronze_version
    rows = bronze.read_dealers(root, dealers, version)
    results = [] if source is None else [reconcile_with_source(partner, rows, source, warn_only)]
    aggregated = billing_usage_aggregated(rows, partner)
    monthly = billing_monthly_usage_by_service(aggregated, partner)
    checks = gate(partner, [*results, *silver_checks(rows, aggregated, monthly)], warn_only)
    watermark = rows["usage_modified"].max()
    metadata = provenance_metadata({"publish_id": publish_id, "bronze_version": str(version),
                                    "source_watermark": "none" if watermark is None else watermark.isoformat(),
                                    "checks": as_json(checks)})
    try:
        for table, frame in zip(SILVER_TABLES, (aggregated, monthly), strict=True):
            write_parquet_atomic(frame, staged_path(root, publish_id, "silver", table, partner), metadata)
        if publish:
            lake_publish(root, publish_id, partner, [("silver", table) for table in SILVER_TABLES])
    except BaseException:
        remove_staging(root, publish_id)
        raise
    if publish:
        remove_staging(root, publish_id)
    return SilverResult(partner, dealers, rows.height, aggregated.height, monthly.height, version, publish_id,
                        publish, checks)


def build_gold(root: LakePath, partner: str, staged_silver: str | None = None, publish_id: str | None = None,
               warn_only: frozenset[str] = frozenset()) -> GoldResult:
    """From the silver staged under `staged_silver` (a tick's or a cascading silver run's), then all four
    files published together under that id; without it, from the published silver, gold alone under
    `publish_id`. Whatever fails, the published files stay as they were."""
    publish_as = staged_silver or publish_id or new_publish_id()
    try:
        silver = (staged_path(root, staged_silver, "silver", SILVER_TABLES[0], partner) if staged_silver
                  else partition_path(root, "silver", SILVER_TABLES[0], partner))
        if not silver.exists():
            raise FileNotFoundError(f"silver file {silver} is missing; run partner-silver for {partner} first")
        aggregated = pl.read_parquet(silver)
        report = usage_report(aggregated, partner)
        active = active_services(aggregated, partner)
        checks = gate(partner, gold_checks(aggregated, report, active), warn_only)
        built_from = provenance(silver)
        metadata = provenance_metadata({"publish_id": publish_as, "checks": as_json(checks),
                                        "bronze_version": built_from.get("bronze_version", "unknown"),
                                        "source_watermark": built_from.get("source_watermark", "unknown")})
        for table, frame in zip(GOLD_TABLES, (report, active), strict=True):
            write_parquet_atomic(frame, staged_path(root, publish_as, "gold", table, partner), metadata)
        tables = [("silver", t) for t in SILVER_TABLES if staged_silver] + [("gold", t) for t in GOLD_TABLES]
        lake_publish(root, publish_as, partner, tables)
    finally:
        remove_staging(root, publish_as)
    return GoldResult(partner, report.height, active.height, publish_as, tuple(t for _, t in tables), checks)


def new_publish_id() -> str:
    """For a build outside a flow run (tests, bench): the flows use their run's id."""
    return uuid.uuid4().hex
