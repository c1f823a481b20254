"""No run of the pipeline stays Pending or Running after the process that ran it died.

Prefect marks nothing Crashed when a flow run's process is SIGKILLed (an OOM kill, a reboot),
and a dead tick keeps its deployment's concurrency slot, so the ticks after it are Cancelled.
Two means, each for what it can see:

- the `usage-crashed-runs` automation (created by `usage-pipeline setup`), Prefect's own
  zombie-run recipe: a run of the pipeline that sent a heartbeat and then neither another one
  nor a final state within USAGE_HEARTBEAT_TIMEOUT_SECONDS is marked Crashed, which frees its
  deployment slot. It covers ticks and every deployment run (workers and `serve` send a
  heartbeat every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds);
- each tick, holding the detection slot, marks Crashed what heartbeats cannot show: in-process
  subflow runs (bronze, silver, gold) still open under a parent run that has ended, and other
  ticks of its deployment still open (one that died Pending never sent a heartbeat).
"""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

from prefect.automations import Automation, ChangeFlowRunState, EventTrigger, Posture
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    TaskRunFilter,
    TaskRunFilterId,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.settings import get_current_settings
from prefect.states import Crashed

from orchestration.alerts import ensure_automation
from orchestration.deployments import PIPELINE_TAG, deployment_specs
from usage_pipeline.settings import Settings

CRASHED_RUNS = "usage-crashed-runs"
FINAL_RUN_EVENTS = {f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")}
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
OPEN_STATES = [StateType.PENDING, StateType.RUNNING]
PAGE = 200
SERVE_HEARTBEAT_SECONDS = 30  # Prefect's shortest; `usage-pipeline serve` uses it unless told otherwise


def crashed_runs_automation(timeout_seconds: int) -> Automation:
    """Prefect's zombie-run automation, for the pipeline's runs only (those tagged `usage-pipeline`)."""
    return Automation(
        name=CRASHED_RUNS,
        description=f"A usage-pipeline run with no heartbeat for {timeout_seconds} s has lost its process: mark it"
                    " Crashed (frees its deployment's concurrency slot).",
        trigger=EventTrigger(
            posture=Posture.Proactive,
            after={HEARTBEAT_EVENT},
            expect={HEARTBEAT_EVENT, *FINAL_RUN_EVENTS},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{PIPELINE_TAG}"},
            for_each={"prefect.resource.id"},
            threshold=1,
            within=timedelta(seconds=timeout_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"No heartbeat for {timeout_seconds} s: the process running it died. The next tick"
                        " redoes its work.",
            )
        ],
    )


def heartbeat_problem(timeout_seconds: int) -> str | None:
    """Whether this process's heartbeat period lets its runs be told from dead ones within the timeout."""
    frequency = get_current_settings().flows.heartbeat_frequency
    if frequency is not None and frequency * 3 <= timeout_seconds * 2:
        return None
    return (f"PREFECT_FLOWS_HEARTBEAT_FREQUENCY is {frequency} here, but {CRASHED_RUNS} marks a run Crashed after"
            f" {timeout_seconds} s without a heartbeat (USAGE_HEARTBEAT_TIMEOUT_SECONDS): set it to at most"
            f" {timeout_seconds * 2 // 3} (e.g. {SERVE_HEARTBEAT_SECONDS}) wherever runs execute (workers; serve does)")


def setup_crash_detection(settings: Settings) -> list[str]:
    """Create or update the crashed-runs automation; warn when this environment's heartbeats are too rare."""
    timeout = settings.heartbeat_timeout_seconds
    done = ensure_automation(crashed_runs_automation(timeout))
    lines = [f"{CRASHED_RUNS} {done}: a pipeline run with no heartbeat for {timeout} s is marked Crashed"]
    if problem := heartbeat_problem(timeout):
        lines.append(f"WARNING: {problem}")
    return lines


def crash_orphaned_runs(tick_run_id: UUID, tick_deployment_id: UUID | None) -> list[str]:
    """Mark Crashed the pipeline's runs left open by a dead process; returns their names.

    Called by a tick that holds the detection slot and its deployment's: no other tick of that
    deployment can be running then, and a subflow that runs in its parent's process cannot
    outlive it. Deployment runs started by a tick (USAGE_PARTITION_RUNS=deployment) run in
    processes of their own and are left to the heartbeat automation.
    """
    with get_client(sync_client=True) as client:
        open_runs = [run for run in read_open_runs(client) if run.id != tick_run_id]
        parents = parent_flow_runs(client, [run for run in open_runs if run.parent_task_run_id])
        orphans = []
        for run in open_runs:
            if run.parent_task_run_id is not None:
                parent = parents.get(run.parent_task_run_id)
                orphaned = run.deployment_id is None and (parent is None or parent.state is None or parent.state.is_final())
            else:
                orphaned = tick_deployment_id is not None and run.deployment_id == tick_deployment_id
            if orphaned:
                client.set_flow_run_state(
                    run.id,
                    Crashed(message="Its process died (found open by the next detection tick, which redoes its work)"),
                    force=True,
                )
                orphans.append(run.name)
    return orphans


def read_open_runs(client: SyncPrefectClient) -> list[FlowRun]:
    """The pipeline's flow runs that are Pending or Running (usually none but the calling tick)."""
    flows = FlowFilter(name=FlowFilterName(any_=[spec.name for spec in deployment_specs()]))
    state = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=OPEN_STATES)))
    runs: list[FlowRun] = []
    while page := client.read_flow_runs(flow_filter=flows, flow_run_filter=state, limit=PAGE, offset=len(runs)):
        runs.extend(page)
        if len(page) < PAGE:
            break
    return runs


def parent_flow_runs(client: SyncPrefectClient, subflow_runs: list[FlowRun]) -> dict[UUID, FlowRun]:
    """Each subflow run's parent flow run, by the subflow's parent task run id (absent: deleted)."""
    if not subflow_runs:
        return {}
    task_ids = list({run.parent_task_run_id for run in subflow_runs})
    task_runs = client.read_task_runs(task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=task_ids)),
                                      limit=len(task_ids))
    flow_run_of = {task_run.id: task_run.flow_run_id for task_run in task_runs}
    flow_ids = list({flow_run_id for flow_run_id in flow_run_of.values() if flow_run_id is not None})
    flow_runs = {run.id: run for run in client.read_flow_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_ids)), limit=len(flow_ids))} if flow_ids else {}
    return {task_id: flow_runs[flow_id] for task_id, flow_id in flow_run_of.items() if flow_id in flow_runs}
