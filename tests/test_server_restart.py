"""Issue 4, scenario 9: the Prefect server restarts in the middle of a tick.

A server and a serve process of its own (not the session's: restarting those
would disturb other tests), on a PostgreSQL database of its own that survives the restart.
The tick is interrupted while partition runs are in flight; after the restart
the next tick must complete and leave no partition stale.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime

import polars as pl
import pytest

from orchestration import local_prefect
from tests.conftest import pipeline_environ
from tests.pipeline_helpers import BRONZE_TABLE, RestApi, file_ids, partition_files
from tests.postgres import prefect_database
from tests.sourcedata import PARTNER_A, PARTNER_B, PARTNER_C, SourceBuilder, usage_report_truth
from usage_pipeline.lake import read_state_document

pytestmark = pytest.mark.integration

ALL_PARTNERS = (PARTNER_A, PARTNER_B, PARTNER_C)


class Api(RestApi):
    def start_tick(self) -> str:
        deployment = self.get("/deployments/name/usage-change-detection/usage-change-detection")
        return self.post(f"/deployments/{deployment['id']}/create_flow_run", {})["id"]


@pytest.fixture
def database():
    with prefect_database(f"prefect_restart_{os.getpid()}") as settings:
        yield settings


def test_server_restarted_mid_tick_next_tick_repairs_everything(fresh, database, tmp_path):
    billing, v3 = fresh
    source = SourceBuilder(billing, v3)
    source.standard()
    home, lake, logs = tmp_path / "prefect-home", tmp_path / "lake", tmp_path / "logs"
    for path in (home, lake, logs):
        path.mkdir()
    server, url = local_prefect.start_server(home, logs / "server.log", settings=database)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    env = dict(os.environ, **pipeline_environ(), PREFECT_API_URL=url, USAGE_LAKE_ROOT=str(lake))
    api = Api(url)
    serve = None
    try:
        setup = subprocess.run([sys.executable, "-m", "orchestration.cli", "setup"], env=env, capture_output=True, text=True)
        assert setup.returncode == 0, setup.stderr
        serve = local_prefect.start_serve(logs / "serve.log", env=env)

        # A tick, interrupted as soon as one of its partition runs is running.
        interrupted = api.start_tick()
        deadline = time.monotonic() + 180
        while not api.flow_runs(state={"type": {"any_": ["RUNNING"]}}, tags={"all_": ["layer:silver"]}):
            assert time.monotonic() < deadline, "no silver run started"
            time.sleep(0.2)
        local_prefect.stop(server)
        time.sleep(3)  # the tick and its children see the API gone
        server, _ = local_prefect.start_server(home, logs / "server.log", port=port, settings=database)

        # Whatever became of the interrupted tick, the next one completes and repairs every partition.
        api.wait_final(interrupted, timeout=240)
        source.execute("UPDATE `usage` SET usage_modified = %s WHERE usage_FK_dealer_id = 3", datetime(2026, 10, 12))
        after = api.wait_final(api.start_tick(), timeout=240)
        assert after["state_name"] == "Completed", (after["state_name"], after["state"]["message"])

        cursor = api.get("/block_types/slug/usage-cursor/block_documents/name/usage-change-detection")["data"]["value"]
        state, problem = read_state_document(lake)
        assert problem is None, problem
        assert set(state["partitions"]) == set(ALL_PARTNERS)
        assert all(status["failures"] == 0 for status in state["partitions"].values()), state["partitions"]
        assert cursor["dealer_last_modified"]["3"] == "2026-10-12T00:00:00.000000Z"
        files = set(file_ids(lake))
        assert files == {BRONZE_TABLE} | set().union(*(partition_files(p) for p in ALL_PARTNERS))
        for partner in ALL_PARTNERS:
            report = pl.read_parquet(lake / "gold" / "usage_report" / f"partner={partner}" / "data.parquet")
            assert [tuple(r.values()) for r in report.select(
                "month", "dealer_id", "quantity", "amount", "services", "customers"
            ).iter_rows(named=True)] == usage_report_truth(billing, partner), partner
        assert api.wait_final(api.start_tick(), timeout=120)["state"]["message"] == "no changes"
    finally:
        if serve is not None:
            local_prefect.stop(serve)
        local_prefect.stop(server)
