"""Unit tests for flows/detection.py: the change rules of CONTRACT.md sections 4 and 5 as pure functions.

`tick()` wires probe_candidates, assemble_snapshot, plan_tick and advance_cursor the way the
detection flow does (flows/usage_change_detection.py), with a hand-written source and child-run
outcomes, and stores the new cursor through JSON as the block would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

import pytest

from tests.cursors import combined
from usage_pipeline.cursor import Cursor, DealerSeen, PartitionStatus, parse_cursor
from usage_pipeline.detection import (
    DealerStats,
    PartitionOutcome,
    Plan,
    RunOutcome,
    advance_cursor,
    assemble_snapshot,
    newly_pending,
    partition_episodes,
    partition_freshness,
    plan_tick,
    probe_candidates,
    silent_changes,
    starts_over,
    with_bronze_stats,
)
from usage_pipeline.reconciliation import ReconcileSlice, ReconciliationState, plan_slice

A = "aaaaaaaa-0000-4000-8000-000000000001"
B = "bbbbbbbb-0000-4000-8000-000000000002"
C = "cccccccc-0000-4000-8000-000000000003"
D = "dddddddd-0000-4000-8000-000000000004"
BASE = datetime(2026, 1, 20, 12, 0, 0)
NOW = datetime(2026, 1, 21, 8, 0, 0)


def t(minutes: int) -> datetime:
    return BASE + timedelta(minutes=minutes)


@dataclass
class Source:
    """What the billing and v3 databases would answer."""

    raw_max: dict[int, datetime | None] = field(default_factory=dict)  # every dealer with any usage row
    relevant: dict[int, DealerStats] = field(default_factory=dict)  # dealers with relevant rows
    partners: dict[int, str | None] = field(default_factory=dict)  # v3 directory

    def copy(self) -> Source:
        return Source(dict(self.raw_max), dict(self.relevant), dict(self.partners))


def base_source() -> Source:
    """A: dealers 1, 2; B: dealer 3 (relevant) and 4 (irrelevant rows only); C: dealer 5 (no usage);
    dealer 6 has relevant rows but maps to no partner."""
    return Source(
        raw_max={1: t(1), 2: t(25), 3: t(3), 4: t(4), 6: t(6)},
        relevant={
            1: DealerStats(t(1), "fp1"),
            2: DealerStats(t(2), "fp2"),  # raw max is newer: an irrelevant row was modified later
            3: DealerStats(t(3), "fp3"),
            6: DealerStats(t(6), "fp6"),
        },
        partners={1: A, 2: A, 3: B, 4: B, 5: C, 6: None},
    )


OK = RunOutcome("ok", "Completed", True)


def outcome(partner: str, silver_fails: bool = False, gold_fails: bool = False) -> PartitionOutcome:
    silver = RunOutcome(f"silver-{partner}", "Failed" if silver_fails else "Completed", not silver_fails,
                        "silver boom" if silver_fails else None)
    if silver_fails:
        return PartitionOutcome(partner, silver, None)
    gold = RunOutcome(f"gold-{partner}", "Crashed" if gold_fails else "Completed", not gold_fails,
                      "gold boom" if gold_fails else None)
    return PartitionOutcome(partner, silver, gold)


def snapshot_for(cursor: Cursor, source: Source, reconcile: bool | ReconcileSlice = False, from_bronze: bool = False):
    """Like read_snapshot after a usage-reconciliation run over `reconcile` (that slice; True: every
    dealer; False: no run since the last tick): probe, query the candidates and the dealers that run
    found changed (`silent_changes`), read v3; or, for a tick that re-extracts all of bronze
    (`from_bronze`), query nothing and await that extract."""
    candidates = probe_candidates(cursor, source.raw_max)
    known = frozenset(source.raw_max) | frozenset(cursor.dealer_last_modified)
    reconciled = known if reconcile is True else frozenset() if reconcile is False else reconcile.dealers
    suspects = frozenset(silent_changes(cursor, reconciled, source.relevant))
    through = None if reconcile is False else cursor.suspects_checked_through + 1
    if from_bronze:
        snapshot = assemble_snapshot(cursor, dict(source.raw_max), known, {}, dict(source.partners), suspects, through)
        return replace(snapshot, awaiting_bronze=True)
    checked = known if candidates is None else frozenset(candidates) | suspects
    queried = {d: s for d, s in source.relevant.items() if d in checked}
    return assemble_snapshot(cursor, dict(source.raw_max), checked, queried, dict(source.partners), suspects, through)


@dataclass
class Tick:
    plan: Plan
    cursor: Cursor  # as stored and read back
    bronze: RunOutcome | None
    ran: list[str]


def tick(cursor: Cursor, source: Source, *, fail: set[str] = frozenset(), fail_gold: set[str] = frozenset(),
         bronze_ok: bool = True, reconcile: bool | ReconcileSlice = False, now: datetime = NOW, full_refresh: bool = False,
         stats_from_bronze: bool = False) -> Tick:
    """One tick as orchestration/tick.py runs it; `stats_from_bronze` as it does when `starts_over`."""
    before = combined(cursor)
    snapshot = snapshot_for(cursor, source, reconcile, from_bronze=stats_from_bronze)
    plan = plan_tick(cursor, snapshot, full_refresh=full_refresh)
    # Invariant: a changed dealer only waits for partitions that this tick actually runs.
    waited_for = set().union(*plan.dealer_partitions.values()) if plan.dealer_partitions else set()
    assert waited_for <= set(plan.partitions), (
        f"dealers wait for partitions {sorted(waited_for - set(plan.partitions))} that the plan never runs"
    )
    bronze = None
    outcomes: dict[str, PartitionOutcome] = {}
    if plan.runs_bronze:
        bronze = OK if bronze_ok else RunOutcome("bronze", "Failed", False, "db down")
        if bronze_ok:
            if snapshot.awaiting_bronze:
                snapshot = with_bronze_stats(snapshot, dict(source.relevant))  # what the full extract holds
            outcomes = {p: outcome(p, p in fail, p in fail_gold) for p in plan.partitions}
    new = advance_cursor(cursor, snapshot, plan, bronze, outcomes, now)
    assert combined(cursor) == before, "the input cursor was mutated"
    stored, warnings = parse_cursor(json.loads(json.dumps(combined(new))))
    assert warnings == []
    assert stored == new
    return Tick(plan, stored, bronze, list(outcomes))


@pytest.fixture
def source() -> Source:
    return base_source()


@pytest.fixture
def settled(source) -> Cursor:
    """The cursor after a successful first run over base_source()."""
    return tick(Cursor(), source).cursor


def test_first_run_plans_bronze_and_every_partition_including_partners_without_usage(source):
    cursor = Cursor()
    assert probe_candidates(cursor, source.raw_max) is None
    result = tick(cursor, source)
    plan = result.plan
    assert plan.first_run
    assert plan.partitions == {A: ["first run"], B: ["first run"], C: ["first run"]}
    assert plan.bronze_dealers is None  # full bronze refresh
    assert plan.dealer_changes == {1: "first run", 2: "first run", 3: "first run", 6: "first run"}
    assert plan.unmapped_dealers == [6]
    assert plan.dealer_partitions == {1: {A}, 2: {A}, 3: {B}, 6: frozenset()}
    assert not plan.is_empty
    assert plan.describe() == "4 dealer(s) -> 3 partition(s)"


def test_first_run_cursor_records_what_was_materialized(source):
    new = tick(Cursor(), source).cursor
    assert not new.is_first_run
    assert new.dealer_last_modified == {1: t(1), 2: t(2), 3: t(3), 6: t(6)}
    assert new.global_last_modified == t(6)
    assert new.fingerprints == {1: "fp1", 2: "fp2", 3: "fp3", 6: "fp6"}
    assert new.dealer_seen == {
        1: DealerSeen(t(1), True, t(1), A),
        2: DealerSeen(t(25), True, t(2), A),
        3: DealerSeen(t(3), True, t(3), B),
        4: DealerSeen(t(4), False, None, B),
        6: DealerSeen(t(6), True, t(6), None),
    }
    assert new.partitions == {
        A: PartitionStatus(materialized_at=NOW, source_watermark=t(2)),
        B: PartitionStatus(materialized_at=NOW, source_watermark=t(3)),
        C: PartitionStatus(materialized_at=NOW, source_watermark=None),
    }
    assert new.suspects_checked_through == 0  # no reconciliation run yet


def test_a_first_run_counted_from_bronze_ends_where_one_counted_by_the_source_does(source):
    """A start-over tick takes its dealer stats from the full extract (no second full join): until then
    every probed dealer may have relevant rows, so dealer 4 (irrelevant rows only) is planned too."""
    assert starts_over(Cursor(), full_refresh=False)
    from_bronze = tick(Cursor(), source, stats_from_bronze=True)
    from_source = tick(Cursor(), source)
    assert from_bronze.plan.partitions == from_source.plan.partitions
    assert from_bronze.plan.bronze_dealers is None
    assert from_bronze.plan.dealer_changes == {**from_source.plan.dealer_changes, 4: "first run"}
    assert from_bronze.cursor == from_source.cursor


def test_a_full_refresh_counted_from_bronze_ends_where_one_counted_by_the_source_does(settled, source):
    source.raw_max[1] = t(90)
    source.relevant[1] = DealerStats(t(90), "fp1b")
    assert starts_over(settled, full_refresh=True) and not starts_over(settled, full_refresh=False)
    from_bronze = tick(settled, source, full_refresh=True, stats_from_bronze=True, reconcile=True,
                       now=NOW + timedelta(hours=1))
    from_source = tick(settled, source, full_refresh=True, reconcile=True, now=NOW + timedelta(hours=1))
    assert from_bronze.plan.partitions == from_source.plan.partitions == {p: ["full refresh requested"] for p in (A, B, C)}
    assert from_bronze.cursor == from_source.cursor
    assert from_bronze.cursor.fingerprints[1] == "fp1b"


def test_a_failed_bronze_leaves_a_first_run_counted_from_bronze_to_retry(source):
    failed = tick(Cursor(), source, stats_from_bronze=True, bronze_ok=False)
    assert failed.cursor.dealer_last_modified == {}
    assert failed.cursor.retry_partitions == {A, B, C}
    assert not starts_over(failed.cursor, full_refresh=False)  # the state says what it saw: every dealer is checked
    retry = tick(failed.cursor, source)
    assert retry.cursor.dealer_last_modified == {1: t(1), 2: t(2), 3: t(3), 6: t(6)}
    assert retry.cursor.retry_partitions == set()


def test_only_a_snapshot_awaiting_bronze_takes_stats_from_it(settled, source):
    with pytest.raises(ValueError, match="awaiting a full bronze extract"):
        with_bronze_stats(snapshot_for(settled, source), {})


def test_a_tick_that_lost_its_state_asks_the_source_not_bronze(settled, source):
    """Lost state re-extracts bronze but plans dealer by dealer ("appeared", "disappeared"): counted
    from bronze, a dealer new since then would have no reason and advance even if its partition failed."""
    lost = edit(settled, lambda v: v.pop("dealer_seen"))
    assert lost.dealer_seen is None and not starts_over(lost, full_refresh=False)
    with pytest.raises(ValueError, match="only a start-over tick"):
        plan_tick(lost, snapshot_for(lost, source, from_bronze=True))
    source.raw_max[7], source.relevant[7], source.partners[7] = t(70), DealerStats(t(70), "fp7"), A
    result = tick(lost, source, fail={A})
    assert result.plan.bronze_dealers is None and result.plan.dealer_changes[7] == "appeared"
    assert 7 not in result.cursor.dealer_last_modified  # waits for A, which failed


def test_first_run_on_an_empty_source_plans_every_partition_and_is_not_repeated():
    empty = Source(partners={1: A, 2: B})
    first = tick(Cursor(), empty)
    assert first.plan.partitions == {A: ["first run"], B: ["first run"]}
    assert first.plan.bronze_dealers is None
    assert first.cursor.dealer_last_modified == {}
    assert first.cursor.global_last_modified is None
    assert not first.cursor.is_first_run  # we wrote empty keys for an empty source
    second = tick(first.cursor, empty)
    assert second.plan.is_empty
    assert second.bronze is None


def test_no_change_gives_an_empty_plan_and_an_unchanged_cursor(settled, source):
    assert probe_candidates(settled, source.raw_max) == set()
    result = tick(settled, source, now=NOW + timedelta(minutes=5))
    assert result.plan.is_empty
    assert result.plan.partitions == {}
    assert result.plan.dealer_changes == {}
    assert result.plan.bronze_dealers == []
    assert result.bronze is None
    assert combined(result.cursor) == combined(settled)  # nothing to write


def test_a_reconciliation_that_found_nothing_only_moves_the_slice_its_suspects_were_taken_through(settled, source):
    result = tick(settled, source, reconcile=True, now=NOW + timedelta(hours=2))
    assert result.plan.is_empty
    assert result.cursor == settled.with_changes(suspects_checked_through=1)


def test_one_changed_dealer_rematerializes_only_its_partition(settled, source):
    source.raw_max[1] = t(30)
    source.relevant[1] = DealerStats(t(30), "fp1b")
    assert probe_candidates(settled, source.raw_max) == {1}
    result = tick(settled, source)
    plan = result.plan
    assert not plan.first_run
    assert plan.dealer_changes == {1: "MAX(usage_modified) changed"}
    assert plan.partitions == {A: ["dealer 1: MAX(usage_modified) changed"]}
    assert plan.bronze_dealers == [1]
    assert result.ran == [A]
    new = result.cursor
    assert new.dealer_last_modified == {**settled.dealer_last_modified, 1: t(30)}
    assert new.global_last_modified == t(30)
    assert new.fingerprints[1] == "fp1b"
    assert new.dealer_seen[1] == DealerSeen(t(30), True, t(30), A)
    assert new.partitions[A] == PartitionStatus(materialized_at=NOW, source_watermark=t(30))
    assert new.partitions[B] == settled.partitions[B]  # untouched partition keeps its status
    # and the next tick is quiet again
    assert tick(new, source).plan.is_empty


def test_max_moving_backwards_is_a_change_and_the_cursor_follows_it(settled, source):
    # the newest row of dealer 3 was deleted: MAX goes back in time
    source.raw_max[3] = t(-10)
    source.relevant[3] = DealerStats(t(-10), "fp3-less")
    result = tick(settled, source)
    assert result.plan.dealer_changes == {3: "MAX(usage_modified) changed"}
    assert result.plan.partitions == {B: ["dealer 3: MAX(usage_modified) changed"]}
    assert result.cursor.dealer_last_modified[3] == t(-10)
    assert result.cursor.partitions[B].source_watermark == t(-10)


def test_global_last_modified_moves_backwards_when_the_newest_dealer_goes_back(settled, source):
    source.raw_max[6] = t(0)
    source.relevant[6] = DealerStats(t(0), "fp6b")
    result = tick(settled, source)
    assert result.plan.dealer_changes == {6: "MAX(usage_modified) changed"}
    assert result.cursor.global_last_modified == t(3)  # max over the remaining dealers


def test_new_dealer_appears(settled, source):
    source.partners[7] = B
    source.raw_max[7] = t(40)
    source.relevant[7] = DealerStats(t(40), "fp7")
    assert probe_candidates(settled, source.raw_max) == {7}
    result = tick(settled, source)
    assert result.plan.dealer_changes == {7: "appeared"}
    assert result.plan.partitions == {B: ["dealer 7: appeared"]}
    assert result.plan.bronze_dealers == [7]
    assert result.cursor.dealer_last_modified[7] == t(40)
    assert result.cursor.dealer_seen[7] == DealerSeen(t(40), True, t(40), B)


def test_dealer_whose_rows_are_all_deleted_disappears(settled, source):
    del source.raw_max[3]
    del source.relevant[3]
    assert probe_candidates(settled, source.raw_max) == {3}
    result = tick(settled, source)
    assert result.plan.dealer_changes == {3: "relevant rows disappeared"}
    assert result.plan.partitions == {B: ["dealer 3: relevant rows disappeared"]}
    assert result.plan.bronze_dealers == [3]
    new = result.cursor
    assert 3 not in new.dealer_last_modified
    assert 3 not in new.fingerprints
    assert 3 not in new.dealer_seen
    assert new.partitions[B] == PartitionStatus(materialized_at=NOW, source_watermark=None)
    assert tick(new, source).plan.is_empty


def test_dealer_whose_rows_stop_being_relevant_disappears_on_reconciliation(settled, source):
    # a service-data change: the usage rows stay (same raw MAX) but no longer pass the filters
    del source.relevant[1]
    assert probe_candidates(settled, source.raw_max) == set()  # the cheap probe cannot see it
    result = tick(settled, source, reconcile=True)
    assert result.plan.dealer_changes == {1: "relevant rows disappeared"}
    assert result.plan.partitions == {A: ["dealer 1: relevant rows disappeared"]}
    assert 1 not in result.cursor.dealer_last_modified
    assert result.cursor.dealer_seen[1] == DealerSeen(t(1), False, None, A)
    assert tick(result.cursor, source).plan.is_empty


def test_null_timestamps_appear_and_then_stay_unchanged(settled, source):
    source.partners[8] = A
    source.raw_max[8] = None  # every row has usage_modified NULL
    source.relevant[8] = DealerStats(None, "fp8")
    first = tick(settled, source)
    assert first.plan.dealer_changes == {8: "appeared"}
    assert first.plan.partitions == {A: ["dealer 8: appeared"]}
    new = first.cursor
    assert 8 in new.dealer_last_modified and new.dealer_last_modified[8] is None
    assert combined(new)["dealer_last_modified"]["8"] is None
    assert new.dealer_seen[8] == DealerSeen(None, True, None, A)
    # unchanged: neither the probe nor a reconciliation finds anything
    assert probe_candidates(new, source.raw_max) == set()
    assert tick(new, source).plan.is_empty
    assert tick(new, source, reconcile=True).plan.is_empty


def test_only_null_timestamp_dealers_is_not_a_first_run():
    source = Source(raw_max={1: None}, relevant={1: DealerStats(None, "fp")}, partners={1: A})
    first = tick(Cursor(), source)
    assert first.cursor.dealer_last_modified == {1: None}
    assert first.cursor.global_last_modified is None
    assert not first.cursor.is_first_run
    assert tick(first.cursor, source).plan.is_empty


def test_max_changing_from_a_timestamp_to_null_and_back_is_a_change(settled, source):
    source.raw_max[1] = None
    source.relevant[1] = DealerStats(None, "fp1")
    result = tick(settled, source)
    assert result.plan.dealer_changes == {1: "MAX(usage_modified) changed"}
    assert result.cursor.dealer_last_modified[1] is None
    source.raw_max[1] = t(50)
    source.relevant[1] = DealerStats(t(50), "fp1")
    again = tick(result.cursor, source)
    assert again.plan.dealer_changes == {1: "MAX(usage_modified) changed"}
    assert again.cursor.dealer_last_modified[1] == t(50)


def test_dealer_moved_between_partners_rematerializes_both(settled, source):
    source.partners[1] = B  # v3 directory edit only; no usage row changed
    assert probe_candidates(settled, source.raw_max) == set()
    result = tick(settled, source)
    plan = result.plan
    assert plan.dealer_changes == {1: f"moved from partner {A} to {B}"}
    assert plan.dealer_partitions == {1: frozenset({A, B})}
    assert set(plan.partitions) == {A, B}
    assert plan.partitions[A] == [f"dealer 1: moved from partner {A} to {B}"]
    assert plan.bronze_dealers == [1]
    assert result.cursor.dealer_seen[1].partner == B
    assert result.cursor.partitions[A].source_watermark == t(2)  # only dealer 2 left in A
    assert result.cursor.partitions[B].source_watermark == t(3)
    assert tick(result.cursor, source).plan.is_empty


def test_dealer_moved_and_changed_in_the_same_tick_rematerializes_both(settled, source):
    source.partners[3] = A
    source.raw_max[3] = t(60)
    source.relevant[3] = DealerStats(t(60), "fp3b")
    plan = tick(settled, source).plan
    assert plan.dealer_changes == {3: "MAX(usage_modified) changed"}
    assert plan.dealer_partitions[3] == {A, B}
    assert set(plan.partitions) == {A, B}


def test_moved_dealer_advances_only_when_both_partitions_succeed(settled, source):
    source.partners[1] = B
    first = tick(settled, source, fail={A})
    assert first.cursor.dealer_seen[1].partner == A  # not advanced
    assert first.cursor.partitions[A].failures == 1
    assert first.cursor.partitions[B].failures == 0
    second = tick(first.cursor, source, fail_gold={B})
    assert set(second.plan.partitions) == {A, B}  # both again, not just the failed one
    assert second.plan.dealer_changes == {1: f"moved from partner {A} to {B}"}
    assert second.cursor.dealer_seen[1].partner == A
    assert second.cursor.partitions[A] == PartitionStatus(materialized_at=NOW, source_watermark=t(2))
    assert second.cursor.partitions[B].failures == 1
    third = tick(second.cursor, source)
    assert set(third.plan.partitions) == {A, B}
    assert third.cursor.dealer_seen[1].partner == B
    assert third.cursor.retry_partitions == set()
    assert tick(third.cursor, source).plan.is_empty


def test_new_unmapped_dealer_is_reported_runs_no_partition_and_advances(settled, source):
    source.partners[9] = None
    source.raw_max[9] = t(70)
    source.relevant[9] = DealerStats(t(70), "fp9")
    result = tick(settled, source)
    plan = result.plan
    assert plan.dealer_changes == {9: "appeared"}
    assert plan.unmapped_dealers == [9]
    assert plan.partitions == {}
    assert plan.dealer_partitions == {9: frozenset()}
    assert plan.bronze_dealers == [9]  # bronze holds unmapped dealers' rows too
    assert not plan.is_empty
    assert result.bronze is OK
    assert result.cursor.dealer_last_modified[9] == t(70)
    assert result.cursor.dealer_seen[9] == DealerSeen(t(70), True, t(70), None)
    assert tick(result.cursor, source).plan.is_empty


def test_dealer_missing_from_v3_counts_as_unmapped(settled, source):
    source.raw_max[11] = t(5)
    source.relevant[11] = DealerStats(t(5), "fp11")  # no row in v3.dealer at all
    result = tick(settled, source)
    assert result.plan.unmapped_dealers == [11]
    assert result.plan.partitions == {}
    assert result.cursor.dealer_last_modified[11] == t(5)


def test_dealer_unmapped_in_v3_rematerializes_its_old_partition(settled, source):
    source.partners[3] = None
    result = tick(settled, source)
    assert result.plan.dealer_changes == {3: f"moved from partner {B} to None"}
    assert result.plan.partitions == {B: [f"dealer 3: moved from partner {B} to None"]}
    assert result.plan.unmapped_dealers == [3]
    assert result.cursor.dealer_seen[3].partner is None
    assert result.cursor.partitions[B].source_watermark is None


def edit(cursor: Cursor, change) -> Cursor:
    """An operator edit in the Prefect UI: change the stored JSON, read it back."""
    value = json.loads(json.dumps(combined(cursor)))
    change(value)
    edited, warnings = parse_cursor(value)
    assert warnings == []
    return edited


def test_operator_removing_a_dealer_key_rematerializes_its_partition(settled, source):
    edited = edit(settled, lambda v: v["dealer_last_modified"].pop("3"))
    assert probe_candidates(edited, source.raw_max) == {3}
    result = tick(edited, source)
    assert result.plan.dealer_changes == {3: "cursor entry removed"}
    assert result.plan.partitions == {B: ["dealer 3: cursor entry removed"]}
    assert result.plan.bronze_dealers == [3]
    assert result.cursor.dealer_last_modified == settled.dealer_last_modified
    assert tick(result.cursor, source).plan.is_empty


@pytest.mark.parametrize("value", ["2020-01-01T00:00:00.000000Z", None, "2030-01-01T00:00:00.000000Z"])
def test_operator_setting_a_dealer_key_to_another_value_rematerializes_its_partition(settled, source, value):
    edited = edit(settled, lambda v: v["dealer_last_modified"].__setitem__("1", value))
    assert probe_candidates(edited, source.raw_max) == {1}
    result = tick(edited, source)
    assert result.plan.dealer_changes == {1: "MAX(usage_modified) changed"}
    assert result.plan.partitions == {A: ["dealer 1: MAX(usage_modified) changed"]}
    assert result.cursor.dealer_last_modified[1] == t(1)  # restored from the source


def test_operator_adding_a_key_for_a_dealer_without_rows_rematerializes_its_partition(settled, source):
    edited = edit(settled, lambda v: v["dealer_last_modified"].__setitem__("5", "2026-01-01T00:00:00.000000Z"))
    assert 5 in probe_candidates(edited, source.raw_max)
    result = tick(edited, source)
    assert result.plan.dealer_changes == {5: "relevant rows disappeared"}
    assert result.plan.partitions == {C: ["dealer 5: relevant rows disappeared"]}
    assert 5 not in result.cursor.dealer_last_modified


@pytest.mark.parametrize("reset", [lambda v: v.clear(),
                                   lambda v: v.update(global_last_modified=None, dealer_last_modified={})])
def test_operator_reset_gives_first_run_behaviour(settled, source, reset):
    edited = edit(settled, reset)
    assert edited.is_first_run
    result = tick(edited, source)
    assert result.plan.first_run
    assert result.plan.bronze_dealers is None
    assert set(result.plan.partitions) == {A, B, C}
    assert result.cursor.dealer_last_modified == settled.dealer_last_modified


def test_unchanged_dealers_are_not_queried_and_their_rows_are_carried_over(settled, source):
    source.raw_max[3] = t(80)
    source.relevant[3] = DealerStats(t(80), "fp3b")
    snapshot = snapshot_for(settled, source)
    assert snapshot.checked == frozenset({3})
    assert snapshot.suspects == frozenset()
    assert snapshot.relevant == {
        1: DealerStats(t(1), "fp1"),
        2: DealerStats(t(2), "fp2"),
        3: DealerStats(t(80), "fp3b"),
        6: DealerStats(t(6), "fp6"),
    }


def test_assemble_snapshot_fills_unchecked_dealers_from_the_cursor():
    cursor = Cursor(dealer_last_modified={1: t(1), 2: t(2), 3: None}, fingerprints={1: "fp1", 3: "fp3"})
    snapshot = assemble_snapshot(
        cursor,
        raw_max={1: t(1), 2: t(9), 3: None, 4: t(4)},
        checked=frozenset({2, 4}),
        queried={4: DealerStats(t(4), "fp4")},  # 2 was checked and has no relevant rows any more
        partners={1: A, 2: A, 3: B, 4: None},
    )
    assert snapshot.relevant == {
        1: DealerStats(t(1), "fp1"),
        3: DealerStats(None, "fp3"),
        4: DealerStats(t(4), "fp4"),
    }
    assert snapshot.raw_max == {1: t(1), 2: t(9), 3: None, 4: t(4)}
    assert snapshot.partners == {1: A, 2: A, 3: B, 4: None}
    assert snapshot.checked == frozenset({2, 4})
    assert snapshot.suspects == frozenset() and snapshot.suspects_through is None


def test_assemble_snapshot_uses_an_empty_fingerprint_when_none_was_stored():
    cursor = Cursor(dealer_last_modified={1: t(1)})
    snapshot = assemble_snapshot(cursor, {1: t(1)}, frozenset(), {}, {1: A})
    assert snapshot.relevant == {1: DealerStats(t(1), "")}


def test_fingerprint_change_with_same_max_is_found_by_reconciliation(settled, source):
    # a row deleted below MAX: same MAX, different count and sums
    source.relevant[2] = DealerStats(t(2), "fp2-after-delete")
    assert tick(settled, source).plan.is_empty  # the cheap probe alone cannot see it
    result = tick(settled, source, reconcile=True)
    assert result.plan.dealer_changes == {2: "rows changed without a newer usage_modified"}
    assert result.plan.partitions == {A: ["dealer 2: rows changed without a newer usage_modified"]}
    assert result.cursor.fingerprints[2] == "fp2-after-delete"
    assert result.cursor.dealer_last_modified[2] == t(2)
    assert tick(result.cursor, source, reconcile=True).plan.is_empty


def test_missing_fingerprints_rematerialize_on_reconciliation(settled, source):
    edited = edit(settled, lambda v: v.pop("fingerprints"))
    result = tick(edited, source, reconcile=True)
    assert set(result.plan.dealer_changes) == {1, 2, 3, 6}
    assert set(result.plan.dealer_changes.values()) == {"rows changed without a newer usage_modified"}
    assert result.cursor.fingerprints == settled.fingerprints


def test_the_rolling_reconciliation_finds_a_silent_change_when_its_slice_reaches_the_dealer(settled, source):
    """Runs five minutes apart reconcile a slice each (real `plan_slice` and `silent_changes`, as
    queries.reconcile_slice does), a tick after each: dealer 3's change is found by the slice that holds
    it, rebuilt by the tick after it, and the cycle's last slice completes it."""
    source.relevant[3] = DealerStats(t(3), "fp3-after-delete")  # same MAX: only the fingerprint sees it
    known = set(source.raw_max) | set(settled.dealer_last_modified)
    cursor, now, state, slices = settled, NOW, ReconciliationState(cycle_started_at=NOW), []
    while True:
        now += timedelta(minutes=5)
        rolling = plan_slice(known, state.cycle_started_at, state.next_dealer, now, 3600)
        changed = silent_changes(cursor, rolling.dealers, source.relevant)
        state = state.after(rolling, changed, cursor.suspects_checked_through, now)
        result = tick(cursor, source, reconcile=rolling, now=now)
        slices.append(sorted(rolling.dealers))
        assert bool(result.plan.dealer_changes) == (3 in rolling.dealers) == bool(changed)
        cursor = result.cursor
        assert cursor.suspects_checked_through == state.slices
        if rolling.completes:
            break
        assert state.next_dealer == rolling.next_dealer and state.cycle_started_at == NOW
    assert sum(slices, []) == sorted(known) and len(slices) == 10
    assert cursor.fingerprints[3] == "fp3-after-delete"
    assert state.cycle_started_at == now == NOW + timedelta(minutes=50) and state.next_dealer is None
    assert parse_cursor(json.loads(json.dumps(combined(cursor))))[0] == cursor


def test_missing_dealer_seen_checks_every_dealer_and_rebuilds_bronze_and_every_partition(settled, source):
    """The state store was lost: nothing proves a partition current, so every one is rebuilt (C's too)."""
    edited = edit(settled, lambda v: v.pop("dealer_seen"))
    assert edited.dealer_seen is None
    assert not edited.is_first_run
    assert probe_candidates(edited, source.raw_max) is None
    result = tick(edited, source)
    assert not result.plan.first_run
    assert result.plan.dealer_changes == {d: "no record of its partition" for d in (1, 2, 3, 6)}
    assert set(result.plan.partitions) == {A, B, C}
    assert result.plan.partitions[C] == ["no pipeline state"]
    assert result.plan.bronze_dealers is None
    assert result.cursor.dealer_seen == settled.dealer_seen
    assert tick(result.cursor, source).plan.is_empty


# --- operator requests: partners=[...] and full_refresh ------------------------------------------


def test_requested_partner_is_rebuilt_alone_with_its_dealers_reread(settled, source):
    snapshot = snapshot_for(settled, source)
    plan = plan_tick(settled, snapshot, requested=frozenset([A]))
    assert plan.partitions == {A: ["requested by operator"]}
    assert plan.bronze_dealers == [1, 2]
    assert plan.dealer_partitions == {1: frozenset([A]), 2: frozenset([A])}
    assert not plan.dealer_changes and not plan.unknown_partners


def test_requested_partner_advances_its_dealers_only_when_it_succeeds(settled, source):
    source.relevant[1] = DealerStats(t(1), "fp1")
    edited = edit(settled, lambda v: v["dealer_last_modified"].__setitem__("1", "2026-01-20T12:01:00.000000Z"))
    snapshot = snapshot_for(edited, source)
    failed = {A: outcome(A, silver_fails=True)}
    plan = plan_tick(edited, snapshot, requested=frozenset([A]))
    after_failure = advance_cursor(edited, snapshot, plan, OK, failed, NOW)
    assert after_failure.partitions[A].failures == 1
    assert after_failure.dealer_seen[2] == edited.dealer_seen[2]
    after_success = advance_cursor(edited, snapshot, plan, OK, {A: outcome(A)}, NOW)
    assert after_success.partitions[A].failures == 0 and after_success.partitions[A].materialized_at == NOW


def test_requested_partner_with_changes_of_its_own_keeps_both_reasons(settled, source):
    source.raw_max[3] = t(30)
    source.relevant[3] = DealerStats(t(30), "fp3b")
    plan = plan_tick(settled, snapshot_for(settled, source), requested=frozenset([A]))
    assert plan.partitions == {A: ["requested by operator"], B: ["dealer 3: MAX(usage_modified) changed"]}
    assert plan.bronze_dealers == [1, 2, 3]


def test_requested_partner_of_dealers_without_rows_is_rebuilt_empty(settled, source):
    plan = plan_tick(settled, snapshot_for(settled, source), requested=frozenset([C]))
    assert plan.partitions == {C: ["requested by operator"]}
    assert plan.bronze_dealers == [5]


def test_requested_partner_nobody_maps_to_is_reported_not_rebuilt(settled, source):
    plan = plan_tick(settled, snapshot_for(settled, source), requested=frozenset([D]))
    assert plan.unknown_partners == [D]
    assert plan.is_empty and not plan.runs_bronze


def test_full_refresh_plans_like_a_first_run(settled, source):
    plan = plan_tick(settled, snapshot_for(settled, source), full_refresh=True)
    assert plan.first_run and plan.bronze_dealers is None
    assert plan.partitions == {p: ["full refresh requested"] for p in (A, B, C)}


def test_probe_candidates_rules():
    seen = {
        1: DealerSeen(t(1), True, t(1), A),  # untouched
        2: DealerSeen(t(2), True, t(2), A),  # raw max moved
        3: DealerSeen(t(3), True, t(3), B),  # operator removed its key
        4: DealerSeen(t(4), False, None, B),  # irrelevant, untouched
        5: DealerSeen(t(5), True, t(5), B),  # operator changed its key
        7: DealerSeen(t(7), False, None, B),  # irrelevant, now has a key (operator added it)
    }
    cursor = Cursor(
        global_last_modified=t(5),
        dealer_last_modified={1: t(1), 2: t(2), 5: t(0), 6: t(6), 7: t(7)},
        dealer_seen=seen,
    )
    raw_max = {1: t(1), 2: t(22), 3: t(3), 4: t(4), 5: t(5), 7: t(7), 8: t(8)}  # 6 gone, 8 new
    assert probe_candidates(cursor, raw_max) == {2, 3, 5, 6, 7, 8}


def test_probe_candidates_is_none_without_memory():
    raw_max = {1: t(1)}
    assert probe_candidates(Cursor(), raw_max) is None
    assert probe_candidates(Cursor(dealer_last_modified={1: t(1)}), raw_max) is None  # dealer_seen absent
    assert probe_candidates(Cursor(dealer_seen={}), raw_max) == {1}  # empty-source cursor: just the new dealer


def test_failed_partition_keeps_its_dealers_old_entries_while_others_advance(settled, source):
    source.raw_max[1] = t(90)
    source.relevant[1] = DealerStats(t(90), "fp1b")
    source.raw_max[3] = t(91)
    source.relevant[3] = DealerStats(t(91), "fp3b")
    result = tick(settled, source, fail={A})
    new = result.cursor
    # dealer 1 (partition A failed): every entry as before
    assert new.dealer_last_modified[1] == settled.dealer_last_modified[1] == t(1)
    assert new.dealer_seen[1] == settled.dealer_seen[1]
    assert new.fingerprints[1] == settled.fingerprints[1] == "fp1"
    # dealer 3 (partition B succeeded): advanced
    assert new.dealer_last_modified[3] == t(91)
    assert new.dealer_seen[3] == DealerSeen(t(91), True, t(91), B)
    assert new.fingerprints[3] == "fp3b"
    assert new.global_last_modified == t(91)
    failed = new.partitions[A]
    assert failed.failures == 1
    assert failed.last_error == "silver-" + A + " Failed: silver boom"
    assert failed.materialized_at == settled.partitions[A].materialized_at  # last good one kept
    assert failed.source_watermark == settled.partitions[A].source_watermark
    assert new.partitions[B] == PartitionStatus(materialized_at=NOW, source_watermark=t(91))
    assert new.retry_partitions == {A}


def test_gold_failure_counts_as_a_failed_partition(settled, source):
    source.raw_max[1] = t(90)
    source.relevant[1] = DealerStats(t(90), "fp1b")
    new = tick(settled, source, fail_gold={A}).cursor
    assert new.dealer_last_modified[1] == t(1)
    assert new.partitions[A].failures == 1
    assert new.partitions[A].last_error == "gold-" + A + " Crashed: gold boom"


def test_failed_partition_is_retried_counted_and_reset_on_success(settled, source):
    source.raw_max[1] = t(90)
    source.relevant[1] = DealerStats(t(90), "fp1b")
    first = tick(settled, source, fail={A})
    assert first.cursor.partitions[A].failures == 1

    second = tick(first.cursor, source, fail={A}, now=NOW + timedelta(minutes=5))
    assert second.plan.partitions == {
        A: ["dealer 1: MAX(usage_modified) changed", "retry after 1 failed tick(s)"]
    }
    assert second.plan.bronze_dealers == [1, 2]  # the changed dealer and every dealer of the retried partition
    assert second.cursor.partitions[A].failures == 2
    assert second.cursor.dealer_last_modified[1] == t(1)

    third_time = NOW + timedelta(minutes=10)
    third = tick(second.cursor, source, now=third_time)
    assert "retry after 2 failed tick(s)" in third.plan.partitions[A]
    assert third.cursor.partitions[A] == PartitionStatus(materialized_at=third_time, source_watermark=t(90))
    assert third.cursor.dealer_last_modified[1] == t(90)
    assert third.cursor.fingerprints[1] == "fp1b"
    assert third.cursor.retry_partitions == set()
    assert tick(third.cursor, source).plan.is_empty


def test_failed_partition_without_dealer_changes_is_retried(source):
    # first run: partner C (no usage rows) fails; A and B succeed
    first = tick(Cursor(), source, fail={C})
    assert first.cursor.partitions[C].failures == 1
    assert first.cursor.dealer_last_modified == {1: t(1), 2: t(2), 3: t(3), 6: t(6)}
    second = tick(first.cursor, source)
    assert second.plan.dealer_changes == {}
    assert second.plan.partitions == {C: ["retry after 1 failed tick(s)"]}
    assert second.plan.bronze_dealers == [5]
    assert not second.plan.is_empty
    assert second.cursor.partitions[C] == PartitionStatus(materialized_at=NOW, source_watermark=None)
    assert tick(second.cursor, source).plan.is_empty


def test_failed_partition_is_remembered_even_after_its_partner_leaves_the_directory(source):
    first = tick(Cursor(), source, fail={C})
    source.partners[5] = None  # C no longer exists in v3
    second = tick(first.cursor, source, fail={C})
    assert C in second.plan.partitions
    assert second.cursor.partitions[C].failures == 2
    third = tick(second.cursor, source)
    assert C not in third.cursor.partitions  # succeeded and no longer live: forgotten
    assert tick(third.cursor, source).plan.is_empty


def test_bronze_failure_advances_nobody(settled, source):
    source.raw_max[1] = t(90)
    source.relevant[1] = DealerStats(t(90), "fp1b")
    source.raw_max[3] = t(91)
    source.relevant[3] = DealerStats(t(91), "fp3b")
    source.partners[12] = None  # and an unmapped newcomer
    source.raw_max[12] = t(92)
    source.relevant[12] = DealerStats(t(92), "fp12")
    result = tick(settled, source, bronze_ok=False)
    assert result.ran == []
    new = result.cursor
    assert new.dealer_last_modified == settled.dealer_last_modified
    assert new.fingerprints == settled.fingerprints
    assert new.dealer_seen == settled.dealer_seen
    assert new.global_last_modified == settled.global_last_modified
    for partner in (A, B):
        assert new.partitions[partner].failures == 1
        assert new.partitions[partner].last_error == "bronze Failed: db down"
        assert new.partitions[partner].materialized_at == settled.partitions[partner].materialized_at
    assert new.partitions[C] == settled.partitions[C]  # not planned, not touched
    retry = tick(new, source)
    assert set(retry.plan.dealer_changes) == {1, 3, 12}
    assert retry.cursor.dealer_last_modified[1] == t(90)
    assert retry.cursor.dealer_last_modified[12] == t(92)
    assert retry.cursor.retry_partitions == set()


# --- freshness lag and pending episodes (issue 19) ---------------------------------------------------------


def test_a_partition_is_pending_from_the_first_tick_that_planned_it_until_it_is_published(settled, source):
    """The lag counts from the tick that first found it needing a rebuild, not from a source timestamp."""
    source.raw_max[1] = t(90)
    source.relevant[1] = DealerStats(t(90), "fp1b")
    first = tick(settled, source, fail={A})
    assert newly_pending(settled, first.plan) == [A]
    assert first.cursor.partitions[A].pending_since == NOW
    assert first.cursor.partitions[B].pending_since is None  # not planned

    later = NOW + timedelta(minutes=5)
    second = tick(first.cursor, source, fail_gold={A}, now=later)
    assert newly_pending(first.cursor, second.plan) == []  # announced by the first tick
    assert second.cursor.partitions[A].pending_since == NOW
    assert second.cursor.partitions[A].lag_seconds(later) == 300

    published = NOW + timedelta(minutes=10)
    third = tick(second.cursor, source, now=published)
    assert third.cursor.partitions[A].pending_since is None
    assert third.cursor.partitions[A].lag_seconds(published + timedelta(hours=1)) == 0


def test_the_episode_of_a_pending_partition_holds_until_it_is_published_then_a_new_one_begins(settled, source):
    source.raw_max[1] = t(90)
    source.relevant[1] = DealerStats(t(90), "fp1b")
    first = tick(settled, source, fail={A})
    opened = partition_episodes(settled, first.plan)
    assert opened == {A: settled.partitions[A].episode}
    second = tick(first.cursor, source, now=NOW + timedelta(minutes=5))
    assert partition_episodes(first.cursor, second.plan) == opened  # the publishing tick closes the same one
    source.raw_max[1] = t(95)
    source.relevant[1] = DealerStats(t(95), "fp1c")
    third = tick(second.cursor, source, now=NOW + timedelta(minutes=10))
    assert newly_pending(second.cursor, third.plan) == [A]
    assert partition_episodes(second.cursor, third.plan)[A] not in opened.values()


def test_a_tick_that_died_before_saving_leaves_the_next_one_the_same_episode(settled, source):
    """Its pending event was sent; the retry announces the same episode again, so that episode's window
    (usage-partition-stale) is the one the retry's publish closes."""
    source.raw_max[3] = t(90)
    source.relevant[3] = DealerStats(t(90), "fp3b")
    died = plan_tick(settled, snapshot_for(settled, source))
    retry = tick(settled, source, now=NOW + timedelta(minutes=7))
    assert newly_pending(settled, died) == newly_pending(settled, retry.plan) == [B]
    assert partition_episodes(settled, died) == partition_episodes(settled, retry.plan)


def test_bronze_failure_leaves_every_planned_partition_pending_since_that_tick(settled, source):
    source.raw_max[1] = t(90)
    source.relevant[1] = DealerStats(t(90), "fp1b")
    failed = tick(settled, source, bronze_ok=False)
    assert failed.cursor.partitions[A].pending_since == NOW
    assert failed.cursor.partitions[B].pending_since is None


def test_bronze_failure_on_first_run_leaves_every_partition_to_retry(source):
    result = tick(Cursor(), source, bronze_ok=False)
    assert result.cursor.dealer_last_modified == {}
    assert result.cursor.retry_partitions == {A, B, C}
    retry = tick(result.cursor, source)
    assert set(retry.plan.partitions) == {A, B, C}
    assert set(retry.plan.dealer_changes) == {1, 2, 3, 6}
    assert retry.cursor.dealer_last_modified == {1: t(1), 2: t(2), 3: t(3), 6: t(6)}
    assert retry.cursor.retry_partitions == set()


def test_advance_cursor_with_bronze_failure_and_unmapped_dealer():
    cursor = Cursor(dealer_seen={})
    source = Source(raw_max={1: t(1)}, relevant={1: DealerStats(t(1), "fp")}, partners={1: None})
    snapshot = snapshot_for(cursor, source)
    plan = plan_tick(cursor, snapshot)
    failed = RunOutcome("bronze", "Failed", False, None)
    new = advance_cursor(cursor, snapshot, plan, failed, {}, NOW)
    assert new.dealer_last_modified == {}
    assert new.dealer_seen == {}
    ran = advance_cursor(cursor, snapshot, plan, None, {}, NOW)
    assert ran.dealer_last_modified == {1: t(1)}


def test_partition_outcome_ok_and_error():
    good = outcome(A)
    assert good.ok and good.error is None
    silver = outcome(A, silver_fails=True)
    assert not silver.ok
    assert silver.gold is None
    assert silver.error == f"silver-{A} Failed: silver boom"
    gold = outcome(A, gold_fails=True)
    assert not gold.ok
    assert gold.error == f"gold-{A} Crashed: gold boom"
    quiet = PartitionOutcome(A, RunOutcome("s", "Cancelled", False), None)
    assert quiet.error == "s Cancelled: no message"


def test_plan_of_partitions_and_reasons_is_sorted_by_partner(settled, source):
    source.partners[1] = C
    source.raw_max[3] = t(99)
    source.relevant[3] = DealerStats(t(99), "x")
    plan = tick(settled, source).plan
    assert list(plan.partitions) == sorted(plan.partitions) == [A, B, C]
    assert list(plan.dealer_changes) == [1, 3]


def test_first_run_after_a_reset_plans_every_partition_a_dealer_waits_for():
    """Operator resets the two contract keys (dealer_seen stays) while dealer 1 moved A -> B and A left v3.

    A first run must still let the dealer advance; otherwise the cursor stays empty and every
    tick is a first run again, forever, and A's stale files are never emptied.
    """
    before = Source(raw_max={1: t(1)}, relevant={1: DealerStats(t(1), "fp1")}, partners={1: A})
    settled = tick(Cursor(), before).cursor
    reset = edit(settled, lambda v: v.update(global_last_modified=None, dealer_last_modified={}))
    assert reset.is_first_run
    after = before.copy()
    after.partners[1] = B
    snapshot = snapshot_for(reset, after)
    plan = plan_tick(reset, snapshot)
    assert plan.first_run
    outcomes = {p: outcome(p) for p in plan.partitions}
    new = advance_cursor(reset, snapshot, plan, OK, outcomes, NOW)
    assert new.dealer_last_modified == {1: t(1)}, f"dealer 1 did not advance; plan ran only {list(plan.partitions)}"
    assert not new.is_first_run
    assert A in plan.partitions  # the partner the dealer left must be emptied too


# --- freshness as operators see it ------------------------------------------------------------------


def test_freshness_is_fresh_after_success_and_names_why_otherwise(settled, source):
    rows = {row.partner: row for row in partition_freshness(settled)}
    assert set(rows) == {A, B, C}
    assert rows[A].dealers == [1, 2] and rows[A].state == "fresh"
    assert rows[C].dealers == [] and rows[C].state == "fresh"  # built empty: its dealer 5 has no usage

    edited = edit(settled, lambda v: v["dealer_last_modified"].pop("3"))
    assert {r.partner: r.stale_because for r in partition_freshness(edited)}[B] == "cursor entry edited: rebuilt on the next tick"
    failed = tick(edit(settled, lambda v: v["dealer_last_modified"].pop("1")), source, fail={A}).cursor
    assert {r.partner: r.stale_because for r in partition_freshness(failed)}[A].startswith("failed 1 tick(s) in a row")
    reset = edit(settled, lambda v: v.update(global_last_modified=None, dealer_last_modified={}))
    assert {r.stale_because for r in partition_freshness(reset)} == {"cursor reset: rebuilt on the next tick"}
    planned = {r.partner: r.stale_because for r in partition_freshness(settled, frozenset([A, B]))}
    assert planned == {A: "rebuild planned", B: "rebuild planned", C: None}


def test_freshness_lists_each_partners_dealers_sorted_from_one_pass():
    """Dealers of several partners, interleaved and out of order, each listed under its partner in
    dealer order; a partner known only from its status has none (bench/bookkeeping.py: 200 x 20,000)."""
    partners = [A, B, C]
    seen = {dealer: DealerSeen(t(dealer), True, t(dealer), partners[dealer % 3] if dealer % 7 else None)
            for dealer in (14, 3, 9, 1, 22, 7, 5, 30, 2)}
    cursor = Cursor(dealer_last_modified={d: t(d) for d in seen}, dealer_seen=seen,
                    partitions={D: PartitionStatus(materialized_at=t(0))})
    rows = {row.partner: row.dealers for row in partition_freshness(cursor)}
    assert rows == {p: sorted(d for d, s in seen.items() if s.partner == p) for p in partners} | {D: []}
    assert rows[A] == [3, 9, 30] and rows[B] == [1, 22] and rows[C] == [2, 5]
