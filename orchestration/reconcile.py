"""A `usage-reconciliation` run: one slice of the rolling reconciliation, off the detection tick's path.

It asks the source for its slice's fingerprints, compares them with what was materialized, and saves
the dealers that differ as suspects in its own state file; the next detection tick re-checks them and
rebuilds those that really changed (README "The rolling reconciliation").
"""

from __future__ import annotations

import time

from prefect import get_run_logger

from orchestration.events import emit_reconciliation_event
from orchestration.runtime import query_source, read_cursor_value
from orchestration.setup import BILLING_BLOCK
from usage_pipeline.cursor import parse_cursor, utc_now
from usage_pipeline.lake import (
    RECONCILIATION_FILE,
    LakePath,
    read_state_document,
    state_path,
    write_state_document,
)
from usage_pipeline.queries import reconcile_slice
from usage_pipeline.reconciliation import ReconciliationReport, ReconciliationState, parse_reconciliation_state
from usage_pipeline.settings import Settings


def load_reconciliation_state(root: LakePath) -> tuple[ReconciliationState | None, str | None]:
    """The reconciliation's state, or None with why it is unusable (None, None: no run saved one yet)."""
    document, problem = read_state_document(root, RECONCILIATION_FILE)
    if document is None:
        return None, problem if state_path(root, RECONCILIATION_FILE).exists() else None
    try:
        return parse_reconciliation_state(document), None
    except ValueError as exc:
        return None, f"reconciliation state {state_path(root, RECONCILIATION_FILE)} is unreadable ({exc})"


def run_reconciliation(settings: Settings) -> ReconciliationReport | None:
    """One slice (None: nothing materialized to compare with). Its state is saved in one atomic
    write after the source answered, so a run that dies leaves the slice to the next one."""
    logger = get_run_logger()
    root, now = settings.lake_path, utc_now()
    pipeline_state, _ = read_state_document(root)
    cursor, _ = parse_cursor(read_cursor_value(), pipeline_state)  # a tick logs the cursor's problems
    if cursor.dealer_seen is None or cursor.is_first_run:
        logger.info("Nothing to compare with (no pipeline state, or the cursor was reset): the next tick checks"
                    " or rebuilds every dealer")
        return None
    state, problem = load_reconciliation_state(root)
    if problem:
        logger.warning("%s; a new cycle starts now", problem)
    started = time.perf_counter()
    done, changed, after = query_source(BILLING_BLOCK, lambda conn: reconcile_slice(
        conn, cursor, state or ReconciliationState(cycle_started_at=now), now, settings.reconcile_seconds))
    report = ReconciliationReport(done, changed, time.perf_counter() - started)
    write_state_document(root, after.document(), RECONCILIATION_FILE)
    logger.info("Rolling reconciliation: %s", report.summary())
    for dealer, reason in changed.items():
        logger.info("Dealer %d: %s; the next detection tick re-checks and rebuilds it", dealer, reason)
    emit_reconciliation_event(report)
    return report
