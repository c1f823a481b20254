"""Issues 11 and 19: events in the API, and the three automations notifying a real HTTP endpoint.

A local webhook receiver stands behind a `custom-webhook` notification block; `usage-pipeline
setup` (a subprocess, as operators run it) creates the automations against the session's
real Prefect server, with short thresholds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime

import httpx
import pytest
from prefect.automations import Automation
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.blocks.system import Secret

from orchestration.alerts import FAILING, STALE, STALLED
from tests.conftest import pipeline_environ
from tests.pipeline_helpers import child_runs, cursor, tick
from tests.sourcedata import PARTNER_A, PARTNER_B, PARTNER_C, SourceBuilder
from tests.webhook import Receiver

pytestmark = pytest.mark.integration
STALL_SECONDS = 20  # for the stall itself; while ticks run, the automation allows STEADY_STALL_SECONDS
STEADY_STALL_SECONDS = 300  # ticks on a loaded 2-core machine can be more than 20 s apart
FAILED_TICKS = 2
STALE_SECONDS = 60  # the shortest USAGE_ALERT_STALE_SECONDS; the fixture leaves the default (1800)


@pytest.fixture
def receiver():
    server = Receiver()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def setup_command(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestration.cli", "setup"], env={**os.environ, **pipeline_environ(), **env},
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def alerts(pipeline, receiver):
    """The three automations, notifying the receiver; deleted afterwards so no other test triggers them."""
    CustomWebhookNotificationBlock(
        name="usage-alerts-it",
        url=f"http://127.0.0.1:{receiver.server_address[1]}/hook",
        json_data={"subject": "{{subject}}", "body": "{{body}}"},
        allow_private_urls=True,
    ).save("usage-alerts-it", overwrite=True)
    env = {"USAGE_ALERT_BLOCK": "custom-webhook/usage-alerts-it", "USAGE_ALERT_STALL_SECONDS": str(STEADY_STALL_SECONDS),
           "USAGE_ALERT_FAILED_TICKS": str(FAILED_TICKS)}
    result = setup_command(**env)
    assert result.returncode == 0, result.stderr
    time.sleep(3)  # the server's trigger service picks up new automations within a few seconds
    yield env
    for name in (STALLED, FAILING, STALE):
        Automation.read(name=name).delete()


def events(prefix: str, since: datetime) -> list[dict]:
    """Events from the REST API (persisted every few seconds: poll)."""
    api = os.environ["PREFECT_API_URL"]
    body = {"filter": {"event": {"prefix": [prefix]}, "occurred": {"since": since.isoformat()}}, "limit": 50}
    return httpx.post(f"{api}/events/filter", json=body, timeout=30).json()["events"]


def wait_events(prefix: str, since: datetime, count: int, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(found := events(prefix, since)) < count:
        assert time.monotonic() < deadline, f"{len(found)} {prefix} event(s) after {timeout}s"
        time.sleep(1)
    return found


def block_partition(lake_root, partner: str):
    directory = lake_root / "silver" / "billing_usage_aggregated" / f"partner={partner}"
    (directory / "data.parquet").unlink()
    directory.rmdir()
    directory.write_text("blocked")  # gold for this partner cannot publish its silver there
    return directory


def test_tick_and_partition_events_carry_resources_payloads_and_related_runs(fresh, lake_root):
    source = SourceBuilder(*fresh)
    source.standard()
    assert tick()[0].is_completed()
    since = datetime.now().astimezone()
    source.execute("UPDATE `usage` SET usage_modified = '2026-10-09 00:00:00' WHERE usage_FK_dealer_id = 1")
    state, report = tick()
    assert state.is_completed(), state.message

    (tick_event,) = wait_events("usage.detection.tick", since, 1)
    assert tick_event["resource"]["prefect.resource.id"] == "usage.detection"
    payload = tick_event["payload"]
    assert (payload["dealers_changed"], payload["partitions"], payload["ok"], payload["failed"]) == (1, 1, 1, 0)
    assert payload["duration_seconds"] > 0 and payload["source_query_seconds"] > 0
    assert payload["reconciliation_suspects"] == 0 and payload["reconciliation_overdue_seconds"] is None
    tick_run = f"prefect.flow-run.{state.state_details.flow_run_id}"
    assert tick_run in {r["prefect.resource.id"] for r in tick_event["related"]}

    assert payload["freshness_lag_seconds"] == {PARTNER_A: 0, PARTNER_B: 0, PARTNER_C: 0}

    partition_events = {e["event"]: e for e in wait_events("usage.partition.", since, 2)}
    assert set(partition_events) == {"usage.partition.pending", "usage.partition.materialized"}
    pending, materialized = partition_events["usage.partition.pending"], partition_events["usage.partition.materialized"]
    assert materialized["resource"]["prefect.resource.id"] == f"usage.partition.{PARTNER_A}"
    assert materialized["resource"]["usage.partner"] == PARTNER_A
    # The pending event came before the partition's runs, and names the episode its materialized event closes.
    assert {k: pending["resource"][k] for k in ("prefect.resource.id", "usage.partner", "usage.consecutive-failures")} \
        == {"prefect.resource.id": f"usage.partition.{PARTNER_A}", "usage.partner": PARTNER_A,
            "usage.consecutive-failures": "0"}
    assert pending["resource"]["usage.episode"] == materialized["resource"]["usage.episode"] != "never"
    assert pending["payload"]["reasons"] == ["dealer 1: MAX(usage_modified) changed"]
    silver_run = next(run for run in child_runs(state.state_details.flow_run_id) if run.name == f"silver-{PARTNER_A}")
    assert datetime.fromisoformat(pending["occurred"]) <= silver_run.start_time
    roles = {r["prefect.resource.role"]: r["prefect.resource.id"] for r in materialized["related"]}
    outcome = report.partitions[PARTNER_A]
    assert roles["silver"] == f"prefect.flow-run.{outcome.silver.flow_run_id}"
    assert roles["gold"] == f"prefect.flow-run.{outcome.gold.flow_run_id}"
    assert materialized["payload"]["dealers"] == [1] and materialized["payload"]["rows"] == 3  # A's bronze rows
    assert materialized["payload"]["source_watermark"] == "2026-10-09T00:00:00.000000Z"
    assert materialized["payload"]["consecutive_failures"] == 0

    since = datetime.now().astimezone()
    source.execute("UPDATE `usage` SET usage_modified = '2026-10-10 00:00:00' WHERE usage_FK_dealer_id = 3")
    block_partition(lake_root, PARTNER_B)
    state, _ = tick()
    assert state.is_failed()
    partition_events = {e["event"]: e for e in wait_events("usage.partition.", since, 2)}
    failed = partition_events["usage.partition.failed"]
    assert failed["resource"]["usage.consecutive-failures"] == "1"
    assert failed["resource"]["usage.episode"] == partition_events["usage.partition.pending"]["resource"]["usage.episode"]
    assert failed["payload"]["consecutive_failures"] == 1 and "gold-" in failed["payload"]["last_error"]
    ticked = wait_events("usage.detection.tick", since, 1)[0]["payload"]
    assert (ticked["ok"], ticked["failed"]) == (0, 1)
    lags = ticked["freshness_lag_seconds"]
    assert lags[PARTNER_B] > 0 and lags[PARTNER_A] == lags[PARTNER_C] == 0  # B pending since this tick began


def test_setup_is_idempotent_for_automations_and_updates_thresholds(alerts):
    assert setup_command(**alerts).returncode == 0
    changed = setup_command(**{**alerts, "USAGE_ALERT_STALL_SECONDS": "45"})
    assert changed.returncode == 0 and f"{STALLED} updated" in changed.stdout
    api = os.environ["PREFECT_API_URL"]
    automations = httpx.post(f"{api}/automations/filter", json={}, timeout=30).json()
    names = [a["name"] for a in automations]
    assert names.count(STALLED) == 1 and names.count(FAILING) == 1 and names.count(STALE) == 1
    assert Automation.read(name=STALLED).trigger.within.total_seconds() == 45
    assert Automation.read(name=STALE).trigger.within.total_seconds() == 1800  # USAGE_ALERT_STALE_SECONDS unset


def test_setup_finds_the_alert_block_by_its_bare_name_when_only_one_block_has_it(alerts):
    bare = setup_command(**{**alerts, "USAGE_ALERT_BLOCK": "usage-alerts-it"})
    assert bare.returncode == 0, bare.stderr
    assert f"alerts to usage-alerts-it: {STALLED} updated, {FAILING} updated, {STALE} updated" in bare.stdout
    block_id = CustomWebhookNotificationBlock.load("usage-alerts-it")._block_document_id
    assert {Automation.read(name=name).actions[0].block_document_id for name in (FAILING, STALE)} == {block_id}

    missing = setup_command(**{**alerts, "USAGE_ALERT_BLOCK": "no-such-alerts"})
    assert missing.returncode == 2 and "USAGE_ALERT_BLOCK='no-such-alerts': no block of that name" in missing.stderr
    assert "Traceback" not in missing.stderr

    CustomWebhookNotificationBlock(name="other", url="http://127.0.0.1:9/other", allow_private_urls=True).save(
        "usage-alerts-twice", overwrite=True)
    Secret(value="x").save("usage-alerts-twice", overwrite=True)  # the same name on a second block type
    ambiguous = setup_command(**{**alerts, "USAGE_ALERT_BLOCK": "usage-alerts-twice"})
    assert ambiguous.returncode == 2 and "2 blocks of that name; use <block-type-slug>/usage-alerts-twice" in ambiguous.stderr


def test_setup_without_an_alert_block_says_how_to_turn_alerts_on(pipeline):
    result = setup_command()
    assert result.returncode == 0 and "USAGE_ALERT_BLOCK=" in result.stdout


def test_alerts_reach_the_webhook_once_per_condition_and_never_on_healthy_ticks(fresh, lake_root, alerts, receiver):
    source = SourceBuilder(*fresh)
    source.standard()
    for day in (11, 12):  # healthy ticks, each with work
        source.execute("UPDATE `usage` SET usage_modified = %s WHERE usage_FK_dealer_id = 1", datetime(2026, 10, day))
        assert tick()[0].is_completed()
    time.sleep(3)
    assert receiver.received == []

    # A partition that fails FAILED_TICKS ticks in a row: one notification, on the tick that reaches it.
    blocked = block_partition(lake_root, PARTNER_B)
    source.execute("UPDATE `usage` SET usage_modified = '2026-10-13 00:00:00' WHERE usage_FK_dealer_id = 3")
    for failed_ticks in range(1, FAILED_TICKS + 2):
        state, _ = tick()
        assert state.is_failed()
        if failed_ticks == FAILED_TICKS:
            failing_tick_done = time.time()
    at, failing = receiver.wait_for("failing", timeout=30)
    assert PARTNER_B in failing["subject"]
    assert f"Partner {PARTNER_B} failed {FAILED_TICKS} detection ticks in a row" in failing["body"]
    assert "gold-" in failing["body"] and "Last error:" in failing["body"]
    blocked.unlink()

    # Detection stops: one notification about STALL_SECONDS after the last tick, and no repeat.
    assert setup_command(**{**alerts, "USAGE_ALERT_STALL_SECONDS": str(STALL_SECONDS)}).returncode == 0
    time.sleep(3)  # the trigger service picks up the changed automation
    assert tick()[0].is_completed()
    last_tick = time.time()
    at_stalled, stalled = receiver.wait_for("stalled", timeout=STALL_SECONDS + 40)
    time.sleep(STALL_SECONDS + 10)
    assert len(receiver.subjects("stalled")) == 1, receiver.received
    assert len(receiver.subjects("failing")) == 1, receiver.received
    assert f"silent for {STALL_SECONDS} s" in stalled["body"]
    print("ALERTS:", json.dumps({
        "failing": {"seconds_after_failing_tick": round(at - failing_tick_done, 1), "body": failing},
        "stalled": {"seconds_after_last_tick": round(at_stalled - last_tick, 1), "body": stalled},
    }, indent=1))


def test_stale_alert_fires_once_for_a_partition_left_unpublished_though_no_tick_runs_after(fresh, lake_root, alerts,
                                                                                          receiver):
    """One tick finds A and B needing a rebuild, publishes A and fails B; no tick runs after it (as when
    detection stops, or a run hangs), and the server's clock alone fires the alert for B, once."""
    changed = setup_command(**{**alerts, "USAGE_ALERT_STALE_SECONDS": str(STALE_SECONDS)})
    assert changed.returncode == 0 and f"stale after {STALE_SECONDS} s" in changed.stdout, changed.stderr
    assert Automation.read(name=STALE).trigger.within.total_seconds() == STALE_SECONDS
    time.sleep(3)  # the trigger service picks up the changed automation
    source = SourceBuilder(*fresh)
    source.standard()
    assert tick()[0].is_completed()  # every partition found pending, and published in time
    since = datetime.now().astimezone()
    source.execute("UPDATE `usage` SET usage_modified = '2026-10-14 00:00:00' WHERE usage_FK_dealer_id IN (1, 3)")
    block_partition(lake_root, PARTNER_B)
    state, report = tick()
    assert state.is_failed() and report.partitions[PARTNER_A].ok and not report.partitions[PARTNER_B].ok
    pending_sent = time.time()
    episode = cursor().partitions[PARTNER_B].episode
    pending = {e["resource"]["usage.partner"]: e for e in wait_events("usage.partition.pending", since, 2)}
    assert pending[PARTNER_B]["resource"]["usage.episode"] == episode

    at, stale = receiver.wait_for("stale", timeout=STALE_SECONDS + 60)
    assert stale["subject"] == f"usage pipeline: partition {PARTNER_B} stale"
    assert f"still not published {STALE_SECONDS} s later (last published: {episode})" in stale["body"]
    assert "dealer 3: MAX(usage_modified) changed" in stale["body"]

    # A later tick that fails again announces nothing new: that episode fires once.
    since = datetime.now().astimezone()
    assert tick()[0].is_failed()
    wait_events("usage.partition.failed", since, 1)
    assert events("usage.partition.pending", since) == []
    assert [body["subject"] for _, body in receiver.subjects("stale")] == [stale["subject"]]  # none for A
    print("STALE:", json.dumps({"seconds_after_pending": round(at - pending_sent, 1), "body": stale}, indent=1))
