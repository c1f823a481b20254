"""Deployment `usage-change-detection`: one detection tick (orchestration/tick.py does the work)."""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.states import Completed, Failed, State
from prefect.utilities.annotations import quote

from flows.billing_usage_raw import billing_usage_raw
from flows.partner_gold import partner_gold
from flows.partner_silver import partner_silver
from orchestration.engine_logs import quiet_reported_tick_failures
from orchestration.events import emit_partition_events, emit_tick_event
from orchestration.report import publish_tick_artifacts
from orchestration.setup import DETECTION_LIMIT, ensure_limit
from orchestration.slots import ANOTHER_TICK, SKIPPED, SlotTaken, leased_slots
from orchestration.tick import Layers, run_tick
from usage_pipeline.partners import PartnerUUID, parse_partner_uuid
from usage_pipeline.settings import load_settings
from usage_pipeline.tick_report import TickFailed, TickReport

LAYERS = Layers(bronze=billing_usage_raw, silver=partner_silver, gold=partner_gold)
quiet_reported_tick_failures()


@flow(name="usage-change-detection")
def usage_change_detection(
    dry_run: bool = False, partners: list[PartnerUUID] = [], full_refresh: bool = False  # noqa: B006 (never mutated)
) -> State:
    """One tick. Never overlaps another: a second tick ends at once as Skipped.

    `partners`: rebuild exactly these partners now, whatever the cursor says. `full_refresh`:
    re-extract bronze and rebuild every partition. `dry_run`: report what would run, change nothing.
    """
    requested = frozenset(parse_partner_uuid(p, "partners") for p in partners)  # refused before any I/O
    settings = load_settings()  # a bad USAGE_* variable fails the tick here, naming it
    started = time.perf_counter()
    ensure_limit(DETECTION_LIMIT, 1)
    try:
        # A lost lease is logged, not raised: the tick's work is saved by then and its report must go out.
        with leased_slots([DETECTION_LIMIT], settings.slot_lease_seconds, wait=False, fail_if_lost=False):
            report = run_tick(settings, LAYERS, dry_run, requested, full_refresh)
    except SlotTaken:
        get_run_logger().warning("Another detection tick is running; this one does nothing")
        report = TickReport(dry_run=dry_run, skipped=ANOTHER_TICK)
    emit_partition_events(report)  # first: the stale alert's episodes close with them
    publish_tick_artifacts(report)
    emit_tick_event(report, time.perf_counter() - started)
    # Quoted: Prefect walks a returned value for futures, and the report holds the cursor, an entry per
    # dealer (2 s of every tick at 20,000 dealers). `report_of` unwraps it for a caller in this process.
    if report.skipped:
        return Completed(name=SKIPPED, message=report.summary(), data=quote(report))
    if not report.ok:  # the report itself is in the artifacts; the state carries its summary
        return Failed(message=report.summary(), data=TickFailed(report))
    return Completed(message=report.summary(), data=quote(report))
