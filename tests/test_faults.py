"""Issue 4: faults and bad input. The tick always completes, nothing is lost or half written."""

from __future__ import annotations

import contextvars
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime
from uuid import UUID

import polars as pl
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.deployments import run_deployment
from prefect_sqlalchemy import SqlAlchemyConnector

from flows.partner_silver import partner_silver
from orchestration.runtime import read_cursor_value
from orchestration.setup import partner_limit
from tests.conftest import PIPELINE_PASSWORD
from tests.pipeline_helpers import RestApi, cursor, file_ids, read, rewritten, save_cursor_value, tick
from tests.sourcedata import PARTNER_A, PARTNER_B, PARTNER_C, SourceBuilder
from usage_pipeline.partners import InvalidPartnerUUID
from usage_pipeline.settings import load_settings

pytestmark = pytest.mark.integration


@pytest.fixture
def broken_block(pipeline):
    """Point a connector block at a closed port for one test, then restore it."""
    saved = {}

    def break_(block: str, port: int = 1, read_timeout: int | None = None) -> None:
        connector = SqlAlchemyConnector.load(block)
        saved[block] = connector
        broken = connector.model_copy(deep=True)
        broken.connection_info.port = port  # default: nothing listens there, connection refused
        if read_timeout is not None:
            broken.connect_args = {**(broken.connect_args or {}), "read_timeout": read_timeout}
        broken.save(block, overwrite=True)

    yield break_
    for block, connector in saved.items():
        connector.save(block, overwrite=True)


@pytest.mark.parametrize("block", ["billing-db", "v3-db"])
def test_unreachable_source_skips_the_tick_and_keeps_the_cursor(materialized, broken_block, block, caplog, lake_root):
    materialized.execute("UPDATE `usage` SET usage_modified = '2026-10-09 00:00:00' WHERE usage_FK_dealer_id = 1")
    before_cursor, before_files = read_cursor_value(), file_ids(lake_root)
    broken_block(block)

    state, report = tick()

    assert state.is_completed() and state.name == "Skipped", state
    assert block in state.message and PIPELINE_PASSWORD not in state.message
    assert report.bronze is None and not report.partitions
    assert read_cursor_value() == before_cursor and file_ids(lake_root) == before_files
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(block in w for w in warnings) and not any(PIPELINE_PASSWORD in w for w in warnings)


@pytest.fixture
def hung_database_port():
    """A port that accepts TCP connections and never answers, like a hung database server."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # the kernel completes the handshake; nobody ever reads or writes
        yield listener.getsockname()[1]


def test_hung_source_times_out_and_skips_the_tick(materialized, broken_block, hung_database_port, lake_root, caplog):
    """The block's read_timeout bounds a hung server; the tick then ends like for a refused connection."""
    materialized.execute("UPDATE `usage` SET usage_modified = '2026-10-09 00:00:00' WHERE usage_FK_dealer_id = 1")
    before_cursor, before_files = read_cursor_value(), file_ids(lake_root)
    broken_block("billing-db", port=hung_database_port, read_timeout=3)

    started = time.monotonic()
    state, report = tick()

    assert time.monotonic() - started < 60
    assert state.name == "Skipped" and "billing-db" in state.message and "timed out" in state.message, state.message
    assert report.bronze is None and not report.partitions
    assert read_cursor_value() == before_cursor and file_ids(lake_root) == before_files
    assert PIPELINE_PASSWORD not in caplog.text


def test_next_tick_after_recovery_behaves_normally(materialized, broken_block):
    materialized.execute("UPDATE `usage` SET usage_modified = '2026-10-09 00:00:00' WHERE usage_FK_dealer_id = 1")
    broken_block("billing-db")
    assert tick()[0].name == "Skipped"
    connector = SqlAlchemyConnector.load("billing-db")
    connector.connection_info.port = 3306
    connector.save("billing-db", overwrite=True)
    state, report = tick()
    assert state.is_completed() and set(report.partitions) == {PARTNER_A}


@pytest.mark.parametrize(
    "value, expected_warning",
    [
        ("not json at all", "not valid JSON"),
        ([1, 2, 3], "must be a JSON object"),
        (42, "must be a JSON object"),
        ({"dealer_last_modified": "yesterday"}, "dealer_last_modified must be an object"),
    ],
)
def test_garbage_cursor_warns_and_rebuilds_everything(materialized, value, expected_warning, caplog):
    save_cursor_value(value)
    state, report = tick()
    assert state.is_completed(), state.message
    assert any(expected_warning in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert report.plan.first_run and set(report.partitions) == {PARTNER_A, PARTNER_B, PARTNER_C}
    assert isinstance(read_cursor_value(), dict)


def test_one_bad_dealer_entry_is_treated_as_absent_and_others_kept(materialized, caplog):
    value = read_cursor_value()
    value["dealer_last_modified"]["3"] = "not-a-timestamp"
    value["dealer_last_modified"]["abc"] = "2026-01-01T00:00:00.000000Z"
    save_cursor_value(value)
    state, report = tick()
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("'not-a-timestamp'" in m for m in messages) and any("'abc'" in m for m in messages)
    assert set(report.partitions) == {PARTNER_B}  # only dealer 3's entry was unreadable
    assert read_cursor_value()["dealer_last_modified"]["3"] == "2026-10-01T10:00:00.123456Z"


def block_partition(lake_root, layer: str, table: str, partner: str):
    """Make a partition's directory a file, so that run cannot write (a disk-level fault)."""
    directory = lake_root / layer / table / f"partner={partner}"
    (directory / "data.parquet").unlink()
    directory.rmdir()
    directory.write_text("blocked")
    return directory


def test_silver_and_gold_failures_are_retried_next_tick_and_others_land(materialized, lake_root, caplog, monkeypatch):
    """A's silver fails a check (its aggregate loses a row), B's gold cannot publish (a file where a
    directory must be): both retried every tick, nothing of them replaced, C lands."""
    import usage_pipeline.materialize

    materialized.execute("UPDATE `usage` SET usage_modified = '2026-10-10 00:00:00' WHERE usage_FK_dealer_id IN (1, 3, 4)")
    aggregate = usage_pipeline.materialize.billing_usage_aggregated
    monkeypatch.setattr(usage_pipeline.materialize, "billing_usage_aggregated",
                        lambda rows, partner: aggregate(rows, partner).slice(int(partner == PARTNER_A)))
    gold_block = block_partition(lake_root, "gold", "active_services", PARTNER_B)
    before = file_ids(lake_root)

    state, report = tick()
    assert state.is_failed() and "1/3 ok" in state.message
    assert report.partitions[PARTNER_C].ok
    assert not report.partitions[PARTNER_A].silver.ok and report.partitions[PARTNER_A].gold is None
    assert "conservation.aggregated FAILED" in report.partitions[PARTNER_A].silver.message
    assert report.partitions[PARTNER_B].silver.ok and not report.partitions[PARTNER_B].gold.ok
    after = file_ids(lake_root)
    assert {f for f in rewritten(before, after) if "partner=" in f and PARTNER_C not in f} == set()  # not A's, B's
    value = read_cursor_value()
    assert value["dealer_last_modified"]["4"] == "2026-10-10T00:00:00.000000Z"
    assert value["dealer_last_modified"]["1"] == "2026-10-01T09:00:00.123456Z"
    assert value["dealer_last_modified"]["3"] == "2026-10-01T10:00:00.123456Z"

    state, report = tick()  # still broken: retried, counted
    assert set(report.partitions) == {PARTNER_A, PARTNER_B}
    state, report = tick()
    assert cursor().partitions[PARTNER_A].failures == 3
    assert any(
        PARTNER_A in r.getMessage() and "3 ticks in a row" in r.getMessage()
        for r in caplog.records if r.levelname == "ERROR"
    )

    monkeypatch.undo()
    gold_block.unlink()
    state, report = tick()
    assert state.is_completed(), state.message
    assert set(report.partitions) == {PARTNER_A, PARTNER_B}
    value = read_cursor_value()
    assert value["dealer_last_modified"]["1"] == value["dealer_last_modified"]["3"] == "2026-10-10T00:00:00.000000Z"
    assert cursor().partitions[PARTNER_A].failures == 0
    assert tick()[0].message == "no changes"


KILLED_WRITER = """
import sys, polars as pl
from pathlib import Path
from usage_pipeline.lake import write_parquet_atomic
frame = pl.DataFrame({"x": range(30_000_000)})
print("writing", flush=True)
write_parquet_atomic(frame, Path(sys.argv[1]))
"""


def test_writer_killed_mid_write_leaves_the_old_file_and_next_tick_repairs(materialized, lake_root):
    target = lake_root / "gold" / "usage_report" / f"partner={PARTNER_A}" / "data.parquet"
    before = pl.read_parquet(target)
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE)
    assert writer.stdout.readline().strip() == b"writing"
    deadline = time.monotonic() + 60
    while not list(target.parent.glob(".*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.05)
    writer.kill()
    writer.wait()

    assert list(target.parent.glob(".*.tmp")), "the writer was killed before it created its temp file"
    assert pl.read_parquet(target).equals(before)  # old file intact
    assert list(target.parent.glob("*.parquet")) == [target]  # temp files are hidden from readers
    assert pl.scan_parquet(f"{target.parent}/*.parquet").collect().equals(before)  # the leftover is never read

    value = read_cursor_value()
    del value["dealer_last_modified"]["1"]
    save_cursor_value(value)
    state, report = tick()
    assert state.is_completed() and set(report.partitions) == {PARTNER_A}
    assert read(lake_root, "gold", "usage_report", PARTNER_A).equals(before)


def test_the_next_bronze_run_removes_a_killed_full_refresh_s_stale_spill_directory(materialized, tmp_path,
                                                                                   monkeypatch, caplog):
    """What a SIGKILLed full refresh leaves on its host (tests/test_bronze.py kills one): removed by the
    next bronze run there, once untouched for an hour."""
    from flows.billing_usage_raw import billing_usage_raw
    from usage_pipeline import bronze

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    left = tmp_path / f"{bronze.SPILL_PREFIX}killed"
    left.mkdir()
    (left / "0.parquet").write_bytes(b"spilled rows")
    hour_ago = time.time() - bronze.STALE_TEMP_SECONDS - 60
    for path in (left / "0.parquet", left):
        os.utime(path, (hour_ago, hour_ago))
    assert billing_usage_raw(dealer_ids=[1], return_state=True).is_completed()
    assert not left.exists()
    assert any(r.getMessage().startswith("Removed 1 spill directory(ies)") for r in caplog.records)


def test_two_ticks_at_once_only_one_works(materialized, lake_root, monkeypatch):
    """The first tick holds the detection slot (its work waits inside it) until the second has tried."""
    import flows.usage_change_detection as detection

    materialized.execute("UPDATE `usage` SET usage_modified = '2026-10-11 00:00:00' WHERE usage_FK_dealer_id = 3")
    holding, second_done = threading.Event(), threading.Event()
    run_tick = detection.run_tick

    def run_tick_after_the_second(*args, **kwargs):  # only a slot holder gets here
        holding.set()
        assert second_done.wait(120), "the second tick never finished"
        return run_tick(*args, **kwargs)

    monkeypatch.setattr(detection, "run_tick", run_tick_after_the_second)
    results = []
    # Each thread gets a copy of this context, which holds the Prefect settings (API URL).
    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(lambda: results.append(tick()),))
        for _ in range(2)
    ]
    threads[0].start()
    assert holding.wait(120), "the first tick never took the detection slot"
    threads[1].start()
    threads[1].join()
    second_done.set()
    threads[0].join()
    names = sorted(state.name for state, _ in results)
    assert names == ["Completed", "Skipped"], names
    worked = [report for state, report in results if state.name == "Completed"]
    assert set(worked[0].partitions) == {PARTNER_B}
    skipped = [state for state, _ in results if state.name == "Skipped"]
    assert "another detection tick is running" in skipped[0].message


def slot_periods(flow_run_ids) -> list[tuple]:
    """(held, releasing) log times of each run's partner slot, from the runs' own logs."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    # Run logs reach the API in the background, possibly after the run is already final: wait for them.
    deadline = time.monotonic() + 60
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=list(flow_run_ids))))
        marks = [
            {log.message.split(" ")[0]: log.timestamp for log in logs if log.flow_run_id == run_id}
            for run_id in flow_run_ids
        ]
        if all({"Holding", "Releasing"} <= set(mine) for mine in marks) or time.monotonic() > deadline:
            break
        time.sleep(1)
    return sorted((mine["Holding"], mine["Releasing"]) for mine in marks)


def test_same_partner_triggered_twice_runs_serialize(materialized, lake_root):
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("partner-silver/partner-silver")
        runs = [
            client.create_flow_run_from_deployment(deployment.id, parameters={"partner_uuid": PARTNER_B})
            for _ in range(2)
        ]
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            runs = [client.read_flow_run(run.id) for run in runs]
            if all(run.state.is_final() for run in runs):
                break
            time.sleep(1)
    assert all(run.state.is_completed() for run in runs), [run.state for run in runs]
    (held1, released1), (held2, released2) = slot_periods([run.id for run in runs])
    assert released1 <= held2, "the two runs of one partner held its slot at the same time"
    assert read(lake_root, "silver", "billing_usage_aggregated", PARTNER_B).height > 0


def test_slots_a_dead_holder_left_free_themselves_leased_or_only_counted(materialized, caplog, monkeypatch):
    """A holder that died leaves its lease, which expires. A server killed between a slot's count and its
    lease leaves a count that no lease holds, which the next run wanting the slot frees once no run can
    hold it: a partner's (waited for) and the detection tick's (asked for without waiting, so the ticks
    are Skipped until then, not for ever). Only the counts without a lease are freed by hand."""
    from prefect import flow

    from orchestration import slots
    from orchestration.setup import DETECTION_LIMIT, ensure_limit

    monkeypatch.setenv("USAGE_SLOT_LEASE_SECONDS", "60")  # this process's ticks: Prefect's shortest lease
    expiring, counted = (partner_limit(f"{c * 8}-0000-4000-8000-{c * 12}") for c in "fc")
    for name in (expiring, counted):
        ensure_limit(name, 1)
    with get_client(sync_client=True) as client:
        client.increment_concurrency_slots_with_lease([expiring], 1, "concurrency", 60)  # never renewed
        client.increment_concurrency_slots([counted, DETECTION_LIMIT], 1, "concurrency")  # counts, no lease

    @flow
    def hold_slot(name: str) -> str:
        with slots.leased_slots([name], 60):
            return name

    with ThreadPoolExecutor(max_workers=2) as pool:  # each with this test's settings (its Prefect server)
        holders = [pool.submit(contextvars.copy_context().run, hold_slot, name, return_state=True)
                   for name in (expiring, counted)]
        for _ in range(20):  # the last tick that held the slot may hold a lease for 60 s (+45) after it ended
            state, report = tick()
            if state.name != "Skipped":
                break
            time.sleep(10)
        states = [future.result() for future in holders]
    assert state.name == "Completed" and report.skipped is None, state.message
    assert [state.result() for state in states] == [expiring, counted]
    freed = sorted(r.getMessage().split(": counted")[0] for r in caplog.records if r.getMessage().startswith("Freed"))
    assert freed == [f"Freed 1 slot(s) of {counted}", f"Freed 1 slot(s) of {DETECTION_LIMIT}"], freed
    with get_client(sync_client=True) as client:
        assert [client.read_global_concurrency_limit_by_name(n).active_slots for n in (expiring, counted)] == [0, 0]


def test_a_slot_of_a_deleted_limit_fails_the_run_naming_it(pipeline):
    """The server leases only the limits it has: a partition run must not go on without its partner's."""
    from prefect import flow

    from orchestration.setup import ensure_limit
    from orchestration.slots import partner_slot

    partner, held = "dddddddd-0000-4000-8000-00000000000d", []

    @flow
    def hold_slot() -> None:
        with partner_slot(partner, load_settings()):
            held.append(partner)

    ensure_limit(partner_limit(partner), 1)  # known to this process from now on
    with get_client(sync_client=True) as client:
        client.delete_global_concurrency_limit_by_name(partner_limit(partner))
    state = hold_slot(return_state=True)
    assert state.is_failed() and not held
    assert f"['{partner_limit(partner)}'] missing" in state.message, state.message


def test_a_slot_lease_the_server_no_longer_has_fails_the_run(pipeline, monkeypatch):
    """Renewed while held; once the server forgets the lease (410 Gone), the run is told at once in its log
    and fails when its work ends (another run may have held the slot meanwhile)."""
    import logging

    from prefect import flow

    from orchestration import runtime, slots
    from orchestration.setup import ensure_limit

    class QuickRenewal(slots.LeaseRenewal):
        def __init__(self, client, lease_id, logger, lease_seconds):
            super().__init__(client, lease_id, logger, lease_seconds, period=0.2)

    monkeypatch.setattr(slots, "LeaseRenewal", QuickRenewal)
    name, seen = partner_limit("eeeeeeee-0000-4000-8000-00000000000e"), {}
    ensure_limit(name, 1)

    @flow
    def hold_slot() -> None:
        with slots.leased_slots([name], 60) as renewal, get_client(sync_client=True) as client:
            time.sleep(1)
            seen["renewed"] = renewal.is_alive() and renewal.lost is None
            client.release_concurrency_slots_with_lease(renewal.lease_id)  # as an expiry would
            renewal.join(10)
            seen["lost"] = renewal.lost

    state = hold_slot(return_state=True)
    assert seen["renewed"] and seen["lost"].response.status_code == 410  # Gone: expired or revoked
    assert state.is_failed() and "lost the lease" in state.message, state.message
    assert isinstance(runtime.run_or_module_logger(), logging.Logger)  # outside a run: still a logger


@pytest.mark.parametrize("bad", ["../../etc", "x' OR '1'='1", "", "a" * 10_000, "AAAAAAAA-0000-4000-8000-00000000000G"])
def test_bad_partner_uuid_is_rejected_before_any_io(pipeline, lake_root, bad):
    before = sorted(lake_root.parent.rglob("*"))
    with pytest.raises(Exception) as refused:
        run_deployment("partner-silver/partner-silver", parameters={"partner_uuid": bad}, timeout=0)
    assert "partner_uuid" in str(refused.value) or "pattern" in str(refused.value)
    with pytest.raises(Exception):  # noqa: B017 (pydantic's or ours: refused either way)
        partner_silver(partner_uuid=bad)
    with pytest.raises(InvalidPartnerUUID):
        from usage_pipeline.partners import parse_partner_uuid

        parse_partner_uuid(bad)
    assert sorted(lake_root.parent.rglob("*")) == before


def test_bad_source_data_warns_and_outputs_stay_correct(fresh, lake_root, caplog):
    builder = SourceBuilder(*fresh)
    builder.dealer(1, PARTNER_A)
    builder.dealer(2, "not-a-uuid")
    builder.dealer(3, None)
    builder.service(600, 1, name=None)
    builder.usage(1, 600, 1, date(2026, 10, 1), "-12.5000", None)
    builder.usage(2, 600, 1, date(2026, 10, 1), "4.0000", datetime(2026, 10, 1))
    builder.usage(3, 600, 1, date(2026, 10, 1), "4.0000", datetime(2026, 10, 1))

    state, report = tick()

    assert state.is_completed(), state.message
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("malformed partner UUID 'not-a-uuid'" in w for w in warnings)
    assert any("map to no partner" in w and "2" in w and "3" in w for w in warnings)
    assert set(report.partitions) == {PARTNER_A}
    report_a = read(lake_root, "gold", "usage_report", PARTNER_A)
    assert report_a["dealer_id"].to_list() == [1] and str(report_a["amount"][0]) == "-12.5000"
    assert read(lake_root, "gold", "active_services", PARTNER_A)["service_name"].to_list() == [None]


def test_source_rows_beyond_the_contract_fail_bronze_once_and_name_the_column(materialized, lake_root):
    """A source whose money column was widened past DECIMAL(18,4): no retries, nothing written, a clear message."""
    materialized.execute("ALTER TABLE `usage` MODIFY usage_amount DECIMAL(24,4) NOT NULL")
    materialized.usage(1, 501, 1, date(2026, 10, 7), "1000000000000000.0000", datetime(2026, 10, 8))
    before, watermarks = file_ids(lake_root), read_cursor_value()["dealer_last_modified"]

    state, report = tick()

    assert state.is_failed() and "bronze failed" in state.message
    assert "1 amount value(s) beyond DECIMAL(18,4)" in report.bronze.message
    assert file_ids(lake_root) == before and read_cursor_value()["dealer_last_modified"] == watermarks
    with get_client(sync_client=True) as client:
        bronze_run = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(report.bronze.flow_run_id)]))
        attempts = [t.run_count for t in client.read_task_runs(flow_run_filter=bronze_run)]
    assert attempts == [1]  # the data, not the database: no retry

    materialized.execute("DELETE FROM `usage` WHERE usage_amount >= 100000000000000")
    materialized.execute("ALTER TABLE `usage` MODIFY usage_amount DECIMAL(18,4) NOT NULL")
    assert tick()[0].is_completed()


def test_no_password_in_logs_artifacts_or_parameters(materialized):
    with get_client(sync_client=True) as client:
        logs = client.read_logs()
        runs = client.read_flow_runs()
        artifacts = client.read_artifacts()
        blocks_yaml = open("prefect.yaml").read()
    haystack = "\n".join(
        [log.message for log in logs]
        + [str(run.parameters) + str(run.state.message if run.state else "") for run in runs]
        + [str(artifact.data) + str(artifact.description) for artifact in artifacts]
        + [blocks_yaml]
    )
    assert len(logs) > 10 and runs and artifacts
    assert PIPELINE_PASSWORD not in haystack


def test_a_failed_tick_run_ends_with_its_summary_not_an_engine_traceback(materialized, lake_root, prefect_server):
    """A served tick that fails: its state says the one-line summary, its log has no traceback of
    Prefect's engine (nor the report's repr), and its report is in its artifacts."""
    api = RestApi(prefect_server)
    materialized.execute("UPDATE `usage` SET usage_modified = '2026-10-10 00:00:00' WHERE usage_FK_dealer_id = 3")
    blocked = block_partition(lake_root, "gold", "active_services", PARTNER_B)
    deployment = api.get("/deployments/name/usage-change-detection/usage-change-detection")
    run = api.wait_final(api.post(f"/deployments/{deployment['id']}/create_flow_run", {})["id"], timeout=300)
    assert run["state_name"] == "Failed"
    assert run["state"]["message"] == "1 dealer(s) -> 1 partition(s), 0/1 ok", run["state"]["message"]

    def logs() -> list[dict]:
        return api.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200})

    deadline = time.monotonic() + 60
    while not any("Finished in state Failed" in log["message"] for log in logs()):
        assert time.monotonic() < deadline, [log["message"] for log in logs()]
        time.sleep(1)
    time.sleep(5)  # the engine's re-raise would be logged right after its last state
    messages = [log["message"] for log in logs()]
    assert not any("Engine execution exited" in m or "Traceback" in m or "TickReport(" in m for m in messages), messages
    artifacts = api.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    runs_table = next(a for a in artifacts if a["key"] == "usage-tick-runs")
    assert runs_table["description"] == run["state"]["message"]
    assert PARTNER_B in json.dumps(runs_table["data"])

    blocked.unlink()
    state, report = tick()
    assert state.is_completed() and set(report.partitions) == {PARTNER_B}, state.message


def test_a_subflow_that_fails_before_its_run_exists_is_retried(pipeline, monkeypatch):
    """The engine failing before the subflow's run exists (a busy server's 503) is tried again."""
    from prefect import flow

    from orchestration import runtime

    monkeypatch.setattr(runtime.time, "sleep", lambda seconds: None)  # the retry's back-off
    calls = []

    @flow(name="usage-it-child")
    def child() -> str:
        return "built"

    real_with_options = child.with_options

    def failing_before_the_run(**options):
        runnable = real_with_options(**options)

        def call(**parameters):
            calls.append(options["flow_run_name"])
            if len(calls) == 1:
                raise RuntimeError("503 Service Unavailable on POST /task_runs/")
            return runnable(**parameters)

        return call

    @flow(name="usage-it-parent")
    def parent() -> tuple:
        return runtime.run_subflow(child, {}, "child-retried", [])

    monkeypatch.setattr(child, "with_options", failing_before_the_run)
    retried = parent(return_state=True).result()
    # (a loaded SQLite-backed server may add a real 503 of its own: more tries, never fewer)
    assert calls[:2] == ["child-retried", "child-retried"] and retried.ok and retried.state == "Completed", retried
