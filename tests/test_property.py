"""Issue 3: randomized rounds against the real MariaDB; detection must match what really changed.

Each round mutates the source at random, runs one tick's steps (snapshot ->
plan -> bronze/silver/gold -> new cursor) through the same Prefect-free
functions the flows call, and checks that the partitions rebuilt are exactly
those whose relevant rows changed, and that every gold file equals SQL ground
truth. Orchestration itself is covered by test_pipeline.py.

Changes that leave every MAX(usage_modified) untouched (deletes below the max,
edits without a newer timestamp, NULL-timestamp rows, service-data changes)
are only promised to be caught by reconciliation, so they happen only in
rounds that reconcile.
"""

from __future__ import annotations

import os
import random
from datetime import date, datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa

from tests.conftest import BILLING_DB, PIPELINE_CONNECTORX_URI, PIPELINE_SERVER_URL, V3_DB, recreate_source_tables
from tests.pipeline_helpers import read
from tests.sourcedata import RELEVANT_JOIN, SourceBuilder, active_services_truth, usage_report_truth
from usage_pipeline.cursor import Cursor
from usage_pipeline.detection import PartitionOutcome, RunOutcome, advance_cursor, plan_tick
from usage_pipeline.extract import extract_relevant_usage, stream_relevant_usage
from usage_pipeline.materialize import build_gold, build_silver, refresh_bronze
from usage_pipeline.queries import dealer_directory, probe_raw_max, read_snapshot, reconcile_slice
from usage_pipeline.reconciliation import ReconciliationState

pytestmark = pytest.mark.integration
ROUNDS = int(os.environ.get("USAGE_PROPERTY_ROUNDS", "200"))
PARTNERS = [f"{i:08x}-0000-4000-8000-{i:012x}" for i in range(1, 6)]
DEALERS = list(range(1, 16))
CUSTOMERS = list(range(100, 112))
SERVICES = [1, 2, 3]
OK = RunOutcome("test", "Completed", True)
NOW = datetime(2030, 1, 1)  # every tick's and every reconciliation run's


class World:
    """The source as the billing system changes it, with a clock that only moves forward."""

    def __init__(self, builder: SourceBuilder, rng: random.Random):
        self.b, self.rng = builder, rng
        self.clock = datetime(2026, 10, 1)

    def tick_clock(self) -> datetime:
        self.clock += timedelta(seconds=self.rng.randrange(1, 3600), microseconds=self.rng.randrange(10**6))
        return self.clock

    def rows_of(self, dealer: int) -> list[int]:
        with self.b.billing.connect() as conn:
            return [r[0] for r in conn.exec_driver_sql("SELECT usage_id FROM `usage` WHERE usage_FK_dealer_id = %s", (dealer,))]

    def insert(self, modified: datetime | None) -> None:
        self.b.usage(
            self.rng.choice(DEALERS), self.rng.choice(CUSTOMERS), self.rng.choice(SERVICES),
            date(2026, self.rng.choice([8, 9, 10]), self.rng.randrange(1, 29)),
            str(Decimal(self.rng.randrange(-1000, 10000)) / 100), modified, str(self.rng.randrange(1, 50)),
        )

    def visible(self) -> None:
        """A change that moves some dealer's MAX(usage_modified) or the dealer directory."""
        kind = self.rng.choice(["insert", "insert", "update", "backwards", "wipe", "move", "excluded-bump"])
        dealer = self.rng.choice(DEALERS)
        if kind == "insert":
            self.insert(self.tick_clock())
        elif kind == "update" and self.rows_of(dealer):
            row = self.rng.choice(self.rows_of(dealer))
            self.b.execute("UPDATE `usage` SET usage_amount = usage_amount + 1, usage_modified = %s WHERE usage_id = %s",
                           self.tick_clock(), row)
        elif kind == "backwards":
            self.b.execute("UPDATE `usage` SET usage_modified = %s WHERE usage_FK_dealer_id = %s",
                           datetime(2026, 1, 1) + timedelta(seconds=self.rng.randrange(10**6)), dealer)
        elif kind == "wipe":
            self.b.execute("DELETE FROM `usage` WHERE usage_FK_dealer_id = %s", dealer)
        elif kind == "move":
            self.b.dealer(dealer, self.rng.choice(PARTNERS + [None]))
        elif kind == "excluded-bump":
            self.b.execute("UPDATE `usage` SET usage_modified = %s WHERE usage_FK_customer_id = 199 AND usage_FK_dealer_id = %s",
                           self.tick_clock(), dealer)

    def silent(self) -> None:
        """A change that leaves every MAX(usage_modified) as it was (reconciliation territory)."""
        kind = self.rng.choice(["null-insert", "edit", "delete", "service"])
        if kind == "null-insert":
            self.insert(None)
        elif kind == "edit":
            self.b.execute("UPDATE `usage` SET usage_quantity = usage_quantity + 1 ORDER BY RAND() LIMIT 1")
        elif kind == "delete":
            self.b.execute("DELETE FROM `usage` WHERE usage_modified IS NULL OR usage_modified < '2026-06-01' ORDER BY RAND() LIMIT 1")
        else:
            self.b.execute("UPDATE v4_wh_service_data SET service_data_FK_service_status_id = IF(service_data_FK_service_status_id = 3, 5, 3)"
                           " WHERE service_data_FK_customer_id < 199 ORDER BY RAND() LIMIT 1")


def relevant_content(engine: sa.Engine) -> dict[str, set[tuple]]:
    """Per partner, the relevant rows as bronze sees them: what a partition is made of."""
    sql = f"""SELECT LOWER(d.dealer_partner_uuid), u.usage_id, u.usage_FK_dealer_id, u.usage_quantity,
                     u.usage_amount, u.usage_modified, sd.service_data_FK_service_status_id {RELEVANT_JOIN}
              WHERE d.dealer_partner_uuid IS NOT NULL"""
    content: dict[str, set[tuple]] = {p: set() for p in PARTNERS}
    with engine.connect() as conn:
        for partner, *row in conn.exec_driver_sql(sql):
            content[partner].add(tuple(row))
    return content


def run_tick(cursor: Cursor, reconciliation: ReconciliationState, root, billing: sa.Engine, v3: sa.Engine,
             cx_uri: str, reconcile: bool):
    """`reconcile`: a usage-reconciliation run over every dealer (a period this short) comes first."""
    with v3.connect() as conn:
        partners, _ = dealer_directory(conn)
    with billing.connect() as conn:
        if reconcile:
            _, _, reconciliation = reconcile_slice(conn, cursor, reconciliation, NOW, 1)
        snapshot = read_snapshot(conn, cursor, partners, probe_raw_max(conn), reconciliation=reconciliation)
    plan = plan_tick(cursor, snapshot)
    outcomes = {}
    if plan.runs_bronze:
        def extract(dealers):  # a full refresh streams in small batches: several spills, sorted back
            return (stream_relevant_usage(billing, cx_uri, 64) if dealers is None
                    else extract_relevant_usage(billing, cx_uri, dealers))
        written = refresh_bronze(root, extract, plan.bronze_dealers)
        for partner in plan.partitions:  # from the version bronze committed, as a tick's silver runs do
            build_silver(root, partner, sorted(d for d, p in partners.items() if p == partner), written.version)
            build_gold(root, partner)
            outcomes[partner] = PartitionOutcome(partner, OK, OK)
    return advance_cursor(cursor, snapshot, plan, OK if plan.runs_bronze else None, outcomes, NOW), reconciliation, plan


def test_random_rounds_rebuild_exactly_what_changed(source_engines, mariadb_admin, tmp_path):
    admin_billing, admin_v3 = source_engines
    recreate_source_tables(admin_billing, admin_v3)
    builder = SourceBuilder(admin_billing, admin_v3)
    rng = random.Random(int(os.environ.get("USAGE_PROPERTY_SEED", "20261122")))
    world = World(builder, rng)
    for dealer in DEALERS:
        builder.dealer(dealer, rng.choice(PARTNERS + [None]))
    for customer in CUSTOMERS:
        for service in SERVICES:
            builder.service(customer, service, status=rng.choice([3, 3, 10, 5]), name=rng.choice(["A", "B", None]))
    builder.service(199, 1, relevant=False)
    for _ in range(60):
        world.insert(world.tick_clock() if rng.random() > 0.1 else None)

    billing = sa.create_engine(f"{PIPELINE_SERVER_URL}/{BILLING_DB}")
    v3 = sa.create_engine(f"{PIPELINE_SERVER_URL}/{V3_DB}")
    cx_uri = PIPELINE_CONNECTORX_URI
    root = tmp_path / "lake"

    cursor, reconciliation, plan = run_tick(Cursor(), ReconciliationState(NOW), root, billing, v3, cx_uri,
                                            reconcile=False)
    assert plan.first_run
    content = relevant_content(admin_billing)
    rebuilt_counts = []
    for round_no in range(ROUNDS):
        reconcile = round_no % 4 == 3
        for _ in range(rng.randrange(0, 4)):
            world.visible()
        if reconcile:
            for _ in range(rng.randrange(0, 3)):
                world.silent()
        if round_no % 10 == 0:  # occasionally a whole partner is wiped (the monthly wipe)
            builder.execute("DELETE FROM `usage` WHERE usage_FK_dealer_id IN (1, 2, 3)")

        cursor, reconciliation, plan = run_tick(cursor, reconciliation, root, billing, v3, cx_uri, reconcile=reconcile)

        new_content = relevant_content(admin_billing)
        changed = {p for p in PARTNERS if new_content[p] != content[p]}
        assert set(plan.partitions) == changed, (round_no, plan.dealer_changes, plan.partitions, changed)
        content = new_content
        rebuilt_counts.append(len(changed))
        for partner in plan.partitions:
            got = [tuple(r.values()) for r in read(root, "gold", "usage_report", partner)
                   .select("month", "dealer_id", "quantity", "amount", "services", "customers").iter_rows(named=True)]
            assert got == usage_report_truth(admin_billing, partner), (round_no, partner)
            got = [tuple(r.values()) for r in read(root, "gold", "active_services", partner)
                   .select("dealer_id", "customer_id", "service_id", "first_usage_date", "last_usage_date", "amount")
                   .iter_rows(named=True)]
            assert got == active_services_truth(admin_billing, partner), (round_no, partner)
    assert sum(1 for n in rebuilt_counts if n == 0) > 0 and sum(rebuilt_counts) > ROUNDS // 2  # both kinds of rounds happened
