"""The rolling reconciliation (usage_pipeline/reconciliation.py): every dealer re-checked once per
USAGE_RECONCILE_SECONDS, a slice per usage-reconciliation run, its suspects re-checked by the next tick.

The planning is tested as a pure function over simulated clocks (seeded random rounds: regular,
irregular and late runs, dealers that appear and vanish), and the suspects' hand-over to detection
as plain values (runs and ticks interleaved, either one's state lost); the last test runs the real
queries against MariaDB and finds a change only a fingerprint can see within one cycle's runs, each
run asking the source for its slice only and each tick for its suspects only.
"""

from __future__ import annotations

import random
import re
from datetime import date, datetime, timedelta

import pytest
import sqlalchemy as sa

from usage_pipeline.cursor import Cursor
from usage_pipeline.reconciliation import (
    TICK_SECONDS,
    ReconcileSlice,
    ReconciliationState,
    checked_by,
    cycle_seconds,
    parse_reconciliation_state,
    plan_slice,
)

HOUR = 3600.0
T0 = datetime(2026, 11, 1, 12, 0)


class Rolling:
    """The cycle's state between ticks as advance_cursor keeps it (detection.reconciliation_after)."""

    def __init__(self, reconciled_at: datetime | None = T0, next_dealer: int | None = None):
        self.reconciled_at, self.next_dealer = reconciled_at, next_dealer
        self.cycles: list[list[int]] = [[]]  # the dealers each cycle reconciled, in order

    def tick(self, known: set[int], now: datetime, period: float = HOUR) -> ReconcileSlice:
        taken = plan_slice(known, self.reconciled_at, self.next_dealer, now, period)
        self.cycles[-1].extend(sorted(taken.dealers))
        if taken.completes:
            self.reconciled_at, self.next_dealer = now, None
            self.cycles.append([])
        else:
            self.next_dealer = taken.next_dealer
        return taken


def simulate(rng: random.Random, dealers: set[int], period: float, gaps: list[float]) -> dict[int, list[datetime]]:
    """Ticks `gaps` seconds apart; the times each dealer was reconciled."""
    rolling, now = Rolling(), T0
    checks: dict[int, list[datetime]] = {d: [T0] for d in dealers}  # all checked by the tick that started it
    for gap in gaps:
        now += timedelta(seconds=gap)
        for dealer in rolling.tick(dealers, now, period).dealers:
            checks[dealer].append(now)
    for cycle in rolling.cycles[:-1]:
        assert sorted(cycle) == sorted(dealers), "a completed cycle reconciled every dealer exactly once"
    return checks


def longest_gap(checks: dict[int, list[datetime]]) -> float:
    return max((b - a).total_seconds() for times in checks.values() for a, b in zip(times, times[1:], strict=False))


def test_five_minute_ticks_check_every_dealer_once_per_period_a_tenth_at_a_time():
    dealers = set(range(1, 2006))
    rolling, now, sizes = Rolling(), T0, []
    for _ in range(36):  # three hours
        now += timedelta(seconds=TICK_SECONDS)
        sizes.append(len(rolling.tick(dealers, now).dealers))
    assert cycle_seconds(HOUR) == 3000  # ten ticks a cycle
    assert sizes[:10] == [201, 200, 201, 200, 201, 200, 201, 200, 201, 200]
    assert all(sorted(cycle) == sorted(dealers) for cycle in rolling.cycles[:-1]) and len(rolling.cycles) == 4
    checks = simulate(random.Random(1), dealers, HOUR, [TICK_SECONDS] * 48)
    assert longest_gap(checks) <= HOUR


@pytest.mark.parametrize("seed", range(40))
def test_irregular_ticks_at_most_a_tick_apart_keep_every_dealer_within_the_period(seed):
    rng = random.Random(seed)
    dealers = set(rng.sample(range(1, 100_000), rng.randrange(1, 3000)))
    period = rng.choice([900, 1800, 3600, 7200, rng.uniform(700, 10_000)])
    gaps = [rng.uniform(1, TICK_SECONDS) for _ in range(int(4 * period / 150))]
    checks = simulate(rng, dealers, period, gaps)
    assert longest_gap(checks) <= period, (seed, period, len(dealers))


def test_a_late_tick_completes_the_cycle_with_everything_left():
    dealers = set(range(1, 101))
    rolling = Rolling()
    first = rolling.tick(dealers, T0 + timedelta(minutes=5))
    assert len(first.dealers) == 10 and not first.completes and first.next_dealer == 11
    late = rolling.tick(dealers, T0 + timedelta(minutes=75))  # detection was down for over an hour
    assert late.completes and late.dealers == frozenset(range(11, 101)) and late.cycle_percent == 100
    assert rolling.reconciled_at == T0 + timedelta(minutes=75) and rolling.next_dealer is None


def test_dealers_that_appear_or_vanish_mid_cycle():
    rolling = Rolling()
    first = rolling.tick(set(range(10, 110)), T0 + timedelta(minutes=25))  # half the cycle's time: 50 dealers
    assert first.dealers == frozenset(range(10, 60)) and first.next_dealer == 60
    # Dealer 5 appears behind the position (its first tick's probe checks it; the next cycle reconciles it),
    # 200 ahead of it; 60-69 vanish.
    known = (set(range(10, 110)) - set(range(60, 70))) | {5, 200}
    second = rolling.tick(known, T0 + timedelta(minutes=30))
    assert min(second.dealers) == 70 and 5 not in second.dealers
    rest = rolling.tick(known, T0 + timedelta(minutes=50))
    assert rest.completes and 200 in rest.dealers and 5 not in rest.dealers
    assert 5 in rolling.tick(known, T0 + timedelta(minutes=55)).dealers  # the next cycle starts from the lowest id


@pytest.mark.parametrize("seed", range(20))
def test_with_dealers_coming_and_going_each_cycle_checks_every_dealer_present_throughout_it_once(seed):
    rng = random.Random(seed)
    known = set(rng.sample(range(1, 5000), 300))
    rolling, now, present_since = Rolling(), T0, {d: T0 for d in known}
    starts = [T0]
    for _ in range(60):
        now += timedelta(seconds=rng.uniform(60, TICK_SECONDS))
        for dealer in rng.sample(sorted(known), min(len(known), rng.randrange(0, 6))):
            known.discard(dealer)
            present_since.pop(dealer)
        for dealer in rng.sample(range(1, 5000), rng.randrange(0, 6)):
            if dealer not in known:
                known.add(dealer)
                present_since[dealer] = now
        cycle = len(rolling.cycles) - 1
        if rolling.tick(known, now).completes:
            reconciled = rolling.cycles[cycle]
            assert len(reconciled) == len(set(reconciled)), "no dealer twice in a cycle"
            throughout = {d for d, since in present_since.items() if since <= starts[-1]}
            assert throughout <= set(reconciled)
            starts.append(now)
    assert len(starts) > 3


def test_a_period_of_two_ticks_or_less_reconciles_everything_every_tick():
    rolling = Rolling()
    for minutes in (5, 10):
        taken = rolling.tick({1, 2, 3}, T0 + timedelta(minutes=minutes), period=2 * TICK_SECONDS)
        assert taken.completes and taken.dealers == frozenset({1, 2, 3})


def test_a_cycle_never_completed_or_an_old_state_reconciles_everything_when_due():
    assert plan_slice({1, 2}, None, None, T0, HOUR).completes  # no cycle ever completed
    overdue = plan_slice({1, 2, 3}, T0 - timedelta(hours=2), None, T0, HOUR)  # a state from before: no position
    assert overdue.completes and overdue.dealers == frozenset({1, 2, 3})
    on_time = plan_slice({1, 2, 3}, T0 - timedelta(minutes=10), None, T0, HOUR)  # a fifth of the cycle's time
    assert on_time.dealers == frozenset({1}) and on_time.next_dealer == 2


def test_a_clock_behind_the_cycle_s_start_completes_it_instead_of_waiting():
    behind = plan_slice({1, 2, 3}, T0 + timedelta(hours=5), 2, T0, HOUR)
    assert behind.completes and behind.dealers == frozenset({2, 3})


def test_a_slice_waits_at_the_end_until_the_cycle_is_due_and_counts_in_its_description():
    ahead = plan_slice({1, 2, 3}, T0, 4, T0 + timedelta(minutes=40), HOUR)
    assert ahead.dealers == frozenset() and not ahead.completes and ahead.next_dealer == 4
    assert ahead.describe() == "reconciled 0 of 3 dealers (cycle 100 %)"
    part = ReconcileSlice(frozenset(range(167)), 2005, 842, False, 900)
    assert part.describe() == "reconciled 167 of 2,005 dealers (cycle 41 %)"
    everything = ReconcileSlice(frozenset(range(2005)), 2005, 2005, True, None)
    assert everything.describe() == "reconciled 2,005 of 2,005 dealers (cycle 100 %)"


# --- the suspects' hand-over from reconciliation runs to detection ticks -------------------------------


def test_a_tick_re_checks_each_suspect_once_whichever_order_runs_and_ticks_interleave():
    """Runs find suspects; a tick takes those newer than the slice it took them from last (the state it
    read), then saves that slice number; a run drops the ones a tick saved as taken. Every tick that
    saves takes exactly the dealers found since a saved tick last took them."""
    rng = random.Random(7)
    state, checked_through, now = ReconciliationState(cycle_started_at=T0), 0, T0
    awaiting: set[int] = set()  # found by a run, not yet taken by a tick that saved
    for _ in range(400):
        now += timedelta(seconds=rng.uniform(1, TICK_SECONDS))
        if rng.random() < 0.5:  # a run, reading the pipeline's state as the tick last saved it
            changed = rng.sample(range(1, 50), rng.randrange(0, 3))
            done = plan_slice(range(1, 50), state.cycle_started_at, state.next_dealer, now, HOUR)
            state = state.after(done, changed, checked_through, now)
            awaiting |= set(changed)
        elif rng.random() < 0.8:  # a tick that saves its state (else killed first: it took nothing)
            assert state.unchecked_suspects(checked_through) == awaiting
            awaiting, checked_through = set(), state.slices
    assert set(state.suspects) >= awaiting and len(state.suspects) <= 49


def test_a_dealer_found_again_before_a_tick_took_it_is_one_suspect_of_the_newer_slice():
    state = ReconciliationState(T0, None, 3, {7: 3})
    done = ReconcileSlice(frozenset({7, 8}), 10, 2, False, 9)
    after = state.after(done, [7, 8], 2, T0 + timedelta(minutes=5))
    assert after == ReconciliationState(T0, 9, 4, {7: 4, 8: 4})
    assert after.unchecked_suspects(3) == {7, 8} and after.unchecked_suspects(4) == frozenset()


def test_a_completed_cycle_starts_the_next_one_and_keeps_the_suspects_no_tick_took():
    state = ReconciliationState(T0, 30, 9, {3: 8, 5: 9})
    done = ReconcileSlice(frozenset({30, 31}), 31, 31, True, None)
    later = T0 + timedelta(minutes=55)
    assert state.after(done, [31], 8, later) == ReconciliationState(later, None, 10, {5: 9, 31: 10})


def test_a_reconciliation_state_begun_anew_hands_every_suspect_to_the_next_tick():
    """Lost and begun anew at slice 0, below what the tick took last: the tick takes all it finds."""
    anew = ReconciliationState(T0).after(ReconcileSlice(frozenset({1}), 3, 1, False, 2), [1], 57, T0)
    assert anew.slices == 1 and anew.unchecked_suspects(57) == {1}


def test_a_late_cycle_is_overdue_by_how_far_it_runs_past_the_period():
    state = ReconciliationState(T0, 5, 2, {})
    assert state.overdue_seconds(T0 + timedelta(minutes=50), HOUR) == 0
    assert state.overdue_seconds(T0 + timedelta(minutes=70), HOUR) == 600


def test_the_reconciliation_state_round_trips_through_its_document():
    state = ReconciliationState(datetime(2026, 11, 1, 12, 0, 0, 1), 402, 17, {9: 16, 12: 17})
    assert parse_reconciliation_state(state.document()) == state
    assert parse_reconciliation_state(ReconciliationState(None).document()) == ReconciliationState(None)


@pytest.mark.parametrize("document, problem", [
    ({}, "KeyError"),
    ({"cycle_started_at": None, "next_dealer": None, "slices": "3", "suspects": {}}, "slices '3'"),
    ({"cycle_started_at": None, "next_dealer": -1, "slices": 3, "suspects": {}}, "next_dealer -1"),
    ({"cycle_started_at": "soon", "next_dealer": None, "slices": 3, "suspects": {}}, "soon"),
    ({"cycle_started_at": None, "next_dealer": None, "slices": 3, "suspects": {"x": 1}}, "'x'"),
    ({"cycle_started_at": None, "next_dealer": None, "slices": 3, "suspects": {"1": 4}}, "slice numbers up to 3"),
    ({"cycle_started_at": None, "next_dealer": None, "slices": 3, "suspects": []}, "AttributeError"),
])
def test_an_unreadable_reconciliation_state_is_refused_naming_the_problem(document, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_reconciliation_state(document)


@pytest.mark.parametrize("seed", range(10))
def test_explain_s_estimate_is_never_earlier_than_the_check(seed):
    """checked_by (what `explain` prints) bounds the dealer's next reconciliation from above."""
    rng = random.Random(seed)
    dealers = set(rng.sample(range(1, 10_000), rng.randrange(1, 500)))
    rolling, now = Rolling(), T0
    pending: dict[int, datetime] = {}  # dealer -> the estimate made before its next check
    for _ in range(40):
        for dealer in dealers:
            pending.setdefault(dealer, checked_by(dealer, dealers, rolling.reconciled_at, rolling.next_dealer, HOUR))
        now += timedelta(seconds=rng.uniform(1, TICK_SECONDS))
        for dealer in rolling.tick(dealers, now).dealers:
            assert now <= pending.pop(dealer), (seed, dealer)


# --- against MariaDB: a change only the fingerprint sees, found within a cycle, one slice a tick -------


@pytest.mark.integration
def test_a_service_data_change_is_found_within_one_cycle_each_run_asking_for_its_slice(source_engines):
    from tests.conftest import BILLING_DB, PIPELINE_SERVER_URL, V3_DB, recreate_source_tables
    from tests.sourcedata import PARTNER_A, PARTNER_B, SourceBuilder
    from usage_pipeline.detection import PartitionOutcome, RunOutcome, advance_cursor, plan_tick
    from usage_pipeline.queries import dealer_directory, probe_raw_max, read_snapshot, reconcile_slice

    admin_billing, admin_v3 = source_engines
    recreate_source_tables(admin_billing, admin_v3)
    builder = SourceBuilder(admin_billing, admin_v3)
    dealers = list(range(1, 41))
    for dealer in dealers:
        builder.dealer(dealer, PARTNER_A if dealer % 2 else PARTNER_B)
        builder.service(1000 + dealer, 1)
        for day in (3, 4):
            builder.usage(dealer, 1000 + dealer, 1, date(2026, 10, day), "2.5000", datetime(2026, 10, day, 8))

    billing = sa.create_engine(f"{PIPELINE_SERVER_URL}/{BILLING_DB}")
    with sa.create_engine(f"{PIPELINE_SERVER_URL}/{V3_DB}").connect() as conn:
        partners, _ = dealer_directory(conn)
    joins: list[set[int] | None] = []  # each statement that joins service data: its dealers (None: all)

    @sa.event.listens_for(billing, "before_cursor_execute")
    def record(conn, cursor, statement, parameters, context, executemany):
        if "v4_wh_service_data" in statement:  # on MariaDB with literal ids (queries.execute_join)
            ranges = re.findall(r"usage_FK_dealer_id` BETWEEN (\d+) AND (\d+)", statement)
            lists = re.findall(r"usage_FK_dealer_id` IN \(([\d, ]+)\)", statement)
            dealers = {d for low, high in ranges for d in range(int(low), int(high) + 1)}
            dealers |= {int(d) for ids in lists for d in ids.split(",")}
            joins.append(dealers or None)

    ok = RunOutcome("test", "Completed", True)

    def tick(cursor: Cursor, state: ReconciliationState | None, now: datetime):
        joins.clear()
        with billing.connect() as conn:
            snapshot = read_snapshot(conn, cursor, partners, probe_raw_max(conn), reconciliation=state)
        plan = plan_tick(cursor, snapshot)
        outcomes = {p: PartitionOutcome(p, ok, ok) for p in plan.partitions}
        return advance_cursor(cursor, snapshot, plan, ok if plan.runs_bronze else None, outcomes, now), snapshot, plan

    cursor, _, _ = tick(Cursor(), None, T0)
    assert joins == [None]  # a first tick (without bronze to count from): one full join
    with billing.connect() as conn:
        raw_before = probe_raw_max(conn)
    builder.execute("UPDATE v4_wh_service_data SET service_data_FK_service_status_id = 5"
                    " WHERE service_data_FK_customer_id = %s", 1033)  # dealer 33's rows leave the filters
    with billing.connect() as conn:
        assert probe_raw_max(conn) == raw_before  # the probe cannot see it

    state, now, found, queried = ReconciliationState(cycle_started_at=T0), T0, None, []
    for _ in range(11):  # one cycle: ten runs five minutes apart, and one spare; a tick after each
        now += timedelta(seconds=TICK_SECONDS)
        joins.clear()
        with billing.connect() as conn:
            done, changed, state = reconcile_slice(conn, cursor, state, now, HOUR)
        assert joins and all(j is not None for j in joins), "a slice never joins all of usage"
        asked = set().union(*joins)
        assert asked == set(done.dealers) and len(asked) <= 4 + 1  # a tenth of 40 dealers (and one for the rounding)
        queried.extend(sorted(asked))
        cursor, snapshot, plan = tick(cursor, state, now)
        assert snapshot.checked == set(changed) and snapshot.suspects == set(changed)
        assert set().union(set(), *joins) == set(changed), "a tick asks for its suspects only"
        if plan.dealer_changes:
            found = (now, plan, changed)
            break
    assert found is not None, f"not found within a cycle; reconciled {queried}"
    when, plan, changed = found
    assert changed == {33: "relevant rows disappeared"}
    assert plan.dealer_changes == {33: "relevant rows disappeared"} and set(plan.partitions) == {PARTNER_A}
    assert when - T0 <= timedelta(seconds=HOUR)
    assert queried == list(range(1, 37)), "each dealer once, in id order, four a run"
    assert state.next_dealer == 37 and state.cycle_started_at == T0
    assert cursor.suspects_checked_through == state.slices  # taken: the next tick asks for nothing
    assert tick(cursor, state, now + timedelta(seconds=TICK_SECONDS))[1].checked == frozenset()
    billing.dispose()


# --- a usage-reconciliation run killed at random moments ---------------------------------------------

RECONCILE_IN_A_PROCESS = """
from flows.usage_reconciliation import usage_reconciliation
print(usage_reconciliation(return_state=True).message, flush=True)
"""


@pytest.mark.integration
def test_a_reconciliation_run_killed_at_a_random_moment_leaves_its_slice_to_the_next_run(materialized, lake_root,
                                                                                          monkeypatch):
    """SIGKILL anywhere in a run (as a worker's OOM kill would): its state file is the old one or the new one,
    the next run finds the change again, and the tick after it rebuilds it, once. Dealer 1 alone uses
    service (501, 2); each round moves that service between two relevant statuses, which only the
    fingerprint sees."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    from flows.usage_reconciliation import usage_reconciliation
    from orchestration.reconcile import load_reconciliation_state
    from tests.pipeline_helpers import tick
    from tests.sourcedata import PARTNER_A

    monkeypatch.setenv("USAGE_RECONCILE_SECONDS", "0.001")  # every dealer on every run, here and in the child
    env = dict(os.environ)

    def start() -> tuple[subprocess.Popen, float]:
        return subprocess.Popen([sys.executable, "-c", RECONCILE_IN_A_PROCESS], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True), time.monotonic()

    whole, started = start()  # how long a whole run takes here: the kills land anywhere within it
    assert whole.wait(timeout=300) == 0 and whole.stdout.read().startswith("reconciled"), "an unkilled run completes"
    duration = time.monotonic() - started
    rng = random.Random(20261206)
    for round_no, status in enumerate((10, 3, 10, 3)):
        materialized.execute("UPDATE v4_wh_service_data SET service_data_FK_service_status_id = %s"
                             " WHERE service_data_FK_customer_id = 501 AND service_data_FK_service_id = 2", status)
        process, started = start()
        delay = rng.uniform(0, duration)
        while time.monotonic() - started < delay and process.poll() is None:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        with get_client(sync_client=True) as client:  # its lease would free the slot within 120 s: no waiting here
            client.update_global_concurrency_limit("usage-reconciliation", GlobalConcurrencyLimitUpdate(active_slots=0))
        assert load_reconciliation_state(lake_root)[1] is None, f"round {round_no}: the state file is readable"

        found = usage_reconciliation(return_state=True).result()
        assert found.changed == {1: "rows changed without a newer usage_modified"}, (round_no, delay)
        state, report = tick()
        assert state.is_completed(), state.message
        assert report.suspects == {1} and set(report.partitions) == {PARTNER_A}, (round_no, delay)
        assert tick()[0].message == "no changes"
