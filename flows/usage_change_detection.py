"""Detection tick: find changed dealers, rematerialize their partners, advance the cursor.

Each step yields a plain value (cursor, snapshot, plan, outcomes, new cursor);
the rules live in flows/detection.py, this module only wires them to Prefect.
"""

from __future__ import annotations

import contextvars
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

import httpx
from prefect import Flow, flow, get_run_logger
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
from prefect.concurrency.sync import concurrency
from prefect.states import Completed, Failed, State

from blocks.setup import BILLING_BLOCK, DETECTION_LIMIT, ensure_limit, max_concurrent_partitions, partition_run_mode
from flows.cursor import Cursor, parse_cursor
from flows.lake import lake_root, read_state_document, write_state_document
from flows.events import emit_partition_events, emit_tick_event
from flows.detection import (
    PartitionOutcome,
    Plan,
    RunOutcome,
    SourceSnapshot,
    advance_cursor,
    plan_tick,
)
from flows.partner_gold import partner_gold
from flows.partner_silver import partner_silver
from flows.partners import PartnerUUID, layer_tag, parse_partner_uuid, partner_tag
from flows.report import publish_tick_artifacts
from flows.runtime import SLOT_LEASE_SECONDS, SourceError, load_source, read_cursor_value, read_dealer_directory, run_child, run_subflow, write_cursor_value
from flows.source import INDEX_ADVICE, has_dealer_modified_index, read_snapshot

RECONCILE_SECONDS_DEFAULT = 3600
SLOW_PROBE_SECONDS = 1.0
REPORT_FAILURES_AFTER = 3  # consecutive failed ticks before a partition is reported as an ERROR


@dataclass
class TickReport:
    """Everything one tick decided and did; returned as the flow's result and shown in the UI."""

    dry_run: bool
    requested: frozenset[str] = frozenset()  # partners the operator asked to rebuild
    full_refresh: bool = False
    plan: Plan | None = None
    bronze: RunOutcome | None = None
    partitions: dict[str, PartitionOutcome] = field(default_factory=dict)
    cursor: Cursor | None = None
    cursor_saved: bool = False
    source_seconds: float | None = None  # time spent querying v3 and billing for the snapshot
    snapshot_reconciled: bool = False
    skipped: str | None = None  # why the tick did nothing (source down, another tick running)

    @property
    def ok(self) -> bool:
        return (self.bronze is None or self.bronze.ok) and all(o.ok for o in self.partitions.values())

    def summary(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        assert self.plan is not None
        unknown = f"; unknown partner(s) not rebuilt: {', '.join(self.plan.unknown_partners)}" if self.plan.unknown_partners else ""
        if self.plan.is_empty:
            return "no changes" + unknown
        text = self.plan.describe() + unknown
        if self.dry_run:
            return f"dry run: {text} would run" + (" (with bronze)" if self.plan.runs_bronze else "")
        if self.bronze is not None and not self.bronze.ok:
            return f"{text}, bronze failed: {self.bronze.state}"
        good = sum(o.ok for o in self.partitions.values())
        return f"{text}, {good}/{len(self.partitions)} ok"


def reconcile_due(cursor: Cursor, now: datetime) -> bool:
    every = float(os.environ.get("USAGE_RECONCILE_SECONDS", RECONCILE_SECONDS_DEFAULT))
    return cursor.reconciled_at is None or (now - cursor.reconciled_at).total_seconds() >= every


def take_snapshot(cursor: Cursor, now: datetime, requested: frozenset[str]) -> SourceSnapshot:
    """Read the v3 directory, then the billing state; a failure becomes a SourceError naming the database."""
    logger = get_run_logger()
    partners = read_dealer_directory()
    billing = load_source(BILLING_BLOCK)
    try:
        with billing.engine.connect() as conn:
            snapshot, probe_seconds = read_snapshot(conn, cursor, reconcile_due(cursor, now), partners, requested)
        if probe_seconds > SLOW_PROBE_SECONDS and not has_dealer_modified_index(billing.engine):
            logger.warning("Slow usage probe (%.1fs): index missing; ask the DBA for: %s", probe_seconds, INDEX_ADVICE)
    except Exception as exc:
        raise billing.error(exc) from None
    finally:
        billing.engine.dispose()
    logger.info(
        "Found usage data for %d dealer(s); checked %d under the billing filters%s",
        len(snapshot.raw_max), len(snapshot.checked), " (full reconciliation)" if snapshot.reconciled else "",
    )
    return snapshot


def log_plan(plan: Plan) -> None:
    logger = get_run_logger()
    if plan.is_empty:
        logger.debug("No usage changes detected")
        return
    if plan.dealer_changes:
        logger.info("Detected changes for %d dealer(s): %s", len(plan.dealer_changes), sorted(plan.dealer_changes))
    if plan.unknown_partners:
        logger.warning(
            "Requested partner(s) %s: no dealer maps to them in v3 and nothing was materialized for them; not rebuilt",
            plan.unknown_partners,
        )
    if plan.unmapped_dealers:
        logger.warning(
            "Dealer(s) %s changed but map to no partner in v3; their usage is not in any partition",
            plan.unmapped_dealers,
        )
    logger.info("Mapped to %d affected partner partition(s)", len(plan.partitions))
    for partner, reasons in plan.partitions.items():
        logger.info("Partition %s: %s", partner, "; ".join(reasons))
    if plan.runs_bronze:
        logger.info(
            "Creating %d run request(s): 1 bronze (billing-usage-raw) + %d silver/gold partition(s)",
            1 + len(plan.partitions), len(plan.partitions),
        )


def run_layer(partner: str, layer: str, layer_flow: Flow, mode: str) -> RunOutcome:
    """One partition run, named and tagged the same whichever way it runs (partition_run_mode).

    Silver does not cascade to gold here: the tick runs gold itself, right after.
    """
    name, tags = f"{layer}-{partner}", [partner_tag(partner), layer_tag(layer)]
    parameters = {"partner_uuid": partner, **({"cascade": False} if layer == "silver" else {})}
    if mode == "deployment":
        return run_child(layer_flow.name, parameters, name, tags)
    return run_subflow(layer_flow, parameters, name, tags)


def materialize_partition(partner: str, mode: str) -> PartitionOutcome:
    """Silver, then gold if silver succeeded: the two subflow runs of one partner."""
    silver = run_layer(partner, "silver", partner_silver, mode)
    if not silver.ok:
        return PartitionOutcome(partner, silver, None)
    return PartitionOutcome(partner, silver, run_layer(partner, "gold", partner_gold, mode))


def materialize_partitions(partners: list[str], mode: str) -> dict[str, PartitionOutcome]:
    """Run partitions concurrently, at most USAGE_MAX_CONCURRENT_PARTITIONS chains in flight.

    Each thread gets a copy of the flow-run context so its runs link to this tick as subflows.
    """
    with ThreadPoolExecutor(max_workers=max_concurrent_partitions(), thread_name_prefix="partition") as pool:
        futures = {
            partner: pool.submit(contextvars.copy_context().run, materialize_partition, partner, mode)
            for partner in partners
        }
        return {partner: future.result() for partner, future in futures.items()}


def read_cursor(root) -> tuple[Cursor, object, dict | None]:
    """The cursor as the block and the pipeline's state store hold it, with a warning per problem."""
    logger = get_run_logger()
    block_value = read_cursor_value()
    state, problem = read_state_document(root)
    cursor, warnings = parse_cursor(block_value, state)
    for warning in warnings:
        logger.warning(warning)
    if cursor.dealer_seen is None and not cursor.is_first_run:
        logger.warning("%s: re-checking every dealer and rebuilding every partition", problem)
    return cursor, block_value, state


def save_cursor(root, cursor: Cursor, block_value: object, state: dict | None) -> bool:
    """State first, then the block: a crash between them leaves the block behind the state, which the
    next tick reads as an operator edit of those dealers and redoes (never the reverse, which could skip)."""
    if cursor.state_document() != state:
        write_state_document(root, cursor.state_document())
    if cursor.block_value() != block_value:
        return write_cursor_value(cursor.block_value(), block_value)
    return False


def run_tick(dry_run: bool, requested: frozenset[str], full_refresh: bool) -> TickReport:
    logger = get_run_logger()
    mode = partition_run_mode()  # a bad setting fails the tick before it does anything
    report = TickReport(dry_run=dry_run, requested=requested, full_refresh=full_refresh)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    root = lake_root()

    cursor, block_value, state = read_cursor(root)
    report.cursor = cursor

    logger.info("Checking dealer timestamps for usage changes")
    started = time.perf_counter()
    try:
        snapshot = take_snapshot(cursor, now, requested)
        report.source_seconds, report.snapshot_reconciled = time.perf_counter() - started, snapshot.reconciled
    except SourceError as exc:
        logger.warning("Failed to query the source, nothing submitted, cursor unchanged: %s", exc)
        report.skipped = str(exc)
        return report

    plan = report.plan = plan_tick(cursor, snapshot, requested, full_refresh)
    log_plan(plan)
    if dry_run:
        logger.info("Dry run: nothing submitted, cursor unchanged")
        return report

    if plan.runs_bronze:
        bronze_name = "bronze-full" if plan.bronze_dealers is None else f"bronze-{len(plan.bronze_dealers)}-dealers"
        report.bronze = run_child("billing-usage-raw", {"dealer_ids": plan.bronze_dealers}, bronze_name, ["layer:bronze"])
        if not report.bronze.ok:
            logger.error("Bronze failed (%s); no partition runs this tick", report.bronze.message)
        elif plan.partitions:
            report.partitions = materialize_partitions(list(plan.partitions), mode)

    new_cursor = advance_cursor(cursor, snapshot, plan, report.bronze, report.partitions, now)
    for partner, status in new_cursor.partitions.items():
        if status.failures >= REPORT_FAILURES_AFTER:
            logger.error(
                "Partition %s has failed %d ticks in a row (last error: %s); it is retried every tick",
                partner, status.failures, status.last_error,
            )
    report.cursor_saved = save_cursor(root, new_cursor, block_value, state)
    report.cursor = new_cursor
    return report


def slot_taken(exc: ConcurrencySlotAcquisitionError) -> bool:
    """Whether acquisition failed because the slot is held (HTTP 423), not for another reason."""
    cause = exc.__cause__
    return isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 423


@flow(name="usage-change-detection")
def usage_change_detection(
    dry_run: bool = False, partners: list[PartnerUUID] = [], full_refresh: bool = False  # noqa: B006 (never mutated)
) -> State:
    """One tick. Never overlaps another: a second tick ends at once as Skipped.

    `partners`: rebuild exactly these partners now, whatever the cursor says. `full_refresh`:
    re-extract bronze and rebuild every partition. `dry_run`: report what would run, change nothing.
    """
    requested = frozenset(parse_partner_uuid(p, "partners") for p in partners)  # refused before any I/O
    started = time.perf_counter()
    logger = get_run_logger()
    ensure_limit(DETECTION_LIMIT, 1)
    try:
        # No timeout: a timed-out request can still be granted later, leaving an orphaned lease.
        with concurrency(DETECTION_LIMIT, occupy=1, max_retries=0, strict=True, lease_duration=SLOT_LEASE_SECONDS):
            report = run_tick(dry_run, requested, full_refresh)
    except ConcurrencySlotAcquisitionError as exc:
        if not slot_taken(exc):
            raise
        logger.warning("Another detection tick is running; this one does nothing")
        report = TickReport(dry_run=dry_run, skipped="another detection tick is running")
    publish_tick_artifacts(report)
    emit_partition_events(report)
    emit_tick_event(report, time.perf_counter() - started)
    if report.skipped:
        return Completed(name="Skipped", message=report.summary(), data=report)
    if not report.ok:
        return Failed(message=report.summary(), data=report)
    return Completed(message=report.summary(), data=report)
