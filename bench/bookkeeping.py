"""Per-dealer bookkeeping at scale (issue 18 item 5): the state document, the cursor block and the
tick's artifacts at 20,000 dealers and 200 partners, against what a no-change tick costs, and
the Prefect UI pages operators open on them, in headless Chromium.

    .venv/bin/python bench/bookkeeping.py                 # PostgreSQL-backed server
    .venv/bin/python bench/bookkeeping.py --server sqlite # Prefect's default SQLite

Nothing is hand-written: the source is the demo's synthetic one (`usage_pipeline.demo_data`,
200 partners x 100 dealers, a few rows each, in embedded SQLite), and the bookkeeping is what a
real first tick of the project's flow writes to it (bronze, 200 silver and 200 gold subflows,
the state file, the cursor block, the artifacts). Then:

1. no-change ticks of the real flow, in this process, with the time of each of their parts
   (the tick's own functions, wrapped with a timer); then one-dealer ticks (one dealer's usage
   touched in the source before each), which also save both documents, with the parts of that
   save;
2. the bookkeeping on its own, medians of `--reps`: the state document serialised and parsed,
   written and read as the state file; the cursor block loaded and saved through Prefect; each
   artifact the tick creates built and created (freshness at 200 partners, the first tick's runs
   and checks), with their sizes;
3. in headless Chromium (tests/ui_browser.py's flags): the cursor block's V2 page until its
   value is rendered, its edit page until the editor holds the whole value, an unchanged Save
   until the block page says it saved (the stored value is checked to be unchanged), and the
   freshness artifact's page until its table shows rows.

Prints a markdown table, the command line at its top. Timed assertions are banned in tests, so
the 5 s targets are checked here and reported, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's packages, whatever the venv was installed from

from orchestration import local_prefect  # noqa: E402 (imports no Prefect: the server starts first)

warnings.filterwarnings("ignore", "Artifact creation outside of a flow", FutureWarning)  # the bench creates some

UI_TARGET_SECONDS = 5.0
# What a tick is timed by: functions of orchestration/tick.py, then of the flow module (its `run_tick`
# first, which holds the others).
TICK_PARTS = ("clean_up_after_dead_processes", "read_cursor", "take_snapshot", "plan_tick", "advance_cursor",
              "save_cursor")
FLOW_PARTS = ("run_tick", "emit_partition_events", "publish_tick_artifacts", "emit_tick_event", "ensure_limit")
# What a one-dealer tick's `save_cursor` does, by timed name. The block is read twice a tick (at its start
# and inside `write_cursor_value`), so its row is the median of both and overlaps that one's.
SAVE_PARTS = {
    "Cursor.state_document": "in `save_cursor`: the state document built",
    "write_state_document": "in `save_cursor`: the state file written",
    "Cursor.block_value": "in `save_cursor`: the block value built",
    "write_cursor_value": "in `save_cursor`: the block read back, compared and updated",
    "read_cursor_document": "of which one read of the block (median of the tick's two)",
}


def median_time(action: Callable[[], object], reps: int) -> tuple[float, object]:
    """Median wall time of `reps` calls, and the last call's result."""
    times, result = [], None
    for _ in range(reps):
        started = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def kib(size: int) -> str:
    return f"{size / 1024:,.1f}"


@contextmanager
def prefect_server(kind: str, home: Path) -> Iterator[str]:
    """A temporary `prefect server start` as the project starts it (orchestration/local_prefect.py)."""
    from tests.postgres import server_database

    with server_database(kind, f"usage_bench_bookkeeping_{os.getpid()}") as settings:
        process, url = local_prefect.start_server(home, home / "server.log", settings=settings)
        try:
            yield url
        finally:
            local_prefect.stop(process)


class PhaseTimer:
    """Wraps functions of a module or methods of a class so each call's wall time is recorded under a name
    (every call: a part called twice a tick has two times a tick)."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}

    def wrap(self, module: object, name: str, label: str | None = None) -> None:
        original = getattr(module, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds.setdefault(label or name, []).append(time.perf_counter() - started)

        setattr(module, name, timed)


def build_source(work: Path, partners: int, dealers_per_partner: int) -> dict:
    """The demo's synthetic source, sized: `partners` x `dealers_per_partner` mapped dealers (plus one
    unmapped), one customer of three services and eight usage rows each (so that almost every
    dealer has relevant usage and a cursor entry), where `usage-pipeline setup` points the blocks
    when no database is configured."""
    import sqlalchemy as sa

    from orchestration.setup import DEMO_FILES, DEMO_SOURCE_DIR
    from usage_pipeline import demo_data

    os.chdir(work)
    DEMO_SOURCE_DIR.mkdir()
    billing, v3 = (sa.create_engine(f"sqlite:///{(DEMO_SOURCE_DIR / DEMO_FILES[b]).resolve()}") for b in DEMO_FILES)
    demo_data.create_schema(billing, v3)
    shape = demo_data.DemoShape(partners=partners, dealers_per_partner=dealers_per_partner, unmapped_dealers=1,
                                customers_per_dealer=1, services=3, rows_per_customer=8)
    made = demo_data.populate(billing, v3, shape)
    billing.dispose()
    v3.dispose()
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--partners", type=int, default=200)
    parser.add_argument("--dealers-per-partner", type=int, default=100)
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each in-process measurement")
    parser.add_argument("--ticks", type=int, default=3, help="no-change ticks to time, then as many one-dealer ticks")
    parser.add_argument("--ui-reps", type=int, default=3, help="repetitions of each browser measurement")
    parser.add_argument("--no-ui", action="store_true", help="skip the browser measurements")
    args = parser.parse_args()
    command = ".venv/bin/python bench/" + " ".join(
        [Path(sys.argv[0]).name, *map(shlex.quote, sys.argv[1:])])

    work = Path(tempfile.mkdtemp(prefix="usage-bench-bookkeeping-"))
    home = work / "prefect-home"
    home.mkdir()
    with prefect_server(args.server, home) as url:
        os.environ["PREFECT_API_URL"] = url
        os.environ["USAGE_LAKE_ROOT"] = str(work / "lake")
        rows = run(args, work, url)
    print(f"`{command}`\n")
    print(f"Prefect server on {'PostgreSQL' if args.server == 'postgres' else 'SQLite'}; work directory {work}\n")
    print("| what | size KiB | median s | note |")
    print("| --- | ---: | ---: | --- |")
    for what, size, seconds, note in rows:
        print(f"| {what} | {size} | {seconds} | {note} |")


def run(args: argparse.Namespace, work: Path, url: str) -> list[tuple[str, str, str, str]]:
    import sqlalchemy as sa
    from prefect.artifacts import create_table_artifact
    from prefect.client.orchestration import get_client

    import flows.usage_change_detection as detection_flow
    import orchestration.tick as tick_module
    from blocks.usage_cursor import CURSOR_DOCUMENT, UsageCursor
    from orchestration import report as report_module
    from orchestration import runtime
    from orchestration.events import freshness_lags
    from orchestration.runtime import read_cursor_value, write_cursor_value
    from orchestration.setup import BILLING_BLOCK, DEMO_FILES, DEMO_SOURCE_DIR, run_setup
    from tests.pipeline_helpers import RestApi, tick
    from usage_pipeline import demo_data
    from usage_pipeline.cursor import Cursor, parse_cursor, utc_now
    from usage_pipeline.lake import read_state_document, state_path, write_state_document
    from usage_pipeline.settings import load_settings

    out: list[tuple[str, str, str, str]] = []
    made = build_source(work, args.partners, args.dealers_per_partner)
    settings = load_settings()
    run_setup(settings, environ={})
    dealers = sum(len(d) for d in made["partners"].values()) + len(made["unmapped_dealers"])

    started = time.perf_counter()
    state, first = tick()
    first_seconds = time.perf_counter() - started
    if not state.is_completed() or first is None:
        raise RuntimeError(f"first tick: {state.message}")
    out.append(("first tick (bronze + every partition), for scale", "", f"{first_seconds:.1f}",
                f"{state.message}; {dealers:,} dealers, {made['usage_rows']:,} usage rows"))

    # 1. No-change ticks, then one-dealer ticks, each part timed.
    timer = PhaseTimer()
    for name in TICK_PARTS:
        timer.wrap(tick_module, name)
    timer.wrap(tick_module.bronze, "status", "bronze.status")
    for name in FLOW_PARTS:
        timer.wrap(detection_flow, name)
    for name in ("state_document", "block_value"):
        timer.wrap(Cursor, name, f"Cursor.{name}")
    timer.wrap(tick_module, "write_state_document")
    timer.wrap(tick_module, "write_cursor_value")
    timer.wrap(runtime, "read_cursor_document")

    def timed_ticks(label: str, expected: str, before_each: Callable[[], object]) -> tuple[float, dict, object]:
        """`args.ticks` ticks with their parts' rows; the median wall, the parts' medians, the last tick's state."""
        timer.seconds.clear()
        walls = []
        for _ in range(args.ticks):
            before_each()
            started = time.perf_counter()
            state, _ = tick()
            walls.append(time.perf_counter() - started)
            if state.message != expected:
                raise RuntimeError(f"a {label} tick said {state.message!r}")
        tick_wall = statistics.median(walls)
        phase = {name: statistics.median(values) for name, values in timer.seconds.items()}
        out.append((f"**{label} tick**, flow call in process (wall)", "", f"{tick_wall:.3f}",
                    f"median of {args.ticks}; runs {len(walls)}: {fmt(walls)}"))
        for name in (FLOW_PARTS[0], *TICK_PARTS, "bronze.status", *FLOW_PARTS[1:]):
            out.append((f"  tick part `{name}`", "", f"{phase.get(name, 0):.3f}",
                        f"{100 * phase.get(name, 0) / tick_wall:.0f} % of the tick"))
        return tick_wall, phase, state

    tick_wall, phase, _ = timed_ticks("no-change", "no changes", lambda: None)
    bookkeeping = sum(phase.get(n, 0) for n in ("read_cursor", "advance_cursor", "save_cursor",
                                                 "publish_tick_artifacts", "emit_tick_event"))
    out.append(("  **bookkeeping parts together** (read_cursor + advance_cursor + save_cursor + artifacts"
                " + tick event)", "", f"{bookkeeping:.3f}", f"{100 * bookkeeping / tick_wall:.0f} % of the tick"))

    billing = sa.create_engine(f"sqlite:///{(DEMO_SOURCE_DIR / DEMO_FILES[BILLING_BLOCK]).resolve()}")
    dealer = next(d for d, seen in sorted(first.cursor.dealer_seen.items()) if seen.relevant and seen.partner)
    tick_wall, phase, state = timed_ticks("one-dealer", "1 dealer(s) -> 1 partition(s), 1/1 ok",
                                   lambda: demo_data.touch_dealer(billing, dealer, utc_now()))
    billing.dispose()
    for name, what in SAVE_PARTS.items():
        out.append((f"    {what} (`{name}`)", "", f"{phase.get(name, 0):.3f}",
                    f"{100 * phase.get(name, 0) / tick_wall:.0f} % of the tick"))

    # 2. The bookkeeping on its own.
    root = settings.lake_path
    document, _ = read_state_document(root)
    block_value = read_cursor_value()
    cursor, problems = parse_cursor(block_value, document)
    if problems:
        raise RuntimeError(f"the stored cursor has warnings: {problems[:3]}")
    assert cursor.dealer_seen is not None and len(cursor.dealer_seen) == dealers, len(cursor.dealer_seen or {})
    text = json.dumps(cursor.state_document())
    seconds, _ = median_time(lambda: json.dumps(cursor.state_document()), args.reps)
    out.append(("state document: `Cursor.state_document` + `json.dumps`", kib(len(text)), f"{seconds:.3f}",
                f"{len(cursor.dealer_seen):,} dealer_seen, {len(cursor.fingerprints):,} fingerprints,"
                f" {len(cursor.partitions)} partitions"))
    seconds, _ = median_time(lambda: parse_cursor(block_value, json.loads(text)), args.reps)
    out.append(("state document + block value: `json.loads` + `parse_cursor`", "", f"{seconds:.3f}", ""))
    seconds, _ = median_time(lambda: write_state_document(root, cursor.state_document()), args.reps)
    out.append(("state file written (`write_state_document`)", kib(state_path(root).stat().st_size),
                f"{seconds:.3f}", "Parquet, one row"))
    seconds, _ = median_time(lambda: read_state_document(root), args.reps)
    out.append(("state file read (`read_state_document`)", "", f"{seconds:.3f}", ""))

    block_text = json.dumps(block_value)
    seconds, _ = median_time(read_cursor_value, args.reps)
    out.append(("cursor block loaded through Prefect (`read_cursor_value`)", kib(len(block_text)), f"{seconds:.3f}",
                f"{len(block_value['dealer_last_modified']):,} dealers; keys {sorted(block_value)}"))
    seconds, _ = median_time(lambda: write_cursor_value(cursor.block_value(), block_value), args.reps)
    out.append(("cursor block saved through Prefect (`write_cursor_value`: read, compare, update)", "",
                f"{seconds:.3f}", ""))
    seconds, _ = median_time(lambda: UsageCursor.load(CURSOR_DOCUMENT), args.reps)
    out.append(("cursor block loaded as `UsageCursor.load`", "", f"{seconds:.3f}", "what a script would call"))

    now = utc_now()
    seconds, rows = median_time(lambda: report_module.freshness_rows(cursor, now), args.reps)
    size = len(json.dumps(rows))
    out.append((f"freshness artifact rows built (`freshness_rows`, {len(rows)} partners)", kib(size),
                f"{seconds:.3f}", "the table's JSON"))
    seconds, _ = median_time(lambda: create_table_artifact(table=rows, key="bench-freshness",
                                                           description="Partition freshness"), args.reps)
    out.append(("freshness artifact created (`create_table_artifact`)", "", f"{seconds:.3f}", ""))
    seconds, _ = median_time(lambda: freshness_lags(cursor, now), args.reps)
    out.append(("tick event's `freshness_lag_seconds` (`freshness_lags`)", kib(len(json.dumps(freshness_lags(
        cursor, now)))), f"{seconds:.3f}", ""))
    for key, build in (("usage-tick-runs", report_module.tick_rows), ("usage-tick-checks", report_module.check_rows)):
        seconds, rows = median_time(lambda build=build: build(first), args.reps)
        out.append((f"first tick's `{key}` rows built ({len(rows):,} rows)", kib(len(json.dumps(rows))),
                    f"{seconds:.3f}", ""))
        seconds, _ = median_time(lambda rows=rows, key=key: create_table_artifact(table=rows, key=f"bench-{key}"),
                                 args.reps)
        out.append((f"first tick's `{key}` created", "", f"{seconds:.3f}", ""))
    seconds, _ = median_time(lambda: report_module.publish_tick_artifacts(first), args.reps)
    out.append(("first tick's artifacts together (`publish_tick_artifacts`)", "", f"{seconds:.3f}", ""))

    if not args.no_ui:
        api = RestApi(url)
        with get_client(sync_client=True) as client:
            block_id = str(client.read_block_document_by_name(CURSOR_DOCUMENT, "usage-cursor").id)
        (artifact,) = api.post("/artifacts/filter", {
            "artifacts": {"key": {"any_": ["usage-partition-freshness"]},
                          "flow_run_id": {"any_": [str(state.state_details.flow_run_id)]}}})
        out += browser_rows(url, block_id, artifact, block_value, args.ui_reps, api)
    return out


# The V2 edit page's CodeMirror document, summarised in the browser (never the whole text over the wire).
EDITOR_DEALERS_JS = """const editor = document.querySelector('.cm-content');
if (!editor || !editor.cmView) return null;
try { const value = JSON.parse(editor.cmView.view.state.doc.toString());
      return value && value.dealer_last_modified ? Object.keys(value.dealer_last_modified).length : null; }
catch (e) { return null; }"""
TABLE_ROWS_JS = "return document.querySelectorAll('main table tbody tr').length;"
SAVE = "//button[@type='submit'][normalize-space()='Save']"


def browser_rows(url: str, block_id: str, artifact: dict, block_value: dict, reps: int,
                 api) -> list[tuple[str, str, str, str]]:
    from selenium.webdriver.common.by import By

    from tests.ui_browser import Browser

    browser = Browser(url.removesuffix("/api"))
    dealers = len(block_value["dealer_last_modified"])
    block_path = f"/blocks/block/{block_id}"
    stored = lambda: api.get(f"/block_documents/{block_id}")["data"]["value"]  # noqa: E731
    out = []
    try:
        browser.open("/blocks")  # the UI's bundle cached, as for an operator who has the UI open
        browser.element("//main//*[normalize-space(text())='usage-change-detection']")

        def block_page() -> None:
            browser.open(block_path)
            browser.element("//main//*[normalize-space(text())='Dealer Last Modified']")

        def edit_page() -> None:
            browser.open(f"{block_path}/edit")
            browser.wait(lambda d: d.execute_script(EDITOR_DEALERS_JS) == dealers,
                         f"the editor does not hold {dealers} dealers")

        for label, action in (("V2 block page (until the value is rendered)", block_page),
                              ("V2 edit page (until the editor holds every dealer)", edit_page)):
            times = []
            for _ in range(reps):
                started = time.perf_counter()
                action()
                times.append(time.perf_counter() - started)
            seconds = statistics.median(times)
            out.append((f"UI: {label}", "", f"{seconds:.2f}",
                        f"{'under' if seconds < UI_TARGET_SECONDS else 'OVER'} 5 s; runs {fmt(times)}"))

        times = []
        for _ in range(reps):
            edit_page()
            started = time.perf_counter()
            browser.submit(SAVE)
            browser.wait_for_url(lambda u: u.rstrip("/").endswith(block_path), "Save did not return to the block page")
            browser.wait_for_toast("Block updated successfully")
            times.append(time.perf_counter() - started)
            if stored() != block_value:
                raise RuntimeError("an unchanged Save changed the stored cursor")
        seconds = statistics.median(times)
        out.append(("UI: unchanged Save (click until the block page's success toast)", "", f"{seconds:.2f}",
                    f"{'under' if seconds < UI_TARGET_SECONDS else 'OVER'} 5 s; stored value unchanged; runs"
                    f" {fmt(times)}"))

        partners = len(json.loads(artifact["data"]))
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            browser.open(f"/artifacts/artifact/{artifact['id']}")
            browser.wait(lambda d: d.execute_script(TABLE_ROWS_JS) > 0 and d.find_elements(
                By.XPATH, "//main//table/tbody/tr/td[normalize-space()]"), "the freshness table shows no rows")
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        shown = browser.driver.execute_script(TABLE_ROWS_JS)
        out.append((f"UI: freshness artifact page ({partners} partners, until its table shows rows)",
                    kib(len(artifact["data"])), f"{seconds:.2f}",
                    f"{'under' if seconds < UI_TARGET_SECONDS else 'OVER'} 5 s; {shown} rows on its first page;"
                    f" runs {fmt(times)}"))
    finally:
        browser.quit()
    return out


def fmt(times: list[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in times)


if __name__ == "__main__":
    main()
