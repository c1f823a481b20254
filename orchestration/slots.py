"""Concurrency slots, held as leases: one run per partner, one bronze writer, one tick at a time.

A slot the server counted but never leased is repaired here. Prefect's server commits a slot's
count, then writes its lease; a server killed between the two leaves a slot that no lease holds,
so no lease expiry ever frees it, and every later run waiting for it would wait forever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterEndTime,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import ConcurrencyLeaseHolder, FlowRun, StateType
from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse
from prefect.context import FlowRunContext
from prefect.exceptions import PrefectHTTPStatusError
from prefect.runtime import flow_run as current_flow_run

from orchestration.runtime import run_or_module_logger
from orchestration.setup import BRONZE_LIMIT, PARTITIONS_LIMIT, ensure_limit, forget_limits, partner_limit, slot_holders
from usage_pipeline.settings import Settings

SLOT_POLL_SECONDS = 1.0  # longest wait between two asks for a taken slot
# Prefect's repossessor frees expired leases every 15 s: a holder that ended without releasing its
# slot has had it freed by lease expiry this long after its last renewal.
REPOSSESSOR_SLACK_SECONDS = 45
HOLDING_STATES = [StateType.RUNNING, StateType.CANCELLING, StateType.PAUSED]  # a run holds slots only in its body

# This process's flow runs waiting for slots, with their parent task runs (a subflow's link to its parent
# run) and the limits they wait for: a run waiting for a slot of a limit holds none of it, nor does its
# parent run (which would wait for it forever).
# Guarded with the asks themselves, so that a repair never takes for a waiter a run whose ask has just
# been granted.
_BOOKS = threading.Lock()
_WAITING: dict[UUID, tuple[UUID | None, frozenset[str]]] = {}


class SlotTaken(RuntimeError):
    """A slot asked for without waiting is held by another run (the server answered 423 Locked)."""


SKIPPED = "Skipped"  # the state name of a tick that did nothing
ANOTHER_TICK = "another detection tick is running"  # why, when it found the detection slot taken: it held none
ANOTHER_RECONCILIATION = "another reconciliation run is running"  # likewise for the reconciliation's slot


@contextmanager
def partner_slot(partner_uuid: str, settings: Settings) -> Iterator[None]:
    """Hold one slot of the partner's limit (one run per partner) and of the global partition limit."""
    name = partner_limit(partner_uuid)
    ensure_limit(name, 1)
    ensure_limit(PARTITIONS_LIMIT, settings.max_concurrent_partitions)
    with logged_slots([name, PARTITIONS_LIMIT], settings):
        yield


@contextmanager
def bronze_slot(settings: Settings) -> Iterator[None]:
    """Hold the bronze table's one slot: its writes, compaction and vacuum never overlap (delta-rs
    conflicts and #3622: one writer per table at a time)."""
    ensure_limit(BRONZE_LIMIT, 1)
    with logged_slots([BRONZE_LIMIT], settings):
        yield


@contextmanager
def logged_slots(names: list[str], settings: Settings) -> Iterator[None]:
    """`leased_slots`, waited for, with the run's log saying when it waits, holds and releases the first."""
    logger = get_run_logger()
    logger.info("Waiting for concurrency slots %s", " and ".join(names))
    with leased_slots(names, settings.slot_lease_seconds):
        logger.info("Holding slot %s", names[0])
        try:
            yield
        finally:
            # Logged while still held: every log line of a holder precedes the next holder's "Holding".
            logger.info("Releasing slot %s", names[0])


@contextmanager
def leased_slots(
    names: list[str], lease_seconds: float, wait: bool = True, fail_if_lost: bool = True
) -> Iterator[LeaseRenewal]:
    """One slot of each limit in `names`, as a lease held by this flow run, waited for as long as it
    takes (without `wait`, SlotTaken at once if one is held). Yields the lease's renewal thread.
    A holder that dies frees its slot `lease_seconds` after its last renewal (USAGE_SLOT_LEASE_SECONDS).

    What Prefect's `concurrency()` does, through the run's own API client: that one opens
    new clients (each with a TLS context) for the acquire and the release of every use and
    renews the lease at once, about 90 ms of CPU per use, and a first tick holds slots 41
    times. A waiter asks again after the server's Retry-After but at most SLOT_POLL_SECONDS
    later, instead of sleeping up to 30 s (PrefectHQ/prefect#23183). A lease lost while held
    is logged at once and, with `fail_if_lost`, fails the run when its body ends: another
    run may have held the slot meanwhile, so the work is redone on a later tick.
    """
    holder = None if current_flow_run.id is None else ConcurrencyLeaseHolder(type="flow_run", id=current_flow_run.id)
    logger = run_or_module_logger()
    with get_client(sync_client=True) as client:
        lease = acquire(client, names, lease_seconds, holder, wait, logger)
        renewal = LeaseRenewal(client, lease.lease_id, logger, lease_seconds)
        try:
            missing = sorted(set(names) - {limit.name for limit in lease.limits})
            if missing:  # the server leases the limits it has and skips the others
                forget_limits(missing)
                raise RuntimeError(f"concurrency limit(s) {missing} missing (deleted while in use?); the next run"
                                   " creates a partner's limit again, `usage-pipeline setup` the global ones")
            renewal.start()
            yield renewal
        finally:
            renewal.stop()
            try:
                client.release_concurrency_slots_with_lease(lease.lease_id)
            except Exception as exc:  # the lease still ends by itself, lease_seconds at most after the last renewal
                logger.warning("Could not release slot lease %s (%s); it expires by itself", lease.lease_id, exc)
        if fail_if_lost and renewal.lost is not None:
            raise RuntimeError(f"lost the lease on {names} while holding it ({renewal.lost}); "
                               "another run may have held the slot meanwhile")


def acquire(client: SyncPrefectClient, names: list[str], lease_seconds: float,
            holder: ConcurrencyLeaseHolder | None, wait: bool,
            logger: logging.Logger | logging.LoggerAdapter) -> ConcurrencyLimitWithLeaseResponse:
    """Ask until granted. A waiter that has waited longer than any dead holder's lease can last (one
    asking without `wait`: at once) looks for slots counted without a holder, and frees them."""
    waiter, started = None if holder is None else holder.id, time.monotonic()
    repair_at = started + (lease_seconds + REPOSSESSOR_SLACK_SECONDS if wait else 0)
    if waiter is not None:
        context = FlowRunContext.get()  # not prefect.runtime's parent_flow_run_id: that asks the API each time
        parent_task = context.flow_run.parent_task_run_id if context and context.flow_run else None
        with _BOOKS:
            _WAITING[waiter] = (parent_task, frozenset(names))
    try:
        while True:
            try:
                with _BOOKS:
                    response = client.increment_concurrency_slots_with_lease(
                        names, 1, "concurrency", lease_seconds, holder
                    )
                    _WAITING.pop(waiter, None)
                return ConcurrencyLimitWithLeaseResponse.model_validate(response.json())
            except PrefectHTTPStatusError as exc:
                if exc.response.status_code != 423:
                    raise
                retry_after = float(exc.response.headers.get("Retry-After", SLOT_POLL_SECONDS))
            if holder is not None and time.monotonic() >= repair_at:
                repair_at = time.monotonic() + lease_seconds / 4
                if repaired(client, names, lease_seconds, logger, waited=time.monotonic() - started if wait else None):
                    continue
            if not wait:
                raise SlotTaken(f"a slot of {names} is held by another run")
            time.sleep(min(retry_after, SLOT_POLL_SECONDS))
    finally:
        with _BOOKS:
            _WAITING.pop(waiter, None)


def repaired(client: SyncPrefectClient, names: list[str], lease_seconds: float,
             logger: logging.Logger | logging.LoggerAdapter, waited: float | None) -> bool:
    """`free_leaked_slots`, logged: what it freed, or (having `waited`) what it found holding them."""
    try:
        freed, holders = free_leaked_slots(client, names, lease_seconds)
    except Exception as exc:  # e.g. the server restarting: asked again at the next repair time
        logger.warning("Could not look for slots of %s held by no run (%s)", names, exc)
        return False
    if freed:
        logger.warning("Freed %s: counted by the server but held by no run (a server killed while granting"
                       " a slot leaves such a count, which no lease expiry frees)", ", ".join(freed))
    elif waited is not None:
        logger.info("Still waiting for %s after %.0f s; held by, or ended recently: %s", names, waited,
                    ", ".join(holders) or "no run found yet")
    return bool(freed)


def free_leaked_slots(client: SyncPrefectClient, names: list[str],
                      lease_seconds: float) -> tuple[list[str], list[str]]:
    """Release the taken slots of each full limit in `names` that no run can hold: none of its
    holder flows' runs is open, other than this process's waiters, or ended recently enough to
    hold a lease that has not expired yet. Returns what was freed, as "N slot(s) of NAME", and
    the runs that may hold the others, as "RUN (STATE)"."""
    freed, holders = [], []
    with _BOOKS:
        parent_runs = {task: client.read_task_run(task).flow_run_id
                       for task, waited_for in _WAITING.values() if task and waited_for & set(names)}
        for name in names:
            limit = client.read_global_concurrency_limit_by_name(name)
            if limit.active_slots < limit.limit:
                continue
            if runs := possible_holders(client, name, lease_seconds, parent_runs):
                holders += [f"{run.name} ({run.state_name})" for run in runs]
                continue
            client.release_concurrency_slots([name], limit.active_slots, occupancy_seconds=lease_seconds)
            freed.append(f"{limit.active_slots} slot(s) of {name}")
    return freed, holders


def possible_holders(client: SyncPrefectClient, name: str, lease_seconds: float,
                     parent_runs: dict[UUID, UUID]) -> list[FlowRun]:
    """Up to 3 runs that may hold a slot of `name`: open and not waiting for it in this process (nor
    the parent run of one that waits), else ended within a lease period (its lease may outlive it if
    its release was lost). `parent_runs`: the waiters' parent task runs -> their flow runs."""
    flows, tag = slot_holders(name)
    waiting = [(waiter, task) for waiter, (task, waited_for) in _WAITING.items() if name in waited_for]
    not_holding = [waiter for waiter, _ in waiting] + [parent_runs[task] for _, task in waiting if task]
    others = FlowRunFilterId(not_any_=not_holding or None)
    tags = None if tag is None else FlowRunFilterTags(all_=[tag])
    ended_after = datetime.now(UTC) - timedelta(seconds=lease_seconds + REPOSSESSOR_SLACK_SECONDS)
    flow_filter = FlowFilter(name=FlowFilterName(any_=list(flows)))
    open_runs = client.read_flow_runs(flow_filter=flow_filter, limit=3, flow_run_filter=FlowRunFilter(
        id=others, tags=tags, state=FlowRunFilterState(type=FlowRunFilterStateType(any_=HOLDING_STATES))))
    if open_runs:
        return open_runs
    ended = client.read_flow_runs(flow_filter=flow_filter, limit=50, flow_run_filter=FlowRunFilter(
        id=others, tags=tags, end_time=FlowRunFilterEndTime(after_=ended_after)))
    return [run for run in ended if not found_the_slot_taken(run)][:3]


def found_the_slot_taken(run: FlowRun) -> bool:
    """A tick or reconciliation run that ended at once because its slot was taken: it never held it."""
    if run.state is None or run.state.name != SKIPPED:
        return False
    return any(why in (run.state.message or "") for why in (ANOTHER_TICK, ANOTHER_RECONCILIATION))


class LeaseRenewal(threading.Thread):
    """Renews a slot lease four times per lease period while its holder works, and records the
    lease as lost when the server no longer knows it or no renewal got through for a whole period."""

    def __init__(self, client: SyncPrefectClient, lease_id: UUID, logger: logging.Logger | logging.LoggerAdapter,
                 lease_seconds: float, period: float | None = None) -> None:
        super().__init__(name=f"lease-{lease_id}", daemon=True)
        self.client, self.lease_id, self.logger, self.lease_seconds = client, lease_id, logger, lease_seconds
        self.period = lease_seconds / 4 if period is None else period
        self.stopped = threading.Event()
        self.lost: Exception | None = None

    def run(self) -> None:
        renewed = time.monotonic()
        while not self.stopped.wait(self.period):
            try:
                self.client.renew_concurrency_lease(self.lease_id, self.lease_seconds)
                renewed = time.monotonic()
            except Exception as exc:  # e.g. the server restarting: the next try may still be in time
                gone = isinstance(exc, PrefectHTTPStatusError) and exc.response.status_code == 410
                if gone or time.monotonic() - renewed >= self.lease_seconds:
                    self.lost = exc
                    self.logger.error("Lost slot lease %s (%s): another run may take the slot now", self.lease_id, exc)
                    return
                self.logger.warning("Could not renew slot lease %s (%s); retrying", self.lease_id, exc)

    def stop(self) -> None:
        """Stop renewing; a renewal still in flight is not waited for long (Prefect waits 2 s too)."""
        self.stopped.set()
        if self.is_alive():
            self.join(timeout=2)


