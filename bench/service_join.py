"""A full extract's client-side join of usage batches with the relevant service rows, at K = 1 and K = 10.

Synthetic frames of the bench set's shape: 200,000 × K customers with 5 services each, 68 % relevant,
and batches of BATCH_ROWS usage rows on random (customer, service) pairs. "hash join" is the join the
extract used before `service_lookup`: polars' inner join on the packed key, the service side packed
again for every batch; it leaves out the old join's INT checks of both sides, so it understates the
old cost a little. The service rows are made in key order, as the bench source returns them, so
"sort once" is the sort's best case. A full extract joins 10 × K batches.

    .venv/bin/python bench/service_join.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import polars as pl
from polars.testing import assert_frame_equal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from usage_pipeline.extract import (  # noqa: E402
    BATCH_ROWS,
    SERVICE_KEY,
    SERVICE_KEYS,
    join_services,
    packed_service_key,
    service_lookup,
)

CUSTOMERS = 200_000
SERVICES = 5


def services(scale: int) -> pl.DataFrame:
    row = pl.int_range(0, CUSTOMERS * scale * SERVICES)
    return (pl.select(customer_id=(row // SERVICES + 1).cast(pl.Int32), service_id=(row % SERVICES + 1).cast(pl.Int32),
                      service_status_id=(row.hash(1) % 4).cast(pl.Int32), service_name=pl.lit("Voice"))
            .filter(row.hash(2) % 100 < 68))


def batch(scale: int, seed: int) -> pl.DataFrame:
    usage_id = pl.int_range(0, BATCH_ROWS)
    return pl.select(usage_id=usage_id, customer_id=(usage_id.hash(seed) % (CUSTOMERS * scale) + 1).cast(pl.Int32),
                     service_id=(usage_id.hash(seed + 1) % SERVICES + 1).cast(pl.Int32))


def hash_join(usage_rows: pl.DataFrame, relevant: pl.DataFrame) -> pl.DataFrame:
    keyed = relevant.select(packed_service_key(), pl.exclude(SERVICE_KEYS))
    return (usage_rows.with_columns(packed_service_key())
            .join(keyed, on=SERVICE_KEY, how="inner", maintain_order="left").drop(SERVICE_KEY))


def per_batch(join, usage_batches: list[pl.DataFrame], side: pl.DataFrame) -> float:
    started = time.perf_counter()
    for usage_rows in usage_batches:
        join(usage_rows, side)
    return (time.perf_counter() - started) / len(usage_batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--batches", type=int, default=5, help="batches timed per join and scale")
    args = parser.parse_args()
    print(f"`{' '.join([Path(sys.executable).name, *sys.argv])}`\n")
    print("| K | relevant service rows | hash join, per batch | lookup: sort once | lookup join, per batch"
          " | a full extract's joins (10 × K batches): hash / lookup |\n| --- | --- | --- | --- | --- | --- |")
    for scale in args.scale:
        relevant = services(scale)
        usage_batches = [batch(scale, 10 * n) for n in range(args.batches)]
        for usage_rows in usage_batches:  # same rows both ways
            assert_frame_equal(hash_join(usage_rows, relevant), join_services(usage_rows, service_lookup(relevant)))
        started = time.perf_counter()
        lookup = service_lookup(relevant)
        sorting = time.perf_counter() - started
        hashed, looked_up = per_batch(hash_join, usage_batches, relevant), per_batch(join_services, usage_batches, lookup)
        extract_batches = 10 * scale
        print(f"| {scale} | {relevant.height:,} | {hashed * 1000:.1f} ms | {sorting:.2f} s | {looked_up * 1000:.1f} ms"
              f" | {hashed * extract_batches:.1f} s / {sorting + looked_up * extract_batches:.1f} s |")


if __name__ == "__main__":
    main()
