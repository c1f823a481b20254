"""Detection's queries: the cheap index probe, per-dealer relevant stats, the v3 directory.

Everything here is a few aggregate rows per dealer; the bulk extract is in extract.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.compiler import compiles

from usage_pipeline.cursor import Cursor
from usage_pipeline.detection import (
    DealerStats,
    SourceSnapshot,
    assemble_snapshot,
    dealers_of_partners,
    fingerprint,
    probe_candidates,
)
from usage_pipeline.partners import is_partner_uuid
from usage_pipeline.reconciliation import ReconcileSlice, plan_slice
from usage_pipeline.schema import dealer, relevant_usage, service_data, usage

DEALER_BATCH = 500  # dealers per IN (...) list


def dealer_batches(dealers: Iterable[int]) -> list[list[int]]:
    ordered = sorted(dealers)
    return [ordered[i : i + DEALER_BATCH] for i in range(0, len(ordered), DEALER_BATCH)]


def as_datetime(value: object) -> datetime | None:
    """SQLite returns DATETIME aggregates as text; MySQL as datetime."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def probe_raw_max(conn: Connection) -> dict[int, datetime | None]:
    """MAX(usage_modified) per dealer over all rows: a loose index scan, no join.

    Cheap enough for every tick; a dealer whose value did not move since the
    last tick has no new or newer rows (NULL timestamps and deletes below the
    max are caught by the fingerprint when the rolling reconciliation reaches the dealer).
    """
    stmt = sa.select(usage.c.usage_FK_dealer_id, sa.func.max(usage.c.usage_modified)).group_by(
        usage.c.usage_FK_dealer_id
    )
    return {int(d): as_datetime(ts) for d, ts in conn.execute(stmt)}


class char_length(sa.sql.functions.FunctionElement):
    """A string's length in characters on every source (MySQL's LENGTH counts bytes), as polars counts it."""

    type = sa.Integer()
    inherit_cache = True


@compiles(char_length)
def _char_length(element: char_length, compiler, **kw) -> str:
    return f"CHAR_LENGTH({compiler.process(element.clauses, **kw)})"


@compiles(char_length, "sqlite")
def _char_length_sqlite(element: char_length, compiler, **kw) -> str:
    return f"length({compiler.process(element.clauses, **kw)})"


def relevant_stats(conn: Connection, dealers: Iterable[int] | None) -> dict[int, DealerStats]:
    """MAX(usage_modified) and a fingerprint of the relevant rows, for `dealers` (None: all).

    The fingerprint (row count; sums of ids, quantities, amounts, service
    statuses and service-name lengths in characters) catches deletes and edits that leave MAX
    unchanged, rows that move in or out of the filters through service-data
    changes, and status or name changes of their services.
    """
    columns = (
        usage.c.usage_FK_dealer_id,
        sa.func.max(usage.c.usage_modified),
        sa.func.count(),
        sa.func.sum(usage.c.usage_id),
        sa.func.sum(usage.c.usage_quantity),
        sa.func.sum(usage.c.usage_amount),
        sa.func.sum(service_data.c.service_data_FK_service_status_id),
        sa.func.sum(char_length(sa.func.coalesce(service_data.c.service_data_service_name, ""))),
    )
    base = sa.select(*columns).select_from(relevant_usage).group_by(usage.c.usage_FK_dealer_id)
    statements = (
        [base]
        if dealers is None
        else [base.where(usage.c.usage_FK_dealer_id.in_(batch)) for batch in dealer_batches(dealers)]
    )
    stats: dict[int, DealerStats] = {}
    for stmt in statements:
        for dealer_id, last_modified, rows, id_sum, qty_sum, amount_sum, status_sum, name_sum in conn.execute(stmt):
            stats[int(dealer_id)] = DealerStats(
                as_datetime(last_modified), fingerprint(rows, id_sum, qty_sum, amount_sum, status_sum, name_sum)
            )
    return stats


def dealer_directory(conn: Connection) -> tuple[dict[int, str | None], list[str]]:
    """v3 dealer -> partner UUID (lower case); malformed UUIDs count as unmapped, with a warning."""
    warnings: list[str] = []
    directory: dict[int, str | None] = {}
    for dealer_id, partner in conn.execute(sa.select(dealer.c.dealer_id, dealer.c.dealer_partner_uuid)):
        if partner is not None and not is_partner_uuid(partner.strip()):
            warnings.append(f"dealer {dealer_id} has a malformed partner UUID {partner!r}; treated as unmapped")
            partner = None
        directory[int(dealer_id)] = partner.strip().lower() if partner else None
    return directory, warnings


def has_dealer_modified_index(engine: Engine) -> bool:
    """Whether `usage` has an index starting with (usage_FK_dealer_id, usage_modified)."""
    wanted = ["usage_FK_dealer_id", "usage_modified"]
    indexes = sa.inspect(engine).get_indexes("usage")
    return any([c.lower() for c in (ix["column_names"] or [])][:2] == [w.lower() for w in wanted] for ix in indexes)


def read_snapshot(
    billing: Connection,
    cursor: Cursor,
    now: datetime,
    reconcile_seconds: float,
    partners: dict[int, str | None],
    requested: frozenset[str] = frozenset(),
    stats_from_bronze: bool = False,
) -> tuple[SourceSnapshot, float]:
    """Probe, then query only the candidates, this tick's slice of the rolling reconciliation
    (`reconciliation.plan_slice` over USAGE_RECONCILE_SECONDS) and the dealers of `requested`
    partners (their cursor entries advance to what is read now).

    `partners` is the v3 directory (`dealer_directory`). `stats_from_bronze`: a start-over tick
    (`detection.starts_over`) re-extracts all of bronze, so no stats are queried; the snapshot
    awaits them from that extract. Returns the snapshot and the probe's duration in seconds (slow
    means the index is missing).
    """
    started = time.perf_counter()
    raw_max = probe_raw_max(billing)
    probe_seconds = time.perf_counter() - started
    candidates = probe_candidates(cursor, raw_max)
    known = frozenset(raw_max) | frozenset(cursor.dealer_last_modified)
    if stats_from_bronze:  # reconciled once `with_bronze_stats` fills in every dealer
        snapshot = assemble_snapshot(cursor, raw_max, known, {}, partners, None)
        return replace(snapshot, awaiting_bronze=True), probe_seconds
    if candidates is None:
        reconciliation = ReconcileSlice.everything(known)
    else:
        reconciliation = plan_slice(known, cursor.reconciled_at, cursor.reconcile_next_dealer, now, reconcile_seconds)
    # A retried partition's dealers too: their slices are re-extracted, so they are checked again.
    retried = dealers_of_partners(cursor, partners, requested | cursor.retry_partitions)
    checked = known if candidates is None else frozenset(candidates | retried | reconciliation.dealers)
    queried = relevant_stats(billing, None if checked >= known else checked)  # every dealer: one join, no IN lists
    return assemble_snapshot(cursor, raw_max, checked, queried, partners, reconciliation), probe_seconds
