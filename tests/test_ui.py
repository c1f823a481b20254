"""README "Operating it" in the default (V2) Prefect UI, in headless Chromium, on the session's server.

An operator edits the cursor block, reads the freshness table on a detection
run's page and rebuilds a partner from the deployment's Custom run form. Each
test checks what the page shows and what the server then stores or the next
tick does. Screenshots of what the tests saw are written to docs/ui-*.png.
"""

from __future__ import annotations

import copy
import json

import pytest

from tests.pipeline_helpers import (
    BRONZE_TABLE,
    RestApi,
    file_ids,
    partition_files,
    rewritten,
    save_cursor_value,
    tick,
)
from tests.sourcedata import PARTNER_A, PARTNER_B, PARTNER_C, SourceBuilder
from tests.ui_browser import Browser, missing_commands

pytestmark = pytest.mark.integration

CURSOR_PATH = "/block_types/slug/usage-cursor/block_documents/name/usage-change-detection"
DETECTION = "usage-change-detection/usage-change-detection"
FRESHNESS_KEY = "usage-partition-freshness"
CHECKS_KEY = "usage-tick-checks"
SAVE = "//button[@type='submit'][normalize-space()='Save']"  # Cancel is a submit button too
# A cursor as a tick stores it: microseconds, and null for a dealer whose rows have no usage_modified.
CURSOR_VALUE = {
    "global_last_modified": "2026-10-01T10:00:00.123456Z",
    "dealer_last_modified": {"1": "2026-10-01T09:00:00.123456Z", "2": None, "3": "2026-10-01T10:00:00.123456Z",
                             "4": "2026-10-01T08:00:00.123456Z", "9": "2026-10-01T08:00:00.123456Z"},
}
RUN_TIMEOUT = 180  # seconds for one tick in the serve process on a loaded 2-core machine


@pytest.fixture(scope="module")
def browser(prefect_server):
    """One Chromium for the module; a machine without it fails here rather than skipping the UI."""
    missing = missing_commands()
    if missing:
        pytest.fail(f"{' and '.join(missing)} not on PATH: the UI tests need Debian's chromium and chromium-driver"
                    " (`make test` installs them)")
    browser = Browser(prefect_server.removesuffix("/api"))
    yield browser
    browser.quit()


@pytest.fixture
def api(prefect_server) -> RestApi:
    return RestApi(prefect_server)


@pytest.fixture
def first_tick(fresh):
    """Partners A, B and C materialized by one tick; returns that tick's state."""
    SourceBuilder(*fresh).standard()
    state, _ = tick()
    assert state.is_completed(), state.message
    return state


def stored_cursor(api: RestApi) -> tuple[str, dict]:
    """The cursor block's id and its stored value, as the server returns them."""
    document = api.get(CURSOR_PATH)
    return document["id"], document["data"]["value"]


def save_and_wait_for_block_page(browser: Browser, block_id: str) -> None:
    browser.submit(SAVE)
    browser.wait_for_url(lambda url: url.endswith(f"/blocks/block/{block_id}"), "Save did not return to the block page")
    browser.wait_for_toast("Block updated successfully")


def test_cursor_edit_page_shows_the_stored_value(browser, api, fresh):
    save_cursor_value(CURSOR_VALUE)
    block_id, stored = stored_cursor(api)
    browser.open("/blocks")
    browser.click(f"//a[contains(@href, '/blocks/block/{block_id}')][normalize-space()='usage-change-detection']")
    browser.wait_for_url(lambda url: url.endswith(f"/blocks/block/{block_id}"), "block page did not open")
    browser.element("//main//*[normalize-space(text())='Dealer Last Modified']")  # the value, so the page has loaded
    browser.choose("//button[normalize-space()='Open menu']", "Edit")
    browser.wait_for_url(lambda url: url.endswith(f"/blocks/block/{block_id}/edit"), "edit page did not open")

    shown = browser.editor_json()

    browser.screenshot("ui-cursor-edit")
    assert shown == stored == CURSOR_VALUE


def test_saving_the_cursor_unchanged_changes_nothing(browser, api, first_tick, lake_root):
    block_id, stored = stored_cursor(api)
    browser.open(f"/blocks/block/{block_id}/edit")
    assert browser.editor_json() == stored  # an empty editor here would save {} and reset the cursor
    before = file_ids(lake_root)

    save_and_wait_for_block_page(browser, block_id)

    browser.screenshot("ui-cursor-saved")
    assert stored_cursor(api)[1] == stored
    state, _ = tick()
    assert state.is_completed() and state.message == "no changes"
    assert file_ids(lake_root) == before


def test_removing_a_dealer_in_the_editor_rebuilds_exactly_its_partner(browser, api, first_tick, lake_root):
    block_id, stored = stored_cursor(api)
    edited = copy.deepcopy(stored)
    del edited["dealer_last_modified"]["4"]  # dealer 4 is partner C's only dealer
    browser.open(f"/blocks/block/{block_id}/edit")
    assert browser.editor_json() == stored  # loaded: the block's value would replace an earlier edit
    browser.set_editor_text(json.dumps(edited, indent=2))
    assert browser.editor_json() == edited
    before = file_ids(lake_root)

    save_and_wait_for_block_page(browser, block_id)

    assert stored_cursor(api)[1] == edited
    state, report = tick()
    assert state.is_completed(), state.message
    assert set(report.partitions) == {PARTNER_C}
    assert rewritten(before, file_ids(lake_root)) == {BRONZE_TABLE} | partition_files(PARTNER_C)


def test_detection_run_page_leads_to_the_freshness_table_of_every_partner(browser, api, first_tick):
    run_id = str(first_tick.state_details.flow_run_id)
    (artifact,) = api.post("/artifacts/filter", {"artifacts": {"key": {"any_": [FRESHNESS_KEY]},
                                                               "flow_run_id": {"any_": [run_id]}}})
    browser.open(f"/runs/flow-run/{run_id}")
    browser.click("//button[@role='tab'][normalize-space()='Artifacts']")
    browser.element(f"//*[@role='tabpanel'][@data-state='active']//*[normalize-space(text())='{FRESHNESS_KEY}']")
    browser.screenshot("ui-flow-run")

    browser.open(f"/artifacts/artifact/{artifact['id']}")
    browser.click("//*[normalize-space(text())='Items per page']/following::button[@role='combobox'][1]")
    browser.click("//*[@role='option'][normalize-space()='50']")
    stored_rows = json.loads(artifact["data"])
    shown_rows = browser.wait(lambda d: len(rows := browser.table_rows()) == len(stored_rows) and rows,
                              "freshness table does not show one row per partner")

    browser.screenshot("ui-freshness-artifact")
    assert sorted(row["partner"] for row in shown_rows) == sorted([PARTNER_A, PARTNER_B, PARTNER_C])
    assert sorted(row["partner"] for row in stored_rows) == sorted([PARTNER_A, PARTNER_B, PARTNER_C])
    assert all(row["state"] == "fresh" and row["lag_seconds"] == "0" for row in shown_rows)
    assert all(row["lag_seconds"] == 0 for row in stored_rows)


def test_the_checks_table_shows_each_partition_and_check_with_its_numbers(browser, api, first_tick):
    run_id = str(first_tick.state_details.flow_run_id)
    (artifact,) = api.post("/artifacts/filter", {"artifacts": {"key": {"any_": [CHECKS_KEY]},
                                                               "flow_run_id": {"any_": [run_id]}}})
    stored_rows = json.loads(artifact["data"])
    assert artifact["description"] == f"Checks: {len(stored_rows)} passed, 0 failed"
    browser.open(f"/artifacts/artifact/{artifact['id']}")
    browser.click("//*[normalize-space(text())='Items per page']/following::button[@role='combobox'][1]")
    browser.click("//*[@role='option'][normalize-space()='50']")
    shown_rows = browser.wait(lambda d: len(rows := browser.table_rows()) == len(stored_rows) and rows,
                              "checks table does not show one row per partition and check")
    browser.screenshot("ui-checks-artifact")
    assert set(shown_rows[0]) == {"partner", "layer", "check", "expected", "actual", "passed", "severity"}
    gold = [row for row in shown_rows if row["partner"] == PARTNER_A and row["layer"] == "gold"]
    assert [row["check"] for row in gold] == ["conservation.usage_report", "conservation.active_services",
                                              "grain.usage_report", "schema.usage_report",
                                              "grain.active_services", "schema.active_services"]
    assert gold[0]["expected"] == gold[0]["actual"] and gold[0]["expected"].startswith("quantity=")


def test_custom_run_form_rebuilds_the_partner_entered(browser, api, first_tick, lake_root):
    deployment = api.get(f"/deployments/name/{DETECTION}")
    browser.open("/deployments")
    browser.click(f"//a[contains(@href, '/deployments/deployment/{deployment['id']}')]")
    browser.choose("//button[normalize-space()='Run']", "Custom run")
    partners = "//label[normalize-space()='partners (Optional)']/ancestor::div[contains(@class, 'group')][1]"
    browser.element(f"{partners}//*[normalize-space(text())='No items in this list']")
    browser.click(f"{partners}//button[normalize-space()='Add item']")
    browser.element(f"{partners}//textarea").send_keys(PARTNER_A)
    browser.screenshot("ui-custom-run-partners")
    before = file_ids(lake_root)

    browser.submit("//button[@type='submit'][normalize-space()='Submit']")
    view_run = browser.element("//a[normalize-space()='View run'][contains(@href, '/runs/flow-run/')]")
    run_id = view_run.get_attribute("href").rstrip("/").rsplit("/", 1)[1]

    run = api.wait_final(run_id, RUN_TIMEOUT)
    assert run["deployment_id"] == deployment["id"]
    assert run["parameters"]["partners"] == [PARTNER_A]
    assert run["state_type"] == "COMPLETED", run["state"]["message"]
    assert rewritten(before, file_ids(lake_root)) == {BRONZE_TABLE} | partition_files(PARTNER_A)
