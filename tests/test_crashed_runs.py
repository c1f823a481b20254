"""Unit tests for orchestration/crashed_runs.py's pure parts: the automation it asks for, and the heartbeat check."""

from __future__ import annotations

import pytest
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from orchestration.crashed_runs import CRASHED_RUNS, crashed_runs_automation, heartbeat_problem
from orchestration.deployments import PIPELINE_TAG


def test_the_automation_crashes_only_the_pipelines_runs_once_their_heartbeats_stop():
    automation = crashed_runs_automation(90)
    trigger = automation.trigger
    assert automation.name == CRASHED_RUNS
    assert trigger.posture == "Proactive" and trigger.within.total_seconds() == 90 and trigger.threshold == 1
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert trigger.expect == {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                              "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"}
    assert trigger.for_each == {"prefect.resource.id"}  # one bucket per flow run
    related = trigger.match_related
    assert related["prefect.resource.id"] == [f"prefect.tag.{PIPELINE_TAG}"] and related["prefect.resource.role"] == ["tag"]
    (action,) = automation.actions
    assert action.state == StateType.CRASHED and "90 s" in action.message


@pytest.mark.parametrize("frequency, timeout, fine", [(30, 90, True), (30, 45, True), (60, 90, True), (61, 90, False),
                                                      (180, 90, False), (None, 90, False)])
def test_heartbeats_must_come_well_within_the_timeout(frequency, timeout, fine):
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: frequency}):
        problem = heartbeat_problem(timeout)
    assert (problem is None) == fine
    if not fine:
        assert f"PREFECT_FLOWS_HEARTBEAT_FREQUENCY is {frequency} here" in problem
        assert "USAGE_HEARTBEAT_TIMEOUT_SECONDS" in problem and f"at most {timeout * 2 // 3}" in problem
