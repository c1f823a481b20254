"""Issue 2 end to end: real MariaDB, real Prefect server, the served deployments."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

import polars as pl
import pytest
from prefect.client.orchestration import get_client

from blocks.usage_cursor import CURSOR_DOCUMENT
from orchestration.runtime import read_cursor_value
from tests.pipeline_helpers import (
    BRONZE_TABLE,
    child_runs,
    cursor,
    file_ids,
    partition_files,
    read,
    read_bronze,
    rewritten,
    save_cursor_value,
    tick,
)
from tests.sourcedata import (
    PARTNER_A,
    PARTNER_B,
    PARTNER_C,
    SourceBuilder,
    active_services_truth,
    usage_report_truth,
)
from usage_pipeline.lake import read_state_document, state_path, write_state_document

pytestmark = pytest.mark.integration
ALL_PARTNERS = {PARTNER_A, PARTNER_B, PARTNER_C}


@pytest.fixture
def source(fresh) -> SourceBuilder:
    builder = SourceBuilder(*fresh)
    builder.standard()
    return builder


@pytest.fixture
def materialized(source, lake_root):
    """The standard source after a successful first tick."""
    state, report = tick()
    assert state.is_completed(), state.message
    return source


def test_first_run_without_cursor_materializes_bronze_and_every_partition(source, lake_root):
    state, report = tick()

    assert state.is_completed(), state.message
    assert report.plan.first_run and report.plan.bronze_dealers is None
    assert set(report.partitions) == ALL_PARTNERS
    assert all(outcome.ok for outcome in report.partitions.values())
    expected = {BRONZE_TABLE} | set().union(*(partition_files(p) for p in ALL_PARTNERS))
    assert set(file_ids(lake_root)) == expected

    bronze = read_bronze(lake_root)
    assert sorted(bronze["dealer_id"].unique()) == [1, 2, 3, 4, 9]  # the excluded row is not there
    assert 99 not in bronze["amount"].cast(pl.Float64).to_list()

    value = read_cursor_value()
    assert value["global_last_modified"] == "2026-10-01T11:00:00.123456Z".replace("11:", "10:")
    assert value["dealer_last_modified"] == {
        "1": "2026-10-01T09:00:00.123456Z",
        "2": None,  # NULL usage_modified only
        "3": "2026-10-01T10:00:00.123456Z",  # the 11:00 row is excluded by the filters
        "4": "2026-10-01T08:00:00.123456Z",
        "9": "2026-10-01T08:00:00.123456Z",
    }


def test_child_runs_are_tagged_subflows_of_the_tick(source):
    state, report = tick()
    runs = child_runs(state.state_details.flow_run_id)
    names = sorted(run.name for run in runs)
    assert names == sorted(["bronze-full"] + [f"{layer}-{p}" for p in ALL_PARTNERS for layer in ("silver", "gold")])
    silver_ids = {run.name.split("-", 1)[1]: str(run.id) for run in runs if run.name.startswith("silver-")}
    for run in runs:
        if run.name.startswith(("silver-", "gold-")):
            layer, partner = run.name.split("-", 1)
            assert {f"partner:{partner}", f"layer:{layer}"} <= set(run.tags)
            # silver reads the bronze version the tick's bronze run committed and stages its tables;
            # gold publishes them with its own
            assert run.parameters == ({"partner_uuid": partner, "cascade": False, "bronze_version": 0, "publish": False}
                                      if layer == "silver" else {"partner_uuid": partner,
                                                                 "staged_silver": silver_ids[partner]})


def test_no_change_runs_nothing_and_rewrites_nothing(materialized, lake_root):
    before_files, before_cursor = file_ids(lake_root), read_cursor_value()
    before_state = state_path(lake_root).stat()
    state, report = tick()
    assert state.is_completed() and state.message == "no changes"
    assert report.bronze is None and not report.partitions and not report.cursor_saved
    assert child_runs(state.state_details.flow_run_id) == []
    assert file_ids(lake_root) == before_files
    assert read_cursor_value() == before_cursor
    after_state = state_path(lake_root).stat()
    assert (after_state.st_ino, after_state.st_mtime_ns) == (before_state.st_ino, before_state.st_mtime_ns)


def test_a_no_change_tick_rewrites_documents_it_read_with_a_problem(materialized, lake_root):
    """An unchanged cursor is still saved when what it was read from had a problem or an older layout:
    the block loses a bookkeeping key an older version kept there, the state an unreadable entry."""
    value = read_cursor_value()
    save_cursor_value({**value, "fingerprints": {}})
    document, _ = read_state_document(lake_root)
    write_state_document(lake_root, {**document, "partitions": {**document["partitions"], "not-a-uuid": {}}})
    state, _ = tick()
    assert state.message == "no changes"
    assert read_cursor_value() == value
    assert "not-a-uuid" not in read_state_document(lake_root)[0]["partitions"]
    cursor()  # read back without a warning


def test_one_dealer_changed_rewrites_bronze_and_only_its_partner(materialized, lake_root):
    before = file_ids(lake_root)
    materialized.usage(3, 501, 2, date(2026, 10, 7), "1.0000", datetime(2026, 10, 2, 9, 0))

    state, report = tick()

    assert state.is_completed(), state.message
    assert set(report.partitions) == {PARTNER_B}
    assert report.plan.bronze_dealers == [3]
    assert rewritten(before, file_ids(lake_root)) == {BRONZE_TABLE} | partition_files(PARTNER_B)
    assert cursor().dealer_last_modified[3] == datetime(2026, 10, 2, 9, 0)


def test_several_dealers_of_one_partner_trigger_one_partition(materialized, lake_root):
    materialized.execute("UPDATE `usage` SET usage_modified = '2026-10-03 00:00:00' WHERE usage_FK_dealer_id IN (1, 2)")
    state, report = tick()
    assert set(report.plan.dealer_changes) == {1, 2}
    assert set(report.partitions) == {PARTNER_A}
    assert len(child_runs(state.state_details.flow_run_id)) == 3  # bronze, silver, gold


def test_filtered_out_row_changes_nothing(materialized, lake_root):
    before = file_ids(lake_root)
    materialized.usage(3, 503, 1, date(2026, 10, 8), "50.0000", datetime(2026, 10, 9))  # system 4: excluded
    state, report = tick()
    assert state.message == "no changes" and not report.partitions
    assert file_ids(lake_root) == before


def test_gold_equals_sql_ground_truth(materialized, lake_root, source_engines):
    billing, _ = source_engines
    for partner in ALL_PARTNERS:
        report = read(lake_root, "gold", "usage_report", partner)
        got = [
            (r["month"], r["dealer_id"], r["quantity"], r["amount"], r["services"], r["customers"])
            for r in report.iter_rows(named=True)
        ]
        assert got == usage_report_truth(billing, partner), partner
        active = read(lake_root, "gold", "active_services", partner)
        got = [
            (r["dealer_id"], r["customer_id"], r["service_id"], r["first_usage_date"], r["last_usage_date"], r["amount"])
            for r in active.iter_rows(named=True)
        ]
        assert got == active_services_truth(billing, partner), partner
    assert read(lake_root, "gold", "usage_report", PARTNER_A)["amount"].sum() == Decimal("14.2500")


def test_cursor_edit_of_one_dealer_rematerializes_only_its_partner(materialized, lake_root):
    value = read_cursor_value()
    del value["dealer_last_modified"]["4"]
    save_cursor_value(value)
    before = file_ids(lake_root)

    state, report = tick()

    assert set(report.partitions) == {PARTNER_C}
    assert rewritten(before, file_ids(lake_root)) == {BRONZE_TABLE} | partition_files(PARTNER_C)
    assert "4" in read_cursor_value()["dealer_last_modified"]


def test_cursor_value_changed_for_one_dealer_rematerializes_its_partner(materialized):
    value = read_cursor_value()
    value["dealer_last_modified"]["3"] = "2020-01-01T00:00:00.000000Z"
    save_cursor_value(value)
    state, report = tick()
    assert set(report.partitions) == {PARTNER_B}
    assert read_cursor_value()["dealer_last_modified"]["3"] == "2026-10-01T10:00:00.123456Z"


@pytest.mark.parametrize("reset", [{}, {"global_last_modified": None, "dealer_last_modified": {}}, None])
def test_cursor_reset_rematerializes_everything(materialized, reset):
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(CURSOR_DOCUMENT, "usage-cursor")
        if reset is None:
            client.delete_block_document(document.id)
    if reset is not None:
        save_cursor_value(reset)
    state, report = tick()
    assert report.plan.first_run
    assert set(report.partitions) == ALL_PARTNERS


def test_failing_partner_keeps_its_cursor_entries_while_others_advance(materialized, lake_root):
    materialized.execute("UPDATE `usage` SET usage_modified = '2026-10-05 00:00:00' WHERE usage_FK_dealer_id IN (1, 3)")
    blocker = lake_root / "silver" / "billing_usage_aggregated" / f"partner={PARTNER_B}"
    (blocker / "data.parquet").unlink()
    blocker.rmdir()
    blocker.write_text("not a directory")  # silver for B cannot write its file
    before = cursor()

    state, report = tick()

    assert state.is_failed() and "1/2 ok" in state.message
    assert report.partitions[PARTNER_A].ok and not report.partitions[PARTNER_B].ok
    after = cursor()
    assert after.dealer_last_modified[1] == datetime(2026, 10, 5)
    assert after.dealer_last_modified[3] == before.dealer_last_modified[3]
    assert after.partitions[PARTNER_B].failures == 1 and after.partitions[PARTNER_B].last_error

    blocker.unlink()
    state, report = tick()
    assert state.is_completed(), state.message
    assert set(report.partitions) == {PARTNER_B}
    assert cursor().dealer_last_modified[3] == datetime(2026, 10, 5)
    assert cursor().partitions[PARTNER_B].failures == 0


def test_empty_usage_table_writes_empty_partitions_once(fresh, lake_root):
    builder = SourceBuilder(*fresh)
    builder.dealer(1, PARTNER_A)
    state, report = tick()
    assert state.is_completed(), state.message
    aggregated = read(lake_root, "silver", "billing_usage_aggregated", PARTNER_A)
    assert aggregated.height == 0 and "partner_uuid" in aggregated.columns
    assert read(lake_root, "gold", "usage_report", PARTNER_A).height == 0
    before = file_ids(lake_root)
    state, report = tick()
    assert state.message == "no changes"
    assert file_ids(lake_root) == before


def test_null_timestamps_are_detected_and_materialized(materialized, lake_root):
    customer = 777
    materialized.service(customer, 1)
    materialized.dealer(5, PARTNER_C)
    materialized.usage(5, customer, 1, date(2026, 10, 20), "3.0000", None)
    state, report = tick()
    assert set(report.plan.dealer_changes) == {5}
    assert set(report.partitions) == {PARTNER_C}
    assert read_cursor_value()["dealer_last_modified"]["5"] is None
    assert 5 in read(lake_root, "gold", "usage_report", PARTNER_C)["dealer_id"].to_list()


def test_dealer_moving_to_another_partner_rematerializes_both(materialized, lake_root):
    materialized.dealer(4, PARTNER_B)
    state, report = tick()
    assert set(report.partitions) == {PARTNER_B, PARTNER_C}
    assert 4 in read(lake_root, "gold", "usage_report", PARTNER_B)["dealer_id"].to_list()
    assert read(lake_root, "gold", "usage_report", PARTNER_C).height == 0


def test_dealer_whose_relevant_rows_disappear_rematerializes_its_partner(materialized, lake_root):
    materialized.execute("DELETE FROM `usage` WHERE usage_FK_dealer_id = 4")
    state, report = tick()
    assert report.plan.dealer_changes == {4: "relevant rows disappeared"}
    assert set(report.partitions) == {PARTNER_C}
    assert read(lake_root, "gold", "usage_report", PARTNER_C).height == 0
    assert "4" not in read_cursor_value()["dealer_last_modified"]


def test_dry_run_reports_and_changes_nothing(materialized, lake_root):
    materialized.execute("UPDATE `usage` SET usage_modified = '2026-10-06 00:00:00' WHERE usage_FK_dealer_id = 1")
    before_files, before_cursor = file_ids(lake_root), read_cursor_value()
    state, report = tick(dry_run=True)
    assert state.is_completed() and state.message.startswith("dry run")
    assert set(report.plan.partitions) == {PARTNER_A}
    assert child_runs(state.state_details.flow_run_id) == []
    assert file_ids(lake_root) == before_files and read_cursor_value() == before_cursor
