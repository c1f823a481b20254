"""Idempotent set-up: block types, the two source connector blocks, concurrency limits."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_API_URL
from prefect_sqlalchemy import ConnectionComponents, SqlAlchemyConnector, SyncDriver
from pydantic import SecretStr

from blocks.usage_cursor import UsageCursor
from usage_pipeline.queries import has_dealer_modified_index
from usage_pipeline.schema import INDEX_ADVICE
from usage_pipeline.settings import Settings

BILLING_BLOCK = "billing-db"
V3_BLOCK = "v3-db"
ENV_PREFIXES = {BILLING_BLOCK: "BILLING_CDRS_DB", V3_BLOCK: "V3_DB"}
ENV_FIELDS = ("HOST", "PORT", "USER", "PASSWORD", "DATABASE")
DEMO_SOURCE_DIR = Path("demo-source")
DEMO_FILES = {BILLING_BLOCK: "billing.sqlite", V3_BLOCK: "v3.sqlite"}
CONNECT_TIMEOUT_SECONDS = 10

PARTITIONS_LIMIT = "usage-partitions"
DETECTION_LIMIT = "usage-change-detection"
BRONZE_LIMIT = "usage-bronze"  # one writer of the bronze table at a time: writes, compaction, vacuum
RECONCILIATION_LIMIT = "usage-reconciliation"  # one writer of the reconciliation's state at a time


class SetupError(ValueError):
    """Configuration that cannot work; the message names the variable to fix."""


def partner_limit(partner_uuid: str) -> str:
    """Name of the one-slot limit that serializes a partner's runs (same text as its tag)."""
    return f"partner:{partner_uuid}"


PARTITION_FLOWS = ("partner-silver", "partner-gold")
SLOT_HOLDERS = {DETECTION_LIMIT: ("usage-change-detection",), BRONZE_LIMIT: ("billing-usage-raw",),
                RECONCILIATION_LIMIT: ("usage-reconciliation",), PARTITIONS_LIMIT: PARTITION_FLOWS}


def slot_holders(limit: str) -> tuple[tuple[str, ...], str | None]:
    """The flows whose runs may hold a slot of `limit`, and the tag they carry for it (a partner's)."""
    if limit in SLOT_HOLDERS:
        return SLOT_HOLDERS[limit], None
    return PARTITION_FLOWS, limit


@dataclass(frozen=True)
class SourceConfig:
    block: str
    connector: SqlAlchemyConnector
    description: str  # for printing: never includes the password


def source_configs(environ: dict[str, str] | None = None) -> list[SourceConfig]:
    """Connector blocks from the contract's environment variables, or the embedded SQLite default."""
    env = os.environ if environ is None else environ
    given = {block: {f: env.get(f"{prefix}_{f}") for f in ENV_FIELDS} for block, prefix in ENV_PREFIXES.items()}
    if not any(v for values in given.values() for v in values.values()):
        return [_embedded(block) for block in ENV_PREFIXES]
    return [_mysql(block, ENV_PREFIXES[block], values) for block, values in given.items()]


def _embedded(block: str) -> SourceConfig:
    path = (DEMO_SOURCE_DIR / DEMO_FILES[block]).resolve()
    connector = SqlAlchemyConnector(
        connection_info=ConnectionComponents(driver=SyncDriver.SQLITE_PYSQLITE, database=str(path))
    )
    return SourceConfig(block, connector, f"embedded SQLite {path}")


def _mysql(block: str, prefix: str, values: dict[str, str | None]) -> SourceConfig:
    missing = [f"{prefix}_{f}" for f in ("HOST", "USER", "DATABASE") if not values[f]]
    if missing:
        raise SetupError(f"{block}: set {', '.join(missing)} (or none of the source variables for the demo source)")
    port = values["PORT"] or "3306"
    if not port.isdecimal() or not 1 <= int(port) <= 65535:
        raise SetupError(f"{prefix}_PORT must be a port number, got {port!r}")
    connector = SqlAlchemyConnector(
        connection_info=ConnectionComponents(
            driver=SyncDriver.MYSQL_PYMYSQL,
            host=values["HOST"],
            port=int(port),
            username=values["USER"],
            password=SecretStr(values["PASSWORD"] or ""),
            database=values["DATABASE"],
        ),
        connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS, "read_timeout": 3600},
    )
    return SourceConfig(block, connector, f"mysql {values['USER']}@{values['HOST']}:{port}/{values['DATABASE']}")


# Limits this process has seen exist, per API: a flow-run process lives for one run, and a tick's
# 40 partition subflows would otherwise ask for the same two limits 80 times.
_KNOWN_LIMITS: set[tuple[str, str]] = set()


def ensure_limit(name: str, limit: int, update: bool = False) -> None:
    """Create a global concurrency limit if missing: the server leases the limits it has and skips
    a missing one silently when another one named in the same request exists."""
    known = (str(PREFECT_API_URL.value()), name)
    if known in _KNOWN_LIMITS and not update:
        return
    with get_client(sync_client=True) as client:
        if update:
            client.upsert_global_concurrency_limit_by_name(name, limit)
        else:
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
                except ObjectAlreadyExists:
                    pass  # created concurrently by another run
    _KNOWN_LIMITS.add(known)


def forget_limits(names: list[str]) -> None:
    """Found missing after all (deleted while in use): the next `ensure_limit` checks again."""
    _KNOWN_LIMITS.difference_update({(str(PREFECT_API_URL.value()), name) for name in names})


def index_check(billing: SqlAlchemyConnector) -> str:
    """Say whether detection's index exists; the pipeline never creates it (read-only source)."""
    engine = billing.get_engine()
    try:
        if has_dealer_modified_index(engine):
            return "index (usage_FK_dealer_id, usage_modified): present"
        return f"WARNING: index (usage_FK_dealer_id, usage_modified) is missing; ask the DBA for: {INDEX_ADVICE}"
    except sa.exc.SQLAlchemyError as exc:
        return f"WARNING: could not check the usage index ({type(exc).__name__}); is the billing database reachable?"
    finally:
        engine.dispose()


def run_setup(settings: Settings, environ: dict[str, str] | None = None) -> list[str]:
    """Register block types, save connector blocks and limits; return what was done, for printing."""
    configs = source_configs(environ)
    UsageCursor.register_type_and_schema()
    SqlAlchemyConnector.register_type_and_schema()
    done = []
    for config in configs:
        config.connector.save(config.block, overwrite=True)
        done.append(f"block {config.block}: {config.description}")
    done.append(index_check(configs[0].connector))
    ensure_limit(PARTITIONS_LIMIT, settings.max_concurrent_partitions, update=True)
    ensure_limit(DETECTION_LIMIT, 1, update=True)
    ensure_limit(BRONZE_LIMIT, 1, update=True)
    ensure_limit(RECONCILIATION_LIMIT, 1, update=True)
    done.append(f"concurrency limits: {PARTITIONS_LIMIT}={settings.max_concurrent_partitions}, {DETECTION_LIMIT}=1,"
                f" {BRONZE_LIMIT}=1, {RECONCILIATION_LIMIT}=1")
    return done
