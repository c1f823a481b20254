"""Deployment `usage-reconciliation`: one slice of the rolling reconciliation (orchestration/reconcile.py)."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.states import Completed, State

from orchestration.reconcile import run_reconciliation
from orchestration.runtime import SourceError
from orchestration.setup import RECONCILIATION_LIMIT, ensure_limit
from orchestration.slots import ANOTHER_RECONCILIATION, SKIPPED, SlotTaken, leased_slots
from usage_pipeline.settings import load_settings

NOTHING_TO_COMPARE = "nothing materialized to compare with"


@flow(name="usage-reconciliation")
def usage_reconciliation() -> State:
    """Re-check the next slice of every dealer's fingerprint, so that each one is checked once per
    USAGE_RECONCILE_SECONDS; the dealers that changed without a newer usage_modified are left for the next
    detection tick. Never overlaps another: a second run ends at once as Skipped, and so does one that
    cannot reach the billing database (the next run takes its slice)."""
    settings = load_settings()  # a bad USAGE_* variable fails the run here, naming it
    logger = get_run_logger()
    ensure_limit(RECONCILIATION_LIMIT, 1)
    try:
        with leased_slots([RECONCILIATION_LIMIT], settings.slot_lease_seconds, wait=False):
            report = run_reconciliation(settings)
    except SlotTaken:
        logger.warning("Another reconciliation run is running; this one does nothing")
        return Completed(name=SKIPPED, message=ANOTHER_RECONCILIATION)
    except SourceError as exc:
        logger.warning("Failed to query the source; nothing reconciled, the next run takes this slice: %s", exc)
        return Completed(name=SKIPPED, message=f"skipped: {exc}")
    if report is None:
        return Completed(message=NOTHING_TO_COMPARE)
    return Completed(message=report.summary(), data=report)
