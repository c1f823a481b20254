"""The first tick's own work, without Prefect, on the K× bench source, for a before/after pair.

A start-over tick runs, in this order: the full refresh (`materialize.refresh_bronze` streaming
`extract.stream_relevant_usage`) with the start-over totals queries (`extract.source_totals`)
alongside it, then the totals check, then every partner's silver (staged), then every partner's
gold, USAGE_MAX_CONCURRENT_PARTITIONS at a time (8). This script does the same in one process per
`--code` checkout (its `usage_pipeline`), the checkouts taking turns `--rounds` times (in the
given order, then the reverse, and so on), so that a pair shares the machine's moment. It prints
each phase's wall time, the process's CPU time and MariaDB's (from /proc); the lake is temporary:

    git worktree add /tmp/before <commit>
    .venv/bin/python bench/first_tick_work.py --scale 10 --code /tmp/before . --rounds 4 --buffer-pool-mib 8192

What it leaves out is Prefect's share, which `bench/e2e_cli.py`'s partitions floor measures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from load_data import BenchSet, buffer_pool, ensure_loaded  # noqa: E402

CHILD = """
import json, os, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import sqlalchemy as sa
import usage_pipeline
from usage_pipeline.checks import ExtractRead, totals_check
from usage_pipeline.extract import source_totals, stream_relevant_usage
from usage_pipeline.materialize import build_gold, build_silver, committed_totals, refresh_bronze
from usage_pipeline.partners import dealers_of
from usage_pipeline.queries import dealer_directory

assert Path(usage_pipeline.__file__).resolve().parent == Path.cwd().resolve() / "usage_pipeline", usage_pipeline.__file__
billing_url, v3_url, connectorx_uri, source_pid, workers = sys.argv[1:4] + [int(a) for a in sys.argv[4:6]]
billing, v3 = sa.create_engine(billing_url), sa.create_engine(v3_url)
with v3.connect() as conn:
    directory, _ = dealer_directory(conn)
partners = sorted({p for p in directory.values() if p})

def source_cpu():
    fields = Path(f"/proc/{source_pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

def phase(name, work):
    wall, cpu, source = time.perf_counter(), time.process_time(), source_cpu()
    result = work()
    phases[name] = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
                    "source_cpu": source_cpu() - source}
    return result

def each_partner(build):
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(partners, pool.map(build, partners)))

phases = {}
with tempfile.TemporaryDirectory(prefix="bench-first-tick-") as lake:
    root = Path(lake)

    def extract():
        read = ExtractRead()
        with ThreadPoolExecutor(max_workers=1) as pool, billing.connect() as conn:
            totals = pool.submit(source_totals, conn)
            written = refresh_bronze(root, lambda _: stream_relevant_usage(billing, connectorx_uri, read=read),
                                     None, read=read)
            assert totals_check(totals.result(), committed_totals(root, written.version)).passed
        return written

    written = phase("extract beside the totals queries, then the check", extract)
    silvers = phase("silvers", lambda: each_partner(
        lambda p: build_silver(root, p, dealers_of(directory, p), written.version, publish=False)))
    phase("golds", lambda: each_partner(lambda p: build_gold(root, p, silvers[p].publish_id)))
print(json.dumps(phases))
"""


def source_pid(bench: BenchSet) -> int:
    """The bench source's server process (by its own pid file: tests may run MariaDB servers of their
    own), whose CPU time is the source's share of each phase."""
    engine = sa.create_engine(bench.billing_url())
    with engine.connect() as conn:
        pid_file = conn.exec_driver_sql("SELECT @@pid_file").scalar_one()
    engine.dispose()
    return int(Path(pid_file).read_text().split()[0])


def run(code: Path, bench: BenchSet, workers: int) -> dict:
    """The child imports only `code`'s usage_pipeline (load_data would put this checkout's first)."""
    child = subprocess.run(
        [sys.executable, "-c", CHILD, bench.billing_url(), bench.v3_url(), bench.connectorx_uri(), str(source_pid(bench)),
         str(workers)],
        cwd=code, env=dict(os.environ, PYTHONPATH=str(code)), capture_output=True, text=True)
    if child.returncode:
        raise SystemExit(f"the first tick's work in {code} failed:\n{child.stderr}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=10, help="bench set, as bench/load_data.py --scale (default 10)")
    parser.add_argument("--code", type=Path, nargs="+", default=[BENCH.parent],
                        help="checkouts whose usage_pipeline runs, in turn (default: this one)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workers", type=int, default=8, help="partitions at a time (USAGE_MAX_CONCURRENT_PARTITIONS)")
    parser.add_argument("--buffer-pool-mib", type=int, default=0, help="as bench/run.py (0: leave it alone)")
    args = parser.parse_args()
    bench = ensure_loaded(BenchSet.scaled(args.scale))
    print(f"`{' '.join([Path(sys.executable).name, *sys.argv])}`\n")
    print("| code | round | phase | wall | CPU, this process | CPU, MariaDB |\n| --- | --- | --- | ---: | ---: | ---: |")
    totals: dict[Path, list[float]] = {code: [] for code in args.code}
    with buffer_pool(args.buffer_pool_mib):
        for round_ in range(1, args.rounds + 1):
            for code in args.code if round_ % 2 else reversed(args.code):  # who goes first alternates
                phases = run(code, bench, args.workers)
                for name, p in phases.items():
                    print(f"| {code} | {round_} | {name} | {p['wall']:.1f} s | {p['cpu']:.1f} s | {p['source_cpu']:.1f} s |",
                          flush=True)
                totals[code].append(sum(p["wall"] for p in phases.values()))
    print("\n| code | all three phases, wall (median of rounds) | rounds |\n| --- | ---: | --- |")
    for code, walls in totals.items():
        print(f"| {code} | {statistics.median(walls):.1f} s | {', '.join(f'{w:.1f}' for w in walls)} |")


if __name__ == "__main__":
    main()
