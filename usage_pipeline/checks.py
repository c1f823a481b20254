"""The checks that gate a partition's publish: plain functions of the frames about to be published.

Sums are compared exactly, in the contract's DECIMAL(18,4) units. Their results and severity:
usage_pipeline/check_results.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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


@dataclass
class UsageTotals:
    """Rows and money sums of `usage` rows, relevant or not; a full extract adds each range it reads."""

    rows: int = 0
    quantity: Decimal = Decimal(0)
    amount: Decimal = Decimal(0)

    def add(self, frame: pl.DataFrame) -> None:
        self.rows += frame.height
        self.quantity += frame["quantity"].sum() or 0
        self.amount += frame["amount"].sum() or 0

    def to_json(self) -> str:
        return json.dumps({"rows": self.rows, "quantity": str(self.quantity), "amount": str(self.amount)})

    @classmethod
    def from_json(cls, text: str) -> UsageTotals:
        value = json.loads(text)
        return cls(int(value["rows"]), Decimal(value["quantity"]), Decimal(value["amount"]))


@dataclass(frozen=True)
class ExtractTotals:
    """A start-over tick's whole extract in two halves, each of which the source answers without fetching
    a usage row by key: every `usage` row read (one scan of the table), and the relevant rows' count and
    usage_id sum (the (customer, service) index against the service rows). The one join that would sum
    the relevant rows' money fetches every usage row by key instead: 174 s at K = 10 (bench/README.md)."""

    usage: UsageTotals
    relevant_rows: int
    relevant_id_sum: int

    def describe(self) -> str:
        u = self.usage
        return (f"usage {totals_text(u.rows, u.quantity, u.amount)};"
                f" relevant rows={self.relevant_rows} usage_id_sum={self.relevant_id_sum}")


def totals_check(source: ExtractTotals, extracted: ExtractTotals) -> CheckResult:
    """The rows a start-over extract read and the rows it kept, against the source's count of both: a lost
    or doubled range, a money value changed on its way in, or a relevant row dropped or added by the join
    or the write fails it."""
    return compare(RECONCILIATION_TOTALS, source.describe(), extracted.describe())


