"""The bronze extract: relevant usage in bulk, Arrow-native where the source allows, cast to the bronze schema."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from decimal import Decimal

import polars as pl
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.ext.compiler import compiles

from usage_pipeline.checks import EXACT, ExtractRead, SourceTotals, UsageTotals
from usage_pipeline.queries import dealer_batches
from usage_pipeline.schema import RELEVANT_SERVICE, relevant_usage, service_data, usage
from usage_pipeline.transforms import BRONZE_SCHEMA, MONEY, BadSourceRows, empty, money_from_units, normalize_bronze

READ_CONNECTIONS = 2  # bulk reads at once, each on its own connection (so not for an in-memory SQLite)
# A full refresh reads `usage` in keyed ranges of this many rows: memory holds one range at a time
# (plus the relevant service rows), not the table.
BATCH_ROWS = 500_000
MONEY_COLUMNS = ("quantity", "amount")
MONEY_UNITS = 10**MONEY.scale
SERVICE_KEYS = ("customer_id", "service_id")  # what a usage row joins its service row on

USAGE_FIELDS = (  # a bronze row as the source holds it: the usage part ...
    usage.c.usage_id.label("usage_id"),
    usage.c.usage_FK_dealer_id.label("dealer_id"),
    usage.c.usage_FK_customer_id.label("customer_id"),
    usage.c.usage_FK_service_id.label("service_id"),
    usage.c.usage_date.label("usage_date"),
    usage.c.usage_quantity.label("quantity"),
    usage.c.usage_amount.label("amount"),
    usage.c.usage_modified.label("usage_modified"),
)
SERVICE_FIELDS = (  # ... and the part its service row adds
    service_data.c.service_data_FK_service_status_id.label("service_status_id"),
    service_data.c.service_data_service_name.label("service_name"),
)
BRONZE_FIELDS = USAGE_FIELDS + SERVICE_FIELDS


class money_units(sa.sql.functions.FunctionElement):
    """A DECIMAL(18,4) as an exact integer count of 0.0001 units (`money_from_units` undoes it).

    Decoding DECIMAL text was 40 % of the client's work on a full extract; an
    integer decodes at almost no cost.
    """

    type = sa.BigInteger()
    inherit_cache = True


@compiles(money_units)
def _money_units(element: money_units, compiler, **kw) -> str:
    """DECIMAL arithmetic is exact (MySQL, MariaDB)."""
    (column,) = element.clauses
    return compiler.process(sa.cast(column * MONEY_UNITS, sa.BigInteger), **kw)


@compiles(money_units, "sqlite")
def _money_units_sqlite(element: money_units, compiler, **kw) -> str:
    """SQLite keeps a NUMERIC as INTEGER when it is whole, else as REAL: scale the first, round the second."""
    (column,) = element.clauses
    scaled = column * MONEY_UNITS
    whole = sa.func.typeof(column) == "integer"
    return compiler.process(sa.case((whole, scaled), else_=sa.cast(sa.func.round(scaled), sa.BigInteger)), **kw)


class money_units_sum(sa.sql.functions.FunctionElement):
    """The sum of a DECIMAL(18,4) column in 0.0001 units, exact: MySQL's is a DECIMAL, past BIGINT too
    (50 M rows can get there); SQLite's an integer, which fails with an overflow error past it.
    Untyped, so the driver's value is not converted: a Numeric would pass SQLite's through a float."""

    type = sa.types.NullType()
    inherit_cache = True


@compiles(money_units_sum)
def _money_units_sum(element: money_units_sum, compiler, **kw) -> str:
    """MySQL and MariaDB sum DECIMAL exactly; converting the sum, not each row, nearly halves the scan
    (the K = 10 scan of 50 M rows: 15.0 s of MariaDB CPU with a conversion per row, 8.3 s without)."""
    (column,) = element.clauses
    return compiler.process(sa.func.sum(column) * MONEY_UNITS, **kw)


@compiles(money_units_sum, "sqlite")
def _money_units_sum_sqlite(element: money_units_sum, compiler, **kw) -> str:
    """SQLite sums NUMERIC as REAL: each row as exact integer units first."""
    (column,) = element.clauses
    return compiler.process(sa.func.sum(money_units(column)), **kw)


def usage_totals_statement() -> sa.Select:
    """Rows, quantity and amount sums (in units) of every `usage` row: one scan, no join."""
    money = (money_units_sum(c) for c in (usage.c.usage_quantity, usage.c.usage_amount))
    return sa.select(sa.func.count(), *money).select_from(usage)


def relevant_count_statement() -> sa.Select:
    """Rows and usage_id sum of relevant usage: the (customer, service) index holds both keys and the
    primary key, so the server joins it with the service rows without fetching a usage row."""
    return sa.select(sa.func.count(), sa.func.sum(usage.c.usage_id)).select_from(relevant_usage)


def source_totals(conn: sa.Connection) -> SourceTotals:
    """The independent numbers a start-over tick checks its whole extract against, exact."""
    rows, quantity, amount = conn.execute(usage_totals_statement()).one()
    relevant_rows, id_sum = conn.execute(relevant_count_statement()).one()
    money = (Decimal(int(units or 0)).scaleb(-MONEY.scale, EXACT) for units in (quantity, amount))
    return SourceTotals(UsageTotals(int(rows), *money), int(relevant_rows), int(id_sum or 0))


def on_the_wire(fields: tuple[sa.Label, ...]) -> tuple[sa.Label, ...]:
    """What an extract selects for `fields`: money in units, the rest as it is."""
    return tuple(money_units(f.element).label(f.name) if f.name in MONEY_COLUMNS else f for f in fields)


def bronze_statements(dealers: list[int]) -> list[sa.Select]:
    """Some dealers' relevant usage, joined by the server (few rows: its index lookups are cheap)."""
    base = sa.select(*on_the_wire(BRONZE_FIELDS)).select_from(relevant_usage)
    return [base.where(usage.c.usage_FK_dealer_id.in_(batch)) for batch in dealer_batches(dealers)]


def services_statement() -> sa.Select:
    """The relevant service rows, to be joined with usage rows on SERVICE_KEYS by the client.

    For a full refresh this beats the server's join (about 2x on 5 M rows): the server fetches
    every usage row by key for the join, where a plain scan of `usage` streams it in order.
    """
    return sa.select(
        service_data.c.service_data_FK_customer_id.label(SERVICE_KEYS[0]),
        service_data.c.service_data_FK_service_id.label(SERVICE_KEYS[1]),
        *SERVICE_FIELDS,
    ).where(RELEVANT_SERVICE)


def usage_range_statement(after: int | None, rows: int) -> sa.Select:
    """The next `rows` usage rows by primary key: a range scan of the clustered index, in order."""
    stmt = sa.select(*on_the_wire(USAGE_FIELDS)).order_by(usage.c.usage_id).limit(rows)
    return stmt if after is None else stmt.where(usage.c.usage_id > after)


def render_sql(stmt: sa.Select, engine: Engine) -> str:
    """Literal SQL for engines that take text (connectorx); values are ints from our own code."""
    return str(stmt.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))


def read_frame(engine: Engine, stmt: sa.Select, connectorx_uri: str | None) -> pl.DataFrame:
    """Run a bulk read: Arrow-native through connectorx where the source supports it."""
    if connectorx_uri is not None:
        return pl.read_database_uri(render_sql(stmt, engine), connectorx_uri, engine="connectorx")
    with engine.connect() as conn:
        return pl.read_database(stmt, conn, infer_schema_length=None)


SERVICE_KEY = "_service_key"  # SERVICE_KEYS packed into one Int64: customer * 2**32 + service, one-to-one for INT ids


def packed_service_key() -> pl.Expr:
    customer, service = (pl.col(k).cast(pl.Int32) for k in SERVICE_KEYS)
    return (customer.cast(pl.Int64) * 2**32 + service).alias(SERVICE_KEY)


def service_lookup(services: pl.DataFrame) -> pl.DataFrame:
    """The relevant service rows sorted by their packed key, once per extract, for `join_services`.

    A hash join goes over every service row for every batch of usage, so a full extract's joins
    grew with batches × service rows (bench/service_join.py: 0.4 s at K = 1, 9.2 s at K = 10). A
    batch now finds its rows by binary search, at about the cost of its own size (4.9 s at K = 10).
    The contract's unique key is checked here: the search finds one row per key, where a join would
    repeat a usage row for each duplicate.
    """
    _check_int_keys(services, "service data")
    lookup = services.select(packed_service_key(), pl.exclude(SERVICE_KEYS)).sort(SERVICE_KEY)
    if (lookup[SERVICE_KEY].diff() == 0).any():
        repeated = services.filter(pl.struct(SERVICE_KEYS).is_duplicated()).select(SERVICE_KEYS).unique()
        raise BadSourceRows(f"service data has {repeated.height} (customer_id, service_id) pair(s) on more than one row,"
                            f" e.g. {sorted(repeated.rows())[:3]}")
    return lookup


def join_services(usage_rows: pl.DataFrame, lookup: pl.DataFrame) -> pl.DataFrame:
    """Usage rows with their relevant service's columns (an inner join on SERVICE_KEYS against
    `service_lookup`), in `usage` order. The batch's keys are searched in sorted order: consecutive
    searches then walk nearby keys, 1.7× as fast as in `usage` order."""
    _check_int_keys(usage_rows, "usage")
    if lookup.is_empty():
        return pl.concat([usage_rows.clear(), lookup.drop(SERVICE_KEY)], how="horizontal")
    keys, known = usage_rows.select(packed_service_key()).to_series(), lookup[SERVICE_KEY]
    order = keys.arg_sort()  # a NULL key sorts first, is found nowhere, and its row is dropped like the join's
    positions = known.search_sorted(keys.gather(order))
    at = pl.zeros(keys.len(), dtype=positions.dtype, eager=True).scatter(order, positions)
    at = at.clip(upper_bound=known.len() - 1)  # past the last key: no match
    found = known.gather(at) == keys
    return pl.concat([usage_rows.filter(found), lookup.drop(SERVICE_KEY)[at.filter(found)]], how="horizontal")


def _check_int_keys(frame: pl.DataFrame, table: str) -> None:
    """The contract's keys are INT; a wider id would not pack into the join key."""
    for key in SERVICE_KEYS:
        ids = frame[key]
        beyond = ids.filter(ids.cast(pl.Int32, strict=False).is_null() & ids.is_not_null())
        if beyond.len():
            raise BadSourceRows(f"{table} has {beyond.len()} {key} value(s) beyond INT, e.g. {beyond.head(3).to_list()}")


def stream_relevant_usage(
    engine: Engine, connectorx_uri: str | None, batch_rows: int = BATCH_ROWS,
    on_progress: Callable[[int, int], None] | None = None, read: ExtractRead | None = None,
) -> Iterator[pl.DataFrame]:
    """All relevant usage, batch by batch in the bronze schema: `usage` in keyed ranges of
    `batch_rows`, each joined here with the relevant service rows (read once, held meanwhile).

    The next range is read on a second connection while the caller works on this one (the source
    and the client each keep a core busy: a K = 10 full refresh alone took 64.5 s instead of 83.6 s),
    so memory holds two ranges. The ranges are separate reads, like the service read already was; a
    row changed meanwhile has a newer `usage_modified`, so a later tick sees it. `on_progress(done,
    total)` in usage ids; `read` adds up every range and the relevant rows kept of it, before they are
    cast to the bronze schema (the start-over totals check).
    """
    with engine.connect() as conn:
        top = conn.execute(sa.select(sa.func.max(usage.c.usage_id))).scalar() or 0

    def read_range(after: int | None) -> pl.DataFrame:
        return money_from_units(read_frame(engine, usage_range_statement(after, batch_rows), connectorx_uri),
                                MONEY_COLUMNS)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage-range") as reader:
        pending = reader.submit(read_range, None)
        services = service_lookup(read_frame(engine, services_statement(), connectorx_uri))
        while True:
            raw = pending.result()
            more = raw.height == batch_rows
            if more:
                pending = reader.submit(read_range, raw["usage_id"].max())
            if raw.height:
                kept = join_services(raw, services)
                if read is not None:
                    read.every.add(raw)
                    read.kept.add(kept)
                yield normalize_bronze(kept)
            if on_progress is not None:
                on_progress(min(raw["usage_id"].max(), top) if more else top, top)
            if not more:
                return


def extract_relevant_usage(
    engine: Engine, connectorx_uri: str | None, dealers: list[int], on_progress=None
) -> pl.DataFrame:
    """Some dealers' relevant usage, cast to the bronze schema (a full refresh streams instead:
    `stream_relevant_usage`). Statements run READ_CONNECTIONS at a time; the first failed read
    stops the reads not yet started."""
    statements = bronze_statements(dealers)
    with ThreadPoolExecutor(max_workers=READ_CONNECTIONS) as pool:
        reads = [pool.submit(read_frame, engine, stmt, connectorx_uri) for stmt in statements]
        remaining = set(reads)
        while remaining:
            finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
            for future in finished:
                if future.exception() is not None:
                    pool.shutdown(cancel_futures=True)
                    raise future.exception()
            if on_progress is not None:
                on_progress(len(reads) - len(remaining), len(reads))
    frames = [money_from_units(read.result(), MONEY_COLUMNS) for read in reads]
    if not frames:
        return empty(BRONZE_SCHEMA)
    return normalize_bronze(pl.concat(frames, how="diagonal_relaxed"))

