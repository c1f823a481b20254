"""The bronze extract against real sources: MariaDB through connectorx and pymysql, and SQLite.

Money crosses the wire as integer units (usage_pipeline.extract.money_units); these
tests pin that it comes back exact at the edges of DECIMAL(18,4), and that the
full refresh (usage scan + client-side join) and a dealer slice (server join)
return the same rows as the plain server join of the source's columns.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime
from decimal import Decimal

import polars as pl
import pytest
import sqlalchemy as sa
from polars.testing import assert_frame_equal

from tests.conftest import BILLING_DB, PIPELINE_CONNECTORX_URI, PIPELINE_SERVER_URL, recreate_source_tables
from tests.sourcedata import SourceBuilder
from usage_pipeline.checks import ExtractRead, SourceTotals
from usage_pipeline.extract import (
    BRONZE_FIELDS,
    extract_relevant_usage,
    join_services,
    service_lookup,
    source_totals,
    stream_relevant_usage,
)
from usage_pipeline.queries import DEALER_BATCH, MIN_RANGE, dealer_conditions, relevant_stats
from usage_pipeline.schema import billing_metadata, relevant_usage
from usage_pipeline.transforms import (
    BRONZE_SCHEMA,
    BadSourceRows,
    dealer_stats,
    finish_dealer_stats,
    normalize_bronze,
    partial_dealer_stats,
)

EXTREMES = ("99999999999999.9999", "-99999999999999.9999", "0.0001", "-0.0001", "0.0000", "12345.6789")

pytestmark = pytest.mark.integration


def connectorx_uri(transport: str) -> str | None:
    """What the bronze flow passes for a MariaDB source (connectorx), or None to read through pymysql."""
    return PIPELINE_CONNECTORX_URI if transport == "connectorx" else None


def full_extract(engine: sa.Engine, uri: str | None, batch_rows: int = 500_000) -> pl.DataFrame:
    """A full refresh's batches, put together in dealer order (as the table holds them)."""
    return pl.concat(list(stream_relevant_usage(engine, uri, batch_rows))).sort("dealer_id", "usage_id")


def plain_join(engine: sa.Engine) -> pl.DataFrame:
    """The reference: the relevant-usage join with the source's own column types, through pymysql."""
    with engine.connect() as conn:
        return normalize_bronze(pl.read_database(sa.select(*BRONZE_FIELDS).select_from(relevant_usage), conn))


@pytest.fixture
def billing_source(source_engines, mariadb_admin) -> Iterator[sa.Engine]:
    """The standard source plus rows at the edges of DECIMAL(18,4); the pipeline's read-only engine."""
    admin_billing, admin_v3 = source_engines
    recreate_source_tables(admin_billing, admin_v3)
    builder = SourceBuilder(admin_billing, admin_v3)
    builder.standard()
    for n, value in enumerate(EXTREMES):
        builder.usage(5, 501, 1, date(2026, 10, 1 + n), value, datetime(2026, 10, 2, 3, 4, 5, n), quantity=value)
    builder.dealer(5, None)
    engine = sa.create_engine(f"{PIPELINE_SERVER_URL}/{BILLING_DB}")
    yield engine
    engine.dispose()


@pytest.mark.parametrize("transport", ["connectorx", "pymysql"])
def test_full_and_slice_extracts_equal_the_plain_join(billing_source, transport):
    uri = connectorx_uri(transport)
    truth = plain_join(billing_source)
    assert truth.height == 13  # 7 relevant rows of the standard source (the excluded one is not) + 6 extremes

    full = full_extract(billing_source, uri)
    assert full.schema == pl.Schema(BRONZE_SCHEMA)
    assert full.equals(truth)
    progress = []
    batches = list(stream_relevant_usage(billing_source, uri, 4, lambda done, total: progress.append((done, total))))
    with billing_source.connect() as conn:
        usage_rows = conn.exec_driver_sql("SELECT COUNT(*) FROM `usage`").scalar()
    assert len(batches) == -(-usage_rows // 4) and max(b.height for b in batches) <= 4  # keyed ranges of 4
    assert progress[-1][0] == progress[-1][1] and [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert pl.concat(batches).sort("dealer_id", "usage_id").equals(truth)
    assert full.filter(pl.col("dealer_id") == 5)["amount"].to_list() == [Decimal(v) for v in EXTREMES]
    assert full.filter(pl.col("dealer_id") == 5)["quantity"].to_list() == [Decimal(v) for v in EXTREMES]

    for dealers in ([5], [1, 3], [4, 9, 77]):
        sliced = extract_relevant_usage(billing_source, uri, dealers)
        assert sliced.schema == pl.Schema(BRONZE_SCHEMA)
        assert sliced.equals(truth.filter(pl.col("dealer_id").is_in(dealers)))


@pytest.mark.parametrize("transport", ["connectorx", "pymysql"])
def test_a_full_extract_adds_up_to_the_sources_totals(billing_source, transport):
    """The start-over check's parts: every `usage` row the extract read (money at the edges of
    DECIMAL(18,4) included) equals the source's scan of the table; the rows it kept equal the source's
    index-only count and id sum of relevant usage, and their money as read is what bronze gets."""
    read = ExtractRead()
    kept = pl.concat(list(stream_relevant_usage(billing_source, connectorx_uri(transport), 4, read=read)))
    with billing_source.connect() as conn:
        source = source_totals(conn)
        every_row = conn.exec_driver_sql("SELECT COUNT(*), SUM(usage_quantity), SUM(usage_amount) FROM `usage`").one()
    assert (read.every.rows, read.every.quantity, read.every.amount) == tuple(every_row)
    assert read.every.rows > kept.height and source.usage == read.every
    assert (source.relevant_rows, source.relevant_id_sum) == (kept.height, int(kept["usage_id"].sum()))
    assert (read.kept.rows, read.kept.quantity, read.kept.amount) == (kept.height, kept["quantity"].sum(),
                                                                      kept["amount"].sum())


def test_the_sources_totals_stay_exact_past_bigint(billing_source, source_engines):
    """Eleven rows at DECIMAL(18,4)'s top add up to more 0.0001 units than a BIGINT holds: the source
    sums the decimals, then converts the sum (a conversion to BIGINT after the sum would overflow)."""
    builder = SourceBuilder(*source_engines)
    top = "99999999999999.9999"
    for n in range(11):
        builder.usage(5, 501, 1, date(2026, 11, 1 + n), top, None, quantity=top)
    read = ExtractRead()
    list(stream_relevant_usage(billing_source, None, 500_000, read=read))
    with billing_source.connect() as conn:
        totals = source_totals(conn)
    assert totals.usage == read.every and totals.usage.quantity * 10**4 > 2**63


@pytest.mark.parametrize("transport", ["connectorx", "pymysql"])
def test_dealer_stats_from_a_full_extract_equal_the_sources(billing_source, source_engines, transport):
    """A start-over tick counts each dealer's relevant rows from its full extract instead of a second
    full join: both must give the same MAX and fingerprint, or the next reconciliation rebuilds them."""
    builder = SourceBuilder(*source_engines)
    builder.service(504, 7, name="Téléphonie ✆")  # more bytes than characters
    builder.usage(6, 504, 7, date(2026, 10, 9), "0.0001", None)
    builder.usage(6, 504, 7, date(2026, 10, 9), "-12.3456", datetime(2026, 10, 9, 1, 2, 3, 999999), "0.5000")
    with billing_source.connect() as conn:
        truth = relevant_stats(conn, None)
    assert sorted(truth) == [1, 2, 3, 4, 5, 6, 9]
    assert dealer_stats(full_extract(billing_source, connectorx_uri(transport)).lazy()) == truth
    # counted batch by batch while streaming, as a full refresh does: the same
    partials = [partial_dealer_stats(b.lazy()).collect()
                for b in stream_relevant_usage(billing_source, connectorx_uri(transport), 3)]
    assert finish_dealer_stats(pl.concat(partials).lazy()) == truth


def test_some_dealers_stats_by_ranges_and_lists_equal_the_full_joins(billing_source, source_engines):
    """A rolling slice's consecutive dealers are asked as a range, scattered ones as an IN list, each
    summed per customer and service before the service-data join (on MariaDB under SET STATEMENT
    settings): every dealer's MAX and fingerprint must be those of the plain join of all dealers, or
    the reconciliation would rebuild what did not change."""
    builder = SourceBuilder(*source_engines)
    builder.service(600, 1, name="Téléphonie ✆", status=10)
    builder.service(600, 2, name=None, status=-3)
    builder.service(601, 1, relevant=False)
    run = range(100, 100 + MIN_RANGE + 8)
    for n, dealer_id in enumerate(run):
        builder.execute(
            "INSERT INTO `usage` (usage_FK_customer_id, usage_FK_service_id, usage_FK_dealer_id, usage_date,"
            " usage_quantity, usage_amount, usage_modified) VALUES"
            " (600, 1, %s, '2026-10-01', 1.5, %s, %s), (600, 1, %s, '2026-10-02', 2, -0.0001, NULL),"
            " (600, 2, %s, '2026-10-03', 3, 7.25, '2026-10-03 04:05:06.000007'), (601, 1, %s, '2026-10-04', 9, 9, NULL)",
            dealer_id, f"{n}.0001", datetime(2026, 10, 1, 0, 0, n), dealer_id, dealer_id, dealer_id,
        )
    with billing_source.connect() as conn:
        truth = relevant_stats(conn, None)
        asked = [*run, 1, 3, 9, 77]  # 77 has no rows
        assert relevant_stats(conn, asked) == {d: truth[d] for d in asked if d in truth}
    assert dealer_stats(full_extract(billing_source, None).lazy()) == truth  # the join itself, counted by polars


def test_dealer_conditions_range_consecutive_ids_and_list_the_rest():
    run = list(range(1000, 1000 + DEALER_BATCH + MIN_RANGE))  # one batch and a second range's worth
    conditions = [str(c.compile(compile_kwargs={"literal_binds": True}))
                  for c in dealer_conditions([*run, 5, 7, 8, 2000, 2000])]
    assert conditions == [
        f'usage."usage_FK_dealer_id" BETWEEN 1000 AND {1000 + DEALER_BATCH - 1}',
        f'usage."usage_FK_dealer_id" BETWEEN {1000 + DEALER_BATCH} AND {run[-1]}',
        'usage."usage_FK_dealer_id" IN (5, 7, 8, 2000)',
    ]
    short = list(range(1, MIN_RANGE))  # a run too short for a range of its own
    assert [str(c.compile(compile_kwargs={"literal_binds": True})) for c in dealer_conditions(short)] == [
        f'usage."usage_FK_dealer_id" IN ({", ".join(map(str, short))})']
    assert dealer_conditions([]) == []


@pytest.mark.parametrize("transport", ["connectorx", "pymysql"])
@pytest.mark.parametrize("emptied", ["usage", "v4_wh_service_data"])
def test_an_empty_table_gives_an_empty_bronze_with_the_full_schema(billing_source, source_engines, transport, emptied):
    uri = connectorx_uri(transport)
    with source_engines[0].begin() as conn:
        conn.exec_driver_sql(f"DELETE FROM `{emptied}`")
    for frame in (*stream_relevant_usage(billing_source, uri), extract_relevant_usage(billing_source, uri, [1, 3])):
        assert frame.height == 0 and frame.schema == pl.Schema(BRONZE_SCHEMA)


def test_the_embedded_sqlite_source_gives_exact_money_too(tmp_path):
    """SQLite stores a NUMERIC as INTEGER when whole (scaled exactly) and as REAL otherwise (rounded to units)."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'billing.sqlite'}")
    billing_metadata.create_all(engine)
    usage, services = billing_metadata.tables["usage"], billing_metadata.tables["v4_wh_service_data"]
    values = ("12345.6789", "-0.0001", "0.0001", "13.5180", "-987654.3210", "99999999999999", "-99999999999999",
              "123456789.1234")
    with engine.begin() as conn:
        conn.execute(sa.insert(services), [dict(
            service_data_FK_customer_id=1, service_data_FK_service_id=1, service_data_FK_service_status_id=3,
            service_data_csa_category_id=1, service_data_system_id=3, service_data_service_name="Voice")])
        conn.execute(sa.insert(usage), [dict(
            usage_FK_customer_id=1, usage_FK_service_id=1, usage_FK_dealer_id=1 + n % 2, usage_date=date(2026, 10, 1),
            usage_quantity=Decimal(v), usage_amount=Decimal(v), usage_modified=datetime(2026, 10, 1)) for n, v in enumerate(values)])
    read = ExtractRead()
    full = pl.concat(list(stream_relevant_usage(engine, None, 3, read=read))).sort("dealer_id", "usage_id")
    assert full.sort("usage_id")["amount"].to_list() == [Decimal(v) for v in values]
    with engine.connect() as conn:
        assert source_totals(conn) == SourceTotals(read.every, len(values), sum(range(1, len(values) + 1)))
    assert read.every.quantity == read.kept.amount == sum(Decimal(v) for v in values)
    assert full.equals(extract_relevant_usage(engine, None, [1, 2]))
    with engine.begin() as conn:
        conn.execute(sa.update(services).values(service_data_service_name="Téléphonie ✆"))
        truth = relevant_stats(conn, None)
        assert relevant_stats(conn, [1, 2]) == truth  # summed per customer and service first: the same
    assert dealer_stats(full_extract(engine, None).lazy()) == truth
    with engine.begin() as conn:  # totals past a float's 53 bits: the source's sums stay exact integers
        conn.execute(sa.delete(usage).where(usage.c.usage_quantity < 0))
    read = ExtractRead()
    list(stream_relevant_usage(engine, None, 3, read=read))
    with engine.connect() as conn:
        assert source_totals(conn).usage == read.every
    assert read.every.quantity == sum(Decimal(v) for v in values if not v.startswith("-"))


def test_join_services_matches_both_keys_and_keeps_usage_order():
    usage_rows = pl.DataFrame({
        "usage_id": [1, 2, 3, 4, 5, 6, 7],
        "customer_id": [7, 1, 7, 0, 2, None, 8],
        # a negative service id packs into the customer block below: must still match only itself; a key
        # beyond the last service key (8) and a NULL one match nothing
        "service_id": [-1, 1, 2, -1, 1, 2, 1],
    })
    services = pl.DataFrame({"customer_id": [7, 7, 2, 6], "service_id": [2, -1, 1, 2**31 - 1], "service_name": ["b", "a", "c", "x"]})
    joined = join_services(usage_rows, service_lookup(services))
    assert joined.rows() == [(1, 7, -1, "a"), (3, 7, 2, "b"), (5, 2, 1, "c")]
    assert joined.columns == ["usage_id", "customer_id", "service_id", "service_name"]
    assert_frame_equal(joined, usage_rows.join(services, on=["customer_id", "service_id"], maintain_order="left"))
    nothing = join_services(usage_rows, service_lookup(services.clear()))
    assert nothing.is_empty() and nothing.columns == joined.columns


def test_service_lookup_rejects_a_pair_on_two_rows():
    """The contract's unique key: a join would repeat a usage row for each duplicate, the lookup would keep one."""
    services = pl.DataFrame({"customer_id": [7, 2, 7], "service_id": [2, 1, 2], "service_name": ["b", "c", "b2"]})
    with pytest.raises(BadSourceRows, match=r"service data has 1 \(customer_id, service_id\) pair\(s\) on more than one row, e.g. \[\(7, 2\)\]"):
        service_lookup(services)


def test_join_services_rejects_ids_beyond_int():
    usage_rows = pl.DataFrame({"usage_id": [1, 2], "customer_id": [2**31, 5], "service_id": [1, None]})
    services = pl.DataFrame({"customer_id": [0], "service_id": [1], "service_name": ["a"]})
    with pytest.raises(BadSourceRows, match=r"usage has 1 customer_id value\(s\) beyond INT, e.g. \[2147483648\]"):
        join_services(usage_rows, service_lookup(services))
    with pytest.raises(BadSourceRows, match="service data has 1 service_id"):
        service_lookup(services.with_columns(service_id=pl.lit(-(2**31) - 1)))
