"""Issue 20: SIGKILL at random moments of ticks; the pipeline repairs itself, and leaves nothing open.

Its own Prefect server (on a PostgreSQL database of its own), serve process, lake and MariaDB
server (the source is killed too).

A few seeded rounds of each kind of kill (tests/kill_rounds.py says what each kills);
USAGE_KILL_ROUNDS_PER_KIND=8 runs the long variant (README "Crash recovery, measured"). After every round: gold equals the SQL truth
for every partner, no partition is missing, bronze holds each relevant row once, the
cursor block has its two keys, no run of the pipeline is still Pending or Running, the
next tick rewrites nothing, and it removes what killed writers left in the lake.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time

import pytest
import sqlalchemy as sa
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.conftest import BILLING_DB, PIPELINE_PASSWORD, PIPELINE_USER, V3_DB, pipeline_environ, recreate_source_tables
from tests.kill_rounds import KINDS, PrivateMariaDB, Stack, World, run_round, summary, warm_up
from tests.postgres import prefect_database
from tests.webhook import Receiver

pytestmark = pytest.mark.integration
ROUNDS_PER_KIND = int(os.environ.get("USAGE_KILL_ROUNDS_PER_KIND", "3"))
SEED = int(os.environ.get("USAGE_KILL_SEED", "20261202"))
STALL_SECONDS = 30
ROUND_KINDS = os.environ.get("USAGE_KILL_KINDS", ",".join(KINDS)).split(",")


@pytest.fixture(scope="module")
def mariadb():
    server = PrivateMariaDB()
    server.start()
    server.create_source((BILLING_DB, V3_DB), PIPELINE_USER, PIPELINE_PASSWORD)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def source(mariadb):
    """Writable engines on the private server's source databases, tables as the contract declares them."""
    billing = sa.create_engine(f"{mariadb.admin_url}/{BILLING_DB}", pool_pre_ping=True)
    v3 = sa.create_engine(f"{mariadb.admin_url}/{V3_DB}", pool_pre_ping=True)
    recreate_source_tables(billing, v3)
    yield billing, v3
    billing.dispose()
    v3.dispose()


@pytest.fixture(scope="module")
def stack(mariadb, source, tmp_path_factory):
    env = {**pipeline_environ(), "BILLING_CDRS_DB_PORT": str(mariadb.port), "V3_DB_PORT": str(mariadb.port)}
    with prefect_database(f"prefect_kills_{os.getpid()}") as database:
        stack = Stack(tmp_path_factory.mktemp("kills"), env, database)
        stack.start()
        yield stack
        stack.stop()


def test_random_kills_leave_a_lake_the_next_ticks_repair(stack, source, mariadb):
    billing, v3 = source
    world = World(billing, v3, random.Random(SEED))
    world.build(rows=3000)
    tick_seconds = warm_up(stack, world)
    results = []
    for round_no in range(ROUNDS_PER_KIND * len(ROUND_KINDS)):
        kind = ROUND_KINDS[round_no % len(ROUND_KINDS)]
        result = run_round(stack, world, mariadb, billing, kind, SEED + round_no, tick_seconds)
        print("KILL ROUND:", json.dumps(result.__dict__))
        results.append(result)
    print("KILL SUMMARY:", json.dumps(summary(results), indent=1))
    assert [r for r in results if r.problems] == []  # every round, so that the summary counts them all
    assert {r.kind for r in results} == set(ROUND_KINDS) <= set(KINDS)


def test_detection_killed_and_not_restarted_raises_the_stalled_alert(stack):
    """The last round: serve is killed and nobody restarts it. No tick comes, and the operator is told."""
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        with temporary_settings({PREFECT_API_URL: stack.url}):
            CustomWebhookNotificationBlock(
                name="usage-kills-alerts", url=f"http://127.0.0.1:{receiver.server_address[1]}/hook",
                json_data={"subject": "{{subject}}", "body": "{{body}}"}, allow_private_urls=True,
            ).save("usage-kills-alerts", overwrite=True)
        stack.setup(USAGE_ALERT_BLOCK="custom-webhook/usage-kills-alerts", USAGE_ALERT_STALL_SECONDS=str(STALL_SECONDS))
        time.sleep(3)  # the server's trigger service picks up new automations within a few seconds
        assert stack.api.wait_final(stack.api.start_tick(), timeout=240)["state_name"] == "Completed"  # arms it
        stack.kill_serve()
        _, stalled = receiver.wait_for("stalled", timeout=STALL_SECONDS + 60)
        assert f"silent for {STALL_SECONDS} s" in stalled["body"]
    finally:
        receiver.shutdown()
