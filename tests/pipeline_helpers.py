"""Running ticks in-process against the served deployments, and looking at what they left."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, FlowRunFilterTags

from flows.cursor import Cursor, parse_cursor
from flows.runtime import read_cursor_value
from flows.usage_change_detection import TickReport, usage_change_detection


def tick(dry_run: bool = False) -> tuple[object, TickReport]:
    state = usage_change_detection(dry_run=dry_run, return_state=True)
    return state, state.result(raise_on_failure=False)


def cursor() -> Cursor:
    value, warnings = parse_cursor(read_cursor_value())
    assert not warnings, warnings
    return value


def file_ids(root: Path) -> dict[str, tuple[int, int]]:
    """Identity of every lake file: a rewrite (atomic rename) changes the inode and mtime."""
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(root.rglob("*.parquet"))
    }


def rewritten(before: dict, after: dict) -> set[str]:
    return {path for path in after if before.get(path) != after[path]}


def partition_files(partner: str) -> set[str]:
    return {
        f"{layer}/{table}/partner={partner}/data.parquet"
        for layer, table in (
            ("silver", "billing_usage_aggregated"),
            ("silver", "billing_monthly_usage_by_service"),
            ("gold", "usage_report"),
            ("gold", "active_services"),
        )
    }


BRONZE_FILE = "bronze/billing_usage_raw/data.parquet"


def read(root: Path, layer: str, table: str, partner: str) -> pl.DataFrame:
    return pl.read_parquet(root / layer / table / f"partner={partner}" / "data.parquet")


def child_runs(parent_id) -> list:
    """Flow runs started by one detection run (directly or through a partition thread)."""
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))
        )


def runs_tagged(tag: str) -> list:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))
