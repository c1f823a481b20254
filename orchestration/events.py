"""The pipeline's Prefect events (CONTRACT.md section 8): one per tick, one per partition found pending,
one per partition rebuild; and one per slice of the rolling reconciliation.

Operators see them in the UI's Event Feed and build automations on them; `usage-pipeline
setup` creates three (orchestration/alerts.py). Emitted from the tick's run (or a partner run
started by hand), so Prefect relates each event to that run, its flow and deployment by itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from prefect.events import emit_event
from prefect.runtime import flow_run as current_flow_run

from usage_pipeline.check_results import CheckResult, ChecksFailed, as_payload
from usage_pipeline.cursor import Cursor, PartitionStatus, format_timestamp, parse_cursor, utc_now
from usage_pipeline.detection import partition_freshness
from usage_pipeline.lake import read_state_document
from usage_pipeline.settings import load_settings

if TYPE_CHECKING:
    from datetime import datetime

    from usage_pipeline.detection import Plan, RunOutcome
    from usage_pipeline.reconciliation import ReconciliationReport
    from usage_pipeline.tick_report import TickReport

TICK_EVENT = "usage.detection.tick"
RECONCILIATION_EVENT = "usage.reconciliation.slice"
RECONCILIATION_RESOURCE = "usage.reconciliation"
TICK_RESOURCE = "usage.detection"
PENDING_EVENT = "usage.partition.pending"
MATERIALIZED_EVENT = "usage.partition.materialized"
FAILED_EVENT = "usage.partition.failed"
PARTITION_RESOURCE_PREFIX = "usage.partition."
# Resource label with the partition's consecutive failed ticks: automations match it exactly
# (usage-partition-failing fires once, on the tick that reaches its threshold).
FAILURES_LABEL = "usage.consecutive-failures"
PARTNER_LABEL = "usage.partner"
# Resource label naming the pending episode (PartitionStatus.episode): usage-partition-stale keeps one
# window per partition and episode, opened by its pending event and closed by its materialized one.
EPISODE_LABEL = "usage.episode"


def partition_resource(partner: str, episode: str, failures: int) -> dict[str, str]:
    """The resource of every partition event, whoever emits it: the alerts match and bucket on its labels."""
    return {
        "prefect.resource.id": f"{PARTITION_RESOURCE_PREFIX}{partner}",
        "prefect.resource.name": f"partner {partner}",
        PARTNER_LABEL: partner,
        FAILURES_LABEL: str(failures),
        EPISODE_LABEL: episode,
    }


def freshness_lags(cursor: Cursor | None, now: datetime) -> dict[str, float]:
    """Every known partition's lag in seconds (PartitionStatus.lag_seconds), as the freshness artifact lists them."""
    if cursor is None:
        return {}
    return {row.partner: round(row.status.lag_seconds(now), 3) for row in partition_freshness(cursor)}


def emit_tick_event(report: TickReport, duration_seconds: float) -> None:
    plan = report.plan
    outcomes = report.partitions.values()
    emit_event(
        event=TICK_EVENT,
        resource={"prefect.resource.id": TICK_RESOURCE, "prefect.resource.name": "usage-change-detection"},
        payload={
            "summary": report.summary(),
            "dealers_changed": len(plan.dealer_changes) if plan else 0,
            "partitions": len(plan.partitions) if plan else 0,
            "ok": sum(o.ok for o in outcomes),
            "failed": sum(not o.ok for o in outcomes) + (len(plan.partitions) - len(report.partitions)
                                                         if plan and report.bronze and not report.bronze.ok else 0),
            "duration_seconds": round(duration_seconds, 3),
            "source_query_seconds": round(report.source_seconds, 3) if report.source_seconds is not None else None,
            # Dealers the rolling reconciliation found changed that this tick re-checked; how late its cycle is.
            "reconciliation_suspects": len(report.suspects),
            "reconciliation_overdue_seconds": report.reconciliation_overdue_seconds,
            "dry_run": report.dry_run,
            "skipped": report.skipped,
            "bronze": report.bronze_table,
            "freshness_lag_seconds": freshness_lags(report.cursor, utc_now()),
        },
    )


def emit_reconciliation_event(report: ReconciliationReport) -> None:
    done = report.slice
    emit_event(
        event=RECONCILIATION_EVENT,
        resource={"prefect.resource.id": RECONCILIATION_RESOURCE, "prefect.resource.name": "usage-reconciliation"},
        payload={
            "summary": report.summary(),
            "reconciled_dealers": len(done.dealers),
            "known_dealers": done.known,
            "cycle_percent": done.cycle_percent,
            "cycle_completed": done.completes,
            "changed": {str(dealer): reason for dealer, reason in report.changed.items()},
            "source_query_seconds": round(report.seconds, 3),
        },
    )


def emit_pending_events(cursor: Cursor, plan: Plan, partners: list[str], now: datetime) -> None:
    """Each partition this tick newly found needing a rebuild, before its runs: usage-partition-stale
    fires when no materialized event of the same episode follows in time, whether or not ticks go on."""
    for partner in partners:
        status = cursor.partitions.get(partner, PartitionStatus())
        emit_event(
            event=PENDING_EVENT,
            resource=partition_resource(partner, status.episode, status.failures),
            payload={
                "partner": partner,
                "pending_since": format_timestamp(now),
                "last_published": format_timestamp(status.materialized_at),
                "reasons": plan.partitions[partner],
            },
        )


def emit_partition_events(report: TickReport) -> None:
    """After the cursor advanced: each planned partition, rebuilt or failed (bronze failing fails them all),
    with the episode it belonged to when the tick started (a materialized event closes it)."""
    if report.plan is None or report.dry_run or report.cursor is None:
        return
    for partner in report.plan.partitions:
        # A partner that no longer exists and was emptied has no status left: it was published.
        status = report.cursor.partitions.get(partner, PartitionStatus())
        outcome = report.partitions.get(partner)
        runs: list[tuple[str, RunOutcome | None]] = [("silver", outcome.silver if outcome else None),
                                                    ("gold", outcome.gold if outcome else None)]
        dealers = sorted(d for d, parts in report.plan.dealer_partitions.items() if partner in parts)
        emit_event(
            event=FAILED_EVENT if status.failures else MATERIALIZED_EVENT,
            resource=partition_resource(partner, report.episodes[partner], status.failures),
            related=[
                {"prefect.resource.id": f"prefect.flow-run.{run.flow_run_id}", "prefect.resource.role": layer,
                 "prefect.resource.name": run.name}
                for layer, run in runs
                if run is not None and run.flow_run_id
            ],
            payload={
                "partner": partner,
                "dealers": dealers,
                "rows": outcome.silver.rows if outcome else None,
                "source_watermark": format_timestamp(status.source_watermark),
                "consecutive_failures": status.failures,
                "last_error": status.last_error,
                "reasons": report.plan.partitions[partner],
                "checks": as_payload(outcome.checks if outcome else ()),
            },
        )


@contextmanager
def partition_event_if_manual(partner: str, publishes: bool = True) -> Iterator[list[CheckResult]]:
    """Around a partner-silver or partner-gold run started by hand (no parent run) that `publishes`:
    the partition event a tick would emit, with the check results the body collects, or those it
    failed with. Runs of a tick, or a cascading silver's gold, leave that to their parent; a silver
    started by hand only to stage (`publish=false, cascade=false`) publishes nothing to announce."""
    checks: list[CheckResult] = []
    if current_flow_run.parent_flow_run_id or not publishes:
        yield checks
        return
    try:
        yield checks
    except Exception as exc:
        failed = checks + list(exc.results if isinstance(exc, ChecksFailed) else ())
        _emit_manual(FAILED_EVENT, partner, failed, f"{type(exc).__name__}: {exc}")
        raise
    _emit_manual(MATERIALIZED_EVENT, partner, checks, None)


def _emit_manual(event: str, partner: str, checks: list[CheckResult], error: str | None) -> None:
    """With the episode and failure count the pipeline's state records: a manual publish closes the
    pending episode a tick opened."""
    state, _ = read_state_document(load_settings().lake_path)
    status = parse_cursor(None, state)[0].partitions.get(partner, PartitionStatus())
    emit_event(
        event=event,
        resource=partition_resource(partner, status.episode, status.failures),
        payload={"partner": partner, "manual_run": current_flow_run.name, "last_error": error,
                 "consecutive_failures": status.failures, "checks": as_payload(checks)},
    )
