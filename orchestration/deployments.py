"""The five deployments, declared once in prefect.yaml: `prefect deploy --all` reads it for workers,
`usage-pipeline serve` builds the same deployments from it for local use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"
PIPELINE_TAG = "usage-pipeline"  # on every deployment, so on every run they start (automations match it)


@dataclass(frozen=True)
class DeploymentSpec:
    """What prefect.yaml says of one deployment (the fields `serve` uses too)."""

    name: str
    entrypoint: str
    description: str
    tags: list[str]
    interval_seconds: float | None
    concurrency_limit: int | None
    collision_strategy: str | None
    grace_period_seconds: int | None  # how long a run that took the slot may take to start


def deployment_specs(path: Path = PREFECT_YAML) -> list[DeploymentSpec]:
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    specs = []
    for entry in document["deployments"]:
        intervals = [s["interval"] for s in entry.get("schedules") or [] if "interval" in s]
        limit = entry.get("concurrency_limit") or {}
        specs.append(
            DeploymentSpec(
                name=entry["name"],
                entrypoint=entry["entrypoint"],
                description=entry.get("description", ""),
                tags=list(entry.get("tags") or []),
                interval_seconds=intervals[0] if intervals else None,
                concurrency_limit=limit.get("limit"),
                collision_strategy=limit.get("collision_strategy"),
                grace_period_seconds=limit.get("grace_period_seconds"),
            )
        )
    return specs


def spec(name: str) -> DeploymentSpec:
    return next(s for s in deployment_specs() if s.name == name)


def load_deployment_flow(name: str):
    """The flow object behind one of prefect.yaml's deployments (for in-process runs)."""
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(str(PREFECT_YAML.parent / spec(name).entrypoint))


def runner_deployments(schedule: bool) -> list:
    """prefect.yaml's deployments for `prefect.serve`; `schedule=False` leaves detection unscheduled."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    deployments = []
    for spec in deployment_specs():
        limit = None
        if spec.concurrency_limit is not None:
            strategy = ConcurrencyLimitStrategy(spec.collision_strategy or "ENQUEUE")
            limit = ConcurrencyLimitConfig(limit=spec.concurrency_limit, collision_strategy=strategy,
                                           grace_period_seconds=spec.grace_period_seconds)
        deployments.append(
            load_deployment_flow(spec.name).to_deployment(
                name=spec.name,
                description=spec.description,
                tags=spec.tags,
                interval=spec.interval_seconds if schedule else None,
                concurrency_limit=limit,
            )
        )
    return deployments
