"""The rolling reconciliation: which dealers a `usage-reconciliation` run re-checks by fingerprint, so
that every dealer is re-checked once per USAGE_RECONCILE_SECONDS while neither it nor a detection tick
pays for the join of all of `usage`, and what it leaves for detection.

A cycle is one pass over every known dealer in id order. It starts when the previous one completed
(`cycle_started_at`); each run takes the dealers that the cycle's elapsed share of its target length
calls for, from where the last run stopped (`next_dealer`). The dealers whose fingerprint differs from
what was materialized become suspects, numbered by the slice that found them; a detection tick
re-checks the suspects newer than the last slice it took them from, and rebuilds those that really
changed. Plain values only (README "The rolling reconciliation").
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from usage_pipeline.cursor import format_timestamp, parse_timestamp

# The detection and reconciliation schedules (CONTRACT.md section 3, prefect.yaml); a cycle ends two
# runs early for them.
TICK_SECONDS = 300


@dataclass(frozen=True)
class ReconcileSlice:
    """The dealers one run reconciles, and where that leaves the cycle."""

    dealers: frozenset[int]
    known: int  # dealers known to the pipeline's state
    done: int  # of those, reconciled in this cycle, this slice included
    completes: bool  # the cycle ends with this slice; the next one starts at this run
    next_dealer: int | None  # where the cycle goes on at the next run (None: its first dealer)

    @property
    def cycle_percent(self) -> int:
        """How far the cycle is after this slice (100 once completed)."""
        return 100 if self.completes or not self.known else 100 * self.done // self.known

    def describe(self) -> str:
        return f"reconciled {len(self.dealers):,} of {self.known:,} dealers (cycle {self.cycle_percent} %)"


@dataclass(frozen=True)
class ReconciliationReport:
    """What one run reconciled and found: the flow's result, its event's payload."""

    slice: ReconcileSlice
    changed: dict[int, str]  # dealer -> why its rows differ from what was materialized
    seconds: float  # asking the source

    def summary(self) -> str:
        found = f"{len(self.changed)} changed, left for the next tick" if self.changed else "no change"
        return f"{self.slice.describe()} in {self.seconds:.1f} s; {found}"


def cycle_seconds(period_seconds: float) -> float:
    """A cycle's target length. A dealer is reached at most a run after its share comes due, and a
    cycle ends at the first run past its target, so two runs short of the period keeps each dealer's
    checks at most a period apart. A period of two runs or less reconciles everything every run."""
    return period_seconds - 2 * TICK_SECONDS


def plan_slice(known: Iterable[int], reconciled_at: datetime | None, next_dealer: int | None, now: datetime,
               period_seconds: float) -> ReconcileSlice:
    """This run's slice of the cycle that started at `reconciled_at` (None: never completed, so all
    now). Dealers that appear mid-cycle behind `next_dealer` wait for the next cycle (the probe checks
    a new dealer anyway); the run at or after the target takes all that is left and completes it, and
    so does one whose clock is behind the cycle's start (else the cycle would wait for it)."""
    ordered = sorted(set(known))
    start = 0 if next_dealer is None else bisect_left(ordered, next_dealer)
    target = cycle_seconds(period_seconds)
    elapsed = None if reconciled_at is None else (now - reconciled_at).total_seconds()
    if elapsed is None or elapsed < 0 or elapsed >= target:
        return ReconcileSlice(frozenset(ordered[start:]), len(ordered), len(ordered), True, None)
    due = math.ceil(len(ordered) * elapsed / target)
    taken = ordered[start:max(start, due)]
    position = taken[-1] + 1 if taken else next_dealer
    return ReconcileSlice(frozenset(taken), len(ordered), start + len(taken), False, position)


def checked_by(dealer: int, known: Iterable[int], reconciled_at: datetime | None, next_dealer: int | None,
               period_seconds: float) -> datetime | None:
    """About when the rolling reconciliation re-checks `dealer` (None: on its next run), for `explain`:
    in this cycle if it has not reached the dealer yet, else in the next one."""
    target = cycle_seconds(period_seconds)
    if reconciled_at is None or target <= 0:
        return None
    ordered = sorted(set(known) | {dealer})
    share = (bisect_left(ordered, dealer) + 1) / len(ordered)
    tick = timedelta(seconds=TICK_SECONDS)
    if next_dealer is None or dealer >= next_dealer:
        return reconciled_at + timedelta(seconds=share * target) + tick
    return reconciled_at + timedelta(seconds=target + share * target) + 2 * tick


@dataclass(frozen=True)
class ReconciliationState:
    """Where the rolling reconciliation stands, and the suspects it left for detection. Only
    `usage-reconciliation` runs write it (`<lake>/_pipeline/reconciliation_state.parquet`); a tick reads it."""

    cycle_started_at: datetime | None = None  # None: no cycle yet, so the next run takes every dealer
    next_dealer: int | None = None
    slices: int = 0  # slices run so far: a suspect carries the number of the one that found it
    suspects: dict[int, int] = field(default_factory=dict)  # dealer -> slice that found it changed

    def unchecked_suspects(self, checked_through: int) -> frozenset[int]:
        """The suspects a tick that re-checked those of slices up to `checked_through` has not re-checked:
        all of them when this state restarted below that number (it was lost and begun anew)."""
        restarted = self.slices < checked_through
        return frozenset(d for d, found_by in self.suspects.items() if restarted or found_by > checked_through)

    def after(self, done: ReconcileSlice, changed: Iterable[int], checked_through: int,
              now: datetime) -> ReconciliationState:
        """The state after slice `done` found `changed`, dropping the suspects detection has re-checked
        (`checked_through`, as the pipeline's state said when the slice started)."""
        slices = self.slices + 1
        kept = {d: found_by for d, found_by in self.suspects.items()
                if d in self.unchecked_suspects(checked_through)}
        suspects = dict(sorted({**kept, **dict.fromkeys(changed, slices)}.items()))
        if done.completes:
            return ReconciliationState(now, None, slices, suspects)
        return ReconciliationState(self.cycle_started_at, done.next_dealer, slices, suspects)

    def overdue_seconds(self, now: datetime, period_seconds: float) -> float:
        """How long past USAGE_RECONCILE_SECONDS the current cycle runs (0 while on time): a cycle ends
        within its period while reconciliation runs come at most a tick apart."""
        if self.cycle_started_at is None:
            return 0.0
        return max(0.0, (now - self.cycle_started_at).total_seconds() - period_seconds)

    def document(self) -> dict[str, Any]:
        return {
            "cycle_started_at": format_timestamp(self.cycle_started_at),
            "next_dealer": self.next_dealer,
            "slices": self.slices,
            "suspects": {str(dealer): found_by for dealer, found_by in self.suspects.items()},
        }


def parse_reconciliation_state(document: dict[str, Any]) -> ReconciliationState:
    """The state as its file holds it; ValueError naming what is unreadable. Whoever finds it unreadable
    starts a new cycle: that finds again, within the period, every change a lost suspect stood for (the
    source still differs from what was materialized)."""
    try:
        slices, next_dealer = document["slices"], document["next_dealer"]
        if not _is_count(slices) or not (next_dealer is None or _is_count(next_dealer)):
            raise ValueError(f"slices {slices!r} and next_dealer {next_dealer!r} must be non-negative integers")
        suspects = {int(dealer): found_by for dealer, found_by in document["suspects"].items()}
        if not all(_is_count(found_by) and found_by <= slices for found_by in suspects.values()):
            raise ValueError(f"suspects must map dealer ids to slice numbers up to {slices}")
        return ReconciliationState(parse_timestamp(document["cycle_started_at"]), next_dealer, slices, suspects)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
