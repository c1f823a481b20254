"""Change detection as plain values: snapshot -> changes -> plan -> outcomes -> new cursor.

Nothing here talks to a database or to Prefect, so every rule of CONTRACT.md
sections 4 and 5 is tested as a pure function (tests/test_detection.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime

from usage_pipeline.check_results import CheckResult, summary
from usage_pipeline.cursor import Cursor, DealerSeen, PartitionStatus


@dataclass(frozen=True)
class DealerStats:
    """Relevant rows of one dealer: MAX(usage_modified) and a cheap fingerprint of the rows."""

    last_modified: datetime | None
    fingerprint: str


def fingerprint(rows: int, id_sum: object, quantity_sum: object, amount_sum: object, status_sum: object,
                name_chars_sum: object) -> str:
    """One dealer's relevant rows in a line: the same text whether the sums came from the source's SQL
    (queries.relevant_stats) or from the bronze extract (transforms.dealer_stats)."""
    return f"{rows}:{id_sum}:{_money(quantity_sum)}:{_money(amount_sum)}:{status_sum}:{name_chars_sum}"


def _money(value: object) -> str:
    """A DECIMAL(18,4) sum rendered identically whatever numeric type the driver or polars returned."""
    return f"{float(value):.4f}" if value is not None else "0"


@dataclass(frozen=True)
class SourceSnapshot:
    """What the source said this tick, complete for every dealer (once `awaiting_bronze` is cleared).

    `raw_max` comes from the cheap index probe (every dealer with any usage
    row). `relevant` holds the dealers with relevant rows: queried for the
    dealers in `checked`, carried over from the cursor for the others (the
    probe proved them untouched). `suspects` are the dealers among them that
    the rolling reconciliation found changed, through its slice number
    `suspects_through` (None: no reconciliation state to take them from).

    `awaiting_bronze`: a start-over tick (`starts_over`) re-extracts all of bronze anyway, so it
    does not ask the source for every dealer's stats (a full join); `with_bronze_stats` fills
    `relevant` from that extract once it is written. Until then every probed dealer may have
    relevant rows.
    """

    raw_max: dict[int, datetime | None]
    checked: frozenset[int]
    relevant: dict[int, DealerStats]
    partners: dict[int, str | None]  # v3 directory, already validated; None = not mapped
    suspects: frozenset[int] = frozenset()
    suspects_through: int | None = None
    awaiting_bronze: bool = False

    def may_have_relevant_rows(self, dealer: int) -> bool:
        return self.awaiting_bronze or dealer in self.relevant


def with_bronze_stats(snapshot: SourceSnapshot, stats: dict[int, DealerStats]) -> SourceSnapshot:
    """The snapshot completed from a full bronze extract: every dealer's relevant rows, as written."""
    if not snapshot.awaiting_bronze:
        raise ValueError("only a snapshot awaiting a full bronze extract takes its stats from it")
    return replace(snapshot, relevant=stats, awaiting_bronze=False)


def assemble_snapshot(
    cursor: Cursor,
    raw_max: dict[int, datetime | None],
    checked: frozenset[int],
    queried: dict[int, DealerStats],
    partners: dict[int, str | None],
    suspects: frozenset[int] = frozenset(),
    suspects_through: int | None = None,
) -> SourceSnapshot:
    """Fill in the dealers that were not queried from what the cursor says was written."""
    relevant = {
        dealer: DealerStats(ts, cursor.fingerprints.get(dealer, ""))
        for dealer, ts in cursor.dealer_last_modified.items()
        if dealer not in checked
    }
    relevant.update(queried)
    return SourceSnapshot(raw_max, checked, relevant, partners, suspects, suspects_through)


@dataclass(frozen=True)
class Plan:
    """What a tick will run. `bronze_dealers` None means a full bronze refresh."""

    first_run: bool  # everything is rebuilt: no cursor, an operator reset, or full_refresh
    dealer_changes: dict[int, str]  # dealer -> reason
    dealer_partitions: dict[int, frozenset[str]]  # dealer -> partitions it waits for before advancing
    partitions: dict[str, list[str]]  # partner -> reasons, sorted by partner
    bronze_dealers: list[int] | None
    unmapped_dealers: list[int] = field(default_factory=list)
    unknown_partners: list[str] = field(default_factory=list)  # requested, but no dealer maps to them

    @property
    def runs_bronze(self) -> bool:
        """Bronze holds every relevant row, unmapped dealers' too, so any change refreshes it."""
        return bool(self.partitions or self.dealer_changes)

    @property
    def is_empty(self) -> bool:
        return not self.partitions and not self.dealer_changes

    def describe(self) -> str:
        return f"{len(self.dealer_changes)} dealer(s) -> {len(self.partitions)} partition(s)"


@dataclass(frozen=True)
class RunOutcome:
    """The final state of one child flow run."""

    name: str
    state: str
    ok: bool
    message: str | None = None
    flow_run_id: str | None = None
    rows: int | None = None  # bronze rows a silver run read, when its result is at hand (subflows)
    result: object = field(default=None, repr=False, compare=False)  # the run's return value (subflows)
    checks: tuple[CheckResult, ...] = ()  # its checks' results, passed or failed (subflows)


@dataclass(frozen=True)
class PartitionOutcome:
    partner: str
    silver: RunOutcome
    gold: RunOutcome | None  # None: not run because silver failed

    @property
    def ok(self) -> bool:
        return self.silver.ok and self.gold is not None and self.gold.ok

    @property
    def checks(self) -> tuple[CheckResult, ...]:
        return self.silver.checks + (self.gold.checks if self.gold else ())

    @property
    def error(self) -> str | None:
        failed = self.silver if not self.silver.ok else self.gold
        if failed is None or failed.ok:
            return None
        return f"{failed.name} {failed.state}: {failed.message or 'no message'}"


def starts_over(cursor: Cursor, full_refresh: bool) -> bool:
    """Whether this tick rebuilds everything: a first run (or reset) or a full refresh.

    Only such a tick may count its dealers from its bronze extract (`awaiting_bronze`): it
    plans every probed dealer as changed, so no dealer can advance without its partitions.
    A tick that lost the pipeline's state re-extracts bronze too, but plans dealer by dealer
    (what appeared, what disappeared), so it asks the source.
    """
    return cursor.is_first_run or full_refresh


def probe_candidates(cursor: Cursor, raw_max: dict[int, datetime | None]) -> set[int] | None:
    """Dealers whose relevant MAX must be queried; None means all of them (first run or no memory).

    A dealer is skipped only when the index probe shows its rows untouched and
    its cursor entry is exactly what the pipeline wrote, so operator edits and
    deletions are always re-checked.
    """
    if cursor.is_first_run or cursor.dealer_seen is None:
        return None
    seen_all = cursor.dealer_seen
    written = cursor.dealer_last_modified
    candidates = {dealer for dealer in written if dealer not in raw_max}
    for dealer, raw in raw_max.items():
        seen = seen_all.get(dealer)
        if seen is None or seen.raw_max != raw or (dealer in written) != seen.relevant:
            candidates.add(dealer)
        elif dealer in written and written[dealer] != seen.last_modified:
            candidates.add(dealer)
    return candidates


def dealer_change(cursor: Cursor, dealer: int, now: DealerStats | None) -> str | None:
    """Why one checked dealer's relevant rows (`now`, None: none) differ from what was materialized, or None."""
    was_present = dealer in cursor.dealer_last_modified
    if now is not None and not was_present:
        seen = (cursor.dealer_seen or {}).get(dealer)
        return "cursor entry removed" if seen is not None and seen.relevant else "appeared"
    if now is None:
        return "relevant rows disappeared" if was_present else None
    if now.last_modified != cursor.dealer_last_modified[dealer]:
        return "MAX(usage_modified) changed"
    if now.fingerprint != cursor.fingerprints.get(dealer):
        return "rows changed without a newer usage_modified"
    return None


def silent_changes(cursor: Cursor, dealers: frozenset[int], found: dict[int, DealerStats]) -> dict[int, str]:
    """The rolling reconciliation's verdict on its slice (`found`: the relevant stats of `dealers` that
    have any): each dealer whose rows differ from what was materialized, with why."""
    changes = {dealer: dealer_change(cursor, dealer, found.get(dealer)) for dealer in sorted(dealers)}
    return {dealer: reason for dealer, reason in changes.items() if reason}


def dealer_reason(cursor: Cursor, snapshot: SourceSnapshot, dealer: int) -> str | None:
    """Why one dealer's partition(s) must rematerialize outside a first run, or None (CONTRACT.md section 5)."""
    if dealer in snapshot.checked:
        reason = dealer_change(cursor, dealer, snapshot.relevant.get(dealer))
        if reason:
            return reason
    if dealer not in snapshot.relevant and dealer not in cursor.dealer_last_modified:
        return None
    seen = (cursor.dealer_seen or {}).get(dealer)
    if seen is None:
        return "no record of its partition"
    if seen.partner != snapshot.partners.get(dealer):
        return f"moved from partner {seen.partner} to {snapshot.partners.get(dealer)}"
    return None


def affected_partitions(cursor: Cursor, snapshot: SourceSnapshot, dealer: int) -> frozenset[str]:
    """A changed dealer's rows leave the partner that held them and join the one it maps to now."""
    seen = (cursor.dealer_seen or {}).get(dealer)
    holder = seen.partner if seen else snapshot.partners.get(dealer)
    gains = snapshot.partners.get(dealer) if snapshot.may_have_relevant_rows(dealer) else None
    had_rows = dealer in cursor.dealer_last_modified or (seen is not None and seen.relevant)
    loses = holder if had_rows else None
    return frozenset(p for p in (gains, loses) if p)


def dealers_of_partners(cursor: Cursor, partners: dict[int, str | None], wanted: frozenset[str]) -> set[int]:
    """Dealers that map to one of `wanted` in v3 now, or whose rows were last materialized under one."""
    mapped = {dealer for dealer, partner in partners.items() if partner in wanted}
    held = {dealer for dealer, seen in (cursor.dealer_seen or {}).items() if seen.partner in wanted}
    return mapped | held


def changed_dealers(cursor: Cursor, snapshot: SourceSnapshot, start_over: str | None) -> dict[int, str]:
    """Every dealer whose partition(s) must rematerialize, with the reason; all of them when starting over."""
    if start_over:
        return {dealer: start_over for dealer in (snapshot.raw_max if snapshot.awaiting_bronze else snapshot.relevant)}
    changes = {}
    for dealer in set(snapshot.checked) | set(snapshot.relevant) | set(cursor.dealer_last_modified):
        if reason := dealer_reason(cursor, snapshot, dealer):
            changes[dealer] = reason
    return dict(sorted(changes.items()))


def plan_tick(
    cursor: Cursor, snapshot: SourceSnapshot, requested: frozenset[str] = frozenset(), full_refresh: bool = False
) -> Plan:
    """Decide which dealers changed and which partitions must rematerialize (CONTRACT.md section 5).

    `requested` partners (the operator's `partners` parameter) are rebuilt whatever
    changed: their dealers are re-read into bronze and advance only if they succeed.
    `full_refresh` plans like a first run.
    """
    partners = snapshot.partners
    first_run = starts_over(cursor, full_refresh)
    if snapshot.awaiting_bronze and not first_run:
        raise ValueError("only a start-over tick may take its dealer stats from its bronze extract")
    start_over = ("full refresh requested" if full_refresh else "first run") if first_run else None
    live = sorted({p for p in partners.values() if p})

    changes = changed_dealers(cursor, snapshot, start_over)
    if start_over:
        reasons = {partner: [start_over] for partner in live}
    elif cursor.dealer_seen is None:  # the pipeline's state was lost: no partition is known to be current
        reasons = {partner: ["no pipeline state"] for partner in live}
    else:
        reasons = {}
    dealer_partitions: dict[int, frozenset[str]] = {}
    for dealer, reason in changes.items():
        dealer_partitions[dealer] = affected_partitions(cursor, snapshot, dealer)
        for partner in sorted(dealer_partitions[dealer]):
            if first_run:  # includes a partner the dealer left: it must be emptied too
                reasons.setdefault(partner, [reason])
            else:
                reasons.setdefault(partner, []).append(f"dealer {dealer}: {reason}")
    retrying = cursor.retry_partitions
    for partner in sorted(retrying):
        reasons.setdefault(partner, []).append(f"retry after {cursor.partitions[partner].failures} failed tick(s)")
    unknown, requested_dealers = add_requested(cursor, partners, requested, reasons, dealer_partitions)

    if first_run or cursor.dealer_seen is None:
        bronze_dealers = None
    else:
        retried = {d for d, p in partners.items() if p in retrying}
        bronze_dealers = sorted(set(changes) | retried | requested_dealers) if reasons or changes else []
    return Plan(
        first_run=first_run,
        dealer_changes=changes,
        dealer_partitions=dealer_partitions,
        partitions=dict(sorted(reasons.items())),
        bronze_dealers=bronze_dealers,
        unmapped_dealers=sorted(d for d in changes if partners.get(d) is None),
        unknown_partners=unknown,
    )


def add_requested(
    cursor: Cursor,
    partners: dict[int, str | None],
    requested: frozenset[str],
    reasons: dict[str, list[str]],
    dealer_partitions: dict[int, frozenset[str]],
) -> tuple[list[str], set[int]]:
    """Plan the operator's partners (in place): their dealers wait for them. Returns the unknown
    partners (no dealer maps to them, none was materialized under them) and the dealers to re-read."""
    live = {p for p in partners.values() if p}
    unknown, dealers_to_read = [], set()
    for partner in sorted(requested):
        dealers = dealers_of_partners(cursor, partners, frozenset([partner]))
        if not dealers and partner not in live:
            unknown.append(partner)
            continue
        reasons.setdefault(partner, []).append("requested by operator")
        dealers_to_read |= dealers
        for dealer in dealers:
            dealer_partitions[dealer] = dealer_partitions.get(dealer, frozenset()) | {partner}
    return unknown, dealers_to_read


def advance_cursor(
    cursor: Cursor,
    snapshot: SourceSnapshot,
    plan: Plan,
    bronze: RunOutcome | None,
    partitions: dict[str, PartitionOutcome],
    now: datetime,
) -> Cursor:
    """The cursor after a tick: a dealer advances only if every partition it affects succeeded.

    A dealer that does not advance keeps its old entries, so the next tick sees
    the same difference again and retries it; failed partitions are also
    remembered in `partitions` so a partition without dealers is retried too.
    """
    bronze_ok = bronze is None or bronze.ok
    succeeded = {p for p, outcome in partitions.items() if outcome.ok and bronze_ok}
    advanced = advance_dealers(cursor, snapshot, plan, succeeded if bronze_ok else None)
    if bronze_ok:
        errors = {p: partitions[p].error if p in partitions else "not run" for p in plan.partitions}
    else:
        errors = {p: f"bronze {bronze.state}: {bronze.message or 'no message'}" for p in plan.partitions}
    checks = {p: summary(outcome.checks) if outcome.checks else None for p, outcome in partitions.items()}
    statuses = partition_statuses(cursor, snapshot, plan, succeeded, errors, checks, advanced.dealer_last_modified,
                                  now)
    # The suspects it took are re-checked, also when their partitions failed: those are retried.
    through = cursor.suspects_checked_through if snapshot.suspects_through is None else snapshot.suspects_through
    return advanced.with_changes(partitions=statuses, suspects_checked_through=through)


def advance_dealers(cursor: Cursor, snapshot: SourceSnapshot, plan: Plan, succeeded: set[str] | None) -> Cursor:
    """Record what the snapshot says of every dealer that waited for no partition, or only for
    `succeeded` ones (None: bronze failed, so only dealers that waited for nothing)."""
    written = dict(cursor.dealer_last_modified)
    seen_all = dict(cursor.dealer_seen or {})
    fingerprints = dict(cursor.fingerprints)
    for dealer in set(snapshot.raw_max) | set(snapshot.relevant) | set(written) | set(seen_all):
        affected = plan.dealer_partitions.get(dealer)
        if affected is not None and (succeeded is None or not affected <= succeeded):
            continue
        stats = snapshot.relevant.get(dealer)
        if stats is None:
            written.pop(dealer, None)
            fingerprints.pop(dealer, None)
        else:
            written[dealer] = stats.last_modified
            fingerprints[dealer] = stats.fingerprint
        if dealer in snapshot.raw_max:
            seen = (snapshot.raw_max[dealer], stats is not None, stats.last_modified if stats else None,
                    snapshot.partners.get(dealer))
            old = seen_all.get(dealer)
            # An unchanged entry is kept as it is: a tick mostly changes nothing, and building 20,000
            # frozen dataclasses again costs a tenth of a second.
            if old is None or (old.raw_max, old.relevant, old.last_modified, old.partner) != seen:
                seen_all[dealer] = DealerSeen(*seen)
        else:
            seen_all.pop(dealer, None)
    marks = [ts for ts in written.values() if ts is not None]
    return cursor.with_changes(
        global_last_modified=max(marks, default=None),
        dealer_last_modified=written,
        dealer_seen=seen_all,
        fingerprints=fingerprints,
    )


def partition_statuses(
    cursor: Cursor,
    snapshot: SourceSnapshot,
    plan: Plan,
    succeeded: set[str],
    errors: dict[str, str | None],
    checks: dict[str, str | None],
    written: dict[int, datetime | None],
    now: datetime,
) -> dict[str, PartitionStatus]:
    """Freshness after the tick: planned partitions are fresh or one failure further (and pending since the
    first tick that planned them), with this tick's check results (None when none are known: bronze
    failed, or the runs were deployment runs); gone ones dropped."""
    statuses = dict(cursor.partitions)
    for partner in plan.partitions:
        old = statuses.get(partner, PartitionStatus())
        checked = checks.get(partner)
        if partner in succeeded:
            marks = [written[d] for d, p in snapshot.partners.items() if p == partner and written.get(d) is not None]
            statuses[partner] = PartitionStatus(materialized_at=now, source_watermark=max(marks, default=None),
                                                checks=checked)
        else:
            statuses[partner] = replace(old, failures=old.failures + 1, last_error=errors[partner], checks=checked,
                                        pending_since=old.pending_since or now)
    live = {p for p in snapshot.partners.values() if p}
    return {p: s for p, s in statuses.items() if p in live or s.failures > 0}


def newly_pending(cursor: Cursor, plan: Plan) -> list[str]:
    """Planned partitions that were not pending when the tick started: the ones it announces
    (`usage.partition.pending`) before its runs; the others were announced by an earlier tick."""
    return [p for p in plan.partitions if cursor.partitions.get(p, PartitionStatus()).pending_since is None]


def partition_episodes(cursor: Cursor, plan: Plan) -> dict[str, str]:
    """The pending episode of each planned partition, as the cursor at the tick's start names it: the
    tick's events for that partition carry it, the materialized one closing it."""
    return {p: cursor.partitions.get(p, PartitionStatus()).episode for p in plan.partitions}


@dataclass(frozen=True)
class PartitionFreshness:
    """One partition as operators see it (the freshness artifact and `usage-pipeline cursor show`)."""

    partner: str
    dealers: list[int]  # whose rows were last materialized under it
    stale_because: str | None  # None: fresh as of the last tick
    status: PartitionStatus

    @property
    def state(self) -> str:
        return "fresh" if self.stale_because is None else "stale"


def partition_freshness(cursor: Cursor, pending: frozenset[str] = frozenset()) -> list[PartitionFreshness]:
    """Every known partition, stale when it failed, is planned (`pending`) or an operator edit awaits it."""
    seen_all = cursor.dealer_seen or {}
    written = cursor.dealer_last_modified

    def edited(dealer: int) -> bool:
        seen = seen_all[dealer]
        if not seen.relevant:
            return dealer in written
        return dealer not in written or written[dealer] != seen.last_modified

    dealers_of: dict[str, list[int]] = {}  # one pass over the dealers, not one per partner (200 x 20,000)
    for dealer, seen in sorted(seen_all.items()):
        if seen.partner:
            dealers_of.setdefault(seen.partner, []).append(dealer)
    rows = []
    for partner in sorted(set(cursor.partitions) | set(dealers_of)):
        dealers = dealers_of.get(partner, [])
        status = cursor.partitions.get(partner, PartitionStatus())
        if status.failures:
            why = f"failed {status.failures} tick(s) in a row; retried every tick"
        elif partner in pending:
            why = "rebuild planned"
        elif cursor.is_first_run:
            why = "cursor reset: rebuilt on the next tick"
        elif any(edited(d) for d in dealers):
            why = "cursor entry edited: rebuilt on the next tick"
        elif status.materialized_at is None:
            why = "never rebuilt"
        else:
            why = None
        rows.append(PartitionFreshness(partner, dealers, why, status))
    return rows
