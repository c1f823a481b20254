"""The fast tier: whole ticks in-process against the embedded SQLite source, on `prefect_test_harness`.

No MariaDB, no `prefect server` process, no serve: bronze, silver and gold run as subflows
of the tick (the default). Seconds, for quick feedback; the real-server tests stay the proof.
"""

from __future__ import annotations

from datetime import datetime

import polars as pl
import pytest
import sqlalchemy as sa
from prefect.testing.utilities import prefect_test_harness

from orchestration.setup import DEMO_FILES, DEMO_SOURCE_DIR, run_setup
from usage_pipeline import demo_data
from usage_pipeline.settings import load_settings


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
    assert report.snapshot_reconciled  # every dealer counted, from the full extract
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
    monkeypatch.setenv("USAGE_RECONCILE_SECONDS", "0.001")
    state, report = tick()
    assert report.snapshot_reconciled and state.message == "no changes"


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
