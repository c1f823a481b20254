"""End to end through `prefect deployment run`: how close a tick is to the cost of any served run.

    .venv/bin/python bench/e2e_cli.py                   # SQLite-backed server
    .venv/bin/python bench/e2e_cli.py --server both     # SQLite, then PostgreSQL
    .venv/bin/python bench/e2e_cli.py --server postgres --scale 1 10   # the bench set and 10x it, in one run

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

With several `--scale` values (`bench/load_data.py --scale K` sets, loaded first if
missing), each scale gets its own server, and a last table sets the largest scale
against the smallest, with issue 18's targets: the bare source read (connectorx,
`usage` in the extract's keyed ranges and the relevant service rows), the peak RSS of
the serve process tree during each tick, and the lake's and bookkeeping's sizes.
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
import threading
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
from load_data import BenchSet, buffer_pool, ensure_loaded, mariadb_buffer_pool_mib  # noqa: E402 (bench/ is on sys.path)
from prefect import flow  # noqa: E402

from orchestration import local_prefect  # noqa: E402

FLOOR = "bench-floor"
FLOOR_DEPLOYMENT = f"{FLOOR}/{FLOOR}"
PARTITIONS_FLOOR = "bench-partitions-floor"
PARTITIONS_FLOOR_DEPLOYMENT = f"{PARTITIONS_FLOOR}/{PARTITIONS_FLOOR}"
DETECTION_DEPLOYMENT = "usage-change-detection/usage-change-detection"
RECONCILIATION_DEPLOYMENT = "usage-reconciliation/usage-reconciliation"
# The dealer that bench/run.py's (c) picks: mapped, with the median number of relevant rows (1,664).
DEFAULT_DEALER = 1879
RUN_TIMEOUT_SECONDS = 1800
PREFECT_CLI = str(Path(sys.executable).with_name("prefect"))
SERVERS = {"sqlite": "SQLite", "postgres": "PostgreSQL"}

# What each tick's final state message must say (TickReport.summary).
FIRST_TICK = r"\d+ dealer\(s\) -> (\d+) partition\(s\), \1/\1 ok"
ONE_DEALER = re.escape("1 dealer(s) -> 1 partition(s), 1/1 ok")
NO_CHANGE = "no changes"
RECONCILED = r"reconciled [\d,]+ of [\d,]+ dealers .*; no change"  # ReconciliationReport.summary
# What a server under contention leaves in the logs. A SQLite-backed server answers 503 when a write
# meets its lock (SQLITE_BUSY_SNAPSHOT), and the client waits about 2 s before retrying: the client
# logs that at DEBUG, so the serve process (and the runs it starts) log `prefect.client` at DEBUG.
LOG_PROBLEMS = ("retryable status code 503", "database is locked", "Traceback")
CLIENT_DEBUG = {"PREFECT_LOGGING_LOGGERS_PREFECT_CLIENT_LEVEL": "DEBUG"}


@flow(name=FLOOR)
def bench_floor() -> None:
    """Does nothing, so its run costs only what every served run costs."""


def hold_partner_slots(partner_uuid: str) -> None:
    from orchestration.slots import partner_slot
    from usage_pipeline.settings import load_settings

    with partner_slot(partner_uuid, load_settings()):
        pass


@flow(name="bench-noop-silver", flow_run_name="silver-{partner_uuid}")
def noop_silver(partner_uuid: str, cascade: bool = False, bronze_version: int | None = None,
                publish: bool = True) -> None:
    """A partition run with partner-silver's parameters that holds its slots as it does, and builds nothing."""
    hold_partner_slots(partner_uuid)


@flow(name="bench-noop-gold", flow_run_name="gold-{partner_uuid}")
def noop_gold(partner_uuid: str, staged_silver: str | None = None) -> None:
    """The same for partner-gold."""
    hold_partner_slots(partner_uuid)


@flow(name=PARTITIONS_FLOOR)
def bench_partitions_floor(partitions: int = 20) -> None:
    """A first tick's partition phase with nothing to build: the tick's own `materialize_partitions`
    runs a silver and a gold subflow per partner, tagged and holding slots, in this process. What is
    left is what Prefect's subflow runs, tags and slots cost on this runner."""
    from orchestration.runtime import without_subflow_heartbeats
    from orchestration.tick import Layers, materialize_partitions
    from usage_pipeline.settings import load_settings

    partners = [str(uuid.UUID(int=0xBE4C0000_0000_4000_8000_000000000000 + n)) for n in range(partitions)]
    with without_subflow_heartbeats():
        outcomes = materialize_partitions(partners, Layers(noop_silver, noop_silver, noop_gold), load_settings(),
                                          bronze_version=0)
    failed = [outcome for outcome in outcomes.values() if not outcome.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} no-op partition(s) failed: {failed[:3]}")


def serve_with_floor() -> None:
    """`usage-pipeline serve --no-schedule` (`cmd_serve`) plus the floor deployment, all in the same runner."""
    from prefect import serve

    from orchestration.cli import RUNNER_POLL_SECONDS
    from orchestration.crashed_runs import SERVE_HEARTBEAT_SECONDS
    from orchestration.deployments import runner_deployments
    from usage_pipeline.settings import load_settings

    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(SERVE_HEARTBEAT_SECONDS))  # as cmd_serve

    serve(
        *runner_deployments(schedule=False),
        bench_floor.to_deployment(name=FLOOR),
        bench_partitions_floor.to_deployment(name=PARTITIONS_FLOOR),
        limit=load_settings().max_concurrent_partitions + 3,
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
    from tests.postgres import server_database

    with server_database(kind, f"usage_bench_e2e_{os.getpid()}") as settings:
        server, url = local_prefect.start_server(work / "prefect-home", work / "server.log", settings=settings)
        try:
            yield url
        finally:
            local_prefect.stop(server)


def pipeline_env(api_url: str, work: Path, bench: BenchSet) -> dict[str, str]:
    """What an operator's shell holds: the bench databases (read only), a temporary lake, this server."""
    env = dict(os.environ, PREFECT_API_URL=api_url, PREFECT_HOME=str(work / "client-home"),
               USAGE_LAKE_ROOT=str(work / "lake"))
    for prefix, database in (("BILLING_CDRS_DB", bench.billing_db), ("V3_DB", bench.v3_db)):
        env.update({f"{prefix}_HOST": "127.0.0.1", f"{prefix}_PORT": "3306", f"{prefix}_USER": "root",
                    f"{prefix}_PASSWORD": "", f"{prefix}_DATABASE": database})
    return env


@contextmanager
def serving(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """This script's `--serve-only` in the background, until all seven deployments exist."""
    process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve-only"],
                               env={**env, **CLIENT_DEBUG}, cwd=ROOT, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    try:
        api = env["PREFECT_API_URL"]
        names = (*local_prefect.DEPLOYMENT_NAMES, FLOOR_DEPLOYMENT, PARTITIONS_FLOOR_DEPLOYMENT)
        local_prefect.wait_until(
            lambda: all(httpx.get(f"{api}/deployments/name/{name}", timeout=2).status_code == 200 for name in names),
            "serve", 120, process,
        )
        yield process
    finally:
        local_prefect.stop(process)


@dataclass(frozen=True)
class CliRun:
    wall: float
    message: str
    run_id: str
    started_at: datetime  # when the CLI was started (UTC)
    peak_rss: int  # bytes: the serve process tree's largest total resident set while the run went on


def tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants, from /proc (a process gone meanwhile counts 0)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    total, frontier = 0, [root]
    while frontier:
        pid = frontier.pop()
        frontier += children.get(pid, [])
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
    return total


@contextmanager
def peak_rss(root: int, every: float = 0.2) -> Iterator[list[int]]:
    """Sample `tree_rss(root)` in a thread while the block runs; the list holds the peak once it ends."""
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(root))
            done.wait(every)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()


def deployment_run(name: str, env: dict[str, str], expected: str | None = None, serve_pid: int | None = None,
                   parameters: dict[str, object] | None = None) -> CliRun:
    """`prefect deployment run NAME --watch`, timed around the CLI, with the serve process tree's peak RSS
    meanwhile. The run's final state is read back over REST; it must be Completed (not Skipped) with a
    message matching `expected`."""
    params = [arg for key, value in (parameters or {}).items() for arg in ("-p", f"{key}={value}")]
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    with peak_rss(serve_pid or os.getpid()) as peak:
        output = run_checked([PREFECT_CLI, "deployment", "run", name, *params, "--watch"], env)
    wall = time.perf_counter() - started
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", output)
    if run_id is None:
        raise RuntimeError(f"no flow run id in the output of `prefect deployment run {name}`:\n{output}")
    state = httpx.get(f"{env['PREFECT_API_URL']}/flow_runs/{run_id[1]}", timeout=10).raise_for_status().json()["state"]
    message = state["message"] or ""
    if (state["type"], state["name"]) != ("COMPLETED", "Completed") or (expected and not re.fullmatch(expected, message)):
        raise RuntimeError(f"{name} run {run_id[1]} ended {state['name']}: {message!r} (expected {expected!r})")
    return CliRun(wall, message, run_id[1], started_at, peak[0])


def timeline(run: CliRun, api: str, partitions_in_detail: bool = True) -> str:
    """Where the seconds of one CLI run went: the run's and its subflows' state changes and log lines,
    as seconds since the CLI started, read back from the server. Without `partitions_in_detail`
    (a first tick's 40 partition runs), silver and gold runs are summed up in two lines."""
    def since(stamp: str) -> float:
        return (datetime.fromisoformat(stamp) - run.started_at).total_seconds()

    def post(path: str, body: dict) -> list[dict]:
        return httpx.post(f"{api}{path}", json=body, timeout=30).raise_for_status().json()

    def every(path: str, body: dict, page: int = 200) -> list[dict]:
        """All of a filter's answers: the server returns at most 200 a request."""
        found: list[dict] = []
        while len(batch := post(path, {**body, "limit": page, "offset": len(found)})) == page:
            found += batch
        return found + batch

    runs = {run.run_id: "tick"}
    frontier = [run.run_id]
    while frontier:  # subflows of subflows too (a manual silver's gold)
        children = every("/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": frontier}}})
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
    logs = every("/logs/filter", {"logs": {"flow_run_id": {"any_": sorted(detailed)}}, "sort": "TIMESTAMP_ASC"})
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


@dataclass(frozen=True)
class ScaleRun:
    """One server's measurements of one bench set."""
    bench: BenchSet
    measurements: list[Measurement]
    notes: list[str]
    source_read: float  # seconds: the bare connectorx read of what a full extract reads
    rss: dict[str, int]  # tick kind -> peak RSS (bytes) of the serve process tree
    sizes: dict[str, int]  # what -> bytes (or a count, where the name says so)


def bare_source_read(bench: BenchSet) -> tuple[float, int]:
    """What a full extract reads, with nothing else done: the relevant service rows, then `usage` in the
    extract's keyed ranges, each through connectorx and dropped. Seconds and usage rows."""
    import sqlalchemy as sa

    from usage_pipeline.extract import BATCH_ROWS, read_frame, services_statement, usage_range_statement

    engine = sa.create_engine(bench.billing_url())
    try:
        started = time.perf_counter()
        read_frame(engine, services_statement(), bench.connectorx_uri())
        after, rows = None, 0
        while True:
            batch = read_frame(engine, usage_range_statement(after, BATCH_ROWS), bench.connectorx_uri())
            rows += batch.height
            if batch.height < BATCH_ROWS:
                return time.perf_counter() - started, rows
            after = batch["usage_id"].max()
    finally:
        engine.dispose()


def lake_sizes(env: dict[str, str]) -> dict[str, int]:
    """The bronze table's bytes and files, the state document's bytes, and the cursor block's and the
    tick artifacts' JSON bytes as the server hands them to the UI."""
    from blocks.usage_cursor import CURSOR_DOCUMENT
    from usage_pipeline import bronze
    from usage_pipeline.lake import state_path

    lake = Path(env["USAGE_LAKE_ROOT"])
    table = Path(bronze.table_uri(lake))
    files = [f for f in table.rglob("*") if f.is_file()]
    api = env["PREFECT_API_URL"]
    block = httpx.get(f"{api}/block_types/slug/usage-cursor/block_documents/name/{CURSOR_DOCUMENT}",
                      params={"include_secrets": "false"}, timeout=30).raise_for_status()
    sizes = {"bronze table bytes (data and log)": sum(f.stat().st_size for f in files),
             "bronze data files (count)": bronze.status(lake).files,
             "state document bytes": state_path(lake).stat().st_size,
             "cursor block bytes (JSON)": len(block.content)}
    for key in ("usage-partition-freshness", "usage-tick-runs", "usage-tick-checks"):
        latest = httpx.get(f"{api}/artifacts/{key}/latest", timeout=30)
        if latest.status_code == 200:
            sizes[f"`{key}` artifact bytes (JSON)"] = len(latest.content)
    return sizes


def bench_server(kind: str, bench: BenchSet, reps: int, first_ticks: int, dealer: int, keep: bool) -> ScaleRun:
    """Every measurement against one server: the first tick, then `reps` rounds of floor, one-dealer and
    no-change, `first_ticks - 1` ticks after `cursor reset --all`, and `reps` no-op partition phases.
    The notes end with the timelines of the first tick and of the slowest one-dealer tick."""
    progress(f"{kind} x{bench.scale}: bare source read")
    bare_source_read(bench)  # untimed: every measured read then finds the source in MariaDB's buffer pool
    source_read, source_rows = bare_source_read(bench)
    work = Path(tempfile.mkdtemp(prefix=f"usage-bench-e2e-{kind}-x{bench.scale}-"))
    try:
        with prefect_server(kind, work) as url:
            env = pipeline_env(url, work, bench)
            run_checked([sys.executable, "-m", "orchestration.cli", "setup"], env)
            with serving(env, work / "serve.log") as serve:
                def tick(expected: str) -> CliRun:
                    return deployment_run(DETECTION_DEPLOYMENT, env, expected, serve.pid)

                progress(f"{kind} x{bench.scale}: first tick")
                first = tick(FIRST_TICK)
                first_timeline = timeline(first, url, partitions_in_detail=False)
                sizes = lake_sizes(env)
                floor, partitions_floor, one, quiet, reconciled = [], [], [], [], []
                for rep in range(1, reps + 1):
                    progress(f"{kind} x{bench.scale}: floor, one-dealer and no-change ticks, round {rep}/{reps}")
                    floor.append(deployment_run(FLOOR_DEPLOYMENT, env))
                    reset = run_checked([sys.executable, "-m", "orchestration.cli", "cursor", "reset",
                                         "--dealer", str(dealer)], env)
                    if not reset.startswith("Removed the cursor entries"):
                        raise RuntimeError(f"cursor reset --dealer {dealer}: {reset}")
                    one.append(tick(ONE_DEALER))
                    quiet.append(tick(NO_CHANGE))
                    # Off the tick's path; the first run starts its cycle, each later one takes the cycle's
                    # elapsed share of the dealers (USAGE_RECONCILE_SECONDS at its default).
                    reconciled.append(deployment_run(RECONCILIATION_DEPLOYMENT, env, RECONCILED, serve.pid))
                starts_over = []  # the first tick's work again: bronze in full and every partition
                for rep in range(2, first_ticks + 1):
                    progress(f"{kind} x{bench.scale}: tick after `cursor reset --all`, {rep - 1}/{first_ticks - 1}")
                    run_checked([sys.executable, "-m", "orchestration.cli", "cursor", "reset", "--all"], env)
                    starts_over.append(tick(FIRST_TICK))
                # Last: the server is still recording a no-op partition phase's events some seconds after it ends.
                for rep in range(1, reps + 1):
                    progress(f"{kind} x{bench.scale}: no-op partitions, round {rep}/{reps}")
                    partitions_floor.append(deployment_run(PARTITIONS_FLOOR_DEPLOYMENT, env,
                                                           parameters={"partitions": bench.partners}))
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
    firsts = [first, *starts_over]
    measurements = [
        Measurement(f"floor: served no-op flow `{FLOOR}` ({reps} runs)", [r.wall for r in floor], None),
        Measurement(f"no-op partitions: `{PARTITIONS_FLOOR}`, {bench.partners} partners' silver and gold"
                    f" subflows ({reps} runs)", [r.wall for r in partitions_floor], None),
        Measurement(f"first tick: empty lake, no cursor (1 run), then after `cursor reset --all`"
                    f" ({first_ticks - 1} runs)", [r.wall for r in firsts], 3),
        Measurement(f"one-dealer tick after `cursor reset --dealer {dealer}` ({reps} runs)", [r.wall for r in one], 1.5),
        Measurement(f"no-change tick ({reps} runs)", [r.wall for r in quiet], 1.2),
        Measurement(f"usage-reconciliation run, off the tick's path ({reps} runs: "
                    + "; ".join(r.message for r in reconciled) + ")", [r.wall for r in reconciled], None),
    ]
    problems = ", ".join(f"{logs.count(text)} × `{text}`" for text in LOG_PROBLEMS)
    notes = [
        f"Every run ended Completed. State messages: first tick `{first.message}`; "
        f"one-dealer `{one[-1].message}`; no-change `{quiet[-1].message}`.  ",
        f"Bare source read (connectorx: relevant service rows, then {source_rows:,} `usage` rows in keyed ranges):"
        f" {source_read:.2f} s.  ",
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
    rss = {"first tick": max(r.peak_rss for r in firsts), "one-dealer tick": max(r.peak_rss for r in one),
           "no-change tick": max(r.peak_rss for r in quiet)}
    return ScaleRun(bench, measurements, notes, source_read, rss, sizes)


def table(measurements: list[Measurement]) -> str:
    floor = measurements[0].median
    rows = [["measurement", "wall (median, min–max)", "× floor", "target"], ["---"] * 4]
    rows += [m.row(floor) for m in measurements]
    return markdown(rows)


def markdown(rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def verdict(ok: bool, target: str) -> str:
    return f"{target}: " + ("met" if ok else "**not met**")


def growth_table(small: ScaleRun, large: ScaleRun) -> str:
    """The largest scale against the smallest, with issue 18's targets."""
    k = f"{large.bench.scale / small.bench.scale:g}"
    names = ["floor", "partitions floor", "first tick", "one-dealer tick", "no-change tick", "reconciliation run"]
    walls = {name: (a.median, b.median) for name, a, b in zip(names, small.measurements, large.measurements, strict=True)}
    rows = [["measured (same run)", f"K = {small.bench.scale}", f"K = {large.bench.scale}", "growth", "target"],
            ["---"] * 5]
    rows.append(["usage rows / dealers / partners", f"{small.bench.rows:,} / {small.bench.dealers:,} / "
                 f"{small.bench.partners}", f"{large.bench.rows:,} / {large.bench.dealers:,} / {large.bench.partners}",
                 f"{k}×", "-"])
    rows.append(["bare source read", f"{small.source_read:.2f} s", f"{large.source_read:.2f} s",
                 f"{large.source_read / small.source_read:.2f}×", "-"])
    for name, (a, b) in walls.items():
        target = "-"
        if name == "first tick":
            budget = walls["partitions floor"][1] + large.source_read
            target = verdict(b <= 1.5 * budget, f"≤ 1.5 × (partitions floor + source read) = {1.5 * budget:.1f} s")
        elif name == "one-dealer tick":
            target = verdict(b <= 1.2 * a, f"≤ 1.2× K = {small.bench.scale}")
        elif name == "no-change tick":
            floor = walls["floor"][1]
            target = verdict(b <= 1.2 * floor, f"≤ 1.2× floor ({floor:.2f} s) = {1.2 * floor:.2f} s")
        rows.append([f"{name}, wall (median)", f"{a:.2f} s", f"{b:.2f} s", f"{b / a:.2f}×", target])
    for name in small.rss:
        a, b = small.rss[name], large.rss[name]
        target = verdict(b <= 2 * 2**30 and b <= 1.5 * a, "≤ 2 GiB and ≤ 1.5×") if name == "first tick" else "-"
        rows.append([f"{name}, peak RSS of the serve process tree", gib(a), gib(b), f"{b / a:.2f}×", target])
    for name in small.sizes:
        a, b = small.sizes[name], large.sizes.get(name, 0)
        show = (lambda n: f"{n:,}") if "count" in name else (lambda n: f"{n / 2**10:,.0f} KiB")
        rows.append([name, show(a), show(b), f"{b / a:.2f}×" if a else "-", "-"])
    return markdown(rows)


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=[*SERVERS, "both"], default="sqlite",
                        help="the Prefect server's database (default sqlite; both: SQLite, then PostgreSQL)")
    parser.add_argument("--scale", type=int, nargs="+", default=[1], metavar="K",
                        help="bench sets of `bench/load_data.py --scale K`, smallest first (default 1)")
    parser.add_argument("--reps", type=int, default=3, help="rounds of floor, one-dealer and no-change runs (default 3)")
    parser.add_argument("--first-ticks", type=int, default=3,
                        help="first ticks: the empty lake's, then after `cursor reset --all` (default 3)")
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
    if min(args.scale) < 1 or args.reps < 1 or args.first_ticks < 1:
        parser.error("--scale, --reps and --first-ticks must be positive")
    scales = sorted(set(args.scale))

    started = time.perf_counter()
    command = shlex.join([sys.executable, *sys.argv])
    print(f"Command (from {ROOT}): `{command}`\n", flush=True)
    benches = [ensure_loaded(BenchSet.scaled(k)) for k in scales]
    with buffer_pool(args.buffer_pool_mib, progress):
        for kind in SERVERS if args.server == "both" else [args.server]:
            runs = [bench_one_server(kind, bench, args) for bench in benches]
            if len(runs) > 1:
                print(f"#### K = {scales[0]} and K = {scales[-1]} on the {SERVERS[kind]}-backed server\n\n"
                      f"{growth_table(runs[0], runs[-1])}\n", flush=True)
    print(f"Total wall time: {time.perf_counter() - started:,.0f} s.", flush=True)
    return 0


def bench_one_server(kind: str, bench: BenchSet, args: argparse.Namespace) -> ScaleRun:
    load_before = load_average()
    run = bench_server(kind, bench, args.reps, args.first_ticks, args.dealer, args.keep)
    print("\n".join([
        f"#### Prefect {prefect.__version__} server on {SERVERS[kind]}, K = {bench.scale} ({bench.billing_db}:"
        f" {bench.rows:,} usage rows, {bench.dealers:,} dealers, {bench.partners} partners),"
        f" {datetime.now():%Y-%m-%d %H:%M}",
        "",
        table(run.measurements),
        "",
        *run.notes,
        f"MariaDB innodb_buffer_pool_size {mariadb_buffer_pool_mib()} MiB. "
        f"Load average before {load_before}; after {load_average()}.",
        "",
    ]), flush=True)
    return run


if __name__ == "__main__":
    sys.exit(main())
