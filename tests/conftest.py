"""Integration fixtures: the real MariaDB and a real Prefect server with `usage-pipeline serve`.

One Prefect server and one serve process per test session (starting them is
the slow part); every test gets fresh source tables, an empty lake and no
cursor block. The pipeline connects as a read-only MariaDB user with a
password, so tests also prove it never writes to the source and never leaks
the password.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

MARIADB_ADMIN_URL = os.environ.get("USAGE_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306")
# Per-session names, so that two test sessions on one machine do not share source tables.
BILLING_DB = f"usage_it_billing_{os.getpid()}"
V3_DB = f"usage_it_v3_{os.getpid()}"
PIPELINE_USER = "usage_pipeline_it"
PIPELINE_PASSWORD = "Pw-it-9f3b7c1e"  # asserted absent from every log and artifact
# The read-only pipeline user's URLs, for tests that call the extract without Prefect.
PIPELINE_SERVER_URL = f"mysql+pymysql://{PIPELINE_USER}:{PIPELINE_PASSWORD}@127.0.0.1:3306"
PIPELINE_CONNECTORX_URI = f"mysql://{PIPELINE_USER}:{PIPELINE_PASSWORD}@127.0.0.1:3306/{BILLING_DB}"


def pipeline_environ() -> dict[str, str]:
    env = {}
    for prefix, database in (("BILLING_CDRS_DB", BILLING_DB), ("V3_DB", V3_DB)):
        env.update(
            {
                f"{prefix}_HOST": "127.0.0.1",
                f"{prefix}_PORT": "3306",
                f"{prefix}_USER": PIPELINE_USER,
                f"{prefix}_PASSWORD": PIPELINE_PASSWORD,
                f"{prefix}_DATABASE": database,
            }
        )
    return env


def recreate_source_tables(billing: sa.Engine, v3: sa.Engine) -> None:
    """Empty source tables exactly as the contract declares them (usage_pipeline.schema metadata)."""
    from usage_pipeline.schema import billing_metadata, v3_metadata

    for metadata, engine in ((billing_metadata, billing), (v3_metadata, v3)):
        metadata.drop_all(engine)
        metadata.create_all(engine)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The fast tier first: quick feedback, and its harness server is the first this process talks to.

    Prefect keeps process-wide services (events, lease renewal) bound to the first API they
    talk to; a harness entered after the session's server meets "Lease not found" there.
    """
    items.sort(key=lambda item: item.path.name != "test_fast_tick.py")


@pytest.fixture(scope="session")
def mariadb_admin() -> Iterator[sa.Engine]:
    """Root engine on the real MariaDB; creates the test databases and the read-only pipeline user."""
    engine = sa.create_engine(MARIADB_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except sa.exc.OperationalError as exc:
        pytest.fail(f"MariaDB is not reachable at {MARIADB_ADMIN_URL} (start it, see .ci/run): {exc}")
    with engine.connect() as conn:
        for database in (BILLING_DB, V3_DB):
            conn.exec_driver_sql(f"CREATE DATABASE IF NOT EXISTS {database}")
        conn.exec_driver_sql(f"CREATE USER IF NOT EXISTS '{PIPELINE_USER}'@'%%' IDENTIFIED BY '{PIPELINE_PASSWORD}'")
        conn.exec_driver_sql(f"ALTER USER '{PIPELINE_USER}'@'%%' IDENTIFIED BY '{PIPELINE_PASSWORD}'")
        for database in (BILLING_DB, V3_DB):
            conn.exec_driver_sql(f"GRANT SELECT ON {database}.* TO '{PIPELINE_USER}'@'%%'")
    yield engine
    with engine.connect() as conn:
        for database in (BILLING_DB, V3_DB):
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {database}")
    engine.dispose()


@pytest.fixture(scope="session")
def source_engines(mariadb_admin) -> Iterator[tuple[sa.Engine, sa.Engine]]:
    """Writable (root) engines on the two test databases, for building and changing the source."""
    billing = sa.create_engine(f"{MARIADB_ADMIN_URL}/{BILLING_DB}")
    v3 = sa.create_engine(f"{MARIADB_ADMIN_URL}/{V3_DB}")
    yield billing, v3
    billing.dispose()
    v3.dispose()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[str]:
    """A real `prefect server start` on a free port, on a PostgreSQL database of its own (tests/postgres.py)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from orchestration import local_prefect
    from tests.postgres import prefect_database

    home = tmp_path_factory.mktemp("prefect-home")
    with prefect_database(f"prefect_tests_{os.getpid()}") as database:
        process, url = local_prefect.start_server(home, home / "server.log", settings=database)
        os.environ["PREFECT_API_URL"] = url
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
        local_prefect.stop(process)


@pytest.fixture(scope="session")
def lake_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lake")
    os.environ["USAGE_LAKE_ROOT"] = str(root)
    return root


@pytest.fixture(scope="session")
def pipeline(prefect_server, source_engines, lake_root, tmp_path_factory) -> Iterator[subprocess.Popen]:
    """`usage-pipeline setup` against MariaDB, then `usage-pipeline serve` running the deployments."""
    from orchestration import local_prefect

    env = dict(os.environ, **pipeline_environ())
    result = subprocess.run(
        [os.sys.executable, "-m", "orchestration.cli", "setup"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert PIPELINE_PASSWORD not in result.stdout + result.stderr
    logs = tmp_path_factory.mktemp("serve")
    process = local_prefect.start_serve(logs / "serve.log", env=env)
    yield process
    local_prefect.stop(process)
    assert PIPELINE_PASSWORD not in (logs / "serve.log").read_text(errors="replace")


@pytest.fixture
def fresh(pipeline, source_engines, lake_root, mariadb_admin):
    """Empty source tables, an empty lake and no cursor block, before each integration test."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from blocks.usage_cursor import CURSOR_DOCUMENT

    billing, v3 = source_engines
    recreate_source_tables(billing, v3)
    shutil.rmtree(lake_root, ignore_errors=True)
    lake_root.mkdir()
    with get_client(sync_client=True) as client:
        try:
            document = client.read_block_document_by_name(CURSOR_DOCUMENT, "usage-cursor")
            client.delete_block_document(document.id)
        except ObjectNotFound:
            pass
    return billing, v3


@pytest.fixture
def materialized(fresh, lake_root):
    """The standard source (tests/sourcedata.py) after a successful first tick; returns its builder."""
    from tests.pipeline_helpers import tick
    from tests.sourcedata import SourceBuilder

    builder = SourceBuilder(*fresh)
    builder.standard()
    state, _ = tick()
    assert state.is_completed(), state.message
    return builder
