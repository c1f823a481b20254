"""Issue 5 end to end: the production path of the README's "Deploying with workers", via the CLI.

A `prefect server` on a fresh PostgreSQL database, `usage-pipeline setup`,
`prefect work-pool create`, `prefect deploy --all` from the repository root and
two `prefect worker start` processes, all as subprocesses with their own
environment. Ticks are started with `prefect deployment run`, the cursor is
reset the way the UI does it, and what the runs did is read back from the REST
API, the workers' logs and the lake. Nothing here uses the session's
server or `usage-pipeline serve` (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import polars as pl
import pytest

from orchestration.local_prefect import SERVER_SETTINGS, free_port
from tests.conftest import PIPELINE_PASSWORD, pipeline_environ, recreate_source_tables
from tests.pipeline_helpers import BRONZE_TABLE, RestApi, file_ids, partition_files, rewritten
from tests.postgres import prefect_database
from tests.sourcedata import PARTNER_A, PARTNER_B, PARTNER_C, SourceBuilder, usage_report_truth

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "usage-pipeline"
DETECTION = "usage-change-detection/usage-change-detection"
WORKERS = ("e2e-worker-1", "e2e-worker-2")
ALL_PARTNERS = (PARTNER_A, PARTNER_B, PARTNER_C)
RUN_TIMEOUT = 180  # seconds for one tick on a loaded 2-core machine
# Variables this test sets itself: never inherit them from the pytest process (conftest sets some).
OWN_PREFIXES = ("PREFECT_", "USAGE_", "BILLING_CDRS_DB_", "V3_DB_")


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(OWN_PREFIXES)}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        COLUMNS="200",  # keep the CLI's rich output on one line per item
        PYTHONUNBUFFERED="1",
    )
    return env


@dataclass
class Stack(RestApi):
    """The running server and workers, their logs, and what the test measured."""

    api: str
    home: Path
    logs: Path
    lake: Path
    cli_env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def start(self, name: str, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        """A background process in its own session, so that stopping it also stops its children."""
        with open(self.logs / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                args, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.processes[name] = process
        return process

    def stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(process.pid, sig)  # the group this test created for this process
            except ProcessLookupError:
                return
            try:
                process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def cli(self, name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 180) -> str:
        """One CLI command from the repository root; its output is kept in the logs and returned."""
        result = subprocess.run(
            list(args), env=env or self.cli_env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )
        output = result.stdout + result.stderr
        (self.logs / f"cli-{name}.log").write_text(output)
        assert result.returncode == 0, f"{' '.join(args)} failed ({result.returncode}):\n{output}"
        return output

    # REST API (RestApi) ----------------------------------------------------------------------------

    def children(self, run_id: str) -> list[dict]:
        return self.flow_runs(parent_flow_run_id={"any_": [run_id]})

    def assert_alive(self) -> None:
        for name, process in self.processes.items():
            assert process.poll() is None, f"{name} exited with {process.returncode}; see {self.logs}"

    def wait_final(self, run_id: str, timeout: float = RUN_TIMEOUT, check=None) -> dict:
        return super().wait_final(run_id, timeout, check or self.assert_alive)

    def deployment_run(self, name: str, *params: str, env: dict[str, str] | None = None) -> tuple[str, dict, float]:
        """`prefect deployment run` (with extra run environment, if any) and wait: run id, final run, wall time."""
        started = time.perf_counter()
        args = [str(BIN / "prefect"), "deployment", "run", name]
        for param in params:
            args += ["-p", param]
        if env:
            args += ["--job-variable", f"env={json.dumps(env)}"]
        output = self.cli(f"run-{len(list(self.logs.glob('cli-run-*')))}", *args)
        match = re.search(r"UUID: ([0-9a-f-]{36})", output)
        assert match, output
        run = self.wait_final(match.group(1))
        return match.group(1), run, time.perf_counter() - started

    def tick(self, env: dict[str, str] | None = None) -> tuple[dict, list[dict], float]:
        run_id, run, wall = self.deployment_run(DETECTION, env=env)
        assert run["state_type"] == "COMPLETED", (run["state_name"], run["state"]["message"])
        return run, self.children(run_id), wall


def _times(run: dict) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(run["start_time"]), datetime.fromisoformat(run["end_time"])


def _partner_of(run: dict) -> str | None:
    tags = sorted({t.removeprefix("partner:") for t in run["tags"] if t.startswith("partner:")})
    assert len(tags) <= 1, run["tags"]
    return tags[0] if tags else None


def _layer_of(run: dict) -> str | None:
    layers = sorted({t.removeprefix("layer:") for t in run["tags"] if t.startswith("layer:")})
    assert len(layers) <= 1, run["tags"]
    return layers[0] if layers else None


def _partition_runs(children: list[dict]) -> dict[tuple[str, str], dict]:
    """Silver and gold children of a tick by (partner, layer); fails on duplicates."""
    runs: dict[tuple[str, str], dict] = {}
    for run in children:
        layer = _layer_of(run)
        if layer in ("silver", "gold"):
            key = (_partner_of(run), layer)
            assert key not in runs, f"two {key} runs in one tick"
            runs[key] = run
    return runs


def _assert_gold_matches_truth(lake: Path, billing, partners) -> None:
    for partner in partners:
        report = pl.read_parquet(lake / "gold" / "usage_report" / f"partner={partner}" / "data.parquet")
        got = [
            (r["month"], r["dealer_id"], r["quantity"], r["amount"], r["services"], r["customers"])
            for r in report.iter_rows(named=True)
        ]
        assert got == usage_report_truth(billing, partner), partner


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with prefect_database(f"prefect_e2e_{os.getpid()}") as settings:
        yield settings["PREFECT_API_DATABASE_CONNECTION_URL"]


@pytest.fixture(scope="module")
def stack(postgres_url, tmp_path_factory):
    """`prefect server start` on PostgreSQL; everything else the test starts is stopped here too."""
    home = tmp_path_factory.mktemp("deployed")
    logs, lake = home / "logs", home / "lake"
    for path in (logs, lake, home / "server-home", home / "cli-home"):
        path.mkdir()
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    cli_env = dict(_base_env(), PREFECT_HOME=str(home / "cli-home"), PREFECT_API_URL=api)
    stack = Stack(api=api, home=home, logs=logs, lake=lake, cli_env=cli_env)
    server_env = dict(
        _base_env(),
        PREFECT_HOME=str(home / "server-home"),
        PREFECT_API_DATABASE_CONNECTION_URL=postgres_url,
        **SERVER_SETTINGS,
        # The 300 s schedule must not fire in the middle of the test: ticks are started by hand.
        PREFECT_API_SERVICES_SCHEDULER_ENABLED="false",
    )
    try:
        started = time.perf_counter()
        server = stack.start(
            "server",
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            server_env, home,
        )
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"prefect server exited: {(logs / 'server.log').read_text()[-3000:]}"
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prefect server not healthy after 120s"
            time.sleep(0.5)
        stack.timings["server start (PostgreSQL, migrations)"] = time.perf_counter() - started
        yield stack
    finally:
        for name in reversed(list(stack.processes)):
            stack.stop(name)


@pytest.fixture(scope="module")
def source(source_engines) -> SourceBuilder:
    """The standard source (partners A, B, C) in fresh MariaDB tables; `fresh` needs the serve fixture."""
    billing, v3 = source_engines
    recreate_source_tables(billing, v3)
    builder = SourceBuilder(billing, v3)
    builder.standard()
    return builder


def _touch(source: SourceBuilder, dealer: int, when: datetime, amount: str) -> None:
    """Change one dealer's relevant usage the way the billing system would (amount and modified)."""
    changed = source.execute(
        "UPDATE `usage` SET usage_amount = %s, usage_modified = %s"
        " WHERE usage_FK_dealer_id = %s AND usage_FK_customer_id = 501 AND usage_FK_service_id = 1",
        amount, when, dealer,
    )
    assert changed == 1


def _one_dealer_per_partner_tick(
    stack: Stack, source: SourceBuilder, billing, day: int, env: dict[str, str] | None = None
) -> tuple[dict, list[dict], float]:
    """Change dealer 1 (partner A) and 3 (B), tick: exactly A's and B's runs and files, correct gold."""
    _touch(source, 1, datetime(2026, 10, day, 8, 30, 0, 654321), f"{10 + day}.2500")
    _touch(source, 3, datetime(2026, 10, day, 9, 30, 0, 111111), f"{2 + day}.7500")
    before = file_ids(stack.lake)
    runs_before = {r["id"] for r in stack.flow_runs()}
    run, children, wall = stack.tick(env)
    new_runs = [r for r in stack.flow_runs() if r["id"] not in runs_before]
    assert {r["id"] for r in new_runs} == {run["id"]} | {c["id"] for c in children}, "runs outside the tick"
    partition_runs = _partition_runs(children)
    assert set(partition_runs) == {(p, layer) for p in (PARTNER_A, PARTNER_B) for layer in ("silver", "gold")}
    assert [_layer_of(c) for c in children].count("bronze") == 1 and len(children) == 5, children
    for (partner, layer), child in partition_runs.items():
        assert child["state_type"] == "COMPLETED", (partner, layer, child["state_name"])
        assert {f"partner:{partner}", f"layer:{layer}"} <= set(child["tags"]), child["tags"]
    expected_files = {BRONZE_TABLE} | partition_files(PARTNER_A) | partition_files(PARTNER_B)
    assert rewritten(before, file_ids(stack.lake)) == expected_files
    _assert_gold_matches_truth(stack.lake, billing, ALL_PARTNERS)
    return run, children, wall


def test_deployed_with_workers_end_to_end(stack: Stack, source: SourceBuilder, source_engines):
    billing, _ = source_engines
    prefect = str(BIN / "prefect")
    test_started = time.perf_counter()

    # 2. The README's commands: setup, work pool, deploy --all from the repo root, two workers.
    started = time.perf_counter()
    setup_out = stack.cli("setup", str(BIN / "usage-pipeline"), "setup", env=dict(stack.cli_env, **pipeline_environ()))
    assert "block billing-db: mysql" in setup_out and "index (usage_FK_dealer_id, usage_modified): present" in setup_out
    assert "usage-crashed-runs created" in setup_out
    # The CLI's environment keeps Prefect's 180 s heartbeat: setup says what the workers need instead.
    assert "WARNING: PREFECT_FLOWS_HEARTBEAT_FREQUENCY is 180 here" in setup_out, setup_out
    stack.cli("work-pool", prefect, "work-pool", "create", POOL, "--type", "process")
    prefect_yaml = (REPO / "prefect.yaml").read_bytes()
    deploy_out = stack.cli("deploy", prefect, "--no-prompt", "deploy", "--all")
    assert (REPO / "prefect.yaml").read_bytes() == prefect_yaml, "prefect deploy rewrote prefect.yaml"
    stack.timings["setup + work-pool + deploy"] = time.perf_counter() - started

    detection = stack.get(f"/deployments/name/{DETECTION}")
    assert [s["schedule"].get("interval") for s in detection["schedules"]] == [300.0], detection["schedules"]
    assert detection["global_concurrency_limit"]["limit"] == 1, detection
    assert detection["concurrency_options"]["collision_strategy"] == "CANCEL_NEW", detection
    assert detection["concurrency_options"]["grace_period_seconds"] == 60, detection
    for name in ("billing-usage-raw", "partner-silver", "partner-gold", "usage-change-detection"):
        deployment = stack.get(f"/deployments/name/{name}/{name}")
        assert deployment["work_pool_name"] == POOL, deployment
        assert deployment["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
        ], (deploy_out, deployment["pull_steps"])

    for name in WORKERS:
        worker_home = stack.home / f"{name}-home"
        worker_home.mkdir()
        env = dict(
            _base_env(),
            PREFECT_HOME=str(worker_home),
            PREFECT_API_URL=stack.api,
            PREFECT_WORKER_QUERY_SECONDS="2",
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY="30",  # README "Deploying with workers"
            USAGE_LAKE_ROOT=str(stack.lake),
        )
        # Not started from the repository root: the deployments' pull step must get the runs there.
        stack.start(name, [prefect, "worker", "start", "--pool", POOL, "--name", name], env, worker_home)
    deadline = time.monotonic() + 90
    while {w["name"] for w in stack.post(f"/work_pools/{POOL}/workers/filter", {})} != set(WORKERS):
        for name in WORKERS:
            assert stack.processes[name].poll() is None, (stack.logs / f"{name}.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "workers did not register"
        time.sleep(1)

    # 3. First tick: no cursor, bronze and every partition.
    run1, children1, wall1 = stack.tick()
    stack.timings["tick 1 (first run: bronze + 3 partitions)"] = wall1
    assert {f"partner={p}" for p in ALL_PARTNERS} <= {p.parent.name for p in stack.lake.rglob("data.parquet")}
    files = file_ids(stack.lake)
    assert set(files) == {BRONZE_TABLE} | set().union(*(partition_files(p) for p in ALL_PARTNERS)), sorted(files)
    assert set(_partition_runs(children1)) == {(p, layer) for p in ALL_PARTNERS for layer in ("silver", "gold")}
    _assert_gold_matches_truth(stack.lake, billing, ALL_PARTNERS)

    # 4. One dealer of A (1) and one of B (3) change: exactly their silver and gold runs, as subflows
    #    in the tick's own process (the default), then once more as worker runs (USAGE_PARTITION_RUNS).
    run2, children2, wall2 = _one_dealer_per_partner_tick(stack, source, billing, day=2)
    stack.timings["tick 2 (subflows, 2 workers, one dealer of A and of B)"] = wall2
    for run in _partition_runs(children2).values():
        assert run["deployment_id"] is None and run["work_pool_name"] is None, run
    artifacts = stack.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run2["id"]]}}})
    artifact_text = {a["key"]: {"description": a["description"], "data": a["data"]} for a in artifacts}
    assert set(artifact_text) == {"usage-tick-runs", "usage-tick-checks", "usage-partition-freshness"}, artifact_text
    assert "Checks: 26 passed, 0 failed" == artifact_text["usage-tick-checks"]["description"]
    print("ARTIFACTS of tick 2:", json.dumps(artifact_text, indent=1, default=str))
    tick2_children = {c["name"]: c for c in children2}

    fan_out = {"USAGE_PARTITION_RUNS": "deployment"}
    run2b, children2b, wall2b = _one_dealer_per_partner_tick(stack, source, billing, day=3, env=fan_out)
    stack.timings["tick 2b (worker runs, 2 workers, one dealer of A and of B)"] = wall2b
    for run in _partition_runs(children2b).values():
        assert run["work_queue_name"] == "default" and run["work_pool_name"] == POOL, run

    # 5. Reset the cursor as the UI's block edit form does (PATCH, merge_existing_data false).
    document = stack.get("/block_types/slug/usage-cursor/block_documents/name/usage-change-detection")
    assert document["data"]["value"]["dealer_last_modified"], document["data"]
    response = httpx.patch(
        f"{stack.api}/block_documents/{document['id']}",
        json={"data": {"value": {}}, "merge_existing_data": False},
        timeout=30,
    )
    assert response.status_code == 204, response.text
    assert stack.get(f"/block_documents/{document['id']}")["data"] == {"value": {}}
    before = file_ids(stack.lake)
    run3, children3, wall3 = stack.tick()
    stack.timings["tick 3 (cursor reset: bronze + 3 partitions)"] = wall3
    assert set(_partition_runs(children3)) == {(p, layer) for p in ALL_PARTNERS for layer in ("silver", "gold")}
    assert all(c["state_type"] == "COMPLETED" for c in children3), [(c["name"], c["state_name"]) for c in children3]
    assert rewritten(before, file_ids(stack.lake)) == set(before)
    assert stack.get(f"/block_documents/{document['id']}")["data"]["value"]["dealer_last_modified"]

    # 6. One partner's silver by hand from the CLI: A's silver, then its gold (cascade), tagged by the flows.
    before = file_ids(stack.lake)
    silver_id, silver_run, wall = stack.deployment_run("partner-silver/partner-silver", f"partner_uuid={PARTNER_A}")
    stack.timings["manual partner-silver run (gold cascades)"] = wall
    assert silver_run["state_type"] == "COMPLETED", silver_run["state"]["message"]
    assert {f"partner:{PARTNER_A}", "layer:silver"} <= set(silver_run["tags"]), silver_run["tags"]
    assert rewritten(before, file_ids(stack.lake)) == partition_files(PARTNER_A)
    (gold,) = stack.children(silver_id)
    assert gold["name"] == f"gold-{PARTNER_A}" and gold["state_type"] == "COMPLETED", gold
    assert {f"partner:{PARTNER_A}", "layer:gold"} <= set(gold["tags"]), gold["tags"]

    # 7. One worker: the same ticks again (the fan-out tick takes about a minute more, so it is opt-in).
    stack.stop(WORKERS[1])
    measured = [("subflows, 2 workers", wall2, children2), ("worker runs, 2 workers", wall2b, children2b)]
    run4, children4, wall4 = _one_dealer_per_partner_tick(stack, source, billing, day=4)
    stack.timings["tick 4 (subflows, 1 worker)"] = wall4
    measured.append(("subflows, 1 worker", wall4, children4))
    if os.environ.get("USAGE_E2E_ONE_WORKER_TICK") == "1":
        run5, children5, wall5 = _one_dealer_per_partner_tick(stack, source, billing, day=5, env=fan_out)
        stack.timings["tick 5 (worker runs, 1 worker)"] = wall5
        measured.append(("worker runs, 1 worker", wall5, children5))

    # Across the whole test: every deployment run was taken by exactly one worker, both workers took
    # work, and every subflow ran in the process of the worker that took its parent run. Both workers
    # may try to submit the same run; the server lets one move it to Pending and sends the other an
    # abort ("Aborted submission of flow run '<id>'"), so that one did not take it.
    all_runs = stack.flow_runs()
    worker_logs = {name: (stack.logs / f"{name}.log").read_text(errors="replace") for name in WORKERS}
    taken_by: dict[str, list[str]] = {name: [] for name in WORKERS}
    taker_of: dict[str, str] = {}
    aborted = 0
    for run in all_runs:
        if run["deployment_id"] is None:
            continue
        tried = [name for name, text in worker_logs.items() if f"submitting flow run '{run['id']}'" in text]
        lost = [name for name, text in worker_logs.items() if f"Aborted submission of flow run '{run['id']}'" in text]
        takers = [name for name in tried if name not in lost]
        assert len(takers) == 1, (run["name"], tried, lost)
        taken_by[takers[0]].append(run["name"])
        taker_of[run["id"]] = takers[0]
        aborted += len(lost)
    assert all(taken_by.values()), taken_by
    subflows = [run for run in all_runs if run["deployment_id"] is None]
    assert len(subflows) >= 4 * 2 + 3 * 2, len(subflows)  # ticks 2 and 4 (2 partners), 1 and 3 (3 partners)
    for run in subflows:
        parent = stack.get(f"/task_runs/{run['parent_task_run_id']}")["flow_run_id"]
        ran_in = [name for name, text in worker_logs.items() if f"/flow-run/{run['id']}" in text]
        assert ran_in == [taker_of[parent]], (run["name"], ran_in, taker_of.get(parent))

    # A partner's runs never overlap (the partner:<uuid> limit), across every tick and the manual run. A manual
    # silver's cascaded gold is its subflow: silver's own work (and its slot) ends where that gold starts.
    cascaded = {stack.get(f"/task_runs/{r['parent_task_run_id']}")["flow_run_id"]: _times(r)[0]
                for r in all_runs if r["parent_task_run_id"] and _layer_of(r) == "gold"}
    for partner in ALL_PARTNERS:
        intervals = sorted((_times(r)[0], cascaded.get(r["id"], _times(r)[1]))
                           for r in all_runs if _partner_of(r) == partner)
        assert len(intervals) >= 4, (partner, len(intervals))
        for (_, end), (next_start, _) in zip(intervals, intervals[1:], strict=False):
            assert end <= next_start, f"runs of {partner} overlap: one ends {end}, the next starts {next_start}"

    # 8. The pipeline password is in no log: server, workers (flow-run output), CLI, and the API's run logs.
    for log in stack.logs.iterdir():
        assert PIPELINE_PASSWORD not in log.read_text(errors="replace"), log.name
    logs: list[dict] = []
    while page := stack.post("/logs/filter", {"limit": 200, "offset": len(logs)}):
        logs.extend(page)
    assert logs and not [entry for entry in logs if PIPELINE_PASSWORD in entry["message"]]
    for artifact in stack.post("/artifacts/filter", {}):
        assert PIPELINE_PASSWORD not in json.dumps(artifact, default=str)

    # Timings. Per partner: from its silver run's creation to its gold run's end (an upper bound on the
    # orchestration overhead: the work itself is milliseconds on this data), the partition phase of the
    # tick shared by its two partners (they run concurrently), and the tick's wall time / 2.
    for label, wall, children in measured:
        runs = _partition_runs(children)
        spans = [
            (_times(runs[(p, "gold")])[1] - datetime.fromisoformat(runs[(p, "silver")]["created"])).total_seconds()
            for p in (PARTNER_A, PARTNER_B)
        ]
        phase = max(_times(r)[1] for r in runs.values()) - min(datetime.fromisoformat(r["created"]) for r in runs.values())
        stack.timings[f"{label}: per partner, silver created..gold done (mean)"] = sum(spans) / len(spans)
        stack.timings[f"{label}: partition phase (first silver created..last gold done) / 2 partners"] = (
            phase.total_seconds() / 2
        )
        stack.timings[f"{label}: per partner, tick wall / 2"] = wall / 2
    start, end = _times(run2)
    stack.timings["tick 2 detection run Running..Completed"] = (end - start).total_seconds()
    stack.timings["whole test body"] = time.perf_counter() - test_started
    print("TIMINGS:", json.dumps({k: round(v, 1) for k, v in stack.timings.items()}, indent=1))
    print("TAKEN BY:", json.dumps(taken_by, indent=1), f"({aborted} aborted duplicate submission(s))")
    print("TICK 2 CHILDREN:", json.dumps({n: [c["state_name"], c["expected_start_time"], c["start_time"], c["end_time"]] for n, c in tick2_children.items()}, indent=1))
