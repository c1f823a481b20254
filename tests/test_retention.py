"""Issue 11: Prefect 3.9.1 accepts the retention settings the README, demo and tests use, and deletes old runs.

A server of its own with those settings, except the two a test cannot wait for: the vacuum loop
(every 2 s instead of hourly) and the flow-run retention (3601 s, the shortest Prefect accepts).
Runs are aged by moving their end_time back in the server's SQLite database: the API has no way to.
"""

from __future__ import annotations

import sqlite3
import time

import httpx
import pytest
from prefect import flow
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_URL, temporary_settings

from orchestration import local_prefect

pytestmark = pytest.mark.integration


@flow
def finished() -> None:
    """A top-level run that ends Completed."""


def test_vacuum_deletes_finished_runs_older_than_the_retention_and_keeps_the_rest(tmp_path):
    settings = {"PREFECT_SERVER_SERVICES_DB_VACUUM_LOOP_SECONDS": "2",
                "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD": "3601"}
    server, url = local_prefect.start_server(tmp_path, tmp_path / "server.log", settings=settings)
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            runs = [finished(return_state=True).state_details.flow_run_id for _ in range(3)]
        old, kept = runs[:2], runs[2]
        database = sqlite3.connect(tmp_path / "prefect.db")
        with database:
            database.executemany(
                "UPDATE flow_run SET end_time = datetime('now', '-2 hours') WHERE id = ?", [(str(r),) for r in old]
            )
        database.close()

        deadline = time.monotonic() + 60
        while any(httpx.get(f"{url}/flow_runs/{r}", timeout=10).status_code != 404 for r in old):
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(1)
        assert httpx.get(f"{url}/flow_runs/{kept}", timeout=10).status_code == 200
    finally:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            APILogHandler().flush()  # the runs' logs, before their server goes
        local_prefect.stop(server)


def test_the_production_retention_settings_are_accepted(monkeypatch):
    from prefect.settings import Settings

    for name, value in local_prefect.RETENTION.items():
        monkeypatch.setenv(name, value)
    vacuum = Settings().server.services.db_vacuum
    assert vacuum.enabled_vacuum_types == {"events", "flow_runs", "orphans"}
    assert vacuum.retention_period.days == 30
    assert Settings().server.events.retention_period.days == 7
