"""The checks that gate a partition's publish: plain functions of the frames about to be published.

Sums are compared exactly, in the contract's DECIMAL(18,4) units. Their results and severity:
usage_pipeline/check_results.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Context, Decimal

import polars as pl

from usage_pipeline.check_results import RECONCILIATION_SOURCE, RECONCILIATION_TOTALS, CheckResult
from usage_pipeline.detection import DealerStats
from usage_pipeline.transforms import (
    ACTIVE_SERVICES_SCHEMA,
    AGGREGATED_SCHEMA,
    MONEY,
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


EXACT = Context(prec=60)  # sums of DECIMAL(18,4) over billions of rows, with no rounding
MONEY_SUM = pl.Decimal(38, MONEY.scale)  # what a MONEY column is summed as: a sum outgrows 18 digits


@dataclass
class UsageTotals:
    """Rows and money sums of some usage rows; a full extract adds each range as it reads it."""

    rows: int = 0
    quantity: Decimal = Decimal(0)
    amount: Decimal = Decimal(0)

    def add(self, frame: pl.DataFrame) -> None:
        self.rows += frame.height
        self.quantity = EXACT.add(self.quantity, frame["quantity"].cast(MONEY_SUM).sum() or Decimal(0))
        self.amount = EXACT.add(self.amount, frame["amount"].cast(MONEY_SUM).sum() or Decimal(0))

    def to_json(self) -> dict[str, object]:
        return {"rows": self.rows, "quantity": str(self.quantity), "amount": str(self.amount)}

    @classmethod
    def from_json(cls, value: dict[str, object]) -> UsageTotals:
        return cls(int(value["rows"]), Decimal(str(value["quantity"])), Decimal(str(value["amount"])))


@dataclass
class ExtractRead:
    """What a full extract read, range by range: every `usage` row, and the relevant ones it kept as the
    join gave them (before they were cast, spilled and written). Its bronze commit records it
    (`bronze.READ_KEY`)."""

    every: UsageTotals = field(default_factory=UsageTotals)
    kept: UsageTotals = field(default_factory=UsageTotals)

    def to_json(self) -> str:
        return json.dumps({"every": self.every.to_json(), "kept": self.kept.to_json()})

    @classmethod
    def from_json(cls, text: str) -> ExtractRead:
        value = json.loads(text)
        return cls(UsageTotals.from_json(value["every"]), UsageTotals.from_json(value["kept"]))


@dataclass(frozen=True)
class SourceTotals:
    """What the source answers without fetching a usage row by key: every `usage` row (one scan of the
    table), and the relevant rows' count and usage_id sum (the (customer, service) index against the
    service rows). The one join that would sum the relevant rows' money fetches every usage row by key
    instead: 174 s at K = 10 (bench/README.md)."""

    usage: UsageTotals
    relevant_rows: int
    relevant_id_sum: int


@dataclass(frozen=True)
class ExtractTotals:
    """A full extract as committed: what it read, and what the table holds at its version (the relevant
    rows: count, money sums and usage_id sum)."""

    read: ExtractRead
    table: UsageTotals
    table_id_sum: int


def totals_parts(source: SourceTotals, extract: ExtractTotals) -> list[tuple[str, str, str]]:
    """(name, expected, actual) of each thing the start-over check compares: every usage row, as the source
    scans it and as the extract read it; the relevant rows, as the source counts them and as the table
    holds them; their money, as the extract read it and as the table holds it."""
    source_usage, read = source.usage, extract.read.every
    kept, table = extract.read.kept, extract.table
    return [
        ("usage read",
         f"usage {totals_text(source_usage.rows, source_usage.quantity, source_usage.amount)}",
         f"usage {totals_text(read.rows, read.quantity, read.amount)}"),
        ("relevant rows",
         f"relevant rows={source.relevant_rows} usage_id_sum={source.relevant_id_sum}",
         f"relevant rows={table.rows} usage_id_sum={extract.table_id_sum}"),
        ("relevant money",
         f"relevant quantity={_money(kept.quantity)} amount={_money(kept.amount)}",
         f"relevant quantity={_money(table.quantity)} amount={_money(table.amount)}"),
    ]


def totals_check(source: SourceTotals, extract: ExtractTotals) -> CheckResult:
    """A lost or doubled range, a money value changed as it was read, a relevant row the join or the write
    dropped or added, or a kept row's money changed before it was written fails it; `actual` names the
    parts that differ."""
    parts = totals_parts(source, extract)
    differing = [name for name, expected, actual in parts if expected != actual]
    actual = "; ".join(a for _, _, a in parts) + (f" (differs: {', '.join(differing)})" if differing else "")
    return CheckResult(RECONCILIATION_TOTALS, "; ".join(e for _, e, _ in parts), actual, not differing)


def unexplained_by_the_source(before: SourceTotals, after: SourceTotals, extract: ExtractTotals) -> bool:
    """Whether a part of the extract differs from the source's second answer though the source's answer to
    that part did not move between the two: the extract is wrong, not the source busy meanwhile."""
    return any(expected_after != actual and expected_before == expected_after
               for (_, expected_before, _), (_, expected_after, actual)
               in zip(totals_parts(before, extract), totals_parts(after, extract), strict=True))


