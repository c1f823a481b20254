"""Every `USAGE_*` setting in one typed object, read from the environment once and validated at start.

A bad value fails where it is read (the start of a tick, `usage-pipeline setup`)
with a message naming the variable, never as a bare conversion error mid-tick.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from usage_pipeline.check_results import CHECK_NAMES
from usage_pipeline.lake import LakePath, resolve_lake_root

ENV_PREFIX = "USAGE_"
PartitionRunMode = Literal["subflow", "deployment"]


class SettingsError(ValueError):
    """A `USAGE_*` variable that cannot work; the message names it."""


class Settings(BaseSettings):
    """The pipeline's configuration (README "Deploying with workers" and "Monitoring and alerts")."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    lake_root: str = Field("lake", min_length=1, description="a path, or an object-storage URL (s3://...)")
    max_concurrent_partitions: int = Field(8, ge=1, description="partition runs at a time, in all")
    reconcile_seconds: float = Field(
        3600, gt=0, description="re-check every dealer's fingerprint this often (ticks at most 5 min apart), a slice per tick"
    )
    child_run_timeout_seconds: float = Field(3600, gt=0, description="longest wait for a deployment child run")
    partition_runs: PartitionRunMode = Field("subflow", description="run silver/gold in the tick's process or on workers")
    alert_block: str | None = Field(None, description="notification block for the alerts: <type-slug>/<name>")
    alert_stall_seconds: int = Field(900, ge=10, description="alert when no tick arrives for this long")
    alert_failed_ticks: int = Field(3, ge=1, description="alert when a partition failed this many ticks in a row")
    # At least a minute: a tick's own runs take seconds to minutes, and the server checks proactive windows every 5 s.
    alert_stale_seconds: int = Field(
        1800, ge=60, description="alert when a partition found needing a rebuild is not published this long after"
    )
    # Crash recovery (README "Failure modes"): Prefect's heartbeats come at least 30 s apart, its leases last 60 s or more.
    heartbeat_timeout_seconds: int = Field(
        90, ge=45, description="mark a pipeline run Crashed after this long without a heartbeat"
    )
    slot_lease_seconds: int = Field(120, ge=60, description="a crashed holder's concurrency slot frees itself after this long")
    checks_warn_only: str = Field("", description="comma-separated check names that warn instead of blocking a publish")

    @field_validator("checks_warn_only")
    @classmethod
    def _known_checks(cls, value: str) -> str:
        unknown = sorted(set(_names(value)) - set(CHECK_NAMES))
        if unknown:
            raise ValueError(f"unknown check name(s) {unknown}; the checks are {', '.join(CHECK_NAMES)}")
        return value

    @property
    def warn_only_checks(self) -> frozenset[str]:
        return frozenset(_names(self.checks_warn_only))

    @property
    def lake_path(self) -> LakePath:
        return resolve_lake_root(self.lake_root)


def _names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def load_settings() -> Settings:
    """Read the environment now; raise SettingsError naming the first bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = ENV_PREFIX + "_".join(str(part) for part in error["loc"]).upper()
            problems.append(f"{name}: {error['msg']}, got {error.get('input')!r}")
        raise SettingsError("; ".join(problems)) from None
