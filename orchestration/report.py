"""What a tick shows operators in the Prefect UI: its runs and every partition's freshness."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect.artifacts import create_table_artifact

from usage_pipeline.cursor import Cursor, format_timestamp, utc_now
from usage_pipeline.detection import partition_freshness

if TYPE_CHECKING:
    from datetime import datetime

    from usage_pipeline.tick_report import TickReport


def tick_rows(report: TickReport) -> list[dict[str, object]]:
    """One row per triggered partition: why, and how its runs ended."""
    if report.plan is None:
        return []
    dealers_of: dict[str, list[int]] = {}
    for dealer, partners in report.plan.dealer_partitions.items():
        for partner in partners:
            dealers_of.setdefault(partner, []).append(dealer)
    rows = []
    for partner, reasons in report.plan.partitions.items():
        outcome = report.partitions.get(partner)
        rows.append(
            {
                "partner": partner,
                "dealers": ", ".join(map(str, sorted(dealers_of.get(partner, [])))) or "-",
                "why": "; ".join(reasons),
                "silver": outcome.silver.state if outcome else ("dry run" if report.dry_run else "not run"),
                "gold": outcome.gold.state if outcome and outcome.gold else "not run",
                "error": (outcome.error or "") if outcome else "",
            }
        )
    return rows


def check_rows(report: TickReport) -> list[dict[str, object]]:
    """One row per partition and check (and bronze's start-over totals check), with its numbers."""
    runs = [("-", "bronze", report.bronze)] if report.bronze else []
    for partner, outcome in report.partitions.items():
        runs += [(partner, "silver", outcome.silver), (partner, "gold", outcome.gold)]
    return [
        {"partner": partner, "layer": layer, "check": check.name, "expected": check.expected, "actual": check.actual,
         "passed": check.passed, "severity": "blocking" if check.blocking else "warning"}
        for partner, layer, run in runs
        if run is not None
        for check in run.checks
    ]


def freshness_rows(cursor: Cursor, now: datetime, pending: frozenset[str] = frozenset()) -> list[dict[str, object]]:
    """One row per known partition: its dealers, fresh or stale, how long it has waited for a rebuild as of
    `now`, last success, the watermark it reflects."""
    return [
        {
            "partner": row.partner,
            "dealers": ", ".join(map(str, row.dealers)) or "-",
            "state": row.state if row.stale_because is None else f"stale: {row.stale_because}",
            "lag_seconds": round(row.status.lag_seconds(now)),
            "last_success": format_timestamp(row.status.materialized_at) or "never",
            "source_watermark": format_timestamp(row.status.source_watermark) or "-",
            "failed_ticks": row.status.failures,
            "checks": row.status.checks or "-",
            "last_error": row.status.last_error or "",
        }
        for row in partition_freshness(cursor, pending)
    ]


def publish_tick_artifacts(report: TickReport) -> None:
    summary = report.summary()
    create_table_artifact(
        key="usage-tick-runs", table=tick_rows(report) or [{"partner": "-", "why": summary}], description=summary
    )
    if checks := check_rows(report):
        failed = sum(not row["passed"] for row in checks)
        create_table_artifact(key="usage-tick-checks", table=checks,
                              description=f"Checks: {len(checks) - failed} passed, {failed} failed")
    pending = frozenset(report.plan.partitions) if report.plan and report.dry_run else frozenset()
    rows = freshness_rows(report.cursor, utc_now(), pending) if report.cursor else []
    if rows:
        create_table_artifact(key="usage-partition-freshness", table=rows, description="Partition freshness")
