"""Build the benchmark source in MariaDB: `usage_bench_billing` and `usage_bench_v3`.

    .venv/bin/python bench/load_data.py                 # 5,000,000 usage rows (the full set)
    .venv/bin/python bench/load_data.py --rows 500000   # a smaller set, in its own databases
    .venv/bin/python bench/load_data.py --scale 10      # 10x the full set in every dimension
    .venv/bin/python bench/load_data.py --force         # rebuild even if already loaded

The tables are exactly the contract's (created by `usage_pipeline.schema.billing_metadata`
and `v3_metadata`). Rows are generated inside MariaDB with `INSERT ... SELECT`
from the SEQUENCE engine (`seq_1_to_N`), so nothing is shipped over the wire:

* v3.dealer: 2,000 dealers mapped round-robin to 20 partners, plus 5 unmapped.
* v4_wh_service_data: rows/5 rows (1,000,000 at full size) = customers x 5
  services. About a third fails the billing filters: ~5 % another system,
  ~20 % an inactive status (2 or 5), ~10 % another CSA category (4 or 5).
  Half of service 5 has a NULL name.
* usage: `--rows` rows over customers = rows/25 (each customer belongs to
  one dealer), dates over 90 days, ~10 % credits (negative amounts), ~2 %
  NULL usage_modified, ~2 % on a service id with no service-data row.

`--scale K` multiplies every dimension: usage rows, customers (and so service
rows), dealers (mapped and unmapped) and partners; its partners begin with the
full set's 20. `--rows N` changes the rows (and customers) only.

Data is deterministic (fixed RAND seeds). The full set (5 M rows) lives in
`usage_bench_billing` / `usage_bench_v3`; K times it in `usage_bench_billing_x<K>`
/ `usage_bench_v3_x<K>`; any other row count N in `usage_bench_billing_N` /
`usage_bench_v3_N`, so a small run never wipes the full one. A database that
already holds the requested set is left alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from usage_pipeline.demo_data import partner_uuid  # noqa: E402
from usage_pipeline.schema import billing_metadata, dealer, service_data, usage, v3_metadata  # noqa: E402

FULL_ROWS = 5_000_000
PARTNERS = 20
MAPPED_DEALERS = 2_000
UNMAPPED_DEALERS = 5
SERVICES = 5
ROWS_PER_CUSTOMER = 25
CHUNK_ROWS = 500_000
NOW = "2026-11-01 12:00:00"  # usage_modified values lie in the 30 days before this
SEED = 2026

ADMIN_URL = os.environ.get("USAGE_BENCH_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306")
CONNECTORX_BASE = os.environ.get("USAGE_BENCH_CONNECTORX_URL", "mysql://root@127.0.0.1:3306")


@dataclass(frozen=True)
class BenchSet:
    rows: int
    scale: int = 1  # dealers and partners are this many times the full set's

    @classmethod
    def scaled(cls, scale: int) -> BenchSet:
        return cls(FULL_ROWS * scale, scale)

    @property
    def suffix(self) -> str:
        if self.scale != 1:
            return f"_x{self.scale}"
        return "" if self.rows == FULL_ROWS else f"_{self.rows}"

    @property
    def partners(self) -> int:
        return PARTNERS * self.scale

    @property
    def mapped_dealers(self) -> int:
        return MAPPED_DEALERS * self.scale

    @property
    def billing_db(self) -> str:
        return f"usage_bench_billing{self.suffix}"

    @property
    def v3_db(self) -> str:
        return f"usage_bench_v3{self.suffix}"

    @property
    def dealers(self) -> int:
        return (MAPPED_DEALERS + UNMAPPED_DEALERS) * self.scale

    @property
    def customers(self) -> int:
        return max(self.rows // ROWS_PER_CUSTOMER, 2 * self.dealers)

    @property
    def service_rows(self) -> int:
        return self.customers * SERVICES

    def billing_url(self) -> str:
        return f"{ADMIN_URL}/{self.billing_db}"

    def v3_url(self) -> str:
        return f"{ADMIN_URL}/{self.v3_db}"

    def connectorx_uri(self) -> str:
        return f"{CONNECTORX_BASE}/{self.billing_db}"


def expected_indexes() -> dict[str, list[str]]:
    return {ix.name: [c.name for c in ix.columns] for ix in usage.indexes}


def is_loaded(bench: BenchSet, billing: sa.Engine, v3: sa.Engine) -> bool:
    """The set is complete: every table has its row count and `usage` has both contract indexes."""
    try:
        with billing.connect() as conn:
            usage_rows = conn.execute(sa.select(sa.func.count()).select_from(usage)).scalar_one()
            service_rows = conn.execute(sa.select(sa.func.count()).select_from(service_data)).scalar_one()
        with v3.connect() as conn:
            dealer_rows = conn.execute(sa.select(sa.func.count()).select_from(dealer)).scalar_one()
    except sa.exc.SQLAlchemyError:
        return False
    indexes = {ix["name"]: ix["column_names"] for ix in sa.inspect(billing).get_indexes("usage")}
    return (
        (usage_rows, service_rows, dealer_rows) == (bench.rows, bench.service_rows, bench.dealers)
        and all(indexes.get(name) == columns for name, columns in expected_indexes().items())
    )


def load_dealers(bench: BenchSet, v3: sa.Engine) -> None:
    partners = [partner_uuid(i, SEED) for i in range(bench.partners)]
    rows = [
        {
            "dealer_id": d,
            "dealer_name": f"Bench dealer {d}",
            "dealer_partner_uuid": partners[(d - 1) % bench.partners] if d <= bench.mapped_dealers else None,
        }
        for d in range(1, bench.dealers + 1)
    ]
    with v3.begin() as conn:
        conn.execute(sa.insert(dealer), rows)


SERVICE_DATA_SQL = """
INSERT INTO v4_wh_service_data
  (service_data_FK_customer_id, service_data_FK_service_id, service_data_FK_service_status_id,
   service_data_csa_category_id, service_data_system_id, service_data_service_name)
SELECT
  (seq - 1) DIV {services} + 1,
  (seq - 1) MOD {services} + 1,
  CASE WHEN RAND({seed} + 1) < 0.20
       THEN CASE WHEN RAND({seed} + 2) < 0.5 THEN 2 ELSE 5 END
       ELSE CASE FLOOR(RAND({seed} + 3) * 4) WHEN 0 THEN -3 WHEN 1 THEN 3 WHEN 2 THEN 10 ELSE 11 END
  END,
  CASE WHEN RAND({seed} + 4) < 0.10 THEN 4 + FLOOR(RAND({seed} + 5) * 2) ELSE 1 + FLOOR(RAND({seed} + 6) * 3) END,
  CASE WHEN RAND({seed} + 7) < 0.05 THEN 4 ELSE 3 END,
  CASE WHEN (seq - 1) MOD {services} + 1 = {services} AND RAND({seed} + 8) < 0.5 THEN NULL
       ELSE CONCAT('Service ', (seq - 1) MOD {services} + 1) END
FROM seq_1_to_{n}
ORDER BY seq
"""

# Customer from a multiplicative hash of the row number (deterministic, evaluated once per
# row); the dealer is the customer's owner. Everything else from seeded RAND streams.
USAGE_SQL = """
INSERT INTO `usage`
  (usage_id, usage_FK_customer_id, usage_FK_service_id, usage_FK_dealer_id, usage_date,
   usage_quantity, usage_amount, usage_modified)
SELECT
  seq,
  (seq * 2654435761 MOD 4294967296) MOD {customers} + 1,
  CASE WHEN RAND({seed} + 1) < 0.02 THEN {services} + 1 ELSE 1 + FLOOR(RAND({seed} + 2) * {services}) END,
  ((seq * 2654435761 MOD 4294967296) MOD {customers}) MOD {dealers} + 1,
  DATE '2026-08-03' + INTERVAL FLOOR(RAND({seed} + 3) * 90) DAY,
  ROUND(RAND({seed} + 4) * 100, 4),
  ROUND(CASE WHEN RAND({seed} + 5) < 0.10 THEN -RAND({seed} + 6) * 20 ELSE RAND({seed} + 7) * 50 END, 4),
  CASE WHEN RAND({seed} + 8) < 0.02 THEN NULL
       ELSE TIMESTAMP '{now}' - INTERVAL FLOOR(RAND({seed} + 9) * 30 * 86400 * 1000000) MICROSECOND END
FROM seq_1_to_{total}
WHERE seq BETWEEN {first} AND {last}
ORDER BY seq
"""


def load_billing(bench: BenchSet, billing: sa.Engine) -> None:
    with billing.connect() as conn:
        started = time.perf_counter()
        conn.exec_driver_sql(
            SERVICE_DATA_SQL.format(services=SERVICES, seed=SEED * 100, n=bench.service_rows)
        )
        conn.commit()
        print(f"  v4_wh_service_data: {bench.service_rows:,} rows in {time.perf_counter() - started:.1f}s", flush=True)

        # Secondary indexes are built once at the end (sorted build) instead of row by row:
        # random inserts into two indexes larger than the buffer pool are what makes loads slow.
        for name in expected_indexes():
            conn.exec_driver_sql(f"ALTER TABLE `usage` DROP INDEX {name}")
        started = time.perf_counter()
        for chunk, first in enumerate(range(1, bench.rows + 1, CHUNK_ROWS)):
            last = min(first + CHUNK_ROWS - 1, bench.rows)
            conn.exec_driver_sql(
                USAGE_SQL.format(
                    customers=bench.customers, services=SERVICES, dealers=bench.dealers,
                    seed=SEED * 1000 + chunk * 10, now=NOW, total=bench.rows, first=first, last=last,
                )
            )
            conn.commit()
            print(f"  usage: {last:,}/{bench.rows:,} rows ({time.perf_counter() - started:.1f}s)", flush=True)

        started = time.perf_counter()
        adds = ", ".join(f"ADD INDEX {name} ({', '.join(cols)})" for name, cols in expected_indexes().items())
        conn.exec_driver_sql(f"ALTER TABLE `usage` {adds}")
        print(f"  usage indexes {', '.join(expected_indexes())}: {time.perf_counter() - started:.1f}s", flush=True)
        conn.exec_driver_sql("ANALYZE TABLE `usage`, v4_wh_service_data")


def describe(bench: BenchSet, billing: sa.Engine) -> list[str]:
    with billing.connect() as conn:
        null_share = conn.exec_driver_sql(
            "SELECT AVG(usage_modified IS NULL) FROM `usage` FORCE INDEX (idx_usage_dealer_modified)"
        ).scalar_one()
        relevant_share = conn.exec_driver_sql(
            "SELECT AVG(service_data_system_id = 3 AND service_data_FK_service_status_id IN (-3, 3, 10, 11)"
            " AND service_data_csa_category_id IN (1, 2, 3)) FROM v4_wh_service_data"
        ).scalar_one()
        sizes = conn.exec_driver_sql(
            "SELECT table_name, ROUND((data_length + index_length) / 1048576) FROM information_schema.tables"
            " WHERE table_schema = DATABASE() ORDER BY table_name"
        ).all()
    return [
        f"{bench.rows:,} usage rows ({float(null_share):.1%} NULL usage_modified), "
        f"{bench.service_rows:,} service-data rows ({1 - float(relevant_share):.1%} excluded by the billing filters), "
        f"{bench.dealers:,} dealers ({bench.mapped_dealers:,} mapped to {bench.partners} partners,"
        f" {bench.dealers - bench.mapped_dealers} unmapped)",
        "on-disk size: " + ", ".join(f"{name} {mb} MiB" for name, mb in sizes),
    ]


def ensure_loaded(bench: BenchSet, force: bool = False) -> BenchSet:
    """Create and fill the bench databases for `bench` unless they already hold exactly that set."""
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for database in (bench.billing_db, bench.v3_db):
            conn.exec_driver_sql(f"CREATE DATABASE IF NOT EXISTS {database}")
    admin.dispose()
    billing, v3 = sa.create_engine(bench.billing_url()), sa.create_engine(bench.v3_url())
    try:
        if not force and is_loaded(bench, billing, v3):
            print(f"{bench.billing_db}/{bench.v3_db} already loaded with {bench.rows:,} usage rows; skipping the load")
            return bench
        print(f"Loading {bench.billing_db} and {bench.v3_db} ({bench.rows:,} usage rows,"
              f" {bench.dealers:,} dealers, {bench.partners} partners)", flush=True)
        started = time.perf_counter()
        billing_metadata.drop_all(billing)
        v3_metadata.drop_all(v3)
        billing_metadata.create_all(billing)
        v3_metadata.create_all(v3)
        load_dealers(bench, v3)
        load_billing(bench, billing)
        if not is_loaded(bench, billing, v3):
            raise RuntimeError("load finished but the row counts or indexes are not what was asked for")
        print(f"Load time: {time.perf_counter() - started:.1f}s")
        for line in describe(bench, billing):
            print(f"  {line}")
        return bench
    finally:
        billing.dispose()
        v3.dispose()


@contextmanager
def buffer_pool(mib: int, say: Callable[[str], None] = print) -> Iterator[None]:
    """MariaDB's innodb_buffer_pool_size at `mib` MiB inside the block, restored after it (0: leave it alone).

    SET GLOBAL, online in MariaDB 10.11; needs SUPER. The server's 128 MiB default is smaller than
    the 663 MiB set, so a full join then reads from disk (bench/README.md, "Buffer pool").
    """
    before = set_buffer_pool(mib) if mib else None
    if before is not None and before != mib:
        say(f"innodb_buffer_pool_size: {before} MiB -> {mib} MiB for this run")
    try:
        yield
    finally:
        if before is not None and before != mib:
            set_buffer_pool(before, wait=False)
            say(f"(innodb_buffer_pool_size set back to {before} MiB)")


def buffer_pool_mib(conn: sa.Connection) -> int:
    return int(conn.exec_driver_sql("SELECT @@innodb_buffer_pool_size").scalar_one()) // 1048576


def mariadb_buffer_pool_mib() -> int:
    admin = sa.create_engine(ADMIN_URL)
    try:
        with admin.connect() as conn:
            return buffer_pool_mib(conn)
    finally:
        admin.dispose()


def set_buffer_pool(mib: int, wait: bool = True) -> int:
    """Resize the buffer pool, waiting for the resize unless `wait` is false; return the previous size in MiB."""
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            before = buffer_pool_mib(conn)
            if before != mib:
                conn.exec_driver_sql(f"SET GLOBAL innodb_buffer_pool_size = {int(mib) * 1048576}")
                deadline = time.monotonic() + 120
                while wait and time.monotonic() < deadline:
                    status = conn.exec_driver_sql("SHOW STATUS LIKE 'Innodb_buffer_pool_resize_status'").one()[1]
                    size = buffer_pool_mib(conn)
                    if size == mib and ("Completed" in status or not status):
                        break
                    time.sleep(1)
        return before
    finally:
        admin.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--rows", type=int, help=f"usage rows, with the full set's dealers (default {FULL_ROWS:,})")
    size.add_argument("--scale", type=int, help="K times the full set in every dimension")
    parser.add_argument("--force", action="store_true", help="rebuild even if the set is already loaded")
    args = parser.parse_args(argv)
    ensure_loaded(bench_set(parser, args.rows, args.scale), args.force)
    return 0


def bench_set(parser: argparse.ArgumentParser, rows: int | None, scale: int | None) -> BenchSet:
    """The set that `--rows` / `--scale` name (the full set without either); a bad value is a usage error."""
    if rows is not None and rows < 1:
        parser.error("--rows must be positive")
    if scale is not None and scale < 1:
        parser.error("--scale must be positive")
    return BenchSet.scaled(scale) if scale else BenchSet(rows or FULL_ROWS)


if __name__ == "__main__":
    sys.exit(main())
