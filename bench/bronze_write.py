"""Peak memory and time of a bronze full refresh's lake side (`bronze.write_all_spilled`).

Each size runs in a fresh subprocess on synthetic batches of 500,000 rows in usage_id order (a scan
of `usage`), about 1,650 rows a dealer, into a temporary lake; its peak RSS is the child's
`ru_maxrss`. `--code DIR` runs another checkout's `usage_pipeline` (e.g. a worktree of the commit
before a change), for a before/after table:

    .venv/bin/python bench/bronze_write.py --rows 3300000 13200000 33000000
    .venv/bin/python bench/bronze_write.py --code /tmp/before --label before
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS_PER_DEALER = 1650
BATCH_ROWS = 500_000

CHILD = """
import sys, time
from pathlib import Path
import polars as pl
from usage_pipeline import bronze
from usage_pipeline.transforms import BRONZE_SCHEMA

rows, dealers, batch_rows, root = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])

def spread(seed, n):  # a hash of usage_id: random-looking, the same on every run
    return pl.col("usage_id").hash(seed) % n

def batches():
    for start in range(0, rows, batch_rows):
        ids = pl.int_range(start, min(start + batch_rows, rows), dtype=pl.Int64, eager=True).alias("usage_id")
        yield pl.DataFrame(ids).with_columns(
            dealer_id=spread(1, dealers) + 1,
            customer_id=spread(2, 200_000) + 1,
            service_id=spread(3, 5) + 1,
            usage_date=pl.date(2025, 1, 1) + pl.duration(days=spread(4, 365)),
            quantity=(spread(5, 10_000) / 100),
            amount=(spread(6, 1_000_000) / 100),
            usage_modified=pl.datetime(2025, 1, 1) + pl.duration(seconds=spread(7, 365 * 86_400)),
            service_status_id=spread(8, 4) + 1,
            service_name=pl.lit(["Voice", "Data", "SMS", "Fax"]).list.get(spread(9, 4)),
        ).cast(BRONZE_SCHEMA)

started = time.monotonic()
written = bronze.write_all_spilled(root, batches())
assert written.rows == rows, written
print(f"{time.monotonic() - started:.1f}")  # the write, generating its batches included
"""


def run(code: Path, rows: int) -> tuple[float, float]:
    """Wall seconds of the write and the child's peak RSS in MiB."""
    with tempfile.TemporaryDirectory(prefix="bronze-bench-") as lake:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(rows), str(max(1, rows // ROWS_PER_DEALER)), str(BATCH_ROWS), lake],
            cwd=code, env=dict(os.environ, PYTHONPATH=str(code)), stdout=subprocess.PIPE, text=True)
        out = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        if status:
            raise SystemExit(f"the write of {rows} rows failed ({status})")
    return float(out.strip().splitlines()[-1]), usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[3_300_000, 13_200_000, 33_000_000])
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose usage_pipeline runs")
    parser.add_argument("--label", default="this checkout")
    args = parser.parse_args()
    print(f"`{' '.join([Path(sys.executable).name, *sys.argv])}`\n")
    print("| code | rows | dealers | peak RSS | write |\n| --- | --- | --- | --- | --- |")
    for rows in args.rows:
        seconds, mib = run(args.code, rows)
        print(f"| {args.label} | {rows:,} | {rows // ROWS_PER_DEALER:,} | {mib:,.0f} MiB | {seconds:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
