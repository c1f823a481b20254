"""Random-kill rounds: change the source at random, start a tick, SIGKILL something at a random moment,
restart it, let the next ticks run, then check everything an operator relies on.

Run by tests/test_random_kills.py: a few rounds of each kind in the suite, more with
USAGE_KILL_ROUNDS_PER_KIND (README, "Crash recovery, measured"). Each kind kills one thing a
production run can lose:

- `serve`: `usage-pipeline serve` and every process under it (a rebooted or OOM-killed worker);
- `child`: only the flow-run process running the tick (its runner lives on);
- `server`: the Prefect server, restarted on the same database;
- `mariadb`: the billing database (a MariaDB server of the test's own), killed during a bronze extract
  and started again.

Rounds are seeded: the same seed makes the same changes and kill moments.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from urllib.parse import unquote

import polars as pl
import sqlalchemy as sa
from deltalake import DeltaTable

from orchestration import local_prefect
from orchestration.deployments import deployment_specs
from tests.pipeline_helpers import FINAL_STATE_TYPES, RestApi, file_ids, partition_files, read_bronze
from tests.sourcedata import active_services_truth, usage_report_truth
from usage_pipeline import bronze
from usage_pipeline.lake import STAGING_DIR, STALE_TEMP_SECONDS, TEMP_NAME, bronze_path

KINDS = ("serve", "child", "server", "mariadb")
PARTNERS = [f"{i:08x}-0000-4000-8000-{i:012x}" for i in range(0xA1, 0xA5)]
DEALERS = list(range(1, 13))
CUSTOMERS = list(range(100, 120))
SERVICES = [1, 2, 3]
OPEN_STATES = ["PENDING", "RUNNING"]
# Prefect's shortest heartbeat period and lease: a killed tick is marked Crashed, and its slots
# free themselves, within about a minute.
FAST_RECOVERY_ENV = {
    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
    "USAGE_HEARTBEAT_TIMEOUT_SECONDS": "45",
    "USAGE_SLOT_LEASE_SECONDS": "60",
}
BRONZE_RETENTION_SECONDS = 24 * 3600  # bronze.TABLE_CONFIG's delta.deletedFileRetentionDuration
RECOVERY_TIMEOUT = 420  # seconds from the kill until a tick must have completed


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it, parents first (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, queue = [], [pid]
    while queue:
        current = queue.pop(0)
        tree.append(current)
        queue.extend(children.get(current, []))
    return tree


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Api(RestApi):
    def start_tick(self) -> str:
        deployment = self.get("/deployments/name/usage-change-detection/usage-change-detection")
        return self.post(f"/deployments/{deployment['id']}/create_flow_run", {})["id"]

    def open_pipeline_runs(self) -> list[dict]:
        """The pipeline's runs that are Pending or Running."""
        flows = [spec.name for spec in deployment_specs()]  # each deployment's flow has its name
        return self.post("/flow_runs/filter", {"flows": {"name": {"any_": flows}},
                                               "flow_runs": {"state": {"type": {"any_": OPEN_STATES}}}, "limit": 200})

    def cursor_value(self) -> object:
        return self.get("/block_types/slug/usage-cursor/block_documents/name/usage-change-detection")["data"]["value"]


class PrivateMariaDB:
    """A MariaDB server of this test's own (own data directory and port), so that killing it disturbs
    no other test; started the way the machine's is, with the pipeline's read-only user."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="usage-kills-mariadb-"))
        shutil.chown(self.directory, "mysql", "mysql")  # the server drops root for the mysql user
        self.port = local_prefect.free_port()
        self.admin_url = f"mysql+pymysql://root@127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={self.directory / 'data'}", "--user=mysql",
                        "--auth-root-authentication-method=normal", "--skip-test-db"], check=True, capture_output=True)

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["/usr/sbin/mariadbd", "--no-defaults", f"--datadir={self.directory / 'data'}", "--user=mysql",
             f"--port={self.port}", "--bind-address=127.0.0.1", f"--socket={self.directory / 'mysqld.sock'}",
             f"--pid-file={self.directory / 'mysqld.pid'}"],
            stdout=open(self.directory / "server.log", "ab"), stderr=subprocess.STDOUT,
        )
        local_prefect.wait_until(self.alive, "mariadb", 120, self.process)

    def create_source(self, databases: tuple[str, ...], user: str, password: str) -> None:
        engine = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            for database in databases:
                conn.exec_driver_sql(f"CREATE DATABASE {database}")
            conn.exec_driver_sql(f"CREATE USER '{user}'@'%%' IDENTIFIED BY '{password}'")
            for database in databases:
                conn.exec_driver_sql(f"GRANT SELECT ON {database}.* TO '{user}'@'%%'")
        engine.dispose()

    def alive(self) -> bool:
        engine = sa.create_engine(self.admin_url)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return True
        except sa.exc.OperationalError:
            return False
        finally:
            engine.dispose()

    def restart(self) -> None:
        """SIGKILL (no clean shutdown: InnoDB recovers at start), then start again."""
        self.process.kill()
        self.process.wait()
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class Stack:
    """A Prefect server (on the database `server_settings` name) and a `usage-pipeline serve` of their
    own, on a lake of their own."""

    workdir: Path
    source_env: dict[str, str]
    server_settings: dict[str, str]
    port: int = field(default_factory=local_prefect.free_port)
    server: subprocess.Popen | None = None
    serve: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.home, self.lake, self.logs = (self.workdir / name for name in ("prefect-home", "lake", "logs"))
        for path in (self.home, self.lake, self.logs):
            path.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.api = Api(self.url)
        self.env = {**os.environ, **self.source_env, **FAST_RECOVERY_ENV, "PREFECT_API_URL": self.url,
                    "USAGE_LAKE_ROOT": str(self.lake)}

    def start(self) -> None:
        self.start_server()
        assert "usage-crashed-runs created" in self.setup()
        self.start_serve()

    def setup(self, **env: str) -> str:
        """`usage-pipeline setup` against this stack's server, as an operator runs it; returns its output."""
        setup = subprocess.run([sys.executable, "-m", "orchestration.cli", "setup"], env={**self.env, **env},
                               capture_output=True, text=True, timeout=300)
        assert setup.returncode == 0, setup.stdout + setup.stderr
        return setup.stdout

    def start_server(self) -> None:
        self.server, _ = local_prefect.start_server(self.home, self.logs / "server.log", port=self.port,
                                                    settings=self.server_settings)

    def start_serve(self) -> None:
        self.serve = local_prefect.start_serve(self.logs / "serve.log", env=self.env)

    def stop(self) -> None:
        for process in (self.serve, self.server):
            if process is not None:
                kill_all(process_tree(process.pid)[1:])
                local_prefect.stop(process)

    def kill_serve(self) -> None:
        kill_all(process_tree(self.serve.pid))
        self.serve.wait()

    def kill_flow_run_processes(self) -> int:
        """SIGKILL the processes the runner started for flow runs (not the runner); returns how many."""
        runs = [pid for pid in process_tree(self.serve.pid)[1:] if "prefect" in command_line(pid)]
        kill_all(runs)
        return len(runs)

    def kill_server(self) -> None:
        kill_all(process_tree(self.server.pid))
        self.server.wait()


class World:
    """The source as the billing system changes it; a clock that only moves forward."""

    def __init__(self, billing: sa.Engine, v3: sa.Engine, rng: random.Random) -> None:
        self.billing, self.v3, self.rng = billing, v3, rng
        self.clock = datetime(2026, 10, 1)
        self.relevant_pairs: list[tuple[int, int]] = []  # (customer, service) kept by the billing filters

    def now(self) -> datetime:
        self.clock += timedelta(seconds=self.rng.randrange(1, 3600), microseconds=self.rng.randrange(10**6))
        return self.clock

    def build(self, rows: int) -> None:
        with self.v3.begin() as conn:
            for dealer in DEALERS:
                conn.exec_driver_sql("INSERT INTO dealer VALUES (%s, %s, %s)",
                                     (dealer, f"Dealer {dealer}", PARTNERS[dealer % len(PARTNERS)]))
        with self.billing.begin() as conn:
            for customer in CUSTOMERS:
                for service in SERVICES:
                    status = self.rng.choice([3, 3, 10, 5])
                    conn.exec_driver_sql(
                        "INSERT INTO v4_wh_service_data (service_data_FK_customer_id, service_data_FK_service_id,"
                        " service_data_FK_service_status_id, service_data_csa_category_id, service_data_system_id,"
                        " service_data_service_name) VALUES (%s, %s, %s, 1, 3, %s)",
                        (customer, service, status, f"Service {service}"),
                    )
                    if status != 5:  # 5 is outside the billing filters
                        self.relevant_pairs.append((customer, service))
            conn.exec_driver_sql(
                "INSERT INTO `usage` (usage_FK_customer_id, usage_FK_service_id, usage_FK_dealer_id, usage_date,"
                " usage_quantity, usage_amount, usage_modified) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                [self.usage_row() for _ in range(rows)],
            )

    def usage_row(self) -> tuple:
        return (self.rng.choice(CUSTOMERS), self.rng.choice(SERVICES), self.rng.choice(DEALERS),
                date(2026, self.rng.choice([8, 9, 10]), self.rng.randrange(1, 29)), Decimal(self.rng.randrange(1, 50)),
                Decimal(self.rng.randrange(-1000, 10000)) / 100, self.now())

    def change(self, with_relevant_insert: bool = False) -> list[str]:
        """One to four changes: inserts, updates, deletes of a dealer's newest row, dealer moves; with
        `with_relevant_insert` the first is an insert that the billing filters keep (bronze must run)."""
        done = []
        for number in range(self.rng.randrange(1, 5)):
            kind = "relevant-insert" if with_relevant_insert and number == 0 else self.rng.choice(
                ["insert", "update", "delete-newest", "move"])
            dealer = self.rng.choice(DEALERS)
            with self.billing.begin() as conn:
                if kind in ("insert", "relevant-insert"):
                    row = self.usage_row()
                    if kind == "relevant-insert":
                        row = (*self.rng.choice(self.relevant_pairs), dealer, *row[3:])
                    conn.exec_driver_sql(
                        "INSERT INTO `usage` (usage_FK_customer_id, usage_FK_service_id, usage_FK_dealer_id, usage_date,"
                        " usage_quantity, usage_amount, usage_modified) VALUES (%s, %s, %s, %s, %s, %s, %s)", row)
                elif kind == "update":
                    conn.exec_driver_sql("UPDATE `usage` SET usage_amount = usage_amount + 1, usage_modified = %s"
                                         " WHERE usage_FK_dealer_id = %s ORDER BY usage_id LIMIT 1", (self.now(), dealer))
                elif kind == "delete-newest":
                    conn.exec_driver_sql("DELETE FROM `usage` WHERE usage_FK_dealer_id = %s"
                                         " ORDER BY usage_modified DESC LIMIT 1", (dealer,))
            if kind == "move":
                with self.v3.begin() as conn:
                    conn.exec_driver_sql("UPDATE dealer SET dealer_partner_uuid = %s WHERE dealer_id = %s",
                                         (self.rng.choice(PARTNERS), dealer))
            done.append(f"{kind} {dealer}")
        return done

    def relevant_usage_ids(self) -> list[int]:
        sql = """SELECT u.usage_id FROM `usage` u JOIN v4_wh_service_data sd
                   ON sd.service_data_FK_customer_id = u.usage_FK_customer_id
                  AND sd.service_data_FK_service_id = u.usage_FK_service_id
                  AND sd.service_data_system_id = 3 AND sd.service_data_FK_service_status_id IN (-3, 3, 10, 11)
                  AND sd.service_data_csa_category_id IN (1, 2, 3) ORDER BY u.usage_id"""
        with self.billing.connect() as conn:
            return [row[0] for row in conn.exec_driver_sql(sql)]

    def mapped_partners(self) -> set[str]:
        with self.v3.connect() as conn:
            return {row[0] for row in conn.exec_driver_sql(
                "SELECT DISTINCT dealer_partner_uuid FROM dealer WHERE dealer_partner_uuid IS NOT NULL")}


@dataclass
class RoundResult:
    seed: int
    kind: str
    changes: list[str]
    kill_after_seconds: float  # from the tick's creation
    killed_state: str  # the killed tick's state once the next tick completed (Completed: it ended before the kill)
    recovery_seconds: float  # from the kill until a tick completed with every partition current
    ticks_to_recover: int
    gold_equal_truth: bool = True
    problems: list[str] = field(default_factory=list)


def wait_for_a_completed_tick(stack: Stack, deadline: float) -> int:
    """Start ticks until one completes (those before it may be Cancelled or Skipped while the killed one's
    slots are still held); returns how many were started."""
    started = 0
    while True:
        started += 1
        run = stack.api.wait_final(stack.api.start_tick(), timeout=max(deadline - time.monotonic(), 1))
        if run["state_name"] == "Completed":
            return started
        assert time.monotonic() < deadline, f"no completed tick within {RECOVERY_TIMEOUT}s; last: {run['state_name']}"
        time.sleep(2)


def kill_during_tick(stack: Stack, mariadb: PrivateMariaDB, kind: str, delay: float) -> tuple[str, float]:
    """Start a tick, kill per `kind` `delay` seconds into it (mariadb: once its bronze runs), restart;
    returns the killed tick's id and the monotonic time of the kill."""
    tick = stack.api.start_tick()
    created = time.monotonic()
    if kind == "mariadb":
        deadline = created + 180
        while not stack.api.flow_runs(name={"like_": "bronze-"}, parent_flow_run_id={"any_": [tick]}):
            assert time.monotonic() < deadline, "the tick's bronze run never started"
            assert stack.api.flow_run(tick)["state_type"] not in FINAL_STATE_TYPES, "the tick ended without bronze"
            time.sleep(0.02)
        time.sleep(delay)
        killed_at = time.monotonic()
        mariadb.restart()
        return tick, killed_at
    time.sleep(max(0.0, created + delay - time.monotonic()))
    killed_at = time.monotonic()
    if kind == "serve":
        stack.kill_serve()
        stack.start_serve()
    elif kind == "child":
        stack.kill_flow_run_processes()
    elif kind == "server":
        stack.kill_server()
        stack.start_server()
    return tick, killed_at


def check_lake(stack: Stack, world: World, billing_admin: sa.Engine) -> list[str]:
    """Everything that must hold once a clean tick has completed; each problem as a sentence."""
    problems = []
    for partner in sorted(world.mapped_partners()):
        missing = [f for f in partition_files(partner) if not (stack.lake / f).exists()]
        if missing:
            problems.append(f"partner {partner}: missing {missing}")
            continue
    for partner in PARTNERS:
        report_file = stack.lake / "gold" / "usage_report" / f"partner={partner}" / "data.parquet"
        if not report_file.exists():
            continue
        got = [tuple(r.values()) for r in pl.read_parquet(report_file).select(
            "month", "dealer_id", "quantity", "amount", "services", "customers").iter_rows(named=True)]
        if got != usage_report_truth(billing_admin, partner):
            problems.append(f"partner {partner}: usage_report differs from the SQL truth")
        active_file = stack.lake / "gold" / "active_services" / f"partner={partner}" / "data.parquet"
        got = [tuple(r.values()) for r in pl.read_parquet(active_file).select(
            "dealer_id", "customer_id", "service_id", "first_usage_date", "last_usage_date", "amount"
        ).iter_rows(named=True)]
        if got != active_services_truth(billing_admin, partner):
            problems.append(f"partner {partner}: active_services differs from the SQL truth")
    bronze_ids = read_bronze(stack.lake)["usage_id"].to_list()
    if len(bronze_ids) != len(set(bronze_ids)):
        problems.append(f"bronze: {len(bronze_ids) - len(set(bronze_ids))} duplicated row(s)")
    truth = world.relevant_usage_ids()
    if sorted(set(bronze_ids)) != truth:
        lost, extra = set(truth) - set(bronze_ids), set(bronze_ids) - set(truth)
        problems.append(f"bronze: {len(lost)} lost and {len(extra)} extra row(s)")
    value = stack.api.cursor_value()
    if not isinstance(value, dict) or set(value) != {"global_last_modified", "dealer_last_modified"}:
        problems.append(f"cursor block: keys {sorted(value) if isinstance(value, dict) else type(value).__name__}")
    if open_runs := stack.api.open_pipeline_runs():
        problems.append(f"runs still open: {[(r['name'], r['state_name']) for r in open_runs]}")
    return problems


def temp_files(lake: Path) -> list[Path]:
    """A killed writer's temporary files, and a killed partition's staging directories."""
    staging = lake / STAGING_DIR
    return ([path for path in lake.rglob(".*.tmp") if TEMP_NAME.match(path.name)]
            + (list(staging.iterdir()) if staging.is_dir() else []))


def orphaned_bronze_files(lake: Path) -> list[Path]:
    """Data files under the bronze table that no commit ever added: what a killed writer left. (Files a
    later commit removed stay for time travel until the retention counted from that commit.)"""
    table = bronze_path(lake)
    used = {table / name for name in pl.DataFrame(DeltaTable(str(table)).get_add_actions(flatten=True))["path"]}
    for log in (table / "_delta_log").glob("*.json"):
        for line in log.read_text().splitlines():
            action = json.loads(line)
            if "remove" in action:
                used.add(table / unquote(action["remove"]["path"]))
    return [path for path in table.rglob("*.parquet") if "_delta_log" not in path.parts and path not in used]


def check_maintenance(stack: Stack) -> list[str]:
    """A tick after recovery rewrites nothing; it removes any temporary file a killed writer left once
    that is old, and bronze's maintenance (the vacuum the bronze run does every MAINTENANCE_EVERY commits)
    removes every data file no commit made once past the retention. The leftovers are aged here instead
    of waiting an hour, or the retention."""
    problems = []
    leftovers = temp_files(stack.lake) + orphaned_bronze_files(stack.lake)
    old = time.time() - max(STALE_TEMP_SECONDS, BRONZE_RETENTION_SECONDS) - 60
    for path in leftovers:
        os.utime(path, (old, old))
    before = file_ids(stack.lake)
    run = stack.api.wait_final(stack.api.start_tick(), timeout=240)
    if (run["state_name"], run["state"]["message"]) != ("Completed", "no changes"):
        problems.append(f"the tick after recovery: {run['state_name']} {run['state']['message']!r}")
    if file_ids(stack.lake) != before:
        problems.append("the tick after recovery rewrote lake files")
    if remaining := temp_files(stack.lake):
        problems.append(f"temporary files left after the tick: {remaining}")
    bronze.maintain(stack.lake, force=True)  # no tick is running: nothing else writes the table now
    if remaining := orphaned_bronze_files(stack.lake):
        problems.append(f"bronze files no commit made left after maintenance: {remaining}")
    return problems


def run_round(stack: Stack, world: World, mariadb: PrivateMariaDB, billing_admin: sa.Engine, kind: str, seed: int,
              tick_seconds: float) -> RoundResult:
    rng = random.Random(seed)
    world.rng = rng
    changes = world.change(with_relevant_insert=kind == "mariadb")
    delay = rng.uniform(0.0, 0.5) if kind == "mariadb" else rng.uniform(0.0, 0.8 * tick_seconds)
    killed, killed_at = kill_during_tick(stack, mariadb, kind, delay)
    billing_admin.dispose()  # after a database restart, connections of the pool are dead
    ticks = wait_for_a_completed_tick(stack, killed_at + RECOVERY_TIMEOUT)
    recovery = time.monotonic() - killed_at
    result = RoundResult(seed, kind, changes, round(delay, 2), stack.api.flow_run(killed)["state_name"],
                         round(recovery, 1), ticks)
    result.problems = check_lake(stack, world, billing_admin)
    result.gold_equal_truth = not any("SQL truth" in p or "missing" in p for p in result.problems)
    result.problems += check_maintenance(stack)
    return result


def warm_up(stack: Stack, world: World) -> float:
    """The first tick (bronze and every partition), then one with changes, on a healthy stack; returns the
    second one's wall time from its creation, the span that kill moments are drawn from."""
    for make_changes in (False, True):
        if make_changes:
            world.change()
        started = time.monotonic()
        run = stack.api.wait_final(stack.api.start_tick(), timeout=300)
        assert run["state_name"] == "Completed", (run["state_name"], run["state"]["message"])
    return time.monotonic() - started


def summary(results: list[RoundResult]) -> dict[str, dict[str, object]]:
    """Per kind: rounds, how many ended with gold equal to the truth, recovery median and worst."""
    table = {}
    for kind in sorted({r.kind for r in results}):
        of_kind = [r for r in results if r.kind == kind]
        recoveries = [r.recovery_seconds for r in of_kind]
        table[kind] = {"rounds": len(of_kind), "gold_equal_truth": sum(r.gold_equal_truth for r in of_kind),
                       "killed_tick_ended": dict(Counter(r.killed_state for r in of_kind)),
                       "recovery_median_s": statistics.median(recoveries), "recovery_worst_s": max(recoveries)}
    return table
