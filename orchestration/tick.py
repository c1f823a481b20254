"""The detection tick's body: the plain values of usage_pipeline wired to Prefect.

snapshot -> plan -> bronze -> partitions (silver then gold, concurrently) -> new
cursor, with the flow runs, artifacts and events operators see. The flows to run
come in as `Layers`, so this module imports no flow module.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeVar
from uuid import UUID

from prefect import Flow, State, get_run_logger
from prefect.runtime import deployment as current_deployment
from prefect.runtime import flow_run as current_flow_run
from prefect.utilities.annotations import quote

from orchestration.crashed_runs import crash_orphaned_runs, heartbeat_problem
from orchestration.events import emit_pending_events
from orchestration.reconcile import load_reconciliation_state
from orchestration.runtime import (
    Source,
    SourceError,
    TickShared,
    load_source,
    query_source,
    read_cursor_value,
    read_dealer_directory,
    run_child,
    run_subflow,
    sharing_with_subflows,
    without_subflow_heartbeats,
    write_cursor_value,
)
from orchestration.setup import BILLING_BLOCK
from usage_pipeline import bronze
from usage_pipeline.check_results import RECONCILIATION_TOTALS, CheckResult, with_severity
from usage_pipeline.checks import ExtractTotals, SourceTotals, totals_check, unexplained_by_the_source
from usage_pipeline.cursor import Cursor, format_timestamp, is_current_layout, parse_cursor
from usage_pipeline.detection import (
    PartitionOutcome,
    Plan,
    RunOutcome,
    SourceSnapshot,
    advance_cursor,
    newly_pending,
    partition_episodes,
    plan_tick,
    starts_over,
    with_bronze_stats,
)
from usage_pipeline.extract import source_totals
from usage_pipeline.lake import (
    LakePath,
    read_state_document,
    remove_staging,
    remove_stale_temp_files,
    write_state_document,
)
from usage_pipeline.materialize import BronzeResult, bronze_dealer_stats, committed_totals
from usage_pipeline.partners import layer_tag, partner_tag
from usage_pipeline.queries import has_dealer_modified_index, probe_raw_max, read_snapshot
from usage_pipeline.reconciliation import ReconciliationState
from usage_pipeline.schema import INDEX_ADVICE
from usage_pipeline.settings import Settings
from usage_pipeline.tick_report import TickFailed, TickReport

SLOW_PROBE_SECONDS = 1.0
T = TypeVar("T")


@dataclass(frozen=True)
class Layers:
    """The flows a tick runs, as subflows of itself or as deployment runs (USAGE_PARTITION_RUNS)."""

    bronze: Flow
    silver: Flow
    gold: Flow


@dataclass(frozen=True)
class SourceProbe:
    """What a tick asks its sources without its cursor, so while it reads the cursor: the probe of the
    billing source (whose engine the candidates' queries reuse) and the v3 directory."""

    billing: Source
    raw_max: dict[int, datetime | None]
    probe_seconds: float  # the probe's query alone: slow means its index is missing
    partners: dict[int, str | None]
    seconds: float  # from asking both until both answered


def start_probe(pool: ThreadPoolExecutor) -> Future[SourceProbe]:
    """The v3 directory and the billing probe, each on a thread of `pool`; a failure is a SourceError
    naming the database, raised by the future."""
    started = time.perf_counter()
    directory = pool.submit(contextvars.copy_context().run, read_dealer_directory)

    def probe() -> SourceProbe:
        billing = load_source(BILLING_BLOCK)
        try:
            with billing.engine.connect() as conn:
                probe_started = time.perf_counter()
                raw_max = probe_raw_max(conn)
                probe_seconds = time.perf_counter() - probe_started
            partners = directory.result()
            return SourceProbe(billing, raw_max, probe_seconds, partners, time.perf_counter() - started)
        except Exception as exc:
            billing.engine.dispose()
            raise exc if isinstance(exc, SourceError) else billing.error(exc) from None

    return pool.submit(contextvars.copy_context().run, probe)


def dispose_probe(probed: Future[SourceProbe]) -> None:
    """Close the engine the probe opened for the candidates' queries (they reuse its connection)."""
    if not probed.cancelled() and probed.exception() is None:
        probed.result().billing.engine.dispose()


def take_snapshot(cursor: Cursor, requested: frozenset[str], stats_from_bronze: bool,
                  reconciliation: ReconciliationState | None,
                  probed: Future[SourceProbe]) -> tuple[SourceSnapshot, float]:
    """The probe's answer diffed against the cursor, then the candidates' stats asked of the billing
    source, and the seconds the source reads took; a failure becomes a SourceError naming the database."""
    logger = get_run_logger()
    probe = probed.result()
    billing = probe.billing
    started = time.perf_counter()
    try:
        with billing.engine.connect() as conn:
            snapshot = read_snapshot(conn, cursor, probe.partners, probe.raw_max, requested, stats_from_bronze,
                                     reconciliation)
        source_seconds = probe.seconds + time.perf_counter() - started
        if probe.probe_seconds > SLOW_PROBE_SECONDS and not has_dealer_modified_index(billing.engine):
            logger.warning("Slow usage probe (%.1fs): index missing; ask the DBA for: %s",
                           probe.probe_seconds, INDEX_ADVICE)
    except Exception as exc:
        raise billing.error(exc) from None
    if snapshot.awaiting_bronze:
        logger.info(
            "Found usage data for %d dealer(s); bronze is re-extracted in full, so their relevant rows are"
            " counted from that extract", len(snapshot.raw_max),
        )
    else:
        logger.info(
            "Found usage data for %d dealer(s); checked %d under the billing filters, %d of them found changed"
            " by the rolling reconciliation%s", len(snapshot.raw_max), len(snapshot.checked), len(snapshot.suspects),
            f" {sorted(snapshot.suspects)}" if snapshot.suspects else "",
        )
    return snapshot, source_seconds


def read_reconciliation(root: LakePath, now: datetime, period_seconds: float,
                        cursor: Cursor) -> tuple[ReconciliationState | None, float | None]:
    """The rolling reconciliation's state, for its suspects, and how late its cycle is; said in the log
    when it is late or has not run (its deployment, usage-reconciliation, is not served or not scheduled)."""
    logger = get_run_logger()
    state, problem = load_reconciliation_state(root)
    if problem:
        logger.warning("%s; its suspects are re-checked once a usage-reconciliation run saves it again", problem)
    if state is None:
        if cursor.dealer_seen is not None and not problem:
            logger.info("The rolling reconciliation has not run yet (deployment usage-reconciliation): changes that"
                        " leave MAX(usage_modified) alone are found once it does")
        return None, None
    overdue = state.overdue_seconds(now, period_seconds)
    if overdue:
        logger.warning(
            "The rolling reconciliation's cycle started %s and is %.0f s past USAGE_RECONCILE_SECONDS: is the"
            " usage-reconciliation deployment running? Changes that leave MAX(usage_modified) alone wait for it",
            format_timestamp(state.cycle_started_at), overdue,
        )
    return state, overdue


def complete_snapshot(snapshot: SourceSnapshot, root: LakePath, written: BronzeResult | None,
                      version: int) -> SourceSnapshot:
    """A start-over tick's dealer stats, from the bronze it just wrote (instead of a second full join):
    counted by the bronze subflow from its extract, or read from the version a deployment run committed."""
    started = time.perf_counter()
    stats = written.stats if written is not None and written.stats is not None else bronze_dealer_stats(root, version)
    complete = with_bronze_stats(snapshot, stats)
    get_run_logger().info(
        "Took the relevant rows of %d dealer(s) from bronze version %d in %.2fs",
        len(complete.relevant), version, time.perf_counter() - started,
    )
    return complete


def log_plan(plan: Plan) -> None:
    logger = get_run_logger()
    if plan.is_empty:
        logger.debug("No usage changes detected")
        return
    if plan.dealer_changes:
        logger.info("Detected changes for %d dealer(s): %s", len(plan.dealer_changes), sorted(plan.dealer_changes))
    if plan.unknown_partners:
        logger.warning(
            "Requested partner(s) %s: no dealer maps to them in v3 and nothing was materialized for them; not rebuilt",
            plan.unknown_partners,
        )
    if plan.unmapped_dealers:
        logger.warning(
            "Dealer(s) %s changed but map to no partner in v3; their usage is not in any partition",
            plan.unmapped_dealers,
        )
    logger.info("Mapped to %d affected partner partition(s)", len(plan.partitions))
    for partner, reasons in plan.partitions.items():
        logger.info("Partition %s: %s", partner, "; ".join(reasons))
    if plan.runs_bronze:
        logger.info(
            "Creating %d run request(s): 1 bronze (billing-usage-raw) + %d silver/gold partition(s)",
            1 + len(plan.partitions), len(plan.partitions),
        )


def run_layer(flow: Flow, parameters: dict[str, Any], name: str, tags: list[str], settings: Settings) -> RunOutcome:
    """One child run, named and tagged the same whichever way it runs (USAGE_PARTITION_RUNS)."""
    if settings.partition_runs == "deployment":
        return run_child(flow.name, parameters, name, tags, settings.child_run_timeout_seconds)
    return run_subflow(flow, parameters, name, tags)


def run_bronze(plan: Plan, layers: Layers, settings: Settings) -> RunOutcome:
    name = "bronze-full" if plan.bronze_dealers is None else f"bronze-{len(plan.bronze_dealers)}-dealers"
    return run_layer(layers.bronze, {"dealer_ids": plan.bronze_dealers}, name, [layer_tag("bronze")], settings)


def run_silver(partner: str, layers: Layers, settings: Settings, bronze_version: int) -> RunOutcome:
    """Silver of the bronze version the tick committed, checked and staged (not cascading: gold follows)."""
    return run_layer(layers.silver, {"partner_uuid": partner, "cascade": False, "bronze_version": bronze_version,
                                     "publish": False}, f"silver-{partner}", [partner_tag(partner), layer_tag("silver")],
                     settings)


def run_gold(partner: str, silver: RunOutcome, layers: Layers, settings: Settings,
             extract: RunOutcome | None = None) -> PartitionOutcome:
    """Gold from the silver staged under the silver run's id, publishing all four files, if silver succeeded
    and the extract passed its totals check (`extract`, None: no check awaited)."""
    if silver.ok and extract is not None and not extract.ok:  # the tick reports it once, as bronze's failure
        remove_staging(settings.lake_path, silver.flow_run_id)
        return PartitionOutcome(partner, silver, RunOutcome(f"gold-{partner}", "NotStarted", False, extract.message))
    gold = None
    if silver.ok:
        gold = run_layer(layers.gold, {"partner_uuid": partner, "staged_silver": silver.flow_run_id},
                         f"gold-{partner}", [partner_tag(partner), layer_tag("gold")], settings)
    outcome = PartitionOutcome(partner, silver, gold)
    if not outcome.ok:  # also when the run never started and so has no log of its own
        get_run_logger().error("Partition %s failed: %s", partner, outcome.error)
    return outcome


def materialize_partitions(partners: list[str], layers: Layers, settings: Settings, bronze_version: int,
                           extract_checked: Future[RunOutcome] | None = None) -> dict[str, PartitionOutcome]:
    """Run partitions concurrently, at most USAGE_MAX_CONCURRENT_PARTITIONS runs in flight: each partner's
    silver, then its gold. While a start-over tick's extract awaits its totals check (`extract_checked`),
    every silver builds first, then the golds (the publishes) once the check passed: nothing is
    published from an extract that failed it, and no thread waits for the check holding a place.

    Each thread gets a copy of the flow-run context so its runs link to this tick as subflows.
    """
    def in_parallel(work: Callable[[str], T]) -> dict[str, T]:
        with ThreadPoolExecutor(max_workers=settings.max_concurrent_partitions, thread_name_prefix="partition") as pool:
            futures = {partner: pool.submit(contextvars.copy_context().run, work, partner) for partner in partners}
            return {partner: future.result() for partner, future in futures.items()}

    if extract_checked is None:
        return in_parallel(lambda p: run_gold(p, run_silver(p, layers, settings, bronze_version), layers, settings))
    silvers = in_parallel(lambda p: run_silver(p, layers, settings, bronze_version))
    extract = extract_checked.result()
    return in_parallel(lambda p: run_gold(p, silvers[p], layers, settings, extract))


def run_layers(plan: Plan, snapshot: SourceSnapshot, layers: Layers, settings: Settings, report: TickReport) -> SourceSnapshot:
    """Bronze, then the partitions if it succeeded; their outcomes go into `report`. Returns the
    snapshot, completed from bronze when it awaited a full extract."""
    checked = frozenset() if snapshot.awaiting_bronze else snapshot.checked  # else counted from the extract
    with sharing_with_subflows(TickShared(snapshot.partners, checked, snapshot.relevant)), \
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="source-totals") as pool:
        # A start-over tick's independent number, asked as its extract starts (the source as it was
        # before the extract, like an incremental tick's fingerprints) and alongside it.
        totals = pool.submit(contextvars.copy_context().run, query_source, BILLING_BLOCK, source_totals) \
            if snapshot.awaiting_bronze else None
        report.bronze = run_bronze(plan, layers, settings)
        if not report.bronze.ok:
            get_run_logger().error("Bronze failed (%s); no partition runs this tick", report.bronze.message)
            return snapshot
        written = report.bronze.result if isinstance(report.bronze.result, BronzeResult) else None
        version = written.version if written is not None else committed_version(settings.lake_path, report.bronze)
        # The totals check runs while the partitions build; their gold runs (the publishes) wait for it.
        extract_checked = None if totals is None else pool.submit(
            contextvars.copy_context().run, check_extract_totals, settings, report.bronze, version, totals)
        if snapshot.awaiting_bronze:
            snapshot = complete_snapshot(snapshot, settings.lake_path, written, version)
        if plan.partitions:
            report.partitions = materialize_partitions(list(plan.partitions), layers, settings, version,
                                                       extract_checked)
        if extract_checked is not None:
            report.bronze = extract_checked.result()
        if not report.bronze.ok:
            get_run_logger().error("Bronze failed (%s); no partition was published this tick", report.bronze.message)
    return snapshot


def check_extract_totals(settings: Settings, outcome: RunOutcome, version: int,
                         totals_asked: Future[SourceTotals]) -> RunOutcome:
    """A start-over tick's extract (bronze at `version`) against the source's totals asked as it started
    (its dealers' fingerprints come from the extract itself), or asked again after it. A mismatch, or a
    source that does not answer, fails bronze, so no partition is published; USAGE_CHECKS_WARN_ONLY
    naming the check makes either a warning."""
    logger = get_run_logger()
    try:
        extracted = committed_totals(settings.lake_path, version)
    except Exception as exc:  # an older worker's commit, or a log that lost it: checked it cannot be
        result = CheckResult(RECONCILIATION_TOTALS, f"the totals of bronze version {version}'s extract",
                             f"unreadable: {type(exc).__name__}: {exc}", False)
    else:
        try:
            result = compare_asking_again_on_a_mismatch(totals_asked.result(), extracted)
        except SourceError as exc:
            result = CheckResult(RECONCILIATION_TOTALS, "the billing source's totals", f"unanswered: {exc}", False)
    result = with_severity(result, settings.warn_only_checks)
    logger.log(logging.INFO if result.passed else logging.WARNING, "Start-over check %s", result.describe())
    if result.passed or not result.blocking:
        return replace(outcome, checks=(result,))
    return replace(outcome, state="Failed", ok=False, message=f"check failed: {result.describe()}", checks=(result,))


def compare_asking_again_on_a_mismatch(source: SourceTotals, extracted: ExtractTotals) -> CheckResult:
    """The extract against the source's first answer; on a mismatch, the source is asked again (a query as
    long as the first) and the extract compared with that answer. Where only parts that the source's
    answer moved on differ, the source changed during the extract and the totals cannot tell: a warning,
    not a failure (the ticks after it find each dealer the extract missed by its fingerprint, and rebuild
    it). Deferring instead would keep a busy source from ever finishing a first tick. A second ask left
    unanswered keeps the first comparison."""
    result = totals_check(source, extracted)
    if result.passed:
        return result
    try:
        after = query_source(BILLING_BLOCK, source_totals)
    except SourceError as exc:
        return replace(result, actual=f"{result.actual} (asked again, no answer: {exc})")
    second = totals_check(after, extracted)
    if second.passed:
        return replace(result, passed=True, actual=f"{result.actual} (as the source after the extract)")
    if not unexplained_by_the_source(source, after, extracted):
        return replace(second, blocking=False,
                       actual=f"{second.actual} (inconclusive: the source moved during the extract)")
    return replace(second, actual=f"{second.actual} (asked again after the extract)")


def committed_version(root: LakePath, outcome: RunOutcome) -> int:
    """The version a bronze deployment run committed, from its commit's metadata."""
    version = None if outcome.flow_run_id is None else bronze.version_committed_by(root, outcome.flow_run_id)
    if version is None:
        raise RuntimeError(f"{outcome.name} ended {outcome.state} but no bronze commit names it")
    return version


@dataclass(frozen=True)
class StoredCursor:
    """The cursor a tick started from, with the block value and state document it was read from."""

    cursor: Cursor
    block_value: object
    state: dict | None
    # Both read without a warning and with this version's keys: an equal cursor would write back what
    # they already say, so a tick that changed nothing skips building them (0.2 s at 20,000 dealers).
    clean: bool


def read_cursor(root: LakePath) -> StoredCursor:
    """The cursor as the block and the pipeline's state store hold it, with a warning per problem."""
    logger = get_run_logger()
    block_value = read_cursor_value()
    state, problem = read_state_document(root)
    cursor, warnings = parse_cursor(block_value, state)
    for warning in warnings:
        logger.warning(warning)
    if cursor.dealer_seen is None and not cursor.is_first_run:
        logger.warning("%s: re-checking every dealer and rebuilding every partition", problem)
    clean = not warnings and is_current_layout(block_value, state)
    return StoredCursor(cursor, block_value, state, clean)


def save_cursor(root: LakePath, cursor: Cursor, stored: StoredCursor) -> bool:
    """State first, then the block: a crash between them leaves the block behind the state, which the
    next tick reads as an operator edit of those dealers and redoes (never the reverse, which could skip)."""
    if stored.clean and cursor == stored.cursor:
        return False
    if (state := cursor.state_document()) != stored.state:
        write_state_document(root, state)
    if (block_value := cursor.block_value()) != stored.block_value:
        return write_cursor_value(block_value, stored.block_value)
    return False


def clean_up_after_dead_processes(settings: Settings) -> None:
    """What a killed process left: its runs still open (marked Crashed, this tick redoes their work), and
    its temporary lake files."""
    logger = get_run_logger()
    deployment_id = UUID(current_deployment.id) if current_deployment.id else None
    if deployment_id is not None and (problem := heartbeat_problem(settings.heartbeat_timeout_seconds)):
        logger.warning(problem)  # this run could be marked Crashed while it works
    if crashed := crash_orphaned_runs(UUID(current_flow_run.id), deployment_id):
        logger.warning("Marked %d run(s) Crashed that a dead process had left open: %s", len(crashed), crashed)
    if removed := remove_stale_temp_files(settings.lake_path):
        logger.info("Removed %d temporary file(s) that killed writers left in the lake: %s", len(removed), removed)


def report_of(state: State) -> TickReport | None:
    """A finished tick flow run's report, for a caller in the same process: the flow returns it quoted, or
    inside the TickFailed of its Failed state; None when the flow failed before its tick."""
    result = state.result(raise_on_failure=False)
    if isinstance(result, quote):
        result = result.unquote()
    if isinstance(result, TickFailed):
        result = result.report
    return result if isinstance(result, TickReport) else None


def run_tick(settings: Settings, layers: Layers, dry_run: bool, requested: frozenset[str], full_refresh: bool) -> TickReport:
    logger = get_run_logger()
    report = TickReport(dry_run=dry_run, requested=requested, full_refresh=full_refresh)
    now = datetime.now(UTC).replace(tzinfo=None)
    root = settings.lake_path
    logger.info("Checking dealer timestamps for usage changes")
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="source-probe") as pool:
        probed = start_probe(pool)  # needs no cursor: asked while the cursor is read
        try:
            if not dry_run:  # a dry run changes nothing
                clean_up_after_dead_processes(settings)
            stored = read_cursor(root)
            cursor = report.cursor = stored.cursor
            stats_from_bronze = starts_over(cursor, full_refresh) and not dry_run
            reconciliation, report.reconciliation_overdue_seconds = read_reconciliation(
                root, now, settings.reconcile_seconds, cursor)
            snapshot, report.source_seconds = take_snapshot(cursor, requested, stats_from_bronze, reconciliation,
                                                            probed)
            report.suspects = snapshot.suspects
        except SourceError as exc:
            logger.warning("Failed to query the source, nothing submitted, cursor unchanged: %s", exc)
            report.skipped = str(exc)
            return report
        finally:  # however the tick leaves this, once the probe has ended
            probed.add_done_callback(dispose_probe)

    plan = report.plan = plan_tick(cursor, snapshot, requested, full_refresh)
    log_plan(plan)
    if dry_run:
        logger.info("Dry run: nothing submitted, cursor unchanged")
        return report

    report.episodes = partition_episodes(cursor, plan)
    # Before any run: a tick that hangs or dies still leaves the stale alert's start behind.
    emit_pending_events(cursor, plan, newly_pending(cursor, plan), now)
    if plan.runs_bronze:
        with without_subflow_heartbeats():
            snapshot = run_layers(plan, snapshot, layers, settings, report)

    new_cursor = advance_cursor(cursor, snapshot, plan, report.bronze, report.partitions, now)
    for partner, status in new_cursor.partitions.items():
        if status.failures >= settings.alert_failed_ticks:
            logger.error(
                "Partition %s has failed %d ticks in a row (last error: %s); it is retried every tick",
                partner, status.failures, status.last_error,
            )
    report.cursor_saved = save_cursor(root, new_cursor, stored)
    report.cursor = new_cursor
    table = bronze.status(root)
    report.bronze_table = None if table is None else table.payload()
    return report
