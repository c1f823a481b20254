"""`usage-pipeline`: setup, serve, demo, and the operator commands (CONTRACT.md sections 2, 3 and 7)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

RUNNER_POLL_SECONDS = 0.25  # how soon `serve` starts a deployment run (a few cheap queries a second)
DETECTION = "usage-change-detection"


def cmd_setup(_: argparse.Namespace) -> int:
    from orchestration.alerts import setup_alerts
    from orchestration.crashed_runs import setup_crash_detection
    from orchestration.setup import run_setup
    from usage_pipeline.settings import load_settings

    settings = load_settings()
    for line in run_setup(settings) + setup_crash_detection(settings) + setup_alerts(settings):
        print(line)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from prefect import serve

    from orchestration.crashed_runs import SERVE_HEARTBEAT_SECONDS
    from orchestration.deployments import runner_deployments
    from usage_pipeline.settings import load_settings

    # The runs it starts inherit this environment: heartbeats often enough for the crashed-runs automation.
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(SERVE_HEARTBEAT_SECONDS))

    # A tick runs bronze, then at most N partition runs at a time (N + 2 processes with deployment runs), and
    # a reconciliation run may overlap it: N + 3.
    serve(*runner_deployments(schedule=not args.no_schedule), limit=load_settings().max_concurrent_partitions + 3,
          query_seconds=RUNNER_POLL_SECONDS)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the embedded source, run three scripted ticks, then keep the UI and the schedule up."""
    from orchestration import local_prefect

    state_dir = Path(".usage-pipeline").resolve()
    state_dir.mkdir(exist_ok=True)
    processes = []
    try:
        ui = None
        if not os.environ.get("PREFECT_API_URL"):
            server, url = local_prefect.start_server(state_dir / "prefect-home", state_dir / "prefect-server.log")
            processes.append(server)
            os.environ["PREFECT_API_URL"] = url
            ui = url.removesuffix("/api")
            print(f"Started a local Prefect server at {ui} (log in {state_dir})")
        billing, made = build_demo_source()
        serve_log = state_dir / "serve.log"
        processes.append(local_prefect.start_serve(serve_log))  # unscheduled: the scripted ticks run alone
        print(f"Serving the five deployments (log in {serve_log})")
        run_demo_ticks(billing, made)
        if args.exit:
            return 0
        local_prefect.stop(processes.pop())
        processes.append(local_prefect.start_serve(serve_log, extra_args=()))
        print_next_steps(ui or os.environ["PREFECT_API_URL"].removesuffix("/api"), made)
        wait_for_interrupt()
        return 0
    finally:
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()  # send this process's logs before the server goes away
        for process in reversed(processes):
            local_prefect.stop(process)


def build_demo_source():
    """A fresh embedded SQLite source under demo-source/, and `usage-pipeline setup` pointed at it."""
    import sqlalchemy as sa

    from orchestration.setup import DEMO_FILES, DEMO_SOURCE_DIR, run_setup
    from usage_pipeline import demo_data
    from usage_pipeline.settings import load_settings

    DEMO_SOURCE_DIR.mkdir(exist_ok=True)
    paths = {block: (DEMO_SOURCE_DIR / name).resolve() for block, name in DEMO_FILES.items()}
    for path in paths.values():
        path.unlink(missing_ok=True)
    billing, v3 = (sa.create_engine(f"sqlite:///{paths[b]}") for b in ("billing-db", "v3-db"))
    demo_data.create_schema(billing, v3)
    made = demo_data.populate(billing, v3)
    print(f"Demo source: {made['usage_rows']} usage rows in {paths['billing-db']}, dealers in {paths['v3-db']}")
    for line in run_setup(load_settings(), environ={}):
        print(f"setup: {line}")
    return billing, made


def run_demo_ticks(billing, made: dict) -> None:
    """A first tick, a tick after one dealer changed, and a tick that finds nothing; then the lake's files."""
    from orchestration.deployments import load_deployment_flow
    from orchestration.tick import report_of
    from usage_pipeline import bronze, demo_data
    from usage_pipeline.lake import bronze_path
    from usage_pipeline.settings import load_settings

    usage_change_detection = load_deployment_flow(DETECTION)

    def tick(title: str, title_if_resumed: str | None = None) -> None:
        """`title_if_resumed`: the title when the tick did not start over (an earlier demo run's cursor,
        kept with its server state and lake in this directory)."""
        started = time.perf_counter()
        state = usage_change_detection(return_state=True)
        report = report_of(state)
        if title_if_resumed and report is not None and report.plan is not None and not report.plan.first_run:
            title = title_if_resumed
        print(f"\n== {title}: {state.name} in {time.perf_counter() - started:.1f}s: {state.message}")
        for partner, outcome in (report.partitions if report else {}).items():
            print(f"   partner {partner}: silver {outcome.silver.state}, gold {outcome.gold.state if outcome.gold else '-'}")

    tick("First tick (no cursor: bronze and every partition)",
         title_if_resumed="First tick (an earlier demo's cursor: only the dealers changed since)")
    partner, dealers = next(iter(made["partners"].items()))
    touched = demo_data.touch_dealer(billing, dealers[0], datetime.now(UTC).replace(tzinfo=None))
    print(f"\nTouched {touched} usage row(s) of dealer {dealers[0]} (partner {partner})")
    tick("Second tick (one dealer changed: bronze slice and one partition)")
    tick("Third tick (nothing changed)")

    root = load_settings().lake_path
    table = bronze.status(root)
    print(f"\nLake under {root}:")
    print(f"   {bronze_path(root).relative_to(root)}/ (Delta table: {table.describe() if table else 'none'})")
    for path in sorted(root.rglob("*.parquet")) if isinstance(root, Path) else []:
        if path.relative_to(root).parts[0] != "bronze":
            print(f"   {path.relative_to(root)}")


def print_next_steps(ui: str, made: dict) -> None:
    from blocks.usage_cursor import CURSOR_DOCUMENT
    from orchestration.deployments import spec

    partner, dealers = next(iter(made["partners"].items()))
    detection = f"{DETECTION}/{DETECTION}"
    print(f"""
The Prefect UI is at {ui}  (detection runs every {spec(DETECTION).interval_seconds:.0f} s; Ctrl-C stops everything)
Things to try, in another shell from this directory (export PREFECT_API_URL={ui}/api):
  - Runs: open the last usage-change-detection run, tab Artifacts: the partition freshness table.
  - Edit the cursor: Blocks -> Usage Cursor / {CURSOR_DOCUMENT} -> Edit; remove dealer "{dealers[0]}" from
    dealer_last_modified, Save; the next tick rebuilds partner {partner} only.
  - Rebuild one partner now:  .venv/bin/prefect deployment run {detection} -p partners='["{partner}"]'
  - Rebuild one partner's layers from the current bronze:  .venv/bin/prefect deployment run partner-silver/partner-silver -p partner_uuid={partner}
  - See what the pipeline knows:  .venv/bin/usage-pipeline cursor show
  - Ask why a dealer did (not) trigger:  .venv/bin/usage-pipeline explain {made['unmapped_dealers'][0]}
  - Re-check the next slice of every dealer's fingerprint now (it also runs every 5 minutes):
    .venv/bin/prefect deployment run usage-reconciliation/usage-reconciliation
""", flush=True)


def wait_for_interrupt() -> None:
    """Until Ctrl-C or SIGTERM; the caller then stops the server and the serve process.

    Both signals get a handler of their own: a shell that starts the demo in the background
    hands it SIGINT ignored, and `kill -INT` must still stop it.
    """
    import signal

    stop = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.append(True))
    while not stop:
        time.sleep(0.5)
    print("\nStopping the served deployments and the Prefect server ...", flush=True)


def cmd_cursor_show(_: argparse.Namespace) -> int:
    from orchestration.operator import show_cursor

    print("\n".join(show_cursor()))
    return 0


def cmd_cursor_reset(args: argparse.Namespace) -> int:
    from orchestration.operator import reset_cursor

    print("\n".join(reset_cursor(args.all, args.partner or [], args.dealer or [])))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from orchestration.operator import explain

    print("\n".join(explain(args.dealer_id)))
    return 0


def require_prefect_server() -> None:
    """Without PREFECT_API_URL, Prefect starts a throwaway server for one command: a `cursor reset` or a
    `setup` there would report success and change nothing that the operator's server holds."""
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise ValueError("no Prefect server to talk to: set PREFECT_API_URL to its API (e.g."
                         " export PREFECT_API_URL=http://127.0.0.1:4200/api; `make demo` prints its own)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="usage-pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("setup", help="create or update blocks and concurrency limits (idempotent)").set_defaults(func=cmd_setup)
    demo = commands.add_parser("demo", help="build the embedded SQLite source, run real ticks, keep the UI up")
    demo.add_argument("--exit", action="store_true", help="stop after the scripted ticks (for scripts)")
    demo.set_defaults(func=cmd_demo)
    serve = commands.add_parser("serve", help="serve the five deployments in one process")
    serve.add_argument("--no-schedule", action="store_true", help="do not schedule detection every 300 s")
    serve.set_defaults(func=cmd_serve)
    cursor = commands.add_parser("cursor", help="what detection remembers, and forcing rebuilds").add_subparsers(
        dest="cursor_command", required=True
    )
    cursor.add_parser("show", help="per partner: dealers, last rebuild, watermark, fresh or stale, last error").set_defaults(
        func=cmd_cursor_show
    )
    reset = cursor.add_parser("reset", help="make the next tick rebuild everything, some partners or some dealers")
    reset.add_argument("--all", action="store_true", help="rebuild bronze and every partition")
    reset.add_argument("--partner", action="append", metavar="UUID", help="rebuild this partner (repeatable)")
    reset.add_argument("--dealer", action="append", type=int, metavar="ID", help="rebuild this dealer's partner (repeatable)")
    reset.set_defaults(func=cmd_cursor_reset)
    explain = commands.add_parser("explain", help="why a dealer did or did not trigger, and what the next tick does")
    explain.add_argument("dealer_id", type=int, metavar="DEALER_ID")
    explain.set_defaults(func=cmd_explain)
    args = parser.parse_args(argv)
    command = " ".join(filter(None, ["usage-pipeline", args.command, getattr(args, "cursor_command", None)]))
    try:
        if args.command != "demo":  # the demo starts a server of its own when none is set
            require_prefect_server()
        return args.func(args)
    except ValueError as exc:  # bad input or configuration: the message names it, nothing was changed
        print(f"{command}: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a source database or the Prefect API failed (SourceError names which)
        print(f"{command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
