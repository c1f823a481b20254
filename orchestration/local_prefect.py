"""A local Prefect server and a serve process, for the demo and the integration tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import httpx

DEPLOYMENT_NAMES = (
    "usage-change-detection/usage-change-detection",
    "billing-usage-raw/billing-usage-raw",
    "partner-silver/partner-silver",
    "partner-gold/partner-gold",
    "usage-reconciliation/usage-reconciliation",
)


# Keep concurrency leases on disk (PREFECT_HOME/concurrency_leases) instead of in the server's memory:
# with the default, a server restart forgets every lease while the limits still count their slots
# as taken, so a partner whose run held its slot then waits forever.
DURABLE_LEASES = {"PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem"}
# Retention (README "Monitoring and alerts"): a 5-minute tick makes 288 runs a day plus its partition
# runs. Prefect's vacuum deletes finished top-level runs (their subflows follow) after 30 days, a
# billing month and some, and events after 7 days; it runs hourly.
RETENTION = {
    "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events,flow_runs",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD": str(30 * 24 * 3600),
    "PREFECT_SERVER_EVENTS_RETENTION_PERIOD": "P7D",
}
# A run waiting for a partner's slot is told by the server when to ask again: by default up to
# 30 s after the holder released it. One second keeps a manual run queued behind a tick's close.
SLOT_WAIT = {"PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS": "1"}
SERVER_SETTINGS = {**DURABLE_LEASES, **RETENTION, **SLOT_WAIT}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, what: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: process exited with code {process.returncode}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f}s")


def start_server(
    home: Path, log: Path, port: int | None = None, settings: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """`prefect server start` (on a free port unless given) with its own PREFECT_HOME (SQLite database inside),
    durable leases and retention; `settings` overrides any of them."""
    port = port or free_port()
    # The UI asks the API at PREFECT_UI_API_URL (default port 4200), not at the port it was served from.
    env = {**os.environ, **SERVER_SETTINGS, **(settings or {}), "PREFECT_HOME": str(home),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    env.pop("PREFECT_API_URL", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api"
    wait_until(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, "prefect server", 90, process)
    return process, url


def start_serve(log: Path, extra_args: Iterable[str] = ("--no-schedule",), env: dict | None = None) -> subprocess.Popen:
    """`usage-pipeline serve` in the background; returns once its five deployments exist."""
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestration.cli", "serve", *extra_args],
        env=env or dict(os.environ), stdout=open(log, "ab"), stderr=subprocess.STDOUT,
    )
    api = (env or os.environ)["PREFECT_API_URL"]

    def deployments_exist() -> bool:
        return all(httpx.get(f"{api}/deployments/name/{name}", timeout=2).status_code == 200 for name in DEPLOYMENT_NAMES)

    wait_until(deployments_exist, "usage-pipeline serve", 90, process)
    return process


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
