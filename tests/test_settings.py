"""Unit tests for usage_pipeline/settings.py: every USAGE_* variable, read once, errors naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from usage_pipeline.lake import ObjectPath
from usage_pipeline.settings import ENV_PREFIX, Settings, SettingsError, load_settings


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in Settings.model_fields:
        monkeypatch.delenv(ENV_PREFIX + name.upper(), raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_defaults(clean_env, tmp_path):
    settings = load_settings()
    assert settings.lake_path == (tmp_path / "lake").resolve()
    assert (settings.max_concurrent_partitions, settings.partition_runs) == (8, "subflow")
    assert (settings.reconcile_seconds, settings.child_run_timeout_seconds) == (3600, 3600)
    assert (settings.alert_block, settings.alert_stall_seconds, settings.alert_failed_ticks) == (None, 900, 3)
    assert settings.alert_stale_seconds == 1800
    assert (settings.heartbeat_timeout_seconds, settings.slot_lease_seconds) == (90, 120)
    assert settings.warn_only_checks == frozenset()


@pytest.mark.parametrize(("value", "names"), [
    ("grain.usage_report", {"grain.usage_report"}),
    ("grain.usage_report,conservation.usage_report", {"grain.usage_report", "conservation.usage_report"}),
    (" grain.usage_report , reconciliation.totals ,", {"grain.usage_report", "reconciliation.totals"}),
    ("", set()),
])
def test_checks_warn_only_takes_one_name_or_a_comma_separated_list(clean_env, value, names):
    clean_env.setenv("USAGE_CHECKS_WARN_ONLY", value)
    assert load_settings().warn_only_checks == names


def test_an_unknown_check_name_is_refused_listing_the_checks(clean_env):
    clean_env.setenv("USAGE_CHECKS_WARN_ONLY", "grain.usage_report,grain.invoice")
    with pytest.raises(SettingsError, match=r"USAGE_CHECKS_WARN_ONLY: .*unknown check name\(s\) \['grain.invoice'\];"
                                            r" the checks are reconciliation.source, "):
        load_settings()


def test_every_variable_is_read_from_the_environment(clean_env):
    values = {"LAKE_ROOT": "s3://bucket/lake/", "MAX_CONCURRENT_PARTITIONS": "3", "RECONCILE_SECONDS": "60",
              "CHILD_RUN_TIMEOUT_SECONDS": "30.5", "PARTITION_RUNS": "deployment", "ALERT_BLOCK": "slack-webhook/ops",
              "ALERT_STALL_SECONDS": "600", "ALERT_FAILED_TICKS": "5", "ALERT_STALE_SECONDS": "60",
              "HEARTBEAT_TIMEOUT_SECONDS": "45",
              "SLOT_LEASE_SECONDS": "60"}
    for name, value in values.items():
        clean_env.setenv(ENV_PREFIX + name, value)
    settings = load_settings()
    assert settings.lake_path == ObjectPath("s3://bucket/lake")
    assert settings.max_concurrent_partitions == 3 and settings.reconcile_seconds == 60
    assert settings.child_run_timeout_seconds == 30.5 and settings.partition_runs == "deployment"
    assert settings.alert_block == "slack-webhook/ops"
    assert (settings.alert_stall_seconds, settings.alert_failed_ticks, settings.alert_stale_seconds) == (600, 5, 60)
    assert (settings.heartbeat_timeout_seconds, settings.slot_lease_seconds) == (45, 60)


def test_a_relative_lake_root_is_made_absolute(clean_env, tmp_path):
    clean_env.setenv("USAGE_LAKE_ROOT", "elsewhere")
    assert load_settings().lake_path == (tmp_path / "elsewhere").resolve()
    assert isinstance(load_settings().lake_path, Path)


@pytest.mark.parametrize(
    "variable, value",
    [
        ("USAGE_MAX_CONCURRENT_PARTITIONS", "0"),
        ("USAGE_MAX_CONCURRENT_PARTITIONS", "-1"),
        ("USAGE_MAX_CONCURRENT_PARTITIONS", "abc"),
        ("USAGE_MAX_CONCURRENT_PARTITIONS", "1.5"),
        ("USAGE_MAX_CONCURRENT_PARTITIONS", ""),
        ("USAGE_RECONCILE_SECONDS", "hourly"),
        ("USAGE_RECONCILE_SECONDS", "0"),
        ("USAGE_CHILD_RUN_TIMEOUT_SECONDS", "-5"),
        ("USAGE_PARTITION_RUNS", "worker"),
        ("USAGE_HEARTBEAT_TIMEOUT_SECONDS", "30"),  # not above Prefect's shortest heartbeat period
        ("USAGE_SLOT_LEASE_SECONDS", "59"),  # Prefect's shortest lease is 60 s
        ("USAGE_PARTITION_RUNS", "Deployment"),
        ("USAGE_PARTITION_RUNS", ""),
        ("USAGE_ALERT_STALL_SECONDS", "9"),
        ("USAGE_ALERT_FAILED_TICKS", "0"),
        ("USAGE_ALERT_STALE_SECONDS", "59"),  # shorter than a tick's own runs may take
        ("USAGE_ALERT_STALE_SECONDS", "abc"),
        ("USAGE_ALERT_STALE_SECONDS", "90.5"),
        ("USAGE_ALERT_STALE_SECONDS", ""),
        ("USAGE_LAKE_ROOT", ""),
    ],
)
def test_a_bad_value_is_an_error_naming_the_variable_and_the_value(clean_env, variable, value):
    clean_env.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert variable in str(caught.value) and repr(value) in str(caught.value)


def test_settings_error_is_a_value_error():
    """The CLI turns ValueErrors into exit status 2 with the message on stderr."""
    assert issubclass(SettingsError, ValueError)
