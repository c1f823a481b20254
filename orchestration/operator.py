"""The operator commands of CONTRACT.md section 7: `cursor show`, `cursor reset`, `explain`.

They read what the next tick will read (the cursor block and the pipeline's state
store) and change only the cursor block, exactly as an edit in the Prefect UI would.
"""

from __future__ import annotations

import json
from typing import Any

from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

from blocks.usage_cursor import CURSOR_DOCUMENT, UsageCursor
from orchestration.reconcile import load_reconciliation_state
from orchestration.report import freshness_rows
from orchestration.runtime import load_dealer_directory, load_source, read_cursor_value
from orchestration.setup import BILLING_BLOCK
from usage_pipeline import bronze
from usage_pipeline.cursor import Cursor, format_timestamp, parse_cursor, utc_now
from usage_pipeline.explain import DetectionSchedule, explain_dealer
from usage_pipeline.lake import read_state_document, state_path
from usage_pipeline.partners import parse_partner_uuid
from usage_pipeline.settings import load_settings

DETECTION_DEPLOYMENT = "usage-change-detection/usage-change-detection"
SHOW_COLUMNS = ("partner", "dealers", "state", "lag_seconds", "last_success", "source_watermark", "failed_ticks",
                "checks", "last_error")


class OperatorError(ValueError):
    """Input the command cannot act on; printed on stderr, exit status 2, nothing changed."""


def load_cursor() -> tuple[Cursor, Any, list[str]]:
    """The cursor as the next tick reads it, the block's raw value, and every warning."""
    block_value = read_cursor_value()
    state, problem = read_state_document(load_settings().lake_path)
    cursor, warnings = parse_cursor(block_value, state)
    if cursor.dealer_seen is None and not cursor.is_first_run:
        warnings.append(f"{problem}: the next tick re-checks every dealer and rebuilds every partition")
    return cursor, block_value, warnings


def show_cursor() -> list[str]:
    cursor, block_value, warnings = load_cursor()
    lines = [f"WARNING: {warning}" for warning in warnings]
    if block_value is None:
        lines.append(f"No cursor block usage-cursor/{CURSOR_DOCUMENT} yet: the next tick rebuilds bronze and every partition.")
    lines.append(
        f"cursor: global_last_modified {format_timestamp(cursor.global_last_modified) or 'null'},"
        f" {len(cursor.dealer_last_modified)} dealer entr{'y' if len(cursor.dealer_last_modified) == 1 else 'ies'}"
        f"; pipeline state: {state_path(load_settings().lake_path)}"
    )
    table = bronze.status(load_settings().lake_path)
    lines.append("bronze: no Delta table yet" if table is None else f"bronze: {table.describe()}")
    lines.append(f"reconciliation: {reconciliation_status(cursor)}")
    if cursor.is_first_run and block_value is not None:
        lines.append("The cursor is empty: the next tick rebuilds bronze and every partition.")
    rows = freshness_rows(cursor, utc_now())
    if not rows:
        lines.append("No partition has been materialized yet.")
        return lines
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in SHOW_COLUMNS}
    lines.append("  ".join(c.ljust(widths[c]) for c in SHOW_COLUMNS).rstrip())
    lines.extend("  ".join(str(r[c]).ljust(widths[c]) for c in SHOW_COLUMNS).rstrip() for r in rows)
    return lines


def reconciliation_status(cursor: Cursor) -> str:
    """Where the rolling reconciliation stands, and the dealers it found changed that await a tick."""
    settings = load_settings()
    state, problem = load_reconciliation_state(settings.lake_path)
    if state is None:
        return problem or "has not run yet (deployment usage-reconciliation)"
    position = "its first dealer" if state.next_dealer is None else f"dealer {state.next_dealer}"
    waiting = sorted(state.unchecked_suspects(cursor.suspects_checked_through))
    overdue = state.overdue_seconds(utc_now(), settings.reconcile_seconds)
    return (f"cycle started {format_timestamp(state.cycle_started_at)}, goes on from {position};"
            f" {len(waiting)} dealer(s) found changed await the next tick{f' {waiting}' if waiting else ''}"
            + (f"; OVERDUE by {overdue:.0f} s: is the usage-reconciliation deployment running?" if overdue else ""))


def reset_cursor(everything: bool, partners: list[str], dealers: list[int]) -> list[str]:
    """Remove cursor entries so that the next tick rebuilds what was named; validate everything first.

    The block is read as leniently as a tick reads it (`parse_cursor`): a value stored as a JSON
    string is its object, and an entry a tick cannot read (a dealer id that is not an integer, an
    unparsable timestamp) is kept as it is, with the tick's warning, unless it is one of the
    named dealers' entries: then it goes too.
    """
    if everything and (partners or dealers):
        raise OperatorError("--all cannot be combined with --partner or --dealer")
    if not (everything or partners or dealers):
        raise OperatorError("say what to rebuild: --all, --partner UUID or --dealer ID")
    wanted = [parse_partner_uuid(p, "--partner") for p in partners]
    if everything:
        save_block_value({})
        return ["Cursor reset: the next tick rebuilds bronze and every partition."]
    cursor, block_value, warnings = load_cursor()
    lines = [f"WARNING: {warning}" for warning in warnings]
    if cursor.is_first_run:
        return [*lines, "The cursor is already empty: the next tick rebuilds bronze and every partition."]
    if cursor.dealer_seen is None:
        return [*lines, "The pipeline's state is missing: the next tick rebuilds every partition anyway."]
    value = block_object(block_value)  # keep whatever else the block holds: only these entries go
    entries = value.get("dealer_last_modified")
    entries = entries if isinstance(entries, dict) else {}
    # dealers with an entry: those the tick reads, and those whose entry it cannot read (a bad timestamp)
    held_entries = set(cursor.dealer_last_modified) | {d for d in map(entry_dealer, entries) if d is not None}
    remove: dict[int, str] = {}
    for partner in wanted:
        held = [d for d, seen in cursor.dealer_seen.items() if seen.partner == partner and d in held_entries]
        if not held:
            raise OperatorError(
                f"partner {partner} has no dealer in the cursor (nothing of it was materialized);"
                f" to rebuild it now: prefect deployment run {DETECTION_DEPLOYMENT} -p partners='[\"{partner}\"]'"
            )
        remove.update({d: f"partner {partner}" for d in held})
    for dealer in dealers:
        if dealer not in held_entries:
            raise OperatorError(f"dealer {dealer} has no cursor entry (no relevant usage was materialized)")
        remove.setdefault(dealer, f"dealer {dealer}")
    value["dealer_last_modified"] = {k: v for k, v in entries.items() if entry_dealer(k) not in remove}
    save_block_value(value)
    named = ", ".join(sorted({why for why in remove.values()}))
    return [*lines,
            f"Removed the cursor entries of dealer(s) {sorted(remove)} ({named}): the next tick rebuilds their partner(s)."]


def block_object(block_value: Any) -> dict[str, Any]:
    """The block's value as a tick reads it: the object itself, or the object a JSON string holds; else empty."""
    if isinstance(block_value, str | bytes):
        try:
            block_value = json.loads(block_value)
        except ValueError:
            return {}
    return dict(block_value) if isinstance(block_value, dict) else {}


def entry_dealer(key: str) -> int | None:
    """The dealer of a `dealer_last_modified` key as `parse_cursor` reads it; None for a key it skips."""
    try:
        return int(key)
    except ValueError:
        return None


def save_block_value(value: dict[str, Any]) -> None:
    UsageCursor.register_type_and_schema()
    UsageCursor(value=value).save(CURSOR_DOCUMENT, overwrite=True)


def detection_schedule() -> DetectionSchedule | None:
    """Whether detection runs by itself: its deployment's schedule is active, paused, or there is none
    (`usage-pipeline serve --no-schedule`); None when it is not deployed."""
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(DETECTION_DEPLOYMENT)
        except ObjectNotFound:
            return None
    if deployment.paused:
        return "paused"
    if not deployment.schedules:
        return "unscheduled"
    return "scheduled" if any(schedule.active for schedule in deployment.schedules) else "paused"


def explain(dealer: int) -> list[str]:
    cursor, _, warnings = load_cursor()
    directory, _ = load_dealer_directory()  # a malformed UUID shows as "not mapped"
    billing = load_source(BILLING_BLOCK)
    try:
        with billing.engine.connect() as conn:
            settings = load_settings()
            reconciliation, _ = load_reconciliation_state(settings.lake_path)  # unreadable: as if it had not run
            explanation = explain_dealer(conn, dealer, directory, cursor, detection_schedule(), utc_now(),
                                         settings.reconcile_seconds, reconciliation)
    except Exception as exc:
        raise billing.error(exc) from None
    finally:
        billing.engine.dispose()
    return [f"WARNING: {w}" for w in warnings] + explanation.lines()
