"""prefect.yaml declares the five deployments once; `usage-pipeline serve` builds the same ones from it."""

from __future__ import annotations

from orchestration.deployments import PIPELINE_TAG, deployment_specs, runner_deployments

CONTRACT = {  # CONTRACT.md section 3
    "usage-change-detection": ("usage-change-detection", 300.0),
    "billing-usage-raw": ("billing-usage-raw", None),
    "partner-silver": ("partner-silver", None),
    "partner-gold": ("partner-gold", None),
    "usage-reconciliation": ("usage-reconciliation", 300.0),  # README "The rolling reconciliation"
}


def test_prefect_yaml_declares_the_contract_deployments():
    specs = {spec.name: spec for spec in deployment_specs()}
    assert set(specs) == set(CONTRACT)
    assert {name: spec.interval_seconds for name, spec in specs.items()} == {n: c[1] for n, c in CONTRACT.items()}
    for one_at_a_time in ("usage-change-detection", "usage-reconciliation"):
        spec = specs[one_at_a_time]
        assert (spec.concurrency_limit, spec.collision_strategy) == (1, "CANCEL_NEW")
        assert spec.grace_period_seconds == 60  # a run that died Pending frees the slot within a minute
    assert all(PIPELINE_TAG in spec.tags for spec in specs.values())  # the crashed-runs automation matches it


def test_serve_builds_exactly_what_prefect_yaml_declares():
    specs = {spec.name: spec for spec in deployment_specs()}
    served = {d.name: d for d in runner_deployments(schedule=True)}
    assert set(served) == set(specs)
    for name, deployment in served.items():
        spec = specs[name]
        assert deployment.flow_name == CONTRACT[name][0]
        assert deployment.tags == spec.tags and deployment.description == spec.description
        intervals = [s.schedule.interval.total_seconds() for s in deployment.schedules or []]
        assert intervals == ([spec.interval_seconds] if spec.interval_seconds else [])
        options = deployment.concurrency_options
        strategy = options.collision_strategy.value if options else None
        grace = options.grace_period_seconds if options else None
        assert (deployment.concurrency_limit, strategy) == (spec.concurrency_limit, spec.collision_strategy)
        assert grace == spec.grace_period_seconds
    unscheduled = {d.name: d.schedules for d in runner_deployments(schedule=False)}
    assert not unscheduled["usage-change-detection"] and not unscheduled["usage-reconciliation"]
