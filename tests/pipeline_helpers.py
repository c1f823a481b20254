"""Running ticks in-process against the served deployments, and looking at what they left."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import polars as pl
from deltalake import DeltaTable
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, FlowRunFilterTags

from blocks.usage_cursor import CURSOR_DOCUMENT, UsageCursor
from flows.usage_change_detection import usage_change_detection
from orchestration.runtime import read_cursor_value
from orchestration.tick import report_of
from usage_pipeline.cursor import Cursor, parse_cursor
from usage_pipeline.lake import STAGING_DIR, STATE_FILE, read_state_document
from usage_pipeline.settings import load_settings
from usage_pipeline.tick_report import TickReport


def tick(**parameters: object) -> tuple[object, TickReport | None]:
    """One detection tick in this process; the report is None when the flow failed before its tick."""
    state = usage_change_detection(**parameters, return_state=True)
    return state, report_of(state)


def cursor() -> Cursor:
    """The cursor as the next tick reads it: the block's value and the pipeline's state store."""
    state, _ = read_state_document(load_settings().lake_path)
    value, warnings = parse_cursor(read_cursor_value(), state)
    assert not warnings, warnings
    return value


def save_cursor_value(value: object) -> None:
    """Store any JSON as the block's value through the REST API, as an operator's script could."""
    from prefect.client.schemas.actions import BlockDocumentUpdate

    UsageCursor.register_type_and_schema()
    with get_client(sync_client=True) as client:
        try:
            document = client.read_block_document_by_name(CURSOR_DOCUMENT, UsageCursor.get_block_type_slug())
        except Exception:
            UsageCursor(value={}).save(CURSOR_DOCUMENT)
            document = client.read_block_document_by_name(CURSOR_DOCUMENT, UsageCursor.get_block_type_slug())
        client.update_block_document(
            document.id, BlockDocumentUpdate(data={"value": value}, merge_existing_data=False)
        )


def file_ids(root: Path) -> dict[str, object]:
    """Identity of every data file of the lake (not the pipeline's state): a rewrite changes inode and mtime.
    The bronze table counts as one entry, its version: every write of it is a commit."""
    ids: dict[str, object] = {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*.parquet"))
        if p.relative_to(root).parts[0] not in (STATE_DIR, "bronze", STAGING_DIR)
    }
    if DeltaTable.is_deltatable(str(root / BRONZE_TABLE)):
        ids[BRONZE_TABLE] = DeltaTable(str(root / BRONZE_TABLE)).version()
    return ids


def read_bronze(root: Path, version: int | None = None) -> pl.DataFrame:
    """The bronze table as any Delta reader sees it."""
    return pl.read_delta(str(root / BRONZE_TABLE), version=version)


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


BRONZE_TABLE = "bronze/billing_usage_raw"
STATE_DIR = Path(STATE_FILE).parts[0]


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


FINAL_STATE_TYPES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class RestApi:
    """A Prefect server's REST API, called the way scripts and the UI call it.

    A SQLite-backed server answers 503 while its database is locked (right after a restart,
    or on a loaded machine); such calls are retried, as the Prefect client itself does.
    """

    def __init__(self, api: str) -> None:
        self.api = api

    def request(self, method: str, path: str, body: dict | None = None) -> object:
        for attempt in range(10):
            response = httpx.request(method, f"{self.api}{path}", json=body, timeout=30)
            if response.status_code != 503:
                break
            time.sleep(1 + attempt)
        response.raise_for_status()
        return response.json()

    def get(self, path: str) -> object:
        return self.request("GET", path)

    def post(self, path: str, body: dict) -> object:
        return self.request("POST", path, body)

    def flow_run(self, run_id: str) -> dict:
        return self.get(f"/flow_runs/{run_id}")

    def flow_runs(self, **filters: object) -> list[dict]:
        runs: list[dict] = []
        while True:
            page = self.post("/flow_runs/filter", {"flow_runs": filters, "limit": 200, "offset": len(runs)})
            runs.extend(page)
            if len(page) < 200:
                return runs

    def wait_final(self, run_id: str, timeout: float, check: Callable[[], None] = lambda: None) -> dict:
        """Poll until the run is final; `check` may fail the wait early (e.g. a worker died)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            if run["state_type"] in FINAL_STATE_TYPES:
                return run
            check()
            time.sleep(0.5)
        raise AssertionError(f"flow run {run_id} not final after {timeout}s: {self.flow_run(run_id)['state_name']}")
