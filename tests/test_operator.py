"""Issue 10: the operator's surface on the real MariaDB and a real Prefect server.

One-step rebuilds (`partners`, `full_refresh`, silver cascading to gold), the
`usage-pipeline cursor` and `explain` commands as a subprocess, and the state
store: migration from an old block, a deleted store, a process killed between
the store's write and the block's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from datetime import date, datetime

import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from flows.partner_silver import partner_silver
from flows.usage_reconciliation import usage_reconciliation
from orchestration.reconcile import load_reconciliation_state
from orchestration.runtime import read_cursor_value
from tests.cursors import combined
from tests.pipeline_helpers import (
    BRONZE_TABLE,
    child_runs,
    cursor,
    file_ids,
    partition_files,
    rewritten,
    save_cursor_value,
    tick,
)
from tests.sourcedata import PARTNER_A, PARTNER_B, PARTNER_C
from usage_pipeline.cursor import format_timestamp
from usage_pipeline.lake import state_path

pytestmark = pytest.mark.integration
ALL_PARTNERS = {PARTNER_A, PARTNER_B, PARTNER_C}
SILVER_FILES_A = {f"silver/{t}/partner={PARTNER_A}/data.parquet" for t in
                  ("billing_usage_aggregated", "billing_monthly_usage_by_service")}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *args], env=dict(os.environ), capture_output=True,
                          text=True, timeout=120)


# --- one-step rebuilds --------------------------------------------------------------------------------


def test_partners_parameter_rebuilds_exactly_those_partners(materialized, lake_root):
    before, entries = file_ids(lake_root), read_cursor_value()["dealer_last_modified"]
    state, report = tick(partners=[PARTNER_B])
    assert state.is_completed(), state.message
    assert report.plan.partitions == {PARTNER_B: ["requested by operator"]}
    assert report.plan.bronze_dealers == [3]
    assert rewritten(before, file_ids(lake_root)) == {BRONZE_TABLE} | partition_files(PARTNER_B)
    assert read_cursor_value()["dealer_last_modified"] == entries
    assert cursor().partitions[PARTNER_B].materialized_at > cursor().partitions[PARTNER_A].materialized_at


def test_partners_parameter_also_handles_what_the_tick_finds(materialized, lake_root):
    materialized.usage(1, 501, 1, date(2026, 10, 9), "2.0000", datetime(2026, 10, 9, 9))
    state, report = tick(partners=[PARTNER_C.upper()])
    assert set(report.partitions) == {PARTNER_A, PARTNER_C}
    assert cursor().dealer_last_modified[1] == datetime(2026, 10, 9, 9)


@pytest.mark.parametrize("bad", ["not-a-uuid", "../../etc", PARTNER_A + "0"])
def test_malformed_partner_is_refused_before_any_io_naming_it(materialized, lake_root, bad):
    before, value = file_ids(lake_root), read_cursor_value()
    with pytest.raises(Exception) as refused:  # the server checks the parameter against its pattern
        run_deployment("usage-change-detection/usage-change-detection",
                       parameters={"partners": [PARTNER_A, bad]}, timeout=0)
    assert bad in str(refused.value)
    state, _ = tick(partners=[PARTNER_A, bad])  # in-process: Prefect checks the pattern before the flow starts
    assert state.is_failed() and "partners.1: String should match pattern" in state.message
    assert file_ids(lake_root) == before and read_cursor_value() == value


def test_unknown_partner_is_reported_and_nothing_else_runs(materialized, lake_root):
    before = file_ids(lake_root)
    unknown = "dddddddd-0000-4000-8000-000000000004"
    state, report = tick(partners=[unknown])
    assert state.is_completed() and state.message == f"no changes; unknown partner(s) not rebuilt: {unknown}"
    assert file_ids(lake_root) == before


def test_full_refresh_rebuilds_bronze_and_every_partition(materialized, lake_root):
    before = file_ids(lake_root)
    state, report = tick(full_refresh=True)
    assert state.is_completed() and report.plan.bronze_dealers is None
    assert set(report.partitions) == ALL_PARTNERS
    assert rewritten(before, file_ids(lake_root)) == set(before)


def test_dry_run_covers_partners_and_full_refresh(materialized, lake_root):
    before, value = file_ids(lake_root), read_cursor_value()
    state, report = tick(dry_run=True, partners=[PARTNER_A], full_refresh=True)
    assert state.message.startswith("dry run: 5 dealer(s) -> 3 partition(s) would run")
    assert child_runs(state.state_details.flow_run_id) == []
    assert file_ids(lake_root) == before and read_cursor_value() == value


def test_manual_silver_run_cascades_to_gold_unless_told_not_to(materialized, lake_root):
    before = file_ids(lake_root)
    state = partner_silver(partner_uuid=PARTNER_A, return_state=True)
    assert state.is_completed(), state.message
    assert rewritten(before, file_ids(lake_root)) == partition_files(PARTNER_A)
    (gold,) = child_runs(state.state_details.flow_run_id)
    assert gold.name == f"gold-{PARTNER_A}" and {f"partner:{PARTNER_A}", "layer:gold"} <= set(gold.tags)

    before = file_ids(lake_root)
    assert partner_silver(partner_uuid=PARTNER_A, cascade=False, return_state=True).is_completed()
    assert rewritten(before, file_ids(lake_root)) == SILVER_FILES_A


# --- usage-pipeline cursor / explain ----------------------------------------------------------------------


def test_cursor_show_lists_every_partner_with_its_freshness(materialized):
    result = cli("cursor", "show")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line[:8] in {p[:8] for p in ALL_PARTNERS}}
    assert set(rows) == ALL_PARTNERS
    header = next(line for line in result.stdout.splitlines() if line.startswith("partner "))
    assert header.split() == ["partner", "dealers", "state", "lag_seconds", "last_success", "source_watermark",
                              "failed_ticks", "checks", "last_error"]
    assert rows[PARTNER_A].split()[1:5] == ["1,", "2", "fresh", "0"]
    assert "12/12 passed" in rows[PARTNER_A]  # a first tick: its extract is checked by totals, not per dealer


def test_cursor_show_and_explain_give_a_partition_waiting_for_its_rebuild_its_lag(materialized, lake_root):
    silver = lake_root / "silver" / "billing_usage_aggregated" / f"partner={PARTNER_B}"
    shutil.rmtree(silver)
    silver.write_text("blocked")  # B's silver cannot write its file
    materialized.execute("UPDATE `usage` SET usage_modified = '2026-10-15 00:00:00' WHERE usage_FK_dealer_id = 3")
    assert tick()[0].is_failed()
    pending_since = cursor().partitions[PARTNER_B].pending_since.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    lines = cli("cursor", "show").stdout.splitlines()
    header = next(line for line in lines if line.startswith("partner "))
    row = next(line for line in lines if line.startswith(PARTNER_B))
    assert "stale: failed 1 tick(s) in a row" in row
    assert int(row[header.index("lag_seconds"):header.index("last_success")]) > 0
    explained = cli("explain", "3").stdout
    assert re.search(rf"partition lag:     [1-9]\d* s \({PARTNER_B} pending since {pending_since}, 1 failed tick\(s\)\)",
                     explained), explained


def test_cursor_reset_all_makes_the_next_tick_rebuild_everything(materialized):
    result = cli("cursor", "reset", "--all")
    assert result.returncode == 0, result.stderr
    state, report = tick()
    assert report.plan.first_run and set(report.partitions) == ALL_PARTNERS


def test_cursor_reset_partner_rebuilds_exactly_that_partner(materialized, lake_root):
    result = cli("cursor", "reset", "--partner", PARTNER_A)
    assert result.returncode == 0, result.stderr
    assert "stale: cursor entry edited" in cli("cursor", "show").stdout
    before = file_ids(lake_root)
    state, report = tick()
    assert set(report.partitions) == {PARTNER_A}
    assert rewritten(before, file_ids(lake_root)) == {BRONZE_TABLE} | partition_files(PARTNER_A)
    assert set(read_cursor_value()["dealer_last_modified"]) == {"1", "2", "3", "4", "9"}


def test_cursor_reset_dealer_rebuilds_its_partner(materialized):
    assert cli("cursor", "reset", "--dealer", "4").returncode == 0
    state, report = tick()
    assert report.plan.dealer_changes == {4: "cursor entry removed"} and set(report.partitions) == {PARTNER_C}


@pytest.mark.parametrize(
    "args, message",
    [
        (["cursor", "reset"], "say what to rebuild"),
        (["cursor", "reset", "--partner", "xyz"], "--partner must be a canonical 8-4-4-4-12 hex UUID, got 'xyz'"),
        (["cursor", "reset", "--partner", PARTNER_A, "--partner", "dddddddd-0000-4000-8000-000000000004"],
         "partner dddddddd-0000-4000-8000-000000000004 has no dealer in the cursor"),
        (["cursor", "reset", "--dealer", "two"], "invalid int value: 'two'"),
        (["cursor", "reset", "--dealer", "77"], "dealer 77 has no cursor entry"),
        (["cursor", "reset", "--all", "--dealer", "1"], "--all cannot be combined"),
        (["explain", "1.5"], "invalid int value: '1.5'"),
    ],
)
def test_bad_operator_input_exits_2_naming_the_problem_and_changes_nothing(materialized, args, message):
    value = read_cursor_value()
    result = cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    assert read_cursor_value() == value


def test_explain_shows_rows_filters_maxima_partner_cursor_and_next_tick(materialized, lake_root):
    materialized.usage(3, 503, 1, date(2026, 10, 9), "1.0000", datetime(2026, 10, 20))  # excluded: other system
    out = cli("explain", "3")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "3 in all, 1 relevant, 2 excluded" in text
    assert "service_data_system_id != 3: 2" in text
    assert "all rows 2026-10-20T00:00:00.000000Z, relevant rows 2026-10-01T10:00:00.123456Z" in text
    assert f"v3 partner:        {PARTNER_B}" in text
    assert "cursor entry:      2026-10-01T10:00:00.123456Z" in text
    assert "next tick:         nothing for this dealer" in text and "writer updates usage_modified" in text
    published = cursor().partitions[PARTNER_B].materialized_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert f"partition lag:     0 s ({PARTNER_B} published {published})" in text
    assert "reconciliation:    has not run yet (deployment usage-reconciliation)" in text
    assert "reconciliation: has not run yet (deployment usage-reconciliation)" in cli("cursor", "show").stdout
    assert usage_reconciliation(return_state=True).is_completed()  # starts its cycle
    started = format_timestamp(load_reconciliation_state(lake_root)[0].cycle_started_at)
    text = cli("explain", "3").stdout
    assert f"reconciliation:    cycle started {started}, goes on from its first dealer; re-checks this dealer by about" \
        in text
    assert (f"reconciliation: cycle started {started}, goes on from its first dealer; 0 dealer(s) found changed await"
            " the next tick") in cli("cursor", "show").stdout

    materialized.usage(3, 501, 1, date(2026, 10, 9), "1.0000", datetime(2026, 10, 21))
    assert f"next tick rebuilds {PARTNER_B}" in cli("explain", "3").stdout
    unmapped = cli("explain", "9").stdout
    assert "not mapped" in unmapped and "in no partition" in unmapped


def test_explain_tells_when_detection_is_paused(materialized):
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("usage-change-detection/usage-change-detection")
        client.pause_deployment(deployment.id)
        try:
            text = cli("explain", "1").stdout
        finally:
            client.resume_deployment(deployment.id)
    assert "PAUSED" in text and "detection is paused" in text


# --- the state store ----------------------------------------------------------------------------------------


def test_an_old_block_with_bookkeeping_is_migrated_and_nothing_is_lost(materialized, lake_root):
    old = cursor()
    old_format = combined(old)
    save_cursor_value(old_format)
    state_path(lake_root).unlink()
    before = file_ids(lake_root)

    state, report = tick()

    assert state.is_completed() and state.message == "no changes"
    assert set(read_cursor_value()) == {"global_last_modified", "dealer_last_modified"}
    assert combined(cursor()) == old_format  # nothing lost
    assert file_ids(lake_root) == before


def test_a_deleted_state_store_warns_and_rebuilds_every_partition(materialized, lake_root, caplog):
    state_path(lake_root).unlink()
    state, report = tick()
    assert state.is_completed(), state.message
    assert any("does not exist: re-checking every dealer" in r.getMessage() for r in caplog.records
               if r.levelname == "WARNING")
    assert set(report.partitions) == ALL_PARTNERS and report.plan.bronze_dealers is None
    assert tick()[0].message == "no changes"


KILLED_BETWEEN_WRITES = """
import os
import orchestration.tick
from flows.usage_change_detection import usage_change_detection
def killed(*args, **kwargs):
    print("state written; killed before the block write", flush=True)
    os._exit(9)
orchestration.tick.write_cursor_value = killed  # the block write of save_cursor
usage_change_detection(return_state=True)
"""


def free_detection_slot() -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit("usage-change-detection", GlobalConcurrencyLimitUpdate(active_slots=0))


def test_killed_between_the_state_write_and_the_block_write_the_next_tick_redoes_it(materialized, lake_root):
    materialized.usage(3, 501, 1, date(2026, 10, 9), "5.0000", datetime(2026, 10, 22))
    block_before = read_cursor_value()
    killed = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_WRITES], env=dict(os.environ),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9 and "killed before the block write" in killed.stdout, killed.stderr[-2000:]
    assert read_cursor_value() == block_before
    assert cursor().dealer_seen[3].last_modified == datetime(2026, 10, 22)  # the store was written
    free_detection_slot()  # the killed tick's lease would free it within 120 s; the test does not wait

    state, report = tick()
    assert state.is_completed(), state.message
    assert set(report.partitions) == {PARTNER_B}  # the block lags the store: redone, never skipped
    assert read_cursor_value()["dealer_last_modified"]["3"] == "2026-10-22T00:00:00.000000Z"
    assert tick()[0].message == "no changes"
