"""The fast tier: whole ticks in-process against the embedded SQLite source, on `prefect_test_harness`.

No MariaDB, no `prefect server` process, no serve: bronze, silver and gold run as subflows
of the tick (the default). Seconds, for quick feedback; the real-server tests stay the proof.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

import polars as pl
import pytest
import sqlalchemy as sa
from prefect.testing.utilities import prefect_test_harness

from orchestration.setup import DEMO_FILES, DEMO_SOURCE_DIR, run_setup
from tests.test_checks import with_a_duplicate_key
from usage_pipeline import demo_data, extract
from usage_pipeline.lake import GOLD_TABLES, SILVER_TABLES
from usage_pipeline.settings import load_settings
from usage_pipeline.transforms import MONEY


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    with prefect_test_harness(server_startup_timeout=120):
        yield tmp_path_factory.mktemp("fast")


@pytest.fixture
def demo(harness, tmp_path, monkeypatch):
    """The demo source in tmp_path, the blocks pointing at it, an empty lake there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("USAGE_LAKE_ROOT", str(tmp_path / "lake"))
    # One partition at a time: the harness's SQLite server serializes writes anyway, and on a loaded
    # machine concurrent subflows meet "database is locked" there (the real-server tests run them 8 wide).
    monkeypatch.setenv("USAGE_MAX_CONCURRENT_PARTITIONS", "1")
    DEMO_SOURCE_DIR.mkdir()
    billing, v3 = (sa.create_engine(f"sqlite:///{(DEMO_SOURCE_DIR / DEMO_FILES[b]).resolve()}") for b in DEMO_FILES)
    demo_data.create_schema(billing, v3)
    made = demo_data.populate(billing, v3)
    run_setup(load_settings(), environ={})
    from tests.pipeline_helpers import tick  # after the harness: it binds the flow to this API

    return billing, made, tick, tmp_path / "lake"


def cursor():
    from tests.pipeline_helpers import cursor

    return cursor()


def test_first_tick_builds_every_partner_and_a_second_one_only_the_changed(demo, monkeypatch):
    import flows.partner_silver

    billing, made, tick, lake = demo
    versions = []  # the bronze version each silver run read: the one the tick's bronze run committed
    build_silver = flows.partner_silver.build_silver
    monkeypatch.setattr(flows.partner_silver, "build_silver",
                        lambda root, partner, dealers, version, *rest: versions.append(version)
                        or build_silver(root, partner, dealers, version, *rest))
    state, report = tick()
    assert state.is_completed(), state.message
    assert report.bronze.ok and report.bronze.name == "bronze-full"
    assert versions == [report.bronze.result.version] * len(made["partners"]) == [0] * len(made["partners"])
    assert report.plan.first_run and set(report.partitions) == set(made["partners"])
    assert report.bronze_table["version"] == 0 and report.bronze_table["files"] > 0
    assert report.suspects == frozenset()  # every dealer counted, from the full extract
    for partner in made["partners"]:
        gold = pl.read_parquet(lake / "gold" / "usage_report" / f"partner={partner}" / "data.parquet")
        assert set(gold["dealer_id"]) <= set(made["partners"][partner])

    partner, dealers = next(iter(made["partners"].items()))
    demo_data.touch_dealer(billing, dealers[0], datetime(2026, 11, 20, 8, 0))
    state, report = tick()
    assert state.is_completed(), state.message
    assert set(report.partitions) == {partner} and report.plan.bronze_dealers == [dealers[0]]
    assert versions[-1] == report.bronze.result.version == 1
    assert tick()[0].message == "no changes"

    # The source's own SQL re-checks every dealer and agrees with what the first tick counted from bronze.
    from flows.usage_reconciliation import usage_reconciliation

    monkeypatch.setenv("USAGE_RECONCILE_SECONDS", "0.001")
    state = usage_reconciliation(return_state=True)
    reconciled = state.result()
    assert reconciled.slice.completes and len(reconciled.slice.dealers) == reconciled.slice.known > 0
    assert reconciled.changed == {} and state.message.endswith("; no change")


def test_a_silent_change_is_found_by_a_reconciliation_run_and_rebuilt_by_the_next_tick(demo, monkeypatch):
    """usage-reconciliation off the tick's path: it finds what the probe cannot see and leaves it to the
    next tick, which re-checks that dealer alone, rebuilds its partner, and takes it once."""
    from flows.usage_reconciliation import usage_reconciliation

    billing, made, tick, lake = demo
    state = usage_reconciliation(return_state=True)
    assert state.is_completed() and state.message == "nothing materialized to compare with"
    assert tick()[0].is_completed()
    first = usage_reconciliation(return_state=True)  # starts its cycle: USAGE_RECONCILE_SECONDS is an hour
    assert first.result().slice.dealers == frozenset() and (lake / "_pipeline/reconciliation_state.parquet").exists()

    partner, dealers = next(iter(made["partners"].items()))
    with billing.begin() as conn:  # one of the dealer's relevant services leaves the billing filters
        customer, service = conn.exec_driver_sql(
            "SELECT u.usage_FK_customer_id, u.usage_FK_service_id FROM usage u JOIN v4_wh_service_data s"
            " ON s.service_data_FK_customer_id = u.usage_FK_customer_id"
            " AND s.service_data_FK_service_id = u.usage_FK_service_id"
            " WHERE u.usage_FK_dealer_id = ? AND s.service_data_FK_service_status_id = 3 LIMIT 1", (dealers[0],)).one()
        conn.exec_driver_sql("UPDATE v4_wh_service_data SET service_data_FK_service_status_id = 5"
                             " WHERE service_data_FK_customer_id = ? AND service_data_FK_service_id = ?",
                             (customer, service))
    affected = {d for (d,) in billing.connect().exec_driver_sql(
        "SELECT DISTINCT usage_FK_dealer_id FROM usage WHERE usage_FK_customer_id = ? AND usage_FK_service_id = ?",
        (customer, service))}
    assert tick()[0].message == "no changes"  # the probe cannot see it

    monkeypatch.setenv("USAGE_RECONCILE_SECONDS", "0.001")  # every dealer on this run
    found = usage_reconciliation(return_state=True).result()
    assert set(found.changed) == affected and dealers[0] in affected
    state, report = tick()
    assert state.is_completed(), state.message
    assert report.suspects == affected and set(report.plan.dealer_changes) == affected
    assert partner in report.partitions and report.bronze.ok
    assert tick()[0].message == "no changes"  # each suspect taken once
    assert usage_reconciliation(return_state=True).result().changed == {}


def test_a_ticks_partitions_use_its_dealer_directory_and_manual_runs_read_v3():
    from flows.partner_silver import partner_dealers
    from orchestration.runtime import TickShared, sharing_with_subflows, tick_shared

    a, b = "aaaaaaaa-0000-4000-8000-000000000001", "bbbbbbbb-0000-4000-8000-000000000002"
    assert tick_shared() is None  # outside a tick: partner-silver reads v3 itself
    with sharing_with_subflows(TickShared({3: a, 1: a, 2: b, 4: None})):
        assert partner_dealers(a) == [1, 3] and partner_dealers(b) == [2]
    assert tick_shared() is None


def test_requested_partner_and_dry_run(demo):
    _, made, tick, _ = demo
    assert tick()[0].is_completed()
    partner = sorted(made["partners"])[-1]
    state, report = tick(dry_run=True, partners=[partner])
    assert state.message == "dry run: 0 dealer(s) -> 1 partition(s) would run (with bronze)"
    state, report = tick(partners=[partner])
    assert state.is_completed() and set(report.partitions) == {partner}


def test_a_tick_returns_its_report_quoted_so_prefect_does_not_walk_the_cursor(demo):
    """Prefect walks a flow's returned value for futures, and the report holds the cursor, an entry per
    dealer (2 s of every tick at 20,000 dealers): quoted, it is not walked, and a caller unwraps it."""
    from prefect.utilities.annotations import quote

    _, made, tick, _ = demo
    state, report = tick()
    returned = state.result()
    assert state.is_completed() and isinstance(returned, quote) and returned.unquote() is report
    dealers = sum(len(d) for d in made["partners"].values()) + len(made["unmapped_dealers"])
    assert len(report.cursor.dealer_seen) == dealers


def partner_files(lake, partner: str) -> dict[str, bytes]:
    return {f"{layer}/{table}": (lake / layer / table / f"partner={partner}" / "data.parquet").read_bytes()
            for layer, tables in (("silver", SILVER_TABLES), ("gold", GOLD_TABLES)) for table in tables}


def test_a_check_broken_in_a_tick_fails_that_partition_keeps_its_files_and_a_later_tick_publishes(demo, monkeypatch):
    from usage_pipeline import bronze, materialize

    billing, made, tick, lake = demo
    assert tick()[0].is_completed()
    partner, dealers = next(iter(made["partners"].items()))
    before = partner_files(lake, partner)
    real = {"usage_report": materialize.usage_report, "read_dealers": bronze.read_dealers}
    breaks = [
        (materialize, "usage_report", with_a_duplicate_key(real["usage_report"]), "grain.usage_report"),
        # a bronze slice whose sums differ from what the source said: the source, asked again, says the same
        (bronze, "read_dealers", lambda *args: real["read_dealers"](*args).with_columns(pl.col("amount") * 2),
         "reconciliation.source"),
    ]
    for failures, (module, name, broken, check) in enumerate(breaks, start=1):
        monkeypatch.setattr(module, name, broken)
        demo_data.touch_dealer(billing, dealers[0], datetime(2026, 11, 20, 8, failures))
        state, report = tick()
        assert state.is_failed() and set(report.partitions) == {partner}
        assert check in report.partitions[partner].error and "expected" in report.partitions[partner].error
        assert partner_files(lake, partner) == before and not list((lake / "_staging").rglob("*.parquet"))
        status = cursor().partitions[partner]
        assert status.failures == failures and check in status.checks
        monkeypatch.setattr(module, name, real[name])

    # The source moved during the tick: asked again, it no longer says what the snapshot said. Deferred,
    # and the deferral counts like a failure.
    from orchestration import runtime

    real_fingerprints = runtime.read_source_fingerprints
    monkeypatch.setattr(bronze, "read_dealers", breaks[1][2])
    monkeypatch.setattr(runtime, "read_source_fingerprints", lambda dealers: {})
    demo_data.touch_dealer(billing, dealers[0], datetime(2026, 11, 20, 9))
    state, report = tick()
    assert state.is_failed() and "source moved: dealer(s)" in report.partitions[partner].error
    assert partner_files(lake, partner) == before and cursor().partitions[partner].failures == len(breaks) + 1
    monkeypatch.setattr(bronze, "read_dealers", real["read_dealers"])
    monkeypatch.setattr(runtime, "read_source_fingerprints", real_fingerprints)

    state, report = tick()
    assert state.is_completed() and set(report.partitions) == {partner}
    assert report.partitions[partner].checks and all(c.passed for c in report.partitions[partner].checks)
    assert [c.name for c in report.partitions[partner].silver.checks][0] == "reconciliation.source"
    after = partner_files(lake, partner)
    assert all(after[f] != before[f] for f in after)
    assert cursor().partitions[partner].failures == 0 and cursor().partitions[partner].checks == "13/13 passed"


def test_a_check_downgraded_by_the_setting_publishes_with_a_warning(demo, monkeypatch):
    from usage_pipeline import materialize

    billing, made, tick, lake = demo
    assert tick()[0].is_completed()
    partner, dealers = next(iter(made["partners"].items()))
    monkeypatch.setattr(materialize, "usage_report", with_a_duplicate_key(materialize.usage_report))
    monkeypatch.setenv("USAGE_CHECKS_WARN_ONLY", "grain.usage_report,conservation.usage_report")
    demo_data.touch_dealer(billing, dealers[0], datetime(2026, 11, 21, 8))
    state, report = tick()
    assert state.is_completed(), state.message
    assert cursor().partitions[partner].checks == "11/13 passed; failed: conservation.usage_report, grain.usage_report"


def test_a_start_over_tick_checks_its_extract_against_the_source_totals(demo, monkeypatch):
    from orchestration import tick as tick_module

    billing, made, tick, lake = demo
    assert tick()[0].is_completed()
    before = {p: partner_files(lake, p) for p in made["partners"]}
    real_join = extract.join_services
    monkeypatch.setattr(extract, "join_services", lambda rows, services: real_join(rows, services).slice(1))
    state, report = tick(full_refresh=True)
    assert state.is_failed() and "reconciliation.totals FAILED" in report.bronze.message
    # Silver built meanwhile and staged; no gold started, nothing published, nothing left staged.
    assert set(report.partitions) == set(made["partners"]) and not list((lake / "_staging").rglob("*.parquet"))
    assert all(o.silver.ok and (o.gold.state, o.gold.flow_run_id) == ("NotStarted", None) and not o.ok
               for o in report.partitions.values())
    assert {p: partner_files(lake, p) for p in made["partners"]} == before
    assert all(s.failures == 1 for s in cursor().partitions.values())
    monkeypatch.setattr(extract, "join_services", real_join)

    # The source's totals moved between the query alongside the extract and the one after it: the totals
    # cannot tell, so a warning; the partitions are published.
    real_query, asked = tick_module.source_totals, []

    def moving_totals(conn):
        asked.append(conn)
        totals = real_query(conn)
        return replace(totals, relevant_id_sum=totals.relevant_id_sum + len(asked))

    monkeypatch.setattr(tick_module, "source_totals", moving_totals)
    state, report = tick(full_refresh=True)
    assert state.is_completed() and len(asked) == 2, state.message
    (check,) = report.bronze.checks
    assert not check.passed and not check.blocking and "inconclusive: the source moved" in check.actual
    assert all(partner_files(lake, p) != before[p] for p in made["partners"])
    monkeypatch.setattr(tick_module, "source_totals", real_query)

    state, report = tick(full_refresh=True)
    (check,) = report.bronze.checks
    assert state.is_completed() and check.passed and check.name == "reconciliation.totals"
    with billing.connect() as conn:
        usage_rows = conn.exec_driver_sql("SELECT COUNT(*) FROM usage").scalar()
    bronze_rows = pl.read_delta(str(lake / "bronze" / "billing_usage_raw")).height
    assert f"usage rows={usage_rows} " in check.expected and f"relevant rows={bronze_rows} " in check.expected
    assert usage_rows > bronze_rows  # the demo has usage outside the billing filters: both halves count


def test_a_start_over_check_unanswered_by_the_source_blocks_unless_downgraded(demo, monkeypatch):
    """The source's totals unanswered, on the first ask or on the second after a mismatch: the check fails,
    its artifact row says why, nothing is published; USAGE_CHECKS_WARN_ONLY naming it publishes with a warning."""
    from orchestration import report as report_module
    from orchestration import tick as tick_module

    billing, made, tick, lake = demo
    assert tick()[0].is_completed()
    before = {p: partner_files(lake, p) for p in made["partners"]}
    real_query, asked = tick_module.source_totals, []

    def lost_connection(conn):
        raise sa.exc.OperationalError("SELECT ... FROM usage", {}, Exception("Lost connection to server during query"))

    def busy_then_lost(conn):  # the first answer differs in the rows read; asked again, no answer
        asked.append(conn)
        if len(asked) > 1:
            lost_connection(conn)
        totals = real_query(conn)
        return replace(totals, usage=replace(totals.usage, rows=totals.usage.rows + 1))

    for query, says in ((lost_connection, "unanswered: billing-db: OperationalError"),
                        (busy_then_lost, "(differs: usage read) (asked again, no answer:")):
        monkeypatch.setattr(tick_module, "source_totals", query)
        state, report = tick(full_refresh=True)
        (check,) = report.bronze.checks
        assert state.is_failed() and not check.passed and check.blocking, state.message
        assert says in check.actual and "Lost connection to server during query" in check.actual, check
        assert state.message and "reconciliation.totals FAILED" in report.bronze.message
        assert all(o.silver.ok and o.gold.state == "NotStarted" for o in report.partitions.values())
        (row,) = [r for r in report_module.check_rows(report) if r["layer"] == "bronze"]
        assert (row["check"], row["passed"], row["severity"]) == ("reconciliation.totals", False, "blocking")
        assert {p: partner_files(lake, p) for p in made["partners"]} == before
    assert len(asked) == 2

    monkeypatch.setenv("USAGE_CHECKS_WARN_ONLY", "reconciliation.totals")
    monkeypatch.setattr(tick_module, "source_totals", lost_connection)
    state, report = tick(full_refresh=True)
    (check,) = report.bronze.checks
    assert state.is_completed() and not check.passed and not check.blocking, state.message
    assert check.actual.startswith("unanswered: ")
    assert all(partner_files(lake, p) != before[p] for p in made["partners"])


def test_each_part_of_the_start_over_check_fails_the_tick_that_breaks_it(demo, monkeypatch):
    """Real breaks, one at a time, each on a full_refresh tick: no partition is published."""
    from orchestration import tick as tick_module
    from usage_pipeline import bronze as bronze_module

    billing, made, tick, lake = demo
    assert tick()[0].is_completed()
    before = {p: partner_files(lake, p) for p in made["partners"]}
    real_money, real_normalize, real_join = extract.money_from_units, extract.normalize_bronze, extract.join_services
    real_query = tick_module.source_totals

    def busy_source(conn):  # every answer about all of `usage` differs: rows keep arriving
        totals = real_query(conn)
        return replace(totals, usage=replace(totals.usage, rows=totals.usage.rows + len(busy)))

    busy: list[int] = []
    breaks = {  # what breaks -> (module, name, replacement, the part the check names as differing)
        "money doubled as read": (extract, "money_from_units", lambda frame, columns: real_money(frame, columns)
                                  .with_columns((pl.col("quantity") * 2).cast(MONEY)), "usage read"),
        "kept money changed before the write": (extract, "normalize_bronze", lambda frame: real_normalize(
            frame.with_columns((pl.col("amount") + 1).cast(MONEY))), "relevant money"),
        "the commit's read totals lost": (bronze_module, "commit_metadata", lambda root, version: {},
                                          "unreadable: LookupError"),
        "a row dropped while the source is busy": (extract, "join_services", lambda rows, services: real_join(
            rows, services).slice(1), "relevant rows"),
    }
    for why, (module, name, replacement, part) in breaks.items():
        real = getattr(module, name)
        monkeypatch.setattr(module, name, replacement)
        if module is extract and name == "join_services":
            monkeypatch.setattr(tick_module, "source_totals", lambda conn: busy.append(1) or busy_source(conn))
        state, report = tick(full_refresh=True)
        monkeypatch.setattr(module, name, real)
        monkeypatch.setattr(tick_module, "source_totals", real_query)
        (check,) = report.bronze.checks
        assert state.is_failed() and not check.passed and check.blocking, why
        named = check.actual.partition("(differs: ")[2] or check.actual  # the parts that differ, or why none
        assert part in named and "inconclusive" not in check.actual, (why, check)
        assert {p: partner_files(lake, p) for p in made["partners"]} == before, why
    assert len(busy) == 2  # asked alongside the extract and after it: the usage part moved, the relevant one not

    state, report = tick(full_refresh=True)
    assert state.is_completed() and report.bronze.checks[0].passed


def test_a_reader_sees_a_mix_of_versions_only_while_a_publish_renames(demo, monkeypatch):
    """A reader polls one partner's four files while ticks publish it, every other one failing at gold."""
    import threading

    from usage_pipeline import lake as lake_module
    from usage_pipeline import materialize

    billing, made, tick, lake = demo
    assert tick()[0].is_completed()
    partner, dealers = next(iter(made["partners"].items()))
    paths = [lake / layer / table / f"partner={partner}" / "data.parquet"
             for layer, tables in (("silver", SILVER_TABLES), ("gold", GOLD_TABLES)) for table in tables]
    publishes = {"started": 0, "ended": 0}
    real_publish = lake_module.publish

    def counted_publish(*args):
        publishes["started"] += 1
        try:
            real_publish(*args)
        finally:
            publishes["ended"] += 1

    monkeypatch.setattr(materialize, "lake_publish", counted_publish)
    observations, stop = [], threading.Event()

    def read() -> None:
        while not stop.is_set():
            ended_before = publishes["ended"]
            ids = tuple(lake_module.provenance(path)["publish_id"] for path in paths)
            observations.append((ids, publishes["started"] > ended_before))

    reader = threading.Thread(target=read)
    reader.start()
    published, failed = [], []
    real_report = materialize.usage_report
    try:
        for round_ in range(6):
            failing = round_ % 2 == 1
            monkeypatch.setattr(materialize, "usage_report",
                                with_a_duplicate_key(real_report) if failing else real_report)
            demo_data.touch_dealer(billing, dealers[0], datetime(2026, 11, 22, 8, round_))
            state, report = tick()
            silver_id = report.partitions[partner].silver.flow_run_id
            (failed if failing else published).append(silver_id)
            assert state.is_failed() == failing
    finally:
        stop.set()
        reader.join()
    seen = {publish_id for ids, _ in observations for publish_id in ids}
    assert len(observations) > 100 and len(seen) >= 2
    assert not seen & set(failed)  # a failed step never left anything of its build in place
    mixed = [(ids, overlapping) for ids, overlapping in observations if len(set(ids)) > 1]
    assert all(overlapping for _, overlapping in mixed), mixed
