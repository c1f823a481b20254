"""Benchmark the pipeline's source access against the seed's, side by side, in one run.

    .venv/bin/python bench/load_data.py          # once: the 5 M-row set (skipped if loaded)
    .venv/bin/python bench/run.py                # (a) detection, (b) bronze extract, (c) end to end
    .venv/bin/python bench/run.py --rows 100000 --no-e2e
    .venv/bin/python bench/run.py --buffer-pool-mib 1024   # joins warm in memory; restored after the run

(a) detection source cost: the seed's join + GROUP BY dealer vs the pipeline's
    index probe + candidate queries (no change; one changed dealer; a tick's slice
    of the rolling reconciliation and the whole cycle's slices; the first tick,
    which queries every dealer).
(b) bronze extract: the relevant-usage join through pymysql (`pl.read_database`
    on a SQLAlchemy connection) and through connectorx, vs the bronze flow's
    `usage_pipeline.extract.extract_relevant_usage`, whole and for one dealer.
(c) end to end: real ticks through a local Prefect server and
    `usage-pipeline serve`, against the bench databases, with a temporary lake.

Warm numbers: every measurement runs once untimed, then `--reps` times; the
table shows the median (and min-max). The source is never written to.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import polars as pl  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from load_data import FULL_ROWS, BenchSet, buffer_pool, buffer_pool_mib, ensure_loaded  # noqa: E402

from usage_pipeline.cursor import Cursor  # noqa: E402
from usage_pipeline.detection import (  # noqa: E402
    PartitionOutcome,
    RunOutcome,
    SourceSnapshot,
    advance_cursor,
    plan_tick,
    probe_candidates,
)
from usage_pipeline.extract import BRONZE_FIELDS, extract_relevant_usage, read_frame  # noqa: E402
from usage_pipeline.queries import dealer_directory, probe_raw_max, relevant_stats  # noqa: E402
from usage_pipeline.reconciliation import TICK_SECONDS, plan_slice  # noqa: E402
from usage_pipeline.schema import relevant_usage, usage  # noqa: E402
from usage_pipeline.transforms import normalize_bronze  # noqa: E402

# The baseline bronze extract: the relevant-usage join as one query, columns as the source holds them.
BASELINE_EXTRACT = sa.select(*BRONZE_FIELDS).select_from(relevant_usage)

RECONCILE_SECONDS = 3600  # USAGE_RECONCILE_SECONDS' default

# The seed's detection query (usage-change-detection-sensor, "Query Filters"), verbatim
# apart from the schema prefix: we are connected to the bench billing database.
SEED_DETECTION_SQL = """
SELECT usage_model.usage_FK_dealer_id, MAX(usage_model.usage_modified)
FROM `usage` AS usage_model
LEFT OUTER JOIN v4_wh_service_data AS usageServiceData
    ON usageServiceData.service_data_FK_customer_id = usage_model.usage_FK_customer_id
        AND usageServiceData.service_data_FK_service_id = usage_model.usage_FK_service_id
        AND usageServiceData.service_data_FK_service_status_id IN (-3, 3, 10, 11)
        AND usageServiceData.service_data_csa_category_id IN (1, 2, 3)
WHERE usageServiceData.service_data_system_id = 3
GROUP BY usage_model.usage_FK_dealer_id
"""


@dataclass
class Timing:
    median: float
    low: float
    high: float
    reps: int
    result: Any = None

    def ms(self) -> str:
        return f"{self.median * 1000:,.1f}" + (f" ({self.low * 1000:,.1f}–{self.high * 1000:,.1f})" if self.reps > 1 else "")

    def s(self) -> str:
        return f"{self.median:,.2f}" + (f" ({self.low:,.2f}–{self.high:,.2f})" if self.reps > 1 else "")


def measure(fn: Callable[[], Any], reps: int, warmup: int = 1) -> Timing:
    for _ in range(warmup):
        fn()
    times, result = [], None
    for _ in range(reps):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return Timing(statistics.median(times), min(times), max(times), reps, result)


def ratio(baseline: float, candidate: float) -> str:
    return f"{baseline / candidate:,.1f}x" if candidate > 0 else "-"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def say(text: str = "") -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------- environment


def environment(bench: BenchSet, engine: sa.Engine) -> str:
    with engine.connect() as conn:
        version = conn.exec_driver_sql("SELECT VERSION()").scalar_one()
        pool = buffer_pool_mib(conn)
        sizes = dict(
            conn.exec_driver_sql(
                "SELECT table_name, ROUND((data_length + index_length) / 1048576) FROM information_schema.tables"
                " WHERE table_schema = DATABASE()"
            ).all()
        )
        relevant = conn.exec_driver_sql(
            "SELECT COUNT(*) FROM `usage` u JOIN v4_wh_service_data sd"
            " ON sd.service_data_FK_customer_id = u.usage_FK_customer_id"
            " AND sd.service_data_FK_service_id = u.usage_FK_service_id"
            " AND sd.service_data_system_id = 3 AND sd.service_data_FK_service_status_id IN (-3, 3, 10, 11)"
            " AND sd.service_data_csa_category_id IN (1, 2, 3)"
        ).scalar_one()
    cpu = os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"Data set: `{bench.billing_db}` / `{bench.v3_db}`: {bench.rows:,} usage rows ({relevant:,} relevant), "
        f"{bench.service_rows:,} service-data rows, {bench.dealers:,} dealers; "
        f"usage {sizes.get('usage', '?')} MiB, v4_wh_service_data {sizes.get('v4_wh_service_data', '?')} MiB on disk.\n"
        f"Machine: {cpu} CPU(s), Python {platform.python_version()}, MariaDB {version} "
        f"(innodb_buffer_pool_size {pool} MiB), polars {pl.__version__}; load average at start {load}."
    )


# --------------------------------------------------------------------------- (a) detection


CYCLE_START = datetime(2026, 11, 1, 12, 0)  # the last tick's, and the reconciliation cycle's start


def current_cursor(conn: sa.Connection, partners: dict[int, str | None]) -> tuple[Cursor, dict[int, Any]]:
    """The cursor the pipeline would hold right after a successful tick on this data, built by
    the pipeline's own functions (first-run plan, every partition succeeded)."""
    raw_max = probe_raw_max(conn)
    stats = relevant_stats(conn, None)
    known = frozenset(raw_max) | frozenset(stats)
    snapshot = SourceSnapshot(raw_max, known, stats, partners)
    plan = plan_tick(Cursor(), snapshot)
    ok = RunOutcome("bench", "Completed", True)
    outcomes = {p: PartitionOutcome(p, ok, ok) for p in plan.partitions}
    cursor = advance_cursor(Cursor(), snapshot, plan, ok, outcomes, CYCLE_START)
    return cursor, stats


def with_changed_dealer(cursor: Cursor, dealer: int) -> Cursor:
    """The cursor as it is when `dealer` got a newer usage_modified since the last tick."""
    seen = dict(cursor.dealer_seen or {})
    old = seen[dealer]
    seen[dealer] = type(old)(datetime(2000, 1, 1), old.relevant, old.last_modified, old.partner)
    return cursor.with_changes(dealer_seen=seen)


def project_detection(conn: sa.Connection, cursor: Cursor, into_cycle: float = 0.0) -> tuple[set[int] | None, dict]:
    """What take_snapshot() asks the billing database, in the same order, and then a usage-reconciliation
    run `into_cycle` seconds into its cycle (0: its slice is empty) with USAGE_RECONCILE_SECONDS at its
    default (the two asked one after the other, as ticks did before the reconciliation ran on its own)."""
    raw_max = probe_raw_max(conn)
    candidates = probe_candidates(cursor, raw_max)
    if candidates is None:
        return None, relevant_stats(conn, None)
    known = set(raw_max) | set(cursor.dealer_last_modified)
    rolling = plan_slice(known, CYCLE_START, None, CYCLE_START + timedelta(seconds=into_cycle), RECONCILE_SECONDS)
    return candidates | rolling.dealers, relevant_stats(conn, candidates | rolling.dealers)


def cycle_slices(conn: sa.Connection, cursor: Cursor) -> list[frozenset[int]]:
    """The rolling reconciliation's slices over one cycle of 5-minute runs, as the runs plan them."""
    known = set(probe_raw_max(conn)) | set(cursor.dealer_last_modified)
    slices, position, tick = [], None, 0
    while True:
        tick += 1
        now = CYCLE_START + timedelta(seconds=tick * TICK_SECONDS)
        rolling = plan_slice(known, CYCLE_START, position, now, RECONCILE_SECONDS)
        slices.append(rolling.dealers)
        position = rolling.next_dealer
        if rolling.completes:
            return slices


def explain_extra(conn: sa.Connection, sql: str) -> str:
    rows = conn.exec_driver_sql("EXPLAIN " + sql).mappings().all()
    return "; ".join(f"{r['table']}: {r['type']}/{r['key'] or '-'} {r['Extra'] or ''}".strip() for r in rows)


def bench_detection(engine: sa.Engine, v3: sa.Engine, reps: int) -> tuple[str, int]:
    with v3.connect() as conn:
        partners, _ = dealer_directory(conn)
    with engine.connect() as conn:
        cursor, stats = current_cursor(conn, partners)
        # A typical mapped dealer: the one with the median number of relevant rows.
        by_rows = sorted((int(s.fingerprint.split(":")[0]), d) for d, s in stats.items() if partners.get(d))
        rows_of_dealer, dealer = by_rows[len(by_rows) // 2]
        changed = with_changed_dealer(cursor, dealer)

        seed = measure(lambda: dict(conn.exec_driver_sql(SEED_DETECTION_SQL).all()), reps)
        no_change = measure(lambda: project_detection(conn, cursor), reps)
        one = measure(lambda: project_detection(conn, changed), reps)
        probe_only = measure(lambda: probe_raw_max(conn), reps)
        one_slice = measure(lambda: project_detection(conn, cursor, into_cycle=TICK_SECONDS), reps)
        slices = cycle_slices(conn, cursor)
        cycle = measure(lambda: [relevant_stats(conn, dealers) for dealers in slices], 1)
        first = measure(lambda: project_detection(conn, Cursor()), reps)
        seed_plan = explain_extra(conn, SEED_DETECTION_SQL)
        probe_plan = explain_extra(
            conn, str(sa.select(sa.text("usage_FK_dealer_id, MAX(usage_modified)")).select_from(sa.text("`usage`"))
                      .group_by(sa.text("usage_FK_dealer_id")))
        )
    with v3.connect() as conn:
        directory = measure(lambda: dealer_directory(conn), reps)

    # The pipeline must see what the seed sees, and nothing must look changed when nothing changed.
    seed_max = seed.result
    assert no_change.result == (set(), {}), f"no-change tick queried {no_change.result[0]}"
    assert one.result[0] == {dealer} and set(one.result[1]) == {dealer}, one.result[0]
    assert {d: s.last_modified for d, s in first.result[1].items()} == seed_max, "pipeline MAX != seed MAX"
    assert one_slice.result[0] == slices[0], "a tick's slice is the cycle's first"
    assert {d: s for part in cycle.result for d, s in part.items()} == first.result[1], "slices != full join"
    assert one.result[1][dealer] == stats[dealer]

    base = seed.median
    rows = [
        ["seed: join + GROUP BY dealer under the billing filters (every tick)", seed.ms(), "1.0x (baseline)",
         f"{len(seed_max):,} dealers"],
        ["pipeline, no change: `probe_raw_max` + `probe_candidates` + `relevant_stats`(0 dealers)", no_change.ms(),
         ratio(base, no_change.median), "0 dealers queried"],
        [f"pipeline, 1 dealer changed: probe + `relevant_stats`(dealer {dealer})", one.ms(), ratio(base, one.median),
         f"1 dealer, {rows_of_dealer:,} relevant rows"],
        ["  of which `probe_raw_max` alone", probe_only.ms(), ratio(base, probe_only.median),
         f"{len(probe_only.result):,} dealers"],
        [f"pipeline, a tick's reconciliation slice: probe + `relevant_stats`({len(slices[0]):,} dealers)",
         one_slice.ms(), ratio(base, one_slice.median), f"{len(slices[0]):,} of {len(first.result[1]):,} dealers"
         " + fingerprint"],
        [f"  the whole cycle: {len(slices)} ticks' slices, summed (once per USAGE_RECONCILE_SECONDS)", cycle.ms(),
         ratio(base, cycle.median), "every dealer + fingerprint, once"],
        ["pipeline, first tick (empty cursor): probe + `relevant_stats`(all)", first.ms(), ratio(base, first.median),
         "all dealers + fingerprint"],
        ["both, every tick: v3 `dealer_directory`", directory.ms(), "-", f"{len(directory.result[0]):,} dealers"],
    ]
    text = "\n".join([
        f"### (a) Detection: source query cost per tick (warm, median of {reps}, ms; min–max)",
        "",
        table(["what", "ms", "speed-up vs seed", "scope"], rows),
        "",
        f"Checks passed: the pipeline's relevant MAX per dealer equals the seed query's for all {len(seed_max):,} "
        "dealers; the no-change probe selects no candidate; the one-changed-dealer probe selects exactly that dealer.",
        "",
        f"EXPLAIN seed: `{seed_plan}`  ",
        f"EXPLAIN probe: `{probe_plan}`",
    ])
    return text, dealer


# --------------------------------------------------------------------------- (b) bronze


def read_pymysql(engine: sa.Engine, stmt: sa.Select) -> pl.DataFrame:
    with engine.connect() as conn:
        return pl.read_database(stmt, conn, infer_schema_length=None)


def bench_bronze(engine: sa.Engine, bench: BenchSet, dealer: int, reps: int, slice_reps: int) -> str:
    uri = bench.connectorx_uri()
    rows = []
    for label, stmt, n in (
        ("full relevant extract", BASELINE_EXTRACT, reps),
        (f"one dealer ({dealer})", BASELINE_EXTRACT.where(usage.c.usage_FK_dealer_id == dealer), slice_reps),
    ):
        baseline = measure(lambda stmt=stmt: read_pymysql(engine, stmt), n)
        project = measure(lambda stmt=stmt: read_frame(engine, stmt, uri), n)
        a, b = baseline.result, project.result
        assert a.height == b.height and a["usage_id"].sum() == b["usage_id"].sum(), "extracts differ"
        dealers = None if "full" in label else [dealer]
        pipeline = measure(lambda dealers=dealers: extract_relevant_usage(engine, uri, dealers), n)
        assert pipeline.result.equals(normalize_bronze(b)), "extract_relevant_usage differs from the baseline's rows"
        timings = [
            ("pymysql `pl.read_database` (baseline)", baseline),
            ("connectorx `read_frame`, same query", project),
            ("pipeline `extract_relevant_usage`", pipeline),
        ]
        for name, t in timings:
            rows.append([
                label, name, f"{t.result.height:,}", t.s(), f"{t.result.height / t.median:,.0f}",
                "1.0x" if t is baseline else ratio(baseline.median, t.median),
            ])
        dtypes = ", ".join(f"{c}:{d}" for c, d in b.schema.items())
    return "\n".join([
        f"### (b) Bronze extract (warm, median of {reps} for the full extract, {slice_reps} for one dealer; seconds)",
        "",
        table(["extract", "path", "rows", "seconds", "rows/s", "speed-up"], rows),
        "",
        f"All three return the same rows (the pipeline's frame equals the baseline query's cast to the bronze schema). connectorx dtypes of the baseline query: {dtypes}.",
    ])


# --------------------------------------------------------------------------- (c) end to end


def bench_e2e(bench: BenchSet, dealer: int, reps: int, keep: bool) -> str:
    work = Path(tempfile.mkdtemp(prefix="usage-bench-"))
    lake = work / "lake"
    lake.mkdir()
    env_source = {}
    for prefix, database in (("BILLING_CDRS_DB", bench.billing_db), ("V3_DB", bench.v3_db)):
        env_source.update({f"{prefix}_HOST": "127.0.0.1", f"{prefix}_PORT": "3306", f"{prefix}_USER": "root",
                           f"{prefix}_PASSWORD": "", f"{prefix}_DATABASE": database})
    # Before Prefect is first imported: this process's client state in the temp dir, and
    # only warnings on the console (the flows' INFO logs still go to the API and serve.log).
    os.environ.setdefault("PREFECT_HOME", str(work / "client-home"))
    os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"
    from orchestration import local_prefect

    server, url = local_prefect.start_server(work / "prefect-home", work / "server.log")
    processes = [server]
    try:
        os.environ.update(PREFECT_API_URL=url, USAGE_LAKE_ROOT=str(lake))
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: url}):
            env = dict(os.environ, **env_source)
            env.pop("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL")
            done = subprocess.run([sys.executable, "-m", "orchestration.cli", "setup"], env=env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"usage-pipeline setup failed: {done.stderr}")
            serve_log = work / "serve.log"
            processes.append(local_prefect.start_serve(serve_log, env=env))
            return run_ticks(dealer, reps, serve_log, lake)
    finally:
        try:
            from prefect.logging.handlers import APILogHandler

            APILogHandler().flush()  # flush() is an instance method: send our logs before the server stops
        except Exception as exc:  # never leave the server and serve processes behind
            say(f"(could not flush logs: {exc})")
        for process in reversed(processes):
            local_prefect.stop(process)
        if keep:
            say(f"(kept {work}: server.log, serve.log, lake/)")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run_ticks(dealer: int, reps: int, serve_log: Path, lake: Path) -> str:
    from blocks.usage_cursor import CURSOR_DOCUMENT, UsageCursor
    from flows.usage_change_detection import usage_change_detection
    from orchestration.runtime import read_cursor_value
    from orchestration.tick import report_of

    def tick() -> tuple[float, Any]:
        started = time.perf_counter()
        state = usage_change_detection(return_state=True)
        elapsed = time.perf_counter() - started
        report = report_of(state)
        if report is None:
            raise RuntimeError(f"tick {state.name}: {state.message}")
        return elapsed, report

    def bronze_seconds() -> str:
        text = serve_log.read_text(errors="replace")
        found = re.findall(r"Bronze .+? refresh: extracted (\d+) row\(s\) in ([\d.]+)s", text)  # older log format
        found += re.findall(r"Extracted (\d+) relevant usage row\(s\) in ([\d.]+)s", text)
        return f"{found[-1][1]} s for {int(found[-1][0]):,} rows" if found else "?"

    def summary(report: Any) -> str:
        plan = report.plan
        good = sum(o.ok for o in report.partitions.values())
        text = (f"{len(plan.dealer_changes):,} dealer(s) -> {len(plan.partitions)} partition(s), {good} ok"
                + (f"; bronze {report.bronze.state}" if report.bronze else "; no child runs"))
        failed = [f"{p[:8]}: {o.error}" for p, o in report.partitions.items() if not o.ok]
        if failed:
            failures.extend(failed)
            text += f" (**{len(failed)} failed**, see below)"
        return text

    failures: list[str] = []

    rows = []
    elapsed, report = tick()
    assert len(report.plan.partitions) == 20, summary(report)
    rows.append(["first tick (no cursor): full bronze + 20 partitions", f"{elapsed:,.1f}", "1", summary(report),
                 bronze_seconds()])
    if not report.ok:  # the contract retries failed partitions on the next tick: measure that too
        elapsed, report = tick()
        rows.append(["retry tick after a failed partition", f"{elapsed:,.1f}", "1", summary(report), bronze_seconds()])

    def one_dealer_tick() -> tuple[float, Any]:
        value = read_cursor_value()
        value["dealer_last_modified"][str(dealer)] = "2000-01-01T00:00:00.000000Z"  # operator edit = changed dealer
        UsageCursor(value=value).save(CURSOR_DOCUMENT, overwrite=True)
        return tick()

    one = [one_dealer_tick() for _ in range(reps)]
    report = one[-1][1]
    assert len(report.plan.dealer_changes) == 1 and len(report.plan.partitions) == 1, summary(report)
    times = [t for t, _ in one]
    rows.append([f"one changed dealer ({dealer}): bronze slice + 1 partition", f"{statistics.median(times):,.1f}",
                 str(reps), summary(report), bronze_seconds()])

    quiet = [tick() for _ in range(reps)]
    report = quiet[-1][1]
    assert report.plan.is_empty, summary(report)
    rows.append(["no change", f"{statistics.median([t for t, _ in quiet]):,.1f}", str(reps), summary(report), "-"])

    os.environ["USAGE_RECONCILE_SECONDS"] = "1"  # 600 s or less: every dealer every tick
    try:
        elapsed, report = tick()
    finally:
        os.environ.pop("USAGE_RECONCILE_SECONDS")
    assert report.plan.is_empty, summary(report)
    rows.append(["no change, every dealer reconciled at once (USAGE_RECONCILE_SECONDS=1)", f"{elapsed:,.1f}", "1", summary(report), "-"])

    files = sorted(lake.rglob("*.parquet"))
    size = sum(f.stat().st_size for f in files) / 1048576
    return "\n".join([
        "### (c) End to end: real ticks (local Prefect server + `usage-pipeline serve`, "
        f"USAGE_MAX_CONCURRENT_PARTITIONS={os.environ.get('USAGE_MAX_CONCURRENT_PARTITIONS', '8')}; seconds, wall clock)",
        "",
        table(["tick", "seconds", "runs", "what it did", "bronze extract (from the bronze flow's log)"], rows),
        "",
        f"Lake after the ticks: {len(files)} Parquet files, {size:,.0f} MiB. The one-dealer tick is triggered by "
        "editing that dealer's cursor entry (CONTRACT.md section 4), so the source is not written to.",
        *([""] + [f"- failed partition {f}" for f in failures] if failures else []),
    ])


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=FULL_ROWS, help=f"which data set (usage rows; default {FULL_ROWS:,})")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions for detection queries (default 5)")
    parser.add_argument("--bronze-reps", type=int, default=3, help="timed repetitions of the full extract (default 3)")
    parser.add_argument("--e2e-reps", type=int, default=3, help="one-dealer and no-change ticks (default 3)")
    parser.add_argument("--no-e2e", action="store_true", help="skip (c), the end-to-end ticks")
    parser.add_argument("--keep", action="store_true", help="keep the e2e temp dir (logs, lake)")
    parser.add_argument(
        "--buffer-pool-mib", type=int, default=0,
        help="raise MariaDB's innodb_buffer_pool_size to this many MiB for the run (SET GLOBAL, restored at the end;"
             " needs SUPER). 0 (default) leaves the server as it is",
    )
    args = parser.parse_args(argv)
    os.chdir(ROOT)

    bench = ensure_loaded(BenchSet(args.rows))
    with buffer_pool(args.buffer_pool_mib, say):
        return run(args, bench)


def code_state() -> str:
    """Commit and a hash of the project's code, to tell whether it changed while the benchmark ran."""
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("flows/*.py"), *ROOT.glob("blocks/*.py")]):
        digest.update(path.name.encode() + path.read_bytes())
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return f"commit {head or '?'}, flows+blocks sha256 {digest.hexdigest()[:12]}"


def run(args: argparse.Namespace, bench: BenchSet) -> int:
    code = code_state()
    engine = sa.create_engine(bench.billing_url(), connect_args={"connect_timeout": 10, "read_timeout": 600})
    v3 = sa.create_engine(bench.v3_url())
    started = time.perf_counter()
    sections = [f"## usage-pipeline benchmark, {datetime.now():%Y-%m-%d %H:%M}", "", environment(bench, engine)]
    say("Running (a) detection ...")
    text, dealer = bench_detection(engine, v3, args.reps)
    sections += ["", text]
    say("Running (b) bronze extract ...")
    sections += ["", bench_bronze(engine, bench, dealer, args.bronze_reps, args.reps)]
    engine.dispose()
    v3.dispose()
    if not args.no_e2e:
        say("Running (c) end to end ...")
        sections += ["", bench_e2e(bench, dealer, args.e2e_reps, args.keep)]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    code_after = code_state()
    sections[3:3] = [f"Project code: {code}" + ("" if code_after == code else
                     f" -- **changed during the run** (now {code_after}): the numbers mix two versions")]
    sections += ["", f"Benchmark wall time: {time.perf_counter() - started:,.0f} s; load average at the end {load}."]
    say()
    say("\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
