"""Unit tests for the configuration half of orchestration/setup.py (CONTRACT.md sections 2 and 3); no server."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect_sqlalchemy import SyncDriver
from pydantic import SecretStr

from orchestration.setup import (
    BILLING_BLOCK,
    V3_BLOCK,
    SetupError,
    source_configs,
)

PASSWORD_BILLING = "Bill-Pw-7f3e!"
PASSWORD_V3 = "V3-Pw-c0ffee"
ALL_VARIABLES = [f"{prefix}_{name}" for prefix in ("BILLING_CDRS_DB", "V3_DB")
                 for name in ("HOST", "PORT", "USER", "PASSWORD", "DATABASE")]


def full_env() -> dict[str, str]:
    return {
        "BILLING_CDRS_DB_HOST": "billing.example.internal",
        "BILLING_CDRS_DB_PORT": "3307",
        "BILLING_CDRS_DB_USER": "reporter",
        "BILLING_CDRS_DB_PASSWORD": PASSWORD_BILLING,
        "BILLING_CDRS_DB_DATABASE": "billing",
        "V3_DB_HOST": "v3.example.internal",
        "V3_DB_PORT": "3306",
        "V3_DB_USER": "v3reader",
        "V3_DB_PASSWORD": PASSWORD_V3,
        "V3_DB_DATABASE": "v3",
    }


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ALL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


# --- embedded default ---------------------------------------------------------------------------


def test_no_environment_points_both_blocks_at_the_embedded_sqlite(clean_env, tmp_path):
    configs = source_configs()  # reads os.environ
    assert [c.block for c in configs] == [BILLING_BLOCK, V3_BLOCK] == ["billing-db", "v3-db"]
    expected = {
        BILLING_BLOCK: (tmp_path / "demo-source" / "billing.sqlite").resolve(),
        V3_BLOCK: (tmp_path / "demo-source" / "v3.sqlite").resolve(),
    }
    for config in configs:
        info = config.connector.connection_info
        assert info.driver == SyncDriver.SQLITE_PYSQLITE
        assert Path(info.database) == expected[config.block]
        assert Path(info.database).is_absolute()
        assert info.host is None
        assert config.description == f"embedded SQLite {expected[config.block]}"


def test_explicit_empty_environment_is_the_embedded_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    configs = source_configs({})
    assert {c.connector.connection_info.driver for c in configs} == {SyncDriver.SQLITE_PYSQLITE}


def test_variables_set_to_empty_strings_count_as_unset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    configs = source_configs({name: "" for name in ALL_VARIABLES})
    assert {c.connector.connection_info.driver for c in configs} == {SyncDriver.SQLITE_PYSQLITE}


def test_unrelated_variables_do_not_leave_the_embedded_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    configs = source_configs({"MYSQL_HOST": "x", "BILLING_DB_HOST": "y", "PATH": "/bin"})
    assert {c.connector.connection_info.driver for c in configs} == {SyncDriver.SQLITE_PYSQLITE}


# --- MySQL from the environment -----------------------------------------------------------------


def test_full_environment_gives_pymysql_connectors():
    billing, v3 = source_configs(full_env())
    assert (billing.block, v3.block) == (BILLING_BLOCK, V3_BLOCK)
    b = billing.connector.connection_info
    assert b.driver == SyncDriver.MYSQL_PYMYSQL
    assert (b.host, b.port, b.username, b.database) == ("billing.example.internal", 3307, "reporter", "billing")
    v = v3.connector.connection_info
    assert v.driver == SyncDriver.MYSQL_PYMYSQL
    assert (v.host, v.port, v.username, v.database) == ("v3.example.internal", 3306, "v3reader", "v3")
    assert billing.connector.connect_args["connect_timeout"] > 0


def test_passwords_are_secret_strings():
    billing, v3 = source_configs(full_env())
    for config, password in ((billing, PASSWORD_BILLING), (v3, PASSWORD_V3)):
        secret = config.connector.connection_info.password
        assert isinstance(secret, SecretStr)
        assert secret.get_secret_value() == password


def test_passwords_never_appear_in_descriptions_or_reprs():
    configs = source_configs(full_env())
    for config in configs:
        for text in (config.description, repr(config), str(config), repr(config.connector),
                     str(config.connector.connection_info)):
            assert PASSWORD_BILLING not in text
            assert PASSWORD_V3 not in text
    billing, v3 = configs
    assert billing.description == "mysql reporter@billing.example.internal:3307/billing"
    assert v3.description == "mysql v3reader@v3.example.internal:3306/v3"


def test_port_defaults_to_3306_and_password_may_be_empty():
    env = full_env()
    del env["BILLING_CDRS_DB_PORT"]
    del env["BILLING_CDRS_DB_PASSWORD"]
    billing, _ = source_configs(env)
    info = billing.connector.connection_info
    assert info.port == 3306
    assert info.password.get_secret_value() == ""
    assert billing.description.endswith(":3306/billing")


def test_environment_is_read_from_os_environ_by_default(clean_env):
    for name, value in full_env().items():
        clean_env.setenv(name, value)
    billing, v3 = source_configs()
    assert billing.connector.connection_info.host == "billing.example.internal"
    assert v3.connector.connection_info.password.get_secret_value() == PASSWORD_V3


# --- partial or bad configuration ---------------------------------------------------------------


@pytest.mark.parametrize(
    "drop, expected_missing",
    [
        (["BILLING_CDRS_DB_HOST"], ["BILLING_CDRS_DB_HOST"]),
        (["BILLING_CDRS_DB_USER", "BILLING_CDRS_DB_DATABASE"], ["BILLING_CDRS_DB_USER", "BILLING_CDRS_DB_DATABASE"]),
        (["V3_DB_DATABASE"], ["V3_DB_DATABASE"]),
        (["V3_DB_HOST", "V3_DB_PORT", "V3_DB_USER", "V3_DB_PASSWORD", "V3_DB_DATABASE"],
         ["V3_DB_HOST", "V3_DB_USER", "V3_DB_DATABASE"]),  # only billing configured
    ],
)
def test_partial_environment_names_the_missing_variables(drop, expected_missing):
    env = full_env()
    for name in drop:
        del env[name]
    with pytest.raises(SetupError) as caught:
        source_configs(env)
    message = str(caught.value)
    for name in expected_missing:
        assert name in message
    prefix = expected_missing[0].rsplit("_", 1)[0]
    for field in ("HOST", "USER", "DATABASE"):
        if f"{prefix}_{field}" not in expected_missing:
            assert f"{prefix}_{field}" not in message  # only what is actually missing is named
    assert PASSWORD_BILLING not in message and PASSWORD_V3 not in message


def test_only_a_password_set_is_an_error_naming_host_user_and_database():
    with pytest.raises(SetupError) as caught:
        source_configs({"BILLING_CDRS_DB_PASSWORD": PASSWORD_BILLING})
    message = str(caught.value)
    for name in ("BILLING_CDRS_DB_HOST", "BILLING_CDRS_DB_USER", "BILLING_CDRS_DB_DATABASE"):
        assert name in message
    assert PASSWORD_BILLING not in message


@pytest.mark.parametrize(
    "variable, port",
    [("V3_DB_PORT", p) for p in ("abc", "-1", "33o6", "3306.0", " 3306x", "+3306")]
    + [("BILLING_CDRS_DB_PORT", p) for p in ("0", "65536", "99999")],
)
def test_bad_port_is_a_setup_error_naming_the_variable(variable, port):
    env = full_env()
    env[variable] = port
    with pytest.raises(SetupError) as caught:
        source_configs(env)
    assert variable in str(caught.value)
    assert repr(port) in str(caught.value)


def test_setup_error_is_a_value_error():
    assert issubclass(SetupError, ValueError)


def test_a_source_repr_hides_the_password_and_the_connectorx_uri():
    import sqlalchemy as sa

    from orchestration.runtime import Source

    url = f"mysql+pymysql://reporter:{PASSWORD_BILLING}@billing.example.internal:3306/billing"
    source = Source("billing-db", sa.create_engine(url), url.replace("+pymysql", ""), PASSWORD_BILLING)
    assert PASSWORD_BILLING not in repr(source) and PASSWORD_BILLING not in str(source)
    assert "billing-db" in repr(source)


# --- the alert automations ----------------------------------------------------------------------


def test_the_stale_alert_is_a_proactive_window_per_partition_and_episode():
    """Opened by the pending event, closed by the materialized one of the same episode; the server's clock
    fires it, so it needs no later tick. Its message reads only what the pending event carries."""
    from uuid import uuid4

    from prefect.automations import Posture

    from orchestration.alerts import FAILING, STALE, STALLED, automations
    from orchestration.events import EPISODE_LABEL, MATERIALIZED_EVENT, PENDING_EVENT

    block_id = uuid4()
    by_name = {a.name: a for a in automations(block_id, stall_seconds=900, failed_ticks=3, stale_seconds=60)}
    assert set(by_name) == {STALLED, FAILING, STALE}
    trigger = by_name[STALE].trigger
    assert trigger.posture == Posture.Proactive and trigger.threshold == 1
    assert (trigger.after, trigger.expect) == ({PENDING_EVENT}, {MATERIALIZED_EVENT})
    assert trigger.for_each == {"prefect.resource.id", EPISODE_LABEL}
    assert trigger.within.total_seconds() == 60
    (notify,) = by_name[STALE].actions
    assert notify.block_document_id == block_id
    for field in ("partner", "pending_since", "reasons", "last_published"):
        assert f"event.payload.{field}" in notify.subject + notify.body


def test_slot_holders_are_the_flows_that_take_each_slot():
    """A count without a lease is freed only when no run of these flows can hold it: they must be the
    flows that take the slots."""
    from flows.billing_usage_raw import billing_usage_raw
    from flows.partner_gold import partner_gold
    from flows.partner_silver import partner_silver
    from flows.usage_change_detection import usage_change_detection
    from orchestration.setup import BRONZE_LIMIT, DETECTION_LIMIT, PARTITIONS_LIMIT, partner_limit, slot_holders
    from usage_pipeline.partners import partner_tag

    partner = "aaaaaaaa-0000-4000-8000-000000000001"
    partitions = (partner_silver.name, partner_gold.name)
    assert slot_holders(DETECTION_LIMIT) == ((usage_change_detection.name,), None)
    assert slot_holders(BRONZE_LIMIT) == ((billing_usage_raw.name,), None)
    assert slot_holders(PARTITIONS_LIMIT) == (partitions, None)
    assert slot_holders(partner_limit(partner)) == (partitions, partner_tag(partner))
