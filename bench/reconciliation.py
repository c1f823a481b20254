"""The source's cost of the rolling reconciliation and of the start-over totals check, as asked before
and since their access path changed (issue 18), on each data set, in one run:

    .venv/bin/python bench/reconciliation.py --scale 1 10 --reps 3 --buffer-pool-mib 8192

A tick's slice is the cycle's first one of 5-minute ticks, as `plan_slice` plans it (a tenth of the
dealers). "Before" is the plain relevant-usage join with IN lists of 500 dealers and the server's own
settings; "now" is `queries.relevant_stats` (ranges for consecutive ids, rows summed per customer and
service before the service-data join, MariaDB settings for the statement). The start-over totals
"before" are one join of all relevant usage under those settings (`queries.execute_join`), which
sums their money; "now" is `extract.source_totals`: a scan of `usage` without the join, and the
relevant rows counted from the (customer, service) index. Each pair's answers are asserted equal
(for the totals: the relevant rows they count) before anything is printed. Medians of `--reps`
after one untimed run; the totals once each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import sqlalchemy as sa  # noqa: E402
from load_data import BenchSet, buffer_pool, ensure_loaded  # noqa: E402
from run import cycle_slices, measure, table  # noqa: E402

from usage_pipeline.cursor import Cursor  # noqa: E402
from usage_pipeline.detection import DealerStats, fingerprint  # noqa: E402
from usage_pipeline.extract import source_totals  # noqa: E402
from usage_pipeline.queries import (  # noqa: E402
    as_datetime,
    dealer_batches,
    execute_join,
    relevant_stats,
    relevant_stats_statement,
)
from usage_pipeline.schema import relevant_usage, usage  # noqa: E402


def stats_before(conn: sa.Connection, dealers: frozenset[int]) -> dict[int, DealerStats]:
    """How `relevant_stats` asked for some dealers before: the plain join, IN lists, no settings."""
    stats = {}
    for batch in dealer_batches(dealers):
        for dealer_id, last_modified, *sums in conn.execute(relevant_stats_statement(None).where(
                usage.c.usage_FK_dealer_id.in_(batch))):
            stats[int(dealer_id)] = DealerStats(as_datetime(last_modified), fingerprint(*sums))
    return stats


def bench_scale(scale: int, reps: int) -> list[list[str]]:
    bench = ensure_loaded(BenchSet.scaled(scale))
    engine = sa.create_engine(bench.billing_url(), connect_args={"read_timeout": 3600})
    with engine.connect() as conn:
        stats = relevant_stats(conn, None)
        cursor = Cursor(dealer_last_modified={d: s.last_modified for d, s in stats.items()})
        dealers = cycle_slices(conn, cursor)[0]
        before = measure(lambda: stats_before(conn, dealers), reps)
        now = measure(lambda: relevant_stats(conn, dealers), reps)
        assert before.result == now.result == {d: stats[d] for d in dealers if d in stats}, "slice answers differ"
        joined = sa.select(sa.func.count(), sa.func.sum(usage.c.usage_quantity), sa.func.sum(usage.c.usage_amount)) \
            .select_from(relevant_usage)
        totals_before = measure(lambda: execute_join(conn, joined).one(), 1, warmup=0)
        totals_now = measure(lambda: source_totals(conn), 1, warmup=0)
        assert totals_before.result[0] == totals_now.result.relevant_rows, "totals differ"
    engine.dispose()
    rows = sum(int(stats[d].fingerprint.split(":")[0]) for d in dealers if d in stats)
    return [
        [f"K = {scale}: a tick's slice, {len(dealers):,} of {len(stats):,} dealers ({rows:,} relevant rows)",
         before.s(), now.s(), f"{before.median / now.median:.2f}x"],
        [f"K = {scale}: start-over totals ({totals_now.result.relevant_rows:,} relevant of"
         f" {totals_now.result.usage.rows:,} usage rows)", totals_before.s(), totals_now.s(),
         f"{totals_before.median / totals_now.median:.2f}x"],
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, nargs="+", default=[1], help="data sets, as bench/load_data.py --scale")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of each slice query (default 3)")
    parser.add_argument("--buffer-pool-mib", type=int, default=None,
                        help="raise MariaDB's innodb_buffer_pool_size for the run (restored at the end)")
    args = parser.parse_args(argv)
    with buffer_pool(args.buffer_pool_mib):
        rows = [row for scale in args.scale for row in bench_scale(scale, args.reps)]
    print(table(["source query", "before, s", "now, s", "before / now"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
