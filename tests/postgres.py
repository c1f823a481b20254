"""PostgreSQL databases for the tests' Prefect servers, as production runs them.

A SQLite-backed server answers 503 under concurrent writes and its clients back off 2-8 s
(../shared/FACTS.md): the demo's first tick took 11.4 s on one and 2.3 s on PostgreSQL, same
machine and run. The embedded default (`usage-pipeline demo`) stays on SQLite and is tested as is.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from urllib.parse import urlsplit, urlunsplit

import pytest

ADMIN_DSN = os.environ.get("USAGE_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin(sql: str) -> None:
    import asyncpg  # the Prefect server's PostgreSQL driver, a dependency of prefect

    async def run() -> None:
        conn = await asyncpg.connect(ADMIN_DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@contextmanager
def prefect_database(name: str) -> Iterator[dict[str, str]]:
    """A new, empty database `name` (dropped after), as the server settings that point Prefect at it."""
    try:
        _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        _admin(f"CREATE DATABASE {name}")
    except OSError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {ADMIN_DSN} (start it, see .ci/run): {exc}")
    parts = urlsplit(ADMIN_DSN)
    url = urlunsplit(("postgresql+asyncpg", parts.netloc, f"/{name}", "", ""))
    try:
        yield {"PREFECT_API_DATABASE_CONNECTION_URL": url}
    finally:
        _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def server_database(kind: str, name: str) -> AbstractContextManager[dict[str, str]]:
    """The settings of a Prefect server on `kind`: "postgres", a new database `name` (dropped after);
    anything else, Prefect's default SQLite (no settings)."""
    return prefect_database(name) if kind == "postgres" else nullcontext({})
