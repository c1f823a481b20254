"""Detection's queries: the cheap index probe, per-dealer relevant stats, the v3 directory.

Everything here is a few aggregate rows per dealer; the bulk extract is in extract.py.
"""

from __future__ import annotations

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
    silent_changes,
)
from usage_pipeline.partners import is_partner_uuid
from usage_pipeline.reconciliation import ReconcileSlice, ReconciliationState, plan_slice
from usage_pipeline.schema import RELEVANT_SERVICE, dealer, relevant_usage, service_data, usage

DEALER_BATCH = 500  # dealers per statement: an IN (...) list, or a range whose groups fit in memory
MIN_RANGE = 32  # consecutive dealer ids that one BETWEEN range covers instead of an IN list
# bench/README.md, "The reconciliation's access path": what each buys on the bench sets.
MARIADB_JOIN_SETTINGS = (
    "optimizer_switch='mrr=on,mrr_sort_keys=on,mrr_cost_based=off'",
    "mrr_buffer_size=8388608",
    "join_cache_level=6",
    "join_buffer_size=33554432",
    "tmp_table_size=67108864",
    "max_heap_table_size=67108864",
)


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


def dealer_conditions(dealers: Iterable[int]) -> list[sa.ColumnElement[bool]]:
    """WHERE clauses that cover `dealers`, at most DEALER_BATCH of them each: a run of at least MIN_RANGE
    consecutive ids as one BETWEEN range (one index range scan instead of an index dive per dealer; a
    rolling slice over consecutive ids is such a run), the rest as IN lists."""
    ordered = sorted(set(dealers))
    runs: list[list[int]] = []
    for dealer_id in ordered:
        if runs and dealer_id == runs[-1][-1] + 1 and len(runs[-1]) < DEALER_BATCH:
            runs[-1].append(dealer_id)
        else:
            runs.append([dealer_id])
    dealer_column = usage.c.usage_FK_dealer_id
    ranges = [dealer_column.between(run[0], run[-1]) for run in runs if len(run) >= MIN_RANGE]
    scattered = [d for run in runs if len(run) < MIN_RANGE for d in run]
    return ranges + [dealer_column.in_(batch) for batch in dealer_batches(scattered)]


def relevant_stats_statement(where: sa.ColumnElement[bool] | None) -> sa.Select:
    """The fingerprint's aggregates per dealer. For some dealers, `usage` rows are first summed per
    customer and service, so each group costs one service-data lookup, not each row (about 5 rows a
    group on the bench set); for all of them, that grouping would not fit in memory, so it is the join."""
    status = service_data.c.service_data_FK_service_status_id
    name_chars = char_length(sa.func.coalesce(service_data.c.service_data_service_name, ""))
    summed = (usage.c.usage_id, usage.c.usage_quantity, usage.c.usage_amount)
    if where is None:
        return (
            sa.select(usage.c.usage_FK_dealer_id, sa.func.max(usage.c.usage_modified), sa.func.count(),
                      *(sa.func.sum(c) for c in (*summed, status, name_chars)))
            .select_from(relevant_usage).group_by(usage.c.usage_FK_dealer_id)
        )
    keys = (usage.c.usage_FK_dealer_id, usage.c.usage_FK_customer_id, usage.c.usage_FK_service_id)
    groups = (
        sa.select(*keys, sa.func.max(usage.c.usage_modified).label("last_modified"), sa.func.count().label("rows"),
                  *(sa.func.sum(c).label(c.name) for c in summed))
        .where(where).group_by(*keys).subquery("usage_groups")
    )
    matched = groups.join(service_data, sa.and_(
        service_data.c.service_data_FK_customer_id == groups.c.usage_FK_customer_id,
        service_data.c.service_data_FK_service_id == groups.c.usage_FK_service_id,
        RELEVANT_SERVICE,
    ))
    rows = groups.c.rows
    return (
        sa.select(groups.c.usage_FK_dealer_id, sa.func.max(groups.c.last_modified), sa.func.sum(rows),
                  *(sa.func.sum(groups.c[c.name]) for c in summed),
                  sa.func.sum(rows * status), sa.func.sum(rows * name_chars))
        .select_from(matched).group_by(groups.c.usage_FK_dealer_id)
    )


def relevant_stats(conn: Connection, dealers: Iterable[int] | None) -> dict[int, DealerStats]:
    """MAX(usage_modified) and a fingerprint of the relevant rows, for `dealers` (None: all).

    The fingerprint (row count; sums of ids, quantities, amounts, service
    statuses and service-name lengths in characters) catches deletes and edits that leave MAX
    unchanged, rows that move in or out of the filters through service-data
    changes, and status or name changes of their services.
    """
    wheres = [None] if dealers is None else dealer_conditions(dealers)
    stats: dict[int, DealerStats] = {}
    for where in wheres:
        for dealer_id, last_modified, rows, id_sum, qty_sum, amount_sum, status_sum, name_sum in execute_join(
                conn, relevant_stats_statement(where)):
            stats[int(dealer_id)] = DealerStats(
                as_datetime(last_modified), fingerprint(rows, id_sum, qty_sum, amount_sum, status_sum, name_sum)
            )
    return stats


def execute_join(conn: Connection, stmt: sa.Select) -> sa.CursorResult:
    """Run an aggregate over `usage` joined with service data. On MariaDB, with settings for this statement
    only (SET STATEMENT ... FOR): fetch `usage` rows in key order (MRR) and look service rows up in
    sorted batches (BKA), with room for a batch's groups in memory. MySQL and SQLite run it as it is."""
    if not getattr(conn.dialect, "is_mariadb", False):
        return conn.execute(stmt)
    sql = stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})  # ints and '' only
    return conn.exec_driver_sql(f"SET STATEMENT {', '.join(MARIADB_JOIN_SETTINGS)} FOR {sql}")


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
    partners: dict[int, str | None],
    raw_max: dict[int, datetime | None],
    requested: frozenset[str] = frozenset(),
    stats_from_bronze: bool = False,
    reconciliation: ReconciliationState | None = None,
) -> SourceSnapshot:
    """Given the probe (`probe_raw_max`), query only the candidates, the suspects the rolling
    reconciliation left that no tick re-checked yet (`reconciliation`, None: no state of it) and the
    dealers of `requested` partners (their cursor entries advance to what is read now).

    `partners` is the v3 directory (`dealer_directory`). `stats_from_bronze`: a start-over tick
    (`detection.starts_over`) re-extracts all of bronze, so no stats are queried; the snapshot
    awaits them from that extract.
    """
    candidates = probe_candidates(cursor, raw_max)
    known = frozenset(raw_max) | frozenset(cursor.dealer_last_modified)
    through = None if reconciliation is None else reconciliation.slices
    suspects = frozenset() if reconciliation is None else \
        reconciliation.unchecked_suspects(cursor.suspects_checked_through)
    if stats_from_bronze:  # every dealer counted once `with_bronze_stats` fills them in
        snapshot = assemble_snapshot(cursor, raw_max, known, {}, partners, suspects, through)
        return replace(snapshot, awaiting_bronze=True)
    # A retried partition's dealers too: their slices are re-extracted, so they are checked again.
    retried = dealers_of_partners(cursor, partners, requested | cursor.retry_partitions)
    checked = known if candidates is None else frozenset(candidates | retried | suspects)
    queried = relevant_stats(billing, None if checked >= known else checked)  # every dealer: one join, no IN lists
    return assemble_snapshot(cursor, raw_max, checked, queried, partners, suspects, through)


def reconcile_slice(billing: Connection, cursor: Cursor, state: ReconciliationState, now: datetime,
                    period_seconds: float) -> tuple[ReconcileSlice, dict[int, str], ReconciliationState]:
    """One run of the rolling reconciliation: its slice of every dealer the pipeline's state knows
    (`reconciliation.plan_slice` over USAGE_RECONCILE_SECONDS), asked for their fingerprints, the ones
    that differ from what was materialized (with why), and the state to save after it."""
    known = cursor.known_dealers
    done = plan_slice(known, state.cycle_started_at, state.next_dealer, now, period_seconds)
    found = relevant_stats(billing, None if done.dealers >= known else done.dealers) if done.dealers else {}
    changed = silent_changes(cursor, done.dealers, found)
    return done, changed, state.after(done, changed, cursor.suspects_checked_through, now)
