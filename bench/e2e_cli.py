"""End to end through `prefect deployment run`: how close a tick is to the cost of any served run.

    .venv/bin/python bench/e2e_cli.py                   # SQLite-backed server
    .venv/bin/python bench/e2e_cli.py --server both     # SQLite, then PostgreSQL

Issue "A tick close to its work". Operators start a tick with
`prefect deployment run usage-change-detection/usage-change-detection --watch`,
so that is what is timed: the wall time of the CLI in a subprocess. Each tick is
shown as a multiple of a floor taken in the same run, because the machine is
shared. The floor is a no-op flow served by the same `prefect.serve` process as
the project's four deployments, so it pays the same runner, CLI and server costs.
A second served flow, `bench-partitions-floor`, runs a first tick's 40 partition
subflows through the tick's own code with nothing to build: the part of a first
tick that Prefect's runs, tags and slots cost on this runner.
Ticks run against the bench databases of `bench/load_data.py`, which are only
read, and write to a temporary lake. The one-dealer tick follows
`usage-pipeline cursor reset --dealer ID`.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's packages, whatever the venv was installed from

import httpx  # noqa: E402
import prefect  # noqa: E402
from load_data import FULL_ROWS, BenchSet, buffer_pool, mariadb_buffer_pool_mib  # noqa: E402 (bench/ is on sys.path)
from prefect import flow  # noqa: E402

from orchestration import local_prefect  # noqa: E402

FLOOR = "bench-floor"
FLOOR_DEPLOYMENT = f"{FLOOR}/{FLOOR}"
PARTITIONS_FLOOR = "bench-partitions-floor"
PARTITIONS_FLOOR_DEPLOYMENT = f"{PARTITIONS_FLOOR}/{PARTITIONS_FLOOR}"
FIRST_TICK_PARTITIONS = 20  # the bench set's partners, all rebuilt by a first tick
DETECTION_DEPLOYMENT = "usage-change-detection/usage-change-detection"
# The dealer that bench/run.py's (c) picks: mapped, with the median number of relevant rows (1,664).
DEFAULT_DEALER = 1879
RUN_TIMEOUT_SECONDS = 1800
PREFECT_CLI = str(Path(sys.executable).with_name("prefect"))
POSTGRES = ("psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q", "-c")
SERVERS = {"sqlite": "SQLite", "postgres": "PostgreSQL"}

# What each tick's final state message must say (TickReport.summary).
FIRST_TICK = r"\d+ dealer\(s\) -> (\d+) partition\(s\), \1/\1 ok"
ONE_DEALER = re.escape("1 dealer(s) -> 1 partition(s), 1/1 ok")
NO_CHANGE = "no changes"
# What a server under contention leaves in the logs. A SQLite-backed server answers 503 when a write
# meets its lock (SQLITE_BUSY_SNAPSHOT), and the client waits about 2 s before retrying: the client
# logs that at DEBUG, so the serve process (and the runs it starts) log `prefect.client` at DEBUG.
LOG_PROBLEMS = ("retryable status code 503", "database is locked", "Traceback")
CLIENT_DEBUG = {"PREFECT_LOGGING_LOGGERS_PREFECT_CLIENT_LEVEL": "DEBUG"}


@flow(name=FLOOR)
def bench_floor() -> None:
    """Does nothing, so its run costs only what every served run costs."""


@flow(name="bench-noop-silver", flow_run_name="silver-{partner_uuid}")
def noop_silver(partner_uuid: str, cascade: bool = False) -> None:
    """A partition run that holds its slots as partner-silver does, and builds nothing."""
    from orchestration.runtime import partner_slot
    from usage_pipeline.settings import load_settings

    with partner_slot(partner_uuid, load_settings()):
        pass


@flow(name="bench-noop-gold", flow_run_name="gold-{partner_uuid}")
def noop_gold(partner_uuid: str) -> None:
    noop_silver.fn(partner_uuid)


@flow(name=PARTITIONS_FLOOR)
def bench_partitions_floor(partitions: int = FIRST_TICK_PARTITIONS) -> None:
    """A first tick's partition phase with nothing to build: the tick's own `materialize_partitions`
    runs a silver and a gold subflow per partner, tagged and holding slots, in this process. What is
    left is what Prefect's subflow runs, tags and slots cost on this runner."""
    from orchestration.runtime import without_subflow_heartbeats
    from orchestration.tick import Layers, materialize_partitions
    from usage_pipeline.settings import load_settings

    partners = [str(uuid.UUID(int=0xBE4C0000_0000_4000_8000_000000000000 + n)) for n in range(partitions)]
    with without_subflow_heartbeats():
        outcomes = materialize_partitions(partners, Layers(noop_silver, noop_silver, noop_gold), load_settings())
    failed = [outcome for outcome in outcomes.values() if not outcome.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} no-op partition(s) failed: {failed[:3]}")


def serve_with_floor() -> None:
    """`usage-pipeline serve --no-schedule` (`cmd_serve`) plus the floor deployment, all in the same runner."""
    from prefect import serve

    from orchestration.cli import RUNNER_POLL_SECONDS
    from orchestration.deployments import runner_deployments
    from usage_pipeline.settings import load_settings

    serve(
        *runner_deployments(schedule=False),
        bench_floor.to_deployment(name=FLOOR),
        bench_partitions_floor.to_deployment(name=PARTITIONS_FLOOR),
        limit=load_settings().max_concurrent_partitions + 2,
        query_seconds=RUNNER_POLL_SECONDS,
    )


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_checked(command: list[str], env: dict[str, str] | None = None) -> str:
    """Run a command from the project root and return its stdout; raise with its output if it fails."""
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} exited with {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout


@contextmanager
def prefect_server(kind: str, work: Path) -> Iterator[str]:
    """A local server started as the project starts it; for PostgreSQL, on a database made for this run."""
    settings, database = {}, None
    if kind == "postgres":
        database = f"usage_bench_e2e_{os.getpid()}"
        run_checked([*POSTGRES, f"CREATE DATABASE {database}"])
        settings["PREFECT_API_DATABASE_CONNECTION_URL"] = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{database}"
    try:
        server, url = local_prefect.start_server(work / "prefect-home", work / "server.log", settings=settings)
        try:
            yield url
        finally:
            local_prefect.stop(server)
    finally:
        if database:
            run_checked([*POSTGRES, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"])


def pipeline_env(api_url: str, work: Path) -> dict[str, str]:
    """What an operator's shell holds: the bench databases (read only), a temporary lake, this server."""
    bench = BenchSet(FULL_ROWS)
    env = dict(os.environ, PREFECT_API_URL=api_url, PREFECT_HOME=str(work / "client-home"),
               USAGE_LAKE_ROOT=str(work / "lake"))
    for prefix, database in (("BILLING_CDRS_DB", bench.billing_db), ("V3_DB", bench.v3_db)):
        env.update({f"{prefix}_HOST": "127.0.0.1", f"{prefix}_PORT": "3306", f"{prefix}_USER": "root",
                    f"{prefix}_PASSWORD": "", f"{prefix}_DATABASE": database})
    return env


@contextmanager
def serving(env: dict[str, str], log: Path) -> Iterator[None]:
    """This script's `--serve-only` in the background, until all six deployments exist."""
    process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve-only"],
                               env={**env, **CLIENT_DEBUG}, cwd=ROOT, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    try:
        api = env["PREFECT_API_URL"]
        names = (*local_prefect.DEPLOYMENT_NAMES, FLOOR_DEPLOYMENT, PARTITIONS_FLOOR_DEPLOYMENT)
        local_prefect.wait_until(
            lambda: all(httpx.get(f"{api}/deployments/name/{name}", timeout=2).status_code == 200 for name in names),
            "serve", 120, process,
        )
        yield
    finally:
        local_prefect.stop(process)


@dataclass(frozen=True)
class CliRun:
    wall: float
    message: str
    run_id: str
    started_at: datetime  # when the CLI was started (UTC)


def deployment_run(name: str, env: dict[str, str], expected: str | None = None) -> CliRun:
    """`prefect deployment run NAME --watch`, timed around the CLI. The run's final state is read back over REST;
    it must be Completed (not Skipped) with a message matching `expected`."""
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    output = run_checked([PREFECT_CLI, "deployment", "run", name, "--watch"], env)
    wall = time.perf_counter() - started
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", output)
    if run_id is None:
        raise RuntimeError(f"no flow run id in the output of `prefect deployment run {name}`:\n{output}")
    state = httpx.get(f"{env['PREFECT_API_URL']}/flow_runs/{run_id[1]}", timeout=10).raise_for_status().json()["state"]
    message = state["message"] or ""
    if (state["type"], state["name"]) != ("COMPLETED", "Completed") or (expected and not re.fullmatch(expected, message)):
        raise RuntimeError(f"{name} run {run_id[1]} ended {state['name']}: {message!r} (expected {expected!r})")
    return CliRun(wall, message, run_id[1], started_at)


def timeline(run: CliRun, api: str, partitions_in_detail: bool = True) -> str:
    """Where the seconds of one CLI run went: the run's and its subflows' state changes and log lines,
    as seconds since the CLI started, read back from the server. Without `partitions_in_detail`
    (a first tick's 40 partition runs), silver and gold runs are summed up in two lines."""
    def since(stamp: str) -> float:
        return (datetime.fromisoformat(stamp) - run.started_at).total_seconds()

    def post(path: str, body: dict) -> list[dict]:
        return httpx.post(f"{api}{path}", json=body, timeout=30).raise_for_status().json()

    runs = {run.run_id: "tick"}
    frontier = [run.run_id]
    while frontier:  # subflows of subflows too (a manual silver's gold)
        children = post("/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": frontier}}})
        frontier = [child["id"] for child in children if child["id"] not in runs]
        runs.update({child["id"]: child["name"] for child in children})
    detailed = {run_id for run_id, name in runs.items()
                if partitions_in_detail or not name.startswith(("silver-", "gold-"))}
    events = [(0.0, "cli", "`prefect deployment run --watch` started")]
    spans: dict[str, list[tuple[float, float]]] = {}
    for run_id, name in runs.items():
        states = httpx.get(f"{api}/flow_run_states/", params={"flow_run_id": run_id}, timeout=30)
        stamps = [(since(state["timestamp"]), state["name"]) for state in states.raise_for_status().json()]
        if run_id in detailed:
            events += [(at, name, f"state {state}") for at, state in stamps]
        else:
            spans.setdefault(name.split("-")[0], []).append((min(stamps)[0], max(stamps)[0]))
    for layer, layer_spans in spans.items():
        first, last = min(start for start, _ in layer_spans), max(end for _, end in layer_spans)
        durations = [end - start for start, end in layer_spans]
        events += [(first, f"{len(layer_spans)} {layer} runs", f"first Pending; each took {statistics.median(durations):.2f} s"
                    f" (median; {min(durations):.2f}–{max(durations):.2f}) from Pending to Completed"),
                   (last, f"{len(layer_spans)} {layer} runs", "last Completed")]
    logs = post("/logs/filter", {"logs": {"flow_run_id": {"any_": sorted(detailed)}}, "sort": "TIMESTAMP_ASC",
                                 "limit": 200})
    events += [(since(log["timestamp"]), runs.get(log["flow_run_id"], "?"), log["message"].splitlines()[0][:110])
               for log in logs if not log["message"].startswith("Partition ")]
    events.append((run.wall, "cli", "exited"))
    lines = ["| s | run | what |", "| ---: | --- | --- |"]
    lines += [f"| {at:.2f} | {name} | {text.replace('|', '/')} |" for at, name, text in sorted(events)]
    return "\n".join(lines)


@dataclass(frozen=True)
class Measurement:
    label: str
    walls: list[float]
    target: float | None  # at most this multiple of the floor

    @property
    def median(self) -> float:
        return statistics.median(self.walls)

    def row(self, floor: float) -> list[str]:
        wall = f"{self.median:.2f} s" + (f" ({min(self.walls):.2f}–{max(self.walls):.2f})" if len(self.walls) > 1 else "")
        times = self.median / floor
        target = "-" if self.target is None else f"≤ {self.target:g}×: " + ("met" if times <= self.target else "**not met**")
        return [self.label, wall, f"{times:.2f}×", target]


def bench_server(kind: str, reps: int, dealer: int, keep: bool) -> tuple[list[Measurement], list[str]]:
    """Every measurement against one server: a first tick, then `reps` rounds of floor, one-dealer and no-change.
    The notes end with the timelines of the first tick and of the slowest one-dealer tick."""
    work = Path(tempfile.mkdtemp(prefix=f"usage-bench-e2e-{kind}-"))
    try:
        with prefect_server(kind, work) as url:
            env = pipeline_env(url, work)
            run_checked([sys.executable, "-m", "orchestration.cli", "setup"], env)
            with serving(env, work / "serve.log"):
                progress(f"{kind}: first tick")
                first = deployment_run(DETECTION_DEPLOYMENT, env, FIRST_TICK)
                first_timeline = timeline(first, url, partitions_in_detail=False)
                floor, partitions_floor, one, quiet = [], [], [], []
                for rep in range(1, reps + 1):
                    progress(f"{kind}: floor, one-dealer and no-change ticks, round {rep}/{reps}")
                    floor.append(deployment_run(FLOOR_DEPLOYMENT, env))
                    reset = run_checked([sys.executable, "-m", "orchestration.cli", "cursor", "reset",
                                         "--dealer", str(dealer)], env)
                    if not reset.startswith("Removed the cursor entries"):
                        raise RuntimeError(f"cursor reset --dealer {dealer}: {reset}")
                    one.append(deployment_run(DETECTION_DEPLOYMENT, env, ONE_DEALER))
                    quiet.append(deployment_run(DETECTION_DEPLOYMENT, env, NO_CHANGE))
                starts_over = []  # the first tick's work again: bronze in full and every partition
                for rep in range(2, reps + 1):
                    progress(f"{kind}: tick after `cursor reset --all`, {rep - 1}/{reps - 1}")
                    run_checked([sys.executable, "-m", "orchestration.cli", "cursor", "reset", "--all"], env)
                    starts_over.append(deployment_run(DETECTION_DEPLOYMENT, env, FIRST_TICK))
                # Last: the server is still recording a no-op partition phase's events some seconds after it ends.
                for rep in range(1, reps + 1):
                    progress(f"{kind}: no-op partitions, round {rep}/{reps}")
                    partitions_floor.append(deployment_run(PARTITIONS_FLOOR_DEPLOYMENT, env))
                slowest = max(one, key=lambda r: r.wall)
                one_timeline = timeline(slowest, url)
        logs = "".join((work / name).read_text(errors="replace") for name in ("serve.log", "server.log"))
    except BaseException:
        keep = True  # the logs say why a run failed
        raise
    finally:
        if keep:
            progress(f"(kept {work}: server.log, serve.log, lake/)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    measurements = [
        Measurement(f"floor: served no-op flow `{FLOOR}` ({reps} runs)", [r.wall for r in floor], None),
        Measurement(f"no-op partitions: `{PARTITIONS_FLOOR}`, {FIRST_TICK_PARTITIONS} partners' silver and gold"
                    f" subflows ({reps} runs)", [r.wall for r in partitions_floor], None),
        Measurement(f"first tick: empty lake, no cursor (1 run), then after `cursor reset --all` ({reps - 1} runs)",
                    [first.wall, *(r.wall for r in starts_over)], 3),
        Measurement(f"one-dealer tick after `cursor reset --dealer {dealer}` ({reps} runs)", [r.wall for r in one], 1.5),
        Measurement(f"no-change tick ({reps} runs)", [r.wall for r in quiet], 1.2),
    ]
    problems = ", ".join(f"{logs.count(text)} × `{text}`" for text in LOG_PROBLEMS)
    notes = [
        f"Every run ended Completed. State messages: first tick `{first.message}`; "
        f"one-dealer `{one[-1].message}`; no-change `{quiet[-1].message}`.  ",
        f"Serve and server logs (client retries at DEBUG): {problems}.  ",
        "",
        f"<details><summary>Timeline of the first tick ({first.wall:.2f} s)</summary>",
        "",
        first_timeline,
        "",
        "</details>",
        "",
        f"<details><summary>Timeline of the slowest one-dealer tick ({slowest.wall:.2f} s)</summary>",
        "",
        one_timeline,
        "",
        "</details>",
        "",
    ]
    return measurements, notes


def table(measurements: list[Measurement]) -> str:
    floor = measurements[0].median
    rows = [["measurement", "wall (median, min–max)", "× floor", "target"], ["---"] * 4]
    rows += [m.row(floor) for m in measurements]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=[*SERVERS, "both"], default="sqlite",
                        help="the Prefect server's database (default sqlite; both: SQLite, then PostgreSQL)")
    parser.add_argument("--reps", type=int, default=3, help="rounds of floor, one-dealer and no-change runs (default 3)")
    parser.add_argument("--dealer", type=int, default=DEFAULT_DEALER,
                        help=f"the mapped dealer whose cursor entry is reset (default {DEFAULT_DEALER})")
    parser.add_argument("--keep", action="store_true", help="keep each server's temp dir (logs, lake)")
    parser.add_argument("--buffer-pool-mib", type=int, default=0,
                        help="MariaDB's innodb_buffer_pool_size for the run, restored after it (bench/run.py's flag;"
                             " 0, the default, leaves the server alone)")
    parser.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)  # the benchmark's serve process
    args = parser.parse_args(argv)
    if args.serve_only:
        serve_with_floor()
        return 0

    started = time.perf_counter()
    command = shlex.join([sys.executable, *sys.argv])
    print(f"Command (from {ROOT}): `{command}`\n", flush=True)
    with buffer_pool(args.buffer_pool_mib, progress):
        print(warm_source(), "\n", flush=True)
        for kind in SERVERS if args.server == "both" else [args.server]:
            bench_one_server(kind, args)
    print(f"Total wall time: {time.perf_counter() - started:,.0f} s.", flush=True)
    return 0


def warm_source() -> str:
    """Read what a first tick reads, untimed, so that every measured tick finds the source in
    MariaDB's buffer pool (the issue measured warm ticks; bench/run.py warms up the same way)."""
    import sqlalchemy as sa

    from usage_pipeline.extract import extract_relevant_usage

    bench = BenchSet(FULL_ROWS)
    engine = sa.create_engine(bench.billing_url())
    started = time.perf_counter()
    try:
        rows = extract_relevant_usage(engine, bench.connectorx_uri(), None).height
    finally:
        engine.dispose()
    return f"Warm-up: one full relevant extract ({rows:,} rows) in {time.perf_counter() - started:.1f} s before the runs."


def bench_one_server(kind: str, args: argparse.Namespace) -> None:
    load_before = load_average()
    measurements, notes = bench_server(kind, args.reps, args.dealer, args.keep)
    print("\n".join([
        f"#### Prefect {prefect.__version__} server on {SERVERS[kind]}, {datetime.now():%Y-%m-%d %H:%M}",
        "",
        table(measurements),
        "",
        *notes,
        f"MariaDB innodb_buffer_pool_size {mariadb_buffer_pool_mib()} MiB. "
        f"Load average before {load_before}; after {load_average()}.",
        "",
    ]), flush=True)


if __name__ == "__main__":
    sys.exit(main())
