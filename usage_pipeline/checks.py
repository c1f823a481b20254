"""The checks that gate a partition's publish: plain functions of the frames about to be published.

Sums are compared exactly, in the contract's DECIMAL(18,4) units. Their results and severity:
usage_pipeline/check_results.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal

import polars as pl

from usage_pipeline.check_results import RECONCILIATION_SOURCE, RECONCILIATION_TOTALS, CheckResult
from usage_pipeline.detection import DealerStats
from usage_pipeline.transforms import (
    ACTIVE_SERVICES_SCHEMA,
    AGGREGATED_SCHEMA,
    MONTHLY_BY_SERVICE_SCHEMA,
    USAGE_REPORT_SCHEMA,
)

SCHEMAS = {
    "billing_usage_aggregated": AGGREGATED_SCHEMA,
    "billing_monthly_usage_by_service": MONTHLY_BY_SERVICE_SCHEMA,
    "usage_report": USAGE_REPORT_SCHEMA,
    "active_services": ACTIVE_SERVICES_SCHEMA,
}
KEYS = {
    "billing_usage_aggregated": ("dealer_id", "customer_id", "service_id", "usage_date"),
    "billing_monthly_usage_by_service": ("month", "service_id"),
    "usage_report": ("month", "dealer_id"),
    "active_services": ("dealer_id", "customer_id", "service_id"),
}


def _money(value: object) -> str:
    """A sum in DECIMAL(18,4) units, the same text whichever side computed it."""
    return "0.0000" if value is None else f"{Decimal(str(value)):.4f}"


def totals_text(rows: int, quantity: object, amount: object) -> str:
    return f"rows={rows} quantity={_money(quantity)} amount={_money(amount)}"


def sums(frame: pl.DataFrame) -> str:
    return f"quantity={_money(frame['quantity'].sum())} amount={_money(frame['amount'].sum())}"


def frame_totals(frame: pl.DataFrame, rows_column: str | None = "usage_rows") -> str:
    """Usage rows (a row count, or the sum of a count column) and the sums, as one comparable text."""
    rows = frame.height if rows_column is None else int(frame[rows_column].sum())
    return totals_text(rows, frame["quantity"].sum(), frame["amount"].sum())


def compare(name: str, expected: str, actual: str) -> CheckResult:
    return CheckResult(name, expected, actual, expected == actual)


def duplicate_keys(frame: pl.DataFrame, keys: tuple[str, ...]) -> int:
    """Rows beyond the first of each key. The transforms sort their output by its key, so comparing
    neighbours is one cheap pass; a frame in another order, or with null keys, is counted by hashing."""
    if frame.height < 2:
        return 0
    lower, equal = pl.lit(False), pl.lit(True)
    for key in keys:
        before = pl.col(key).shift()
        lower = lower | (equal & (before < pl.col(key)))
        equal = equal & (before == pl.col(key))
    ordered, duplicates, nulls = frame.select(
        (lower | equal).slice(1).all().alias("ordered"), equal.slice(1).sum().alias("duplicates"),
        pl.any_horizontal(pl.col(keys).is_null()).any().alias("nulls"),
    ).row(0)
    if ordered and not nulls:
        return int(duplicates)
    return frame.height - frame.select(keys).unique().height


def grain_check(table: str, frame: pl.DataFrame) -> CheckResult:
    keys = KEYS[table]
    duplicates = duplicate_keys(frame, keys)
    return CheckResult(f"grain.{table}", f"0 duplicate ({', '.join(keys)})", f"{duplicates} duplicate(s)",
                       duplicates == 0)


def schema_check(table: str, frame: pl.DataFrame) -> CheckResult:
    expected = dict(SCHEMAS[table])
    actual = dict(frame.schema)
    diff = [f"{c}: {actual.get(c, 'missing')}" for c in expected if actual.get(c) != expected[c]]
    diff += [f"{c}: unexpected" for c in actual if c not in expected]
    if not diff and list(actual) != list(expected):
        diff = [f"columns in the order {', '.join(actual)}"]
    return CheckResult(f"schema.{table}", "the README's lake schema", "; ".join(diff) or "as documented", not diff)


def shape_checks(tables: Mapping[str, pl.DataFrame]) -> list[CheckResult]:
    return [check(table, frame) for table, frame in tables.items() for check in (grain_check, schema_check)]


def silver_checks(bronze_rows: pl.DataFrame, aggregated: pl.DataFrame, monthly: pl.DataFrame) -> list[CheckResult]:
    """Bronze rows -> daily aggregate -> monthly by service: row counts and sums carry through."""
    daily = frame_totals(aggregated)
    return [
        compare("conservation.aggregated", frame_totals(bronze_rows, None), daily),
        compare("conservation.monthly", daily, frame_totals(monthly)),
        *shape_checks({"billing_usage_aggregated": aggregated, "billing_monthly_usage_by_service": monthly}),
    ]


def gold_checks(aggregated: pl.DataFrame, report: pl.DataFrame, active: pl.DataFrame) -> list[CheckResult]:
    """The report's sums are the aggregate's; the active services are exactly the latest month's."""
    newest = aggregated["usage_date"].max()
    latest = aggregated.filter(pl.col("usage_date") >= newest.replace(day=1)) if newest else aggregated.clear()
    services = latest.height - duplicate_keys(latest, KEYS["active_services"])
    amount = latest["amount"].sum()
    return [
        compare("conservation.usage_report", sums(aggregated), sums(report)),
        compare("conservation.active_services", f"{services} service(s), amount={_money(amount)}",
                f"{active.height} service(s), amount={_money(active['amount'].sum())}"),
        *shape_checks({"usage_report": report, "active_services": active}),
    ]


def mismatched(expected: Mapping[int, DealerStats], actual: Mapping[int, DealerStats], dealers: Iterable[int]) -> list[int]:
    """Dealers whose bronze rows do not match the fingerprint the source gave (absent: no relevant rows)."""
    def text(stats: Mapping[int, DealerStats], dealer: int) -> str:
        return stats[dealer].fingerprint if dealer in stats else "no rows"

    return sorted(d for d in dealers if text(expected, d) != text(actual, d))


def reconciliation_check(expected: Mapping[int, DealerStats], actual: Mapping[int, DealerStats],
                         dealers: list[int]) -> CheckResult:
    """The partner's changed dealers: bronze's count and sums against the source's fingerprints."""
    wrong = mismatched(expected, actual, dealers)

    def shown(stats: Mapping[int, DealerStats]) -> str:
        return ", ".join(f"{d}={stats[d].fingerprint if d in stats else 'no rows'}" for d in wrong)

    if not wrong:
        return CheckResult(RECONCILIATION_SOURCE, f"{len(dealers)} dealer(s) as the source",
                           f"{len(dealers)} dealer(s) match", True)
    return CheckResult(RECONCILIATION_SOURCE, shown(expected), shown(actual), False)


def totals_check(source: tuple[int, object, object], bronze: tuple[int, object, object]) -> CheckResult:
    """A start-over tick's whole extract against one aggregate query of the source: (rows, quantity, amount)."""
    return compare(RECONCILIATION_TOTALS, totals_text(*source), totals_text(*bronze))


