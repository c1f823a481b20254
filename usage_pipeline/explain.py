"""Why a dealer did or did not trigger: the seed's "not triggering despite data changes" checks, automated.

Prefect-free: the caller passes a billing connection, the v3 directory, the cursor
and whether detection is scheduled (paused, or without a schedule); `explain_dealer`
returns a plain value whose `lines()` the CLI prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from usage_pipeline.cursor import Cursor, PartitionStatus, format_timestamp
from usage_pipeline.detection import (
    DealerStats,
    SourceSnapshot,
    affected_partitions,
    dealer_reason,
    probe_candidates,
)
from usage_pipeline.queries import as_datetime, relevant_stats
from usage_pipeline.reconciliation import TICK_SECONDS, ReconciliationState, checked_by
from usage_pipeline.schema import (
    RELEVANT_CSA_CATEGORY_IDS,
    RELEVANT_SERVICE,
    RELEVANT_STATUS_IDS,
    RELEVANT_SYSTEM_ID,
    service_data,
    usage,
)

# Whether detection runs by itself: an active schedule, a paused one (or a paused deployment),
# or none at all (`usage-pipeline serve --no-schedule`: ticks run only when started by hand).
DetectionSchedule = Literal["scheduled", "paused", "unscheduled"]


@dataclass(frozen=True)
class DealerRows:
    """One dealer's usage rows, and how many each billing filter excludes (a row may fail several)."""

    total: int
    relevant: int
    without_service_row: int
    other_system: int
    other_status: int
    other_csa_category: int
    raw_max: datetime | None  # MAX(usage_modified) over all its rows
    relevant_max: datetime | None  # ... over its relevant rows (what the cursor compares)


def count(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[int]:
    return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)


def dealer_rows(conn: Connection, dealer: int) -> DealerRows:
    """One pass over the dealer's rows (index on usage_FK_dealer_id), joined to their service rows."""
    joined = usage.outerjoin(
        service_data,
        sa.and_(
            service_data.c.service_data_FK_customer_id == usage.c.usage_FK_customer_id,
            service_data.c.service_data_FK_service_id == usage.c.usage_FK_service_id,
        ),
    )
    has_service = service_data.c.service_data_id.is_not(None)
    relevant = sa.and_(has_service, RELEVANT_SERVICE)
    stmt = (
        sa.select(
            sa.func.count(),
            count(relevant),
            count(~has_service),
            count(has_service & (service_data.c.service_data_system_id != RELEVANT_SYSTEM_ID)),
            count(has_service & service_data.c.service_data_FK_service_status_id.not_in(RELEVANT_STATUS_IDS)),
            count(has_service & service_data.c.service_data_csa_category_id.not_in(RELEVANT_CSA_CATEGORY_IDS)),
            sa.func.max(usage.c.usage_modified),
            sa.func.max(sa.case((relevant, usage.c.usage_modified))),
        )
        .select_from(joined)
        .where(usage.c.usage_FK_dealer_id == dealer)
    )
    total, relevant_rows, no_service, system, status, category, raw_max, relevant_max = conn.execute(stmt).one()
    return DealerRows(
        int(total), int(relevant_rows), int(no_service), int(system), int(status), int(category),
        as_datetime(raw_max), as_datetime(relevant_max),
    )


@dataclass(frozen=True)
class Explanation:
    dealer: int
    rows: DealerRows
    v3_partner: str | None
    in_v3: bool
    cursor_entry: tuple[bool, datetime | None]  # (present, value)
    materialized_under: str | None  # partner its rows were last materialized under (pipeline state)
    state_known: bool
    partition_lag: str  # how long its partner has waited for a rebuild
    reconciliation: str  # where the rolling reconciliation stands, and when it re-checks the dealer
    next_tick: str
    detection_schedule: DetectionSchedule | None  # None: unknown
    hints: list[str]

    def lines(self) -> list[str]:
        rows = self.rows
        present, entry = self.cursor_entry
        partner = self.v3_partner or ("not mapped (dealer_partner_uuid is NULL or malformed)" if self.in_v3
                                      else "not in v3.dealer")
        return [
            f"dealer {self.dealer}",
            f"  usage rows:        {rows.total} in all, {rows.relevant} relevant, {rows.total - rows.relevant} excluded",
            f"    excluded by:     no service-data row {rows.without_service_row},"
            f" service_data_system_id != {RELEVANT_SYSTEM_ID}: {rows.other_system},"
            f" service_data_FK_service_status_id not in {RELEVANT_STATUS_IDS}: {rows.other_status},"
            f" service_data_csa_category_id not in {RELEVANT_CSA_CATEGORY_IDS}: {rows.other_csa_category}",
            f"  MAX(usage_modified): all rows {_show(rows.raw_max)}, relevant rows {_show(rows.relevant_max)}",
            f"  v3 partner:        {partner}",
            f"  cursor entry:      {_show(entry) if present else 'absent'}",
            f"  materialized under: {self.materialized_under or '-'}"
            + ("" if self.state_known else " (no pipeline state: every dealer is re-checked)"),
            f"  partition lag:     {self.partition_lag}",
            f"  reconciliation:    {self.reconciliation}",
            f"  detection:         {_schedule(self.detection_schedule)}",
            f"  next tick:         {self.next_tick}",
            *(f"  why: {hint}" for hint in self.hints),
        ]


def _show(value: datetime | None) -> str:
    return format_timestamp(value) or "NULL"


def _lag(cursor: Cursor, partner: str | None, now: datetime) -> str:
    if partner is None:
        return "- (no partner)"
    status = cursor.partitions.get(partner, PartitionStatus())
    if status.pending_since is None:
        published = format_timestamp(status.materialized_at)
        return f"0 s ({partner} published {published})" if published else f"0 s ({partner} never found pending)"
    return (f"{round(status.lag_seconds(now))} s ({partner} pending since {format_timestamp(status.pending_since)},"
            f" {status.failures} failed tick(s))")


def recheck_time(cursor: Cursor, dealer: int, reconciliation: ReconciliationState, reconcile_seconds: float,
                 now: datetime) -> datetime | None:
    """About when a tick acts on the rolling reconciliation's next check of the dealer's fingerprint (None:
    that time has passed, so the next run takes all that is left, the tick after it acts)."""
    by = checked_by(dealer, cursor.known_dealers, reconciliation.cycle_started_at, reconciliation.next_dealer,
                    reconcile_seconds)
    return None if by is None or by <= now else by + timedelta(seconds=TICK_SECONDS)


def _rebuilt_by(cursor: Cursor, dealer: int, reconciliation: ReconciliationState | None, reconcile_seconds: float,
                now: datetime) -> str:
    """Which tick rebuilds a dealer whose change only its fingerprint shows."""
    if reconciliation is None:
        return "the tick after the rolling reconciliation's first run (deployment usage-reconciliation)"
    if dealer in reconciliation.unchecked_suspects(cursor.suspects_checked_through):
        return "the next tick (the rolling reconciliation found it changed)"
    by = recheck_time(cursor, dealer, reconciliation, reconcile_seconds, now)
    return ("the tick after the rolling reconciliation's next run" if by is None
            else f"a tick after the rolling reconciliation re-checks it (by about {format_timestamp(by)})")


def _reconciliation(cursor: Cursor, dealer: int, reconciliation: ReconciliationState | None,
                    reconcile_seconds: float, now: datetime) -> str:
    if reconciliation is None:
        return "has not run yet (deployment usage-reconciliation)"
    position = "its first dealer" if reconciliation.next_dealer is None else f"dealer {reconciliation.next_dealer}"
    by = recheck_time(cursor, dealer, reconciliation, reconcile_seconds, now)
    when = "on its next run (its cycle is overdue)" if by is None else f"by about {format_timestamp(by)}"
    suspect = dealer in reconciliation.unchecked_suspects(cursor.suspects_checked_through)
    return (f"cycle started {format_timestamp(reconciliation.cycle_started_at)}, goes on from {position};"
            f" re-checks this dealer {when}" + ("; found it changed: the next tick re-checks it" if suspect else ""))


def _schedule(schedule: DetectionSchedule | None) -> str:
    if schedule is None:
        return "unknown (deployment usage-change-detection not found)"
    if schedule == "unscheduled":
        return "no schedule: ticks run only when started by hand (e.g. `usage-pipeline serve --no-schedule`)"
    return "scheduled" if schedule == "scheduled" else "PAUSED: no tick runs until its schedule is resumed"


def explain_dealer(
    conn: Connection,
    dealer: int,
    directory: dict[int, str | None],
    cursor: Cursor,
    detection_schedule: DetectionSchedule | None,
    now: datetime,
    reconcile_seconds: float,
    reconciliation: ReconciliationState | None,
) -> Explanation:
    """What the next tick will do about `dealer` and, when nothing, which of the seed's causes applies;
    its partner's lag as of `now`; when the rolling reconciliation (USAGE_RECONCILE_SECONDS, its state
    `reconciliation`, None: it has not run) re-checks it."""
    rows = dealer_rows(conn, dealer)
    stats = relevant_stats(conn, [dealer]).get(dealer)
    raw_max = {dealer: rows.raw_max} if rows.total else {}
    snapshot = SourceSnapshot(
        raw_max=raw_max,
        checked=frozenset([dealer]),
        relevant={dealer: stats} if stats else {},
        partners={dealer: directory.get(dealer)},
    )
    seen = (cursor.dealer_seen or {}).get(dealer)
    entry = (dealer in cursor.dealer_last_modified, cursor.dealer_last_modified.get(dealer))
    next_tick, hints = _decide(cursor, snapshot, dealer, stats, reconciliation, reconcile_seconds, now)
    if detection_schedule == "paused":
        hints.append("detection is paused (Prefect UI: Deployments -> usage-change-detection -> schedule toggle)")
    elif detection_schedule == "unscheduled":
        hints.append(
            "detection has no schedule: start a tick with `prefect deployment run"
            " usage-change-detection/usage-change-detection`, or give it one (prefect.yaml's `schedules`"
            " with `prefect deploy --all`, or `usage-pipeline serve` without --no-schedule)"
        )
    return Explanation(
        dealer=dealer,
        rows=rows,
        v3_partner=directory.get(dealer),
        in_v3=dealer in directory,
        cursor_entry=entry,
        materialized_under=seen.partner if seen else None,
        state_known=cursor.dealer_seen is not None,
        partition_lag=_lag(cursor, directory.get(dealer) or (seen.partner if seen else None), now),
        reconciliation=_reconciliation(cursor, dealer, reconciliation, reconcile_seconds, now),
        next_tick=next_tick,
        detection_schedule=detection_schedule,
        hints=hints,
    )


def _decide(cursor: Cursor, snapshot: SourceSnapshot, dealer: int, stats: DealerStats | None,
            reconciliation: ReconciliationState | None, reconcile_seconds: float,
            now: datetime) -> tuple[str, list[str]]:
    rows_hints = []
    partner = snapshot.partners.get(dealer)
    if partner is None:
        rows_hints.append("the dealer maps to no partner in v3: its rows are in bronze but in no partition")
    if cursor.is_first_run:
        return "rebuilds bronze and every partition (the cursor is empty: first run)", rows_hints
    reason = dealer_reason(cursor, snapshot, dealer)
    retry = [p for p in sorted(cursor.retry_partitions) if p == partner]
    if reason:
        affected = sorted(affected_partitions(cursor, snapshot, dealer))
        candidates = probe_candidates(cursor, dict(snapshot.raw_max))
        seen_by_probe = candidates is None or dealer in candidates or reason.startswith(("moved", "no record"))
        when = "the next tick" if seen_by_probe else _rebuilt_by(cursor, dealer, reconciliation, reconcile_seconds, now)
        target = ", ".join(affected) if affected else "no partition (unmapped)"
        return f"{when} rebuilds {target} and re-reads the dealer into bronze: {reason}", rows_hints
    if retry:
        return f"retries partner {partner} (it failed {cursor.partitions[partner].failures} tick(s))", rows_hints
    hints = list(rows_hints)
    if stats is None:
        hints.append("no relevant rows: every row is excluded by the billing filters above, so nothing triggers")
    else:
        hints.append(
            "its relevant MAX(usage_modified) equals the cursor entry and its rows match what was materialized: "
            "if its data changed, check that the writer updates usage_modified"
        )
    return "nothing for this dealer", hints
