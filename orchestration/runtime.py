"""Prefect glue the flows share: source connections, the cursor block, slots, child runs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prefect import Flow, get_run_logger
from prefect import tags as run_tags
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import BlockDocumentUpdate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, FlowRunFilterParentFlowRunId
from prefect.client.schemas.objects import BlockDocument
from prefect.context import TagsContext
from prefect.deployments import run_deployment
from prefect.exceptions import MissingContextError, ObjectNotFound
from prefect.logging import get_logger
from prefect.runtime import flow_run as current_flow_run
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings
from prefect.states import Crashed
from prefect_sqlalchemy import SqlAlchemyConnector
from sqlalchemy.engine import Connection, Engine

from blocks.usage_cursor import CURSOR_DOCUMENT, UsageCursor
from orchestration.setup import (
    BILLING_BLOCK,
    V3_BLOCK,
)
from usage_pipeline.check_results import CheckResult, ChecksFailed
from usage_pipeline.detection import DealerStats, RunOutcome
from usage_pipeline.materialize import GoldResult, SilverResult, SourceFingerprints
from usage_pipeline.partners import layer_tag, partner_tag
from usage_pipeline.queries import dealer_directory, relevant_stats

CHILD_POLL_SECONDS = 0.5
SUBMIT_ATTEMPTS = 3
T = TypeVar("T")


class SourceError(RuntimeError):
    """A source database failed; the message names it and never carries the password."""


@dataclass
class Source:
    """An engine for one connector block, plus what is needed to describe its errors safely."""

    block: str
    engine: Engine  # its repr hides the password
    connectorx_uri: str | None = field(repr=False)  # Arrow-native bulk reads (password inside); None for SQLite
    password: str | None = field(repr=False)

    def error(self, exc: BaseException) -> SourceError:
        text = f"{type(exc).__name__}: {exc}"
        if self.password:
            text = text.replace(self.password, "***")
        if len(text) > 500:
            text = text[:500] + "..."
        return SourceError(f"{self.block}: {text}")


def load_source(block: str) -> Source:
    try:
        connector = SqlAlchemyConnector.load(block)
    except (ValueError, ObjectNotFound) as exc:
        raise SourceError(f"{block}: connector block not found; run `usage-pipeline setup` ({exc})") from None
    engine = connector.get_engine(pool_pre_ping=True)  # the block's URL and connect_args
    url = engine.url
    connectorx_uri = None
    if url.get_backend_name() in ("mysql", "mariadb"):
        connectorx_uri = url.set(drivername="mysql").render_as_string(hide_password=False)
    return Source(block, engine, connectorx_uri, url.password)


def query_source(block: str, query: Callable[[Connection], T]) -> T:
    """One query on a connector block's database; its failure a SourceError naming the block."""
    source = load_source(block)
    try:
        with source.engine.connect() as conn:
            return query(conn)
    except Exception as exc:
        raise source.error(exc) from None
    finally:
        source.engine.dispose()


def load_dealer_directory() -> tuple[dict[int, str | None], list[str]]:
    """The v3 dealer -> partner map, and a warning per malformed row (those count as unmapped)."""
    return query_source(V3_BLOCK, dealer_directory)


def read_source_fingerprints(dealers: list[int]) -> dict[int, DealerStats]:
    """The dealers' relevant-row stats as the billing source has them now."""
    return query_source(BILLING_BLOCK, lambda conn: relevant_stats(conn, dealers))


def read_dealer_directory() -> dict[int, str | None]:
    """The v3 directory inside a run, its warnings in the run's log."""
    partners, warnings = load_dealer_directory()
    for warning in warnings:
        get_run_logger().warning(warning)
    return partners


@dataclass(frozen=True)
class TickShared:
    """What the running tick already holds, for the subflows it runs in its own process: the v3
    map it planned with (one v3 read per tick, and a partition holds exactly the dealers the plan
    gave it), and what the source said of the dealers it checked before the extract (the source
    reconciliation check). Manual and deployment runs, in processes of their own, read v3 themselves
    and have no such fingerprints."""

    directory: dict[int, str | None]
    checked: frozenset[int] = frozenset()  # empty on a start-over tick: it counts dealers from its extract
    fingerprints: dict[int, DealerStats] = field(default_factory=dict)  # of `checked`; absent: no relevant rows

    def source_fingerprints(self, dealers: list[int]) -> SourceFingerprints | None:
        checked = [d for d in dealers if d in self.checked]
        if not checked:
            return None
        return SourceFingerprints({d: self.fingerprints[d] for d in checked if d in self.fingerprints}, checked,
                                  read_source_fingerprints)


_TICK_SHARED: ContextVar[TickShared | None] = ContextVar("usage_tick_shared", default=None)


@contextmanager
def sharing_with_subflows(shared: TickShared) -> Iterator[TickShared]:
    token = _TICK_SHARED.set(shared)
    try:
        yield shared
    finally:
        _TICK_SHARED.reset(token)


def tick_shared() -> TickShared | None:
    """The running tick's shared values, or None outside a tick."""
    return _TICK_SHARED.get()


def read_cursor_document() -> BlockDocument | None:
    with get_client(sync_client=True) as client:
        try:
            return client.read_block_document_by_name(CURSOR_DOCUMENT, UsageCursor.get_block_type_slug())
        except ObjectNotFound:
            return None


def read_cursor_value() -> Any:
    """The raw `value` of the cursor block, or None when the block does not exist."""
    document = read_cursor_document()
    return None if document is None else document.data.get("value")


def write_cursor_value(value: dict[str, Any], read_at_start: Any) -> bool:
    """Save the cursor unless an operator edited it during the tick (their edit wins).

    Skipping the write is safe: the next tick redoes the work this tick did. An existing
    block's `value` is replaced in one request; `Block.save` would also re-register the
    block type and schema and read the document back (about 8 requests).
    """
    document = read_cursor_document()
    if (None if document is None else document.data.get("value")) != read_at_start:
        get_run_logger().warning(
            "The cursor block was edited during this tick; keeping the operator's edit and not saving this tick's"
            " progress (the next tick will redo it)"
        )
        return False
    if document is None:
        UsageCursor(value=value).save(CURSOR_DOCUMENT)
        return True
    with get_client(sync_client=True) as client:
        client.update_block_document(document.id, BlockDocumentUpdate(data={"value": value}))
    return True


def tag_current_run(partner_uuid: str, layer: str) -> None:
    """Make sure a partition run carries its tags even when started by hand from the CLI or UI."""
    wanted = {partner_tag(partner_uuid), layer_tag(layer)}
    tags = set(current_flow_run.tags or [])
    if wanted <= tags or current_flow_run.id is None:
        return
    with get_client(sync_client=True) as client:
        client.update_flow_run(current_flow_run.id, tags=sorted(tags | wanted))


def run_or_module_logger() -> logging.Logger | logging.LoggerAdapter:
    """The current run's logger (its lines show in the UI), or this module's outside a run."""
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger(__name__)


def without_subflow_heartbeats() -> AbstractContextManager:
    """Subflows started inside get no heartbeat thread of their own: the parent's heartbeat already
    shows this process alive, and Prefect joins a run's heartbeat thread for up to a second at its
    end. Entered once per tick: each `temporary_settings` re-validates all settings (about 25 ms)."""
    if get_current_settings().flows.heartbeat_frequency is None:
        return nullcontext()
    return temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def without_task_tags() -> AbstractContextManager:
    """Tasks called inside run untagged; the flow runs around them keep their tags. Before a task
    run with tags it has not seen in this process, Prefect's engine asks the server for their
    `tag:` concurrency limits. On a SQLite-backed server that write meets the task run's own insert
    and waits out a 503 retry: 2 s or more in every served tick, measured. These tasks have no tag limits."""
    return TagsContext(current_tags=set())


def run_subflow(flow: Flow, parameters: dict[str, Any], run_name: str, tags: list[str]) -> RunOutcome:
    """Run a flow in this process as a subflow of the current run and return its final state.

    When the engine itself fails (a busy server's 503 past the client's own retries, the API
    gone) before the subflow's run exists, it is tried again, up to SUBMIT_ATTEMPTS times; once
    the run exists it is not (one run per layer and partition per tick): the run is marked Crashed
    if it was left open, and the child counts as failed, to be redone on a later tick.
    """
    for attempt in range(1, SUBMIT_ATTEMPTS + 1):
        try:
            with run_tags(*tags), without_subflow_heartbeats():
                state = flow.with_options(flow_run_name=run_name)(**parameters, return_state=True)
            break
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            created = abandon_subflow_runs(run_name, error)
            if created is not None or attempt == SUBMIT_ATTEMPTS:
                return RunOutcome(run_name, "Crashed", False, error, created)
            run_or_module_logger().warning("Starting %s failed (%s); retrying", run_name, error)
            time.sleep(2**attempt)
    result = state.result(raise_on_failure=False) if state.is_completed() or state.is_failed() else None
    rows = getattr(result, "bronze_rows", None)  # a silver run's SilverResult
    return RunOutcome(run_name, state.name, state.is_completed(), state.message, str(state.state_details.flow_run_id),
                      rows, result=result, checks=checks_of(result))


def checks_of(result: object) -> tuple[CheckResult, ...]:
    """A silver or gold run's check results: from its result, or from the ChecksFailed it failed with."""
    if isinstance(result, ChecksFailed):
        return result.results
    return result.checks if isinstance(result, SilverResult | GoldResult) else ()


def abandon_subflow_runs(run_name: str, error: str) -> str | None:
    """The id of the current run's subflow run named `run_name` if one was created (None: none was),
    marked Crashed unless it ended; best effort, as the API may be what failed."""
    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[current_flow_run.id]),
                name=FlowRunFilterName(any_=[run_name])))
            for run in runs:
                if run.state is None or not run.state.is_final():
                    client.set_flow_run_state(run.id, Crashed(message=f"Abandoned by its parent: {error}"), force=True)
    except Exception as exc:
        run_or_module_logger().warning("Could not look up %s after it failed (%s)", run_name, exc)
        return "unknown"  # it may exist: not tried again
    return str(runs[0].id) if runs else None


def run_child(
    deployment: str, parameters: dict[str, Any], run_name: str, tags: list[str], timeout_seconds: float
) -> RunOutcome:
    """Run a deployment as a subflow of the current run and wait for its final state.

    `run_deployment` does not raise when the child fails, so the state is checked here;
    a child that does not finish in time counts as failed and is retried on a later tick.
    """
    # Same key on every attempt: a retry after a lost response finds the run instead of adding one.
    key = f"{current_flow_run.id}:{run_name}"
    for attempt in range(1, SUBMIT_ATTEMPTS + 1):
        try:
            flow_run = run_deployment(
                f"{deployment}/{deployment}",
                parameters=parameters,
                flow_run_name=run_name,
                tags=tags,
                idempotency_key=key,
                timeout=timeout_seconds,
                poll_interval=CHILD_POLL_SECONDS,
            )
            break
        except Exception as exc:  # e.g. a busy server (503); after the last attempt, this child failed
            if attempt == SUBMIT_ATTEMPTS:
                return RunOutcome(run_name, "NotSubmitted", False, f"{type(exc).__name__}: {exc}")
            get_run_logger().warning("Submitting %s failed (%s); retrying", run_name, exc)
            time.sleep(2**attempt)
    state = flow_run.state
    if state is None or not state.is_final():
        message = f"not finished after {timeout_seconds:.0f}s (state {state.name if state else 'unknown'})"
        return RunOutcome(run_name, state.name if state else "Unknown", False, message, str(flow_run.id))
    return RunOutcome(run_name, state.name, state.is_completed(), state.message, str(flow_run.id))
