"""The rolling reconciliation: which dealers a tick re-checks by fingerprint, so that every dealer is
re-checked once per USAGE_RECONCILE_SECONDS while no tick pays for the join of all of `usage`.

A cycle is one pass over every known dealer in id order. It starts when the previous one completed
(`reconciled_at`); each tick takes the dealers that the cycle's elapsed share of its target length
calls for, from where the last tick stopped (`next_dealer`). Plain values only (README
"The rolling reconciliation").
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

# The detection schedule (CONTRACT.md section 3, prefect.yaml); a cycle ends two ticks early for it.
TICK_SECONDS = 300


@dataclass(frozen=True)
class ReconcileSlice:
    """The dealers one tick reconciles, and where that leaves the cycle."""

    dealers: frozenset[int]
    known: int  # dealers known to the tick: the probe's and the cursor's
    done: int  # of those, reconciled in this cycle, this slice included
    completes: bool  # the cycle ends with this slice; the next one starts at this tick
    next_dealer: int | None  # where the cycle goes on at the next tick (None: its first dealer)

    @classmethod
    def everything(cls, known: Iterable[int]) -> ReconcileSlice:
        """All dealers at once: a start-over tick, or one that lost the pipeline's state."""
        dealers = frozenset(known)
        return cls(dealers, len(dealers), len(dealers), completes=True, next_dealer=None)

    @property
    def cycle_percent(self) -> int:
        """How far the cycle is after this slice (100 once completed)."""
        return 100 if self.completes or not self.known else 100 * self.done // self.known

    def describe(self) -> str:
        return f"reconciled {len(self.dealers):,} of {self.known:,} dealers (cycle {self.cycle_percent} %)"


def cycle_seconds(period_seconds: float) -> float:
    """A cycle's target length. A dealer is reached at most a tick after its share comes due, and a
    cycle ends at the first tick past its target, so two ticks short of the period keeps each dealer's
    checks at most a period apart. A period of two ticks or less reconciles everything every tick."""
    return period_seconds - 2 * TICK_SECONDS


def plan_slice(known: Iterable[int], reconciled_at: datetime | None, next_dealer: int | None, now: datetime,
               period_seconds: float) -> ReconcileSlice:
    """This tick's slice of the cycle that started at `reconciled_at` (None: never completed, so all
    now). Dealers that appear mid-cycle behind `next_dealer` wait for the next cycle (the probe checks
    a new dealer anyway); the tick at or after the target takes all that is left and completes it, and
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
    """About when the rolling reconciliation re-checks `dealer` (None: on the next tick), for `explain`:
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
