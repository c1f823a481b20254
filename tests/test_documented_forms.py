"""Every documented form works: the README's commands, flags, parameters and variables, run as an operator runs them.

`prefect deployment run` with each `-p` form against the session's served deployments,
`usage-pipeline cursor reset` with repeated flags, `usage-pipeline setup` with bad and changed
configuration, and `usage-pipeline demo --exit` with and without `PREFECT_API_URL` and run again, all as
subprocesses of the real CLIs, checked by their exit codes, output and what they left in the
lake, the cursor block and the Prefect server. Also the bugs the audit behind these tests found
(a cursor reset on a block a tick tolerates, `explain` on a deployment without a schedule).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path

import httpx
import pytest
from prefect.client.orchestration import get_client

from orchestration import local_prefect
from orchestration.runtime import read_cursor_value
from tests.conftest import pipeline_environ
from tests.pipeline_helpers import (
    BRONZE_TABLE,
    RestApi,
    child_runs,
    cursor,
    file_ids,
    partition_files,
    read_bronze,
    rewritten,
    save_cursor_value,
    tick,
)
from tests.postgres import prefect_database
from tests.sourcedata import PARTNER_A, PARTNER_B, PARTNER_C
from tests.test_alerts import wait_events
from usage_pipeline.lake import STATE_FILE

pytestmark = pytest.mark.integration

DETECTION = "usage-change-detection/usage-change-detection"
SILVER = "partner-silver/partner-silver"
USAGE_PIPELINE = Path(sys.executable).with_name("usage-pipeline")  # the console script operators run
SILVER_FILES_A = {f"silver/{t}/partner={PARTNER_A}/data.parquet" for t in
                  ("billing_usage_aggregated", "billing_monthly_usage_by_service")}
SOURCE_PREFIXES = ("BILLING_CDRS_DB_", "V3_DB_")


def usage_pipeline(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(USAGE_PIPELINE), *args], env=env or dict(os.environ), capture_output=True, text=True,
                          timeout=120)


def deployment_run(api: RestApi, name: str, *params: str) -> dict:
    """`prefect deployment run NAME -p KEY=VALUE ...`, as the README writes it; the run, once final.

    Without `--watch` (it was seen to hang on cancelled runs): the run's id is read from the
    CLI's output and the run is polled through the REST API until it is final.
    """
    command = [sys.executable, "-m", "prefect", "deployment", "run", name, *(a for p in params for a in ("-p", p))]
    created = subprocess.run(command, env=dict(os.environ, COLUMNS="250"), capture_output=True, text=True,
                             timeout=120)
    assert created.returncode == 0, created.stdout + created.stderr
    match = re.search(r"UUID: ([0-9a-f-]{36})", created.stdout)
    assert match, created.stdout
    return api.wait_final(match.group(1), timeout=300)


def completed(run: dict) -> dict:
    assert run["state_type"] == "COMPLETED", (run["state_name"], run["state"]["message"])
    return run


# --- prefect deployment run: the detection deployment's -p forms ------------------------------------------


def test_deployment_run_detection_with_each_documented_parameter(materialized, lake_root, prefect_server):
    api = RestApi(prefect_server)
    materialized.usage(3, 501, 1, date(2026, 10, 9), "1.0000", datetime(2026, 10, 21))  # a change to find
    before, value = file_ids(lake_root), read_cursor_value()

    # -p dry_run=true: reports what the tick would do, changes nothing
    dry = completed(deployment_run(api, DETECTION, "dry_run=true"))
    assert dry["parameters"] == {"dry_run": True}  # JSON: a boolean, not the string "true"
    assert dry["state"]["message"] == "dry run: 1 dealer(s) -> 1 partition(s) would run (with bronze)"
    assert child_runs(dry["id"]) == []
    assert file_ids(lake_root) == before and read_cursor_value() == value

    # -p full_refresh=true: bronze and every partition rewritten, the pending change included
    full = completed(deployment_run(api, DETECTION, "full_refresh=true"))
    assert full["parameters"] == {"full_refresh": True}
    assert full["state"]["message"].endswith("-> 3 partition(s), 3/3 ok")
    assert rewritten(before, file_ids(lake_root)) == set(before)
    assert cursor().dealer_last_modified[3] == datetime(2026, 10, 21)

    # -p partners='["<uuid>"]': exactly that partner (and its dealers' bronze slice) rewritten
    before, entries = file_ids(lake_root), read_cursor_value()["dealer_last_modified"]
    one = completed(deployment_run(api, DETECTION, f'partners=["{PARTNER_A}"]'))
    assert one["parameters"] == {"partners": [PARTNER_A]}
    assert one["state"]["message"] == "0 dealer(s) -> 1 partition(s), 1/1 ok"
    assert rewritten(before, file_ids(lake_root)) == {BRONZE_TABLE} | partition_files(PARTNER_A)
    assert {run.name for run in child_runs(one["id"]) if run.name.startswith("silver-")} == {f"silver-{PARTNER_A}"}
    assert read_cursor_value()["dealer_last_modified"] == entries


# --- prefect deployment run usage-reconciliation ---------------------------------------------------------


def test_deployment_run_reconciliation_starts_its_cycle_and_a_tick_then_reads_it(materialized, lake_root, prefect_server):
    """README "The rolling reconciliation": `prefect deployment run usage-reconciliation/usage-reconciliation`."""
    api = RestApi(prefect_server)
    run = completed(deployment_run(api, "usage-reconciliation/usage-reconciliation"))
    # Its first run begins its cycle (dealers 1, 2, 3, 4 and 9 are known): no dealer is due yet.
    assert re.fullmatch(r"reconciled 0 of 5 dealers \(cycle 0 %\) in [\d.]+ s; no change", run["state"]["message"])
    assert (lake_root / "_pipeline" / "reconciliation_state.parquet").exists()
    shown = usage_pipeline("cursor", "show")
    assert shown.returncode == 0 and "reconciliation: cycle started " in shown.stdout, shown.stderr
    again = completed(deployment_run(api, "usage-reconciliation/usage-reconciliation"))
    assert again["state"]["message"].startswith("reconciled ") and again["state"]["message"].endswith("; no change")
    state, report = tick()
    assert state.is_completed() and report.reconciliation_overdue_seconds == 0 and report.suspects == frozenset()


# --- prefect deployment run partner-silver, with and without cascade ----------------------------------


def test_deployment_run_partner_silver_cascades_to_gold_unless_cascade_false(materialized, lake_root, prefect_server):
    """Each manual run is gated by the checks and emits the partition event with their results."""
    api = RestApi(prefect_server)
    since = datetime.now().astimezone()
    before = file_ids(lake_root)
    alone = completed(deployment_run(api, SILVER, f"partner_uuid={PARTNER_A}", "cascade=false"))
    assert alone["parameters"] == {"partner_uuid": PARTNER_A, "cascade": False}
    assert alone["name"] == f"silver-{PARTNER_A}" and {f"partner:{PARTNER_A}", "layer:silver"} <= set(alone["tags"])
    assert rewritten(before, file_ids(lake_root)) == SILVER_FILES_A  # gold untouched
    assert child_runs(alone["id"]) == []

    before = file_ids(lake_root)
    cascaded = completed(deployment_run(api, SILVER, f"partner_uuid={PARTNER_A}"))
    assert cascaded["parameters"] == {"partner_uuid": PARTNER_A}
    assert rewritten(before, file_ids(lake_root)) == partition_files(PARTNER_A)  # silver, then its gold
    (gold,) = child_runs(cascaded["id"])
    assert gold.name == f"gold-{PARTNER_A}" and gold.state.is_completed()
    alone_event, cascaded_event = sorted(wait_events("usage.partition.", since, 2), key=lambda e: e["occurred"])
    for event, run, checks in ((alone_event, alone, 6), (cascaded_event, cascaded, 12)):
        assert event["event"] == "usage.partition.materialized" and event["payload"]["manual_run"] == run["name"]
        assert event["resource"]["prefect.resource.id"] == f"usage.partition.{PARTNER_A}"
        assert len(event["payload"]["checks"]) == checks and all(c["passed"] for c in event["payload"]["checks"])
    assert not list((lake_root / "_staging").rglob("*.parquet"))


# --- usage-pipeline cursor reset with repeated flags ----------------------------------------------------


def test_cursor_reset_with_repeated_partner_and_dealer_flags(materialized, lake_root):
    reset = usage_pipeline("cursor", "reset", "--partner", PARTNER_A, "--partner", PARTNER_C)
    assert reset.returncode == 0, reset.stderr
    assert "Removed the cursor entries of dealer(s) [1, 2, 4]" in reset.stdout
    assert set(read_cursor_value()["dealer_last_modified"]) == {"3", "9"}
    before = file_ids(lake_root)
    state, report = tick()
    assert state.is_completed(), state.message
    assert set(report.partitions) == {PARTNER_A, PARTNER_C}
    assert rewritten(before, file_ids(lake_root)) == {BRONZE_TABLE} | partition_files(PARTNER_A) | partition_files(PARTNER_C)

    reset = usage_pipeline("cursor", "reset", "--dealer", "3", "--dealer", "4")
    assert reset.returncode == 0, reset.stderr
    assert "Removed the cursor entries of dealer(s) [3, 4]" in reset.stdout
    before = file_ids(lake_root)
    state, report = tick()
    assert state.is_completed(), state.message
    assert report.plan.dealer_changes == {3: "cursor entry removed", 4: "cursor entry removed"}
    assert set(report.partitions) == {PARTNER_B, PARTNER_C}
    assert rewritten(before, file_ids(lake_root)) == {BRONZE_TABLE} | partition_files(PARTNER_B) | partition_files(PARTNER_C)


def test_commands_without_prefect_api_url_exit_2_and_change_nothing(materialized):
    """Prefect would answer them from a throwaway server: a reset would say it worked and change nothing."""
    before = read_cursor_value()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    for command, arguments in (("cursor reset", ["--all"]), ("cursor show", []), ("setup", []), ("explain", ["3"])):
        result = usage_pipeline(*command.split(), *arguments, env=env)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert result.stderr.startswith(f"usage-pipeline {command}: no Prefect server to talk to: set PREFECT_API_URL"), \
            result.stderr
        assert "Cursor reset" not in result.stdout
    assert read_cursor_value() == before


def test_cursor_reset_reads_the_block_as_leniently_as_a_tick(materialized, lake_root):
    """Bug: the reset rebuilt the block with int(key) and dict(value), so a block a tick reads with a
    warning (a non-integer dealer key, an unparsable timestamp, the value stored as a JSON string)
    made it exit 2. Now it keeps an unreadable entry it was not asked about (the tick warns about it
    and drops it when it saves the cursor) and removes the named dealers' entries, readable or not."""
    value = read_cursor_value()
    odd = {**value["dealer_last_modified"], "x7": "2026-10-01T00:00:00.000000Z", "4": "not a timestamp"}
    save_cursor_value({**value, "dealer_last_modified": odd})

    reset = usage_pipeline("cursor", "reset", "--dealer", "3", "--partner", PARTNER_C)
    assert reset.returncode == 0, reset.stderr
    assert "dealer id 'x7' is not an integer" in reset.stdout  # the tick's own warning
    assert "Removed the cursor entries of dealer(s) [3, 4]" in reset.stdout
    assert set(read_cursor_value()["dealer_last_modified"]) == {"1", "2", "9", "x7"}
    state, report = tick()
    assert state.is_completed(), state.message
    assert set(report.partitions) == {PARTNER_B, PARTNER_C}
    assert set(read_cursor_value()["dealer_last_modified"]) == {"1", "2", "3", "4", "9"}  # the tick drops 'x7'

    value = read_cursor_value()
    save_cursor_value(json.dumps(value))  # an operator's script stored the JSON text itself
    assert read_cursor_value() == json.dumps(value)
    reset = usage_pipeline("cursor", "reset", "--dealer", "4")
    assert reset.returncode == 0, reset.stderr
    entries = {k: v for k, v in value["dealer_last_modified"].items() if k != "4"}
    assert read_cursor_value() == {**value, "dealer_last_modified": entries}  # stored as an object again


def test_explain_says_no_schedule_when_detection_is_served_without_one(fresh):
    """Bug: `explain` said PAUSED for a deployment that has no schedule at all (the session serves
    with --no-schedule); a paused one still says PAUSED (tests/test_operator.py)."""
    explained = usage_pipeline("explain", "1")
    assert explained.returncode == 0, explained.stderr
    assert "detection:         no schedule: ticks run only when started by hand" in explained.stdout
    assert "PAUSED" not in explained.stdout and "detection is paused" not in explained.stdout
    assert "why: detection has no schedule: start a tick with `prefect deployment run" in explained.stdout


# --- usage-pipeline setup: bad configuration, and a changed limit ---------------------------------------


def setup_environ(**variables: str) -> dict[str, str]:
    """The operator's environment: no source or USAGE_* variable but the lake root and the ones given."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(SOURCE_PREFIXES) and (not k.startswith("USAGE_") or k == "USAGE_LAKE_ROOT")}
    return {**env, **variables}


def block_document(api: RestApi, name: str) -> dict:
    return api.get(f"/block_types/slug/sqlalchemy-connector/block_documents/name/{name}")


def without(environ: dict[str, str], prefix: str) -> dict[str, str]:
    return {k: v for k, v in environ.items() if not k.startswith(prefix)}


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"BILLING_CDRS_DB_HOST": "127.0.0.1"},
         "billing-db: set BILLING_CDRS_DB_USER, BILLING_CDRS_DB_DATABASE"),
        ({**pipeline_environ(), "BILLING_CDRS_DB_PORT": "3306x"}, "BILLING_CDRS_DB_PORT must be a port number, got '3306x'"),
        (without(pipeline_environ(), "V3_DB_"), "v3-db: set V3_DB_HOST, V3_DB_USER, V3_DB_DATABASE"),
        ({**pipeline_environ(), "USAGE_MAX_CONCURRENT_PARTITIONS": "0"},
         "USAGE_MAX_CONCURRENT_PARTITIONS: Input should be greater than or equal to 1, got '0'"),
        ({**pipeline_environ(), "USAGE_CHECKS_WARN_ONLY": "grain.usage_report,grain.invoice"},
         "USAGE_CHECKS_WARN_ONLY: Value error, unknown check name(s) ['grain.invoice']"),
        ({**pipeline_environ(), "USAGE_ALERT_STALE_SECONDS": "59"},
         "USAGE_ALERT_STALE_SECONDS: Input should be greater than or equal to 60, got '59'"),
        ({**pipeline_environ(), "USAGE_ALERT_STALE_SECONDS": "abc"},
         "USAGE_ALERT_STALE_SECONDS: Input should be a valid integer, unable to parse string as an integer, got 'abc'"),
    ],
    ids=["host-without-user", "bad-port", "v3-missing", "zero-partitions", "unknown-check", "stale-below-60",
         "stale-not-a-number"],
)
def test_setup_with_bad_configuration_exits_2_naming_the_variable(pipeline, prefect_server, variables, message):
    api = RestApi(prefect_server)
    blocks = {name: block_document(api, name) for name in ("billing-db", "v3-db")}
    limit = api.get("/v2/concurrency_limits/usage-partitions")

    result = usage_pipeline("setup", env=setup_environ(**variables))

    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("usage-pipeline setup: ") and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert {name: block_document(api, name) for name in blocks} == blocks  # nothing was saved
    assert api.get("/v2/concurrency_limits/usage-partitions") == limit


def test_setup_again_applies_a_changed_max_concurrent_partitions_to_the_server(pipeline, prefect_server):
    """The variable sizes a tick's own pool wherever it runs; the server's limit changes only through setup."""
    api = RestApi(prefect_server)
    original = api.get("/v2/concurrency_limits/usage-partitions")["limit"]
    changed = 3 if original != 3 else 4
    try:
        result = usage_pipeline("setup", env=setup_environ(**pipeline_environ(),
                                                           USAGE_MAX_CONCURRENT_PARTITIONS=str(changed)))
        assert result.returncode == 0, result.stderr
        assert f"concurrency limits: usage-partitions={changed}, usage-change-detection=1" in result.stdout
        assert api.get("/v2/concurrency_limits/usage-partitions")["limit"] == changed
    finally:  # the session's value back, for the tests that follow (the client retries a busy server's 503)
        with get_client(sync_client=True) as client:
            client.upsert_global_concurrency_limit_by_name("usage-partitions", original)
    assert api.get("/v2/concurrency_limits/usage-partitions")["limit"] == original


# --- usage-pipeline demo --exit -----------------------------------------------------------------------------

TICK_LINE = re.compile(r"^== (First|Second|Third) tick \([^)]*\): (\w+) in [\d.]+s: (.*)$", re.MULTILINE)


def demo_environ(**variables: str) -> dict[str, str]:
    """An operator's shell in a fresh checkout: no PREFECT_API_URL, no source or USAGE_* variable."""
    env = {k: v for k, v in os.environ.items()
           if k != "PREFECT_API_URL" and not k.startswith((*SOURCE_PREFIXES, "USAGE_"))}
    return {**env, **variables}


def assert_demo_ran(result: subprocess.CompletedProcess, workdir: Path) -> set[str]:
    """Exit 0, the three ticks' summaries, and the lake under ./lake; returns the partners built."""
    assert result.returncode == 0, (result.stdout[-4000:], result.stderr[-4000:])
    ticks = {name: (state, message) for name, state, message in TICK_LINE.findall(result.stdout)}
    assert set(ticks) == {"First", "Second", "Third"}, result.stdout
    first, second, third = ticks["First"], ticks["Second"], ticks["Third"]
    partners = set(re.findall(r"^   partner ([0-9a-f-]{36}): silver Completed, gold Completed$", result.stdout,
                              re.MULTILINE))
    assert first[0] == "Completed" and re.fullmatch(rf"\d+ dealer\(s\) -> {len(partners)} partition\(s\), "
                                                   rf"{len(partners)}/{len(partners)} ok", first[1]), first
    assert len(partners) >= 2
    assert second == ("Completed", "1 dealer(s) -> 1 partition(s), 1/1 ok")
    assert third == ("Completed", "no changes")
    lake = workdir / "lake"
    assert f"Lake under {lake}:" in result.stdout
    expected = {STATE_FILE} | {f for p in partners for f in partition_files(p)}
    assert {str(p.relative_to(lake)) for p in lake.rglob("*.parquet") if p.relative_to(lake).parts[0] != "bronze"} == expected
    assert all(f"   {path}" in result.stdout.splitlines() for path in expected)
    assert re.search(rf"^   {BRONZE_TABLE}/ \(Delta table: version \d+, \d+ file\(s\), \d+ row\(s\)", result.stdout, re.M)
    assert len(read_bronze(lake)) > 0
    assert {p.name for p in (workdir / "demo-source").iterdir()} >= {"billing.sqlite", "v3.sqlite"}
    return partners


@pytest.fixture(scope="module")
def demos(tmp_path_factory, pipeline, prefect_server) -> Iterator[tuple[dict, str]]:
    """`usage-pipeline demo --exit` in two fresh directories at once: one without PREFECT_API_URL (it
    starts its own server, on SQLite), one with PREFECT_API_URL pointing at a second server of the
    test's own (on PostgreSQL);
    per form, its directory and its completed process, and that second server's API.

    Not the session's server: the demo's serve would compete with the session's serve for the same
    deployments' runs, and its setup would repoint the session's connector blocks at its SQLite
    source. Each demo has a server of its own, so running both at once changes neither.
    """
    root = tmp_path_factory.mktemp("demo")
    with prefect_database(f"prefect_demo_{os.getpid()}") as database:
        server, url = local_prefect.start_server(root / "prefect-home", root / "server.log", settings=database)
        forms = {"own server": demo_environ(), "PREFECT_API_URL": demo_environ(PREFECT_API_URL=url)}
        running = {}
        try:
            for form, env in forms.items():
                workdir = root / form.replace(" ", "-")
                workdir.mkdir()
                with open(workdir.with_suffix(".out"), "w") as out, open(workdir.with_suffix(".err"), "w") as err:
                    running[form] = workdir, subprocess.Popen([str(USAGE_PIPELINE), "demo", "--exit"], cwd=workdir,
                                                              env=env, stdout=out, stderr=err, start_new_session=True)
            finished = {}
            for form, (workdir, process) in running.items():
                returncode = process.wait(timeout=600)
                finished[form] = workdir, subprocess.CompletedProcess(
                    process.args, returncode, workdir.with_suffix(".out").read_text(), workdir.with_suffix(".err").read_text())
            yield finished, url
        finally:
            for _, process in running.values():
                stop_demo_if_running(process)
            local_prefect.stop(server)


def stop_demo_if_running(process: subprocess.Popen) -> None:
    """A demo that timed out: it, and the server and serve it started (its own process group)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_demo_exit_starts_its_own_server_runs_three_ticks_and_stops_it(demos):
    runs, _ = demos
    workdir, result = runs["own server"]
    assert_demo_ran(result, workdir)
    started = re.search(r"^Started a local Prefect server at (http://127\.0\.0\.1:\d+) ", result.stdout, re.MULTILINE)
    assert started, result.stdout
    assert (workdir / ".usage-pipeline" / "prefect-home").is_dir()
    with pytest.raises(httpx.ConnectError):  # stopped with the demo
        httpx.get(f"{started.group(1)}/api/health", timeout=5)


def demo_exit(workdir: Path) -> subprocess.CompletedProcess:
    process = subprocess.Popen([str(USAGE_PIPELINE), "demo", "--exit"], cwd=workdir, env=demo_environ(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=600)
    finally:
        stop_demo_if_running(process)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_demo_exit_again_in_the_same_directory_says_so_and_rebuilds_only_what_changed(demos):
    """The README's re-run: the demo rebuilds its source but keeps the first run's server state and lake,
    so its first tick starts from that cursor (it says so) and finds only the dealer the first run touched.
    Then the README's way to start over: `rm -r .usage-pipeline lake`, and the demo runs as new."""
    runs, _ = demos
    workdir, _ = runs["own server"]
    again = demo_exit(workdir)
    assert again.returncode == 0, (again.stdout[-4000:], again.stderr[-4000:])
    ticks = {name: (state, message) for name, state, message in TICK_LINE.findall(again.stdout)}
    assert "\n== First tick (an earlier demo's cursor: only the dealers changed since): Completed" in again.stdout
    assert ticks == {"First": ("Completed", "1 dealer(s) -> 1 partition(s), 1/1 ok"),
                     "Second": ("Completed", "1 dealer(s) -> 1 partition(s), 1/1 ok"),
                     "Third": ("Completed", "no changes")}, again.stdout
    assert "(no cursor: bronze and every partition)" not in again.stdout

    for kept in (".usage-pipeline", "lake"):
        shutil.rmtree(workdir / kept)
    over = demo_exit(workdir)
    assert "\n== First tick (no cursor: bronze and every partition): Completed" in over.stdout, over.stdout
    assert_demo_ran(over, workdir)


def test_demo_exit_with_prefect_api_url_uses_that_server(demos, prefect_server):
    runs, url = demos
    workdir, result = runs["PREFECT_API_URL"]
    assert_demo_ran(result, workdir)
    assert "Started a local Prefect server" not in result.stdout
    assert not (workdir / ".usage-pipeline" / "prefect-home").exists()

    api = RestApi(url)
    ticks = api.post("/flow_runs/filter", {"flows": {"name": {"any_": ["usage-change-detection"]}}})
    assert sorted(run["state_type"] for run in ticks) == ["COMPLETED"] * 3
    for name in local_prefect.DEPLOYMENT_NAMES:
        assert api.get(f"/deployments/name/{name}")["name"] == name.split("/")[1]
    billing = block_document(api, "billing-db")["data"]["connection_info"]
    assert billing["database"] == str((workdir / "demo-source" / "billing.sqlite").resolve())
    session = block_document(RestApi(prefect_server), "billing-db")["data"]["connection_info"]
    assert session["database"] == pipeline_environ()["BILLING_CDRS_DB_DATABASE"]  # the session's blocks untouched
