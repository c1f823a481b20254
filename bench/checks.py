"""What the publish checks cost, per partition, against the partition's build: the bench set, no Prefect.

    .venv/bin/python bench/checks.py --buffer-pool-mib 1024   # the 5 M-row set (loaded first if needed)
    .venv/bin/python bench/checks.py --rows 100000 --reps 3

Bronze is extracted once into a temporary lake. Then, for every partner, in one run:
- build: `build_silver` (staged, with the source reconciliation against the source's own
  fingerprints, as an incremental tick runs it) + `build_gold` (which publishes all four), the
  partition's whole lake work with its checks;
- checks: the same checks alone, on the frames that build made (`checks.silver_checks`,
  `checks.gold_checks`, `reconcile_with_source`);
- the start-over totals check's two source queries, alone and alongside the full extract they check
  (as a start-over tick runs them; that timing includes the check, with its scan of the table).
Medians of `--reps` after one untimed run. The ratio is checks / (build - checks).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import polars as pl  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from load_data import FULL_ROWS, BenchSet, buffer_pool, ensure_loaded  # noqa: E402

from usage_pipeline import bronze, checks  # noqa: E402
from usage_pipeline.checks import ExtractRead, totals_check  # noqa: E402
from usage_pipeline.extract import source_totals, stream_relevant_usage  # noqa: E402
from usage_pipeline.materialize import (  # noqa: E402
    SourceFingerprints,
    build_gold,
    build_silver,
    committed_totals,
    reconcile_with_source,
    refresh_bronze,
)
from usage_pipeline.queries import dealer_directory, relevant_stats  # noqa: E402
from usage_pipeline.transforms import (  # noqa: E402
    active_services,
    billing_monthly_usage_by_service,
    billing_usage_aggregated,
    usage_report,
)


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=FULL_ROWS, help=f"usage rows of the bench set (default {FULL_ROWS:,})")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--buffer-pool-mib", type=int, default=0,
                        help="MariaDB's innodb_buffer_pool_size for the run, as bench/run.py (0: leave it alone)")
    args = parser.parse_args(argv)
    with buffer_pool(args.buffer_pool_mib):
        return measure_checks(args)


def measure_checks(args: argparse.Namespace) -> int:
    bench = ensure_loaded(BenchSet(args.rows))
    billing, v3 = sa.create_engine(bench.billing_url()), sa.create_engine(bench.v3_url())
    with v3.connect() as conn:
        directory, _ = dealer_directory(conn)
    partners: dict[str, list[int]] = {}
    for dealer, partner in directory.items():
        if partner:
            partners.setdefault(partner, []).append(dealer)
    with tempfile.TemporaryDirectory(prefix="bench-checks-") as temp:
        root = Path(temp) / "lake"

        def full_refresh():
            read = ExtractRead()
            return refresh_bronze(root, lambda _: stream_relevant_usage(billing, bench.connectorx_uri(), read=read),
                                  None, read=read)

        def full_refresh_with_totals():
            """As a start-over tick runs them: the totals queries alongside the extract, then the check."""
            with ThreadPoolExecutor(max_workers=1) as pool, billing.connect() as conn:
                totals = pool.submit(source_totals, conn)
                written = full_refresh()
                assert totals_check(totals.result(), committed_totals(root, written.version)).passed

        written = full_refresh()
        extract_seconds = median_seconds(full_refresh, 1)
        with_totals_seconds = median_seconds(full_refresh_with_totals, 1)
        with billing.connect() as conn:
            totals_seconds = median_seconds(lambda: source_totals(conn), 1)
            fingerprints = relevant_stats(conn, None)
        ratios, rows_out = [], []
        for partner, dealers in sorted(partners.items()):
            source = SourceFingerprints({d: fingerprints[d] for d in dealers if d in fingerprints}, sorted(dealers),
                                        lambda ds: {d: fingerprints[d] for d in ds if d in fingerprints})

            def build(partner: str = partner, dealers: list[int] = dealers, source=source) -> None:
                silver = build_silver(root, partner, dealers, written.version, publish=False, source=source)
                build_gold(root, partner, silver.publish_id)

            rows = bronze.read_dealers(root, dealers, written.version)
            aggregated = billing_usage_aggregated(rows, partner)
            monthly = billing_monthly_usage_by_service(aggregated, partner)
            report, active = usage_report(aggregated, partner), active_services(aggregated, partner)

            def check(partner: str = partner, rows: pl.DataFrame = rows, source=source, aggregated=aggregated,
                      monthly=monthly, report=report, active=active) -> None:
                reconcile_with_source(partner, rows, source)
                checks.silver_checks(rows, aggregated, monthly)
                checks.gold_checks(aggregated, report, active)

            build_seconds = median_seconds(build, args.reps)
            check_seconds = median_seconds(check, args.reps)
            ratios.append(check_seconds / (build_seconds - check_seconds))
            rows_out.append((partner, rows.height, build_seconds, check_seconds))
    billing.dispose()
    v3.dispose()
    print(f"### Publish checks per partition ({args.rows:,}-row bench set, {written.rows:,} bronze rows,"
          f" {len(partners)} partners; median of {args.reps}, s)\n")
    print("| partner | bronze rows | build with checks | checks alone | checks / rest of build |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for partner, rows, build_seconds, check_seconds in rows_out:
        print(f"| {partner[:8]}… | {rows:,} | {build_seconds:.3f} | {check_seconds:.3f} |"
              f" {check_seconds / (build_seconds - check_seconds):.1%} |")
    print(f"\nMedian ratio over partners: {statistics.median(ratios):.1%} (min {min(ratios):.1%}, max {max(ratios):.1%})")
    print(f"Start-over totals check: its two source queries take {totals_seconds:.2f} s alone; a full"
          f" extract and write takes {extract_seconds:.2f} s, {with_totals_seconds:.2f} s with them alongside and the check"
          f" ({with_totals_seconds / extract_seconds - 1:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
