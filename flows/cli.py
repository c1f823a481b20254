"""`usage-pipeline`: setup, demo and serve (CONTRACT.md sections 2 and 3)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

DETECTION_INTERVAL_SECONDS = 300
RUNNER_POLL_SECONDS = 1.0


def cmd_setup(_: argparse.Namespace) -> int:
    from blocks.setup import run_setup

    for line in run_setup():
        print(line)
    return 0


def deployments(schedule: bool) -> list:
    """The four deployments of CONTRACT.md section 3, as prefect.yaml declares them too."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from flows.billing_usage_raw import billing_usage_raw
    from flows.partner_gold import partner_gold
    from flows.partner_silver import partner_silver
    from flows.usage_change_detection import usage_change_detection

    return [
        usage_change_detection.to_deployment(
            name="usage-change-detection",
            interval=DETECTION_INTERVAL_SECONDS if schedule else None,
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
            tags=["usage-pipeline", "layer:detection"],
        ),
        billing_usage_raw.to_deployment(name="billing-usage-raw", tags=["usage-pipeline", "layer:bronze"]),
        partner_silver.to_deployment(name="partner-silver", tags=["usage-pipeline", "layer:silver"]),
        partner_gold.to_deployment(name="partner-gold", tags=["usage-pipeline", "layer:gold"]),
    ]


def cmd_serve(args: argparse.Namespace) -> int:
    from prefect import serve

    from blocks.setup import max_concurrent_partitions

    # A tick runs bronze, then at most N partition runs at a time: N + 2 processes.
    serve(*deployments(schedule=not args.no_schedule), limit=max_concurrent_partitions() + 2,
          query_seconds=RUNNER_POLL_SECONDS)
    return 0


def cmd_demo(_: argparse.Namespace) -> int:
    """Build the embedded source, run a first tick and a one-dealer tick, print what happened."""
    import sqlalchemy as sa

    from flows import demo_data, local_prefect
    from flows.lake import lake_root

    state_dir = Path(".usage-pipeline").resolve()
    state_dir.mkdir(exist_ok=True)
    processes = []
    try:
        if not os.environ.get("PREFECT_API_URL"):
            server, url = local_prefect.start_server(state_dir / "prefect-home", state_dir / "prefect-server.log")
            processes.append(server)
            os.environ["PREFECT_API_URL"] = url
            print(f"Started a local Prefect server at {url.removesuffix('/api')} (UI; log in {state_dir})")

        from blocks.setup import DEMO_FILES, DEMO_SOURCE_DIR, run_setup

        DEMO_SOURCE_DIR.mkdir(exist_ok=True)
        paths = {block: (DEMO_SOURCE_DIR / name).resolve() for block, name in DEMO_FILES.items()}
        for path in paths.values():
            path.unlink(missing_ok=True)
        billing, v3 = (sa.create_engine(f"sqlite:///{paths[b]}") for b in ("billing-db", "v3-db"))
        demo_data.create_schema(billing, v3)
        made = demo_data.populate(billing, v3)
        print(f"Demo source: {made['usage_rows']} usage rows in {paths['billing-db']}, dealers in {paths['v3-db']}")
        for line in run_setup(environ={}):
            print(f"setup: {line}")

        processes.append(local_prefect.start_serve(state_dir / "serve.log"))
        print(f"Serving the four deployments (log in {state_dir / 'serve.log'})")

        from flows.usage_change_detection import usage_change_detection

        def tick(title: str) -> None:
            started = time.perf_counter()
            state = usage_change_detection(return_state=True)
            report = state.result(raise_on_failure=False)
            print(f"\n== {title}: {state.name} in {time.perf_counter() - started:.1f}s: {state.message}")
            for partner, outcome in report.partitions.items():
                print(f"   partner {partner}: silver {outcome.silver.state}, gold {outcome.gold.state if outcome.gold else '-'}")

        tick("First tick (no cursor: bronze and every partition)")
        partner, dealers = next(iter(made["partners"].items()))
        touched = demo_data.touch_dealer(billing, dealers[0], datetime.now(timezone.utc).replace(tzinfo=None))
        print(f"\nTouched {touched} usage row(s) of dealer {dealers[0]} (partner {partner})")
        tick("Second tick (one dealer changed: bronze slice and one partition)")
        tick("Third tick (nothing changed)")

        root = lake_root()
        print(f"\nLake files under {root}:")
        for path in sorted(root.rglob("*.parquet")) if isinstance(root, Path) else []:
            print(f"   {path.relative_to(root)}")
        return 0
    finally:
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()  # send this process's logs before the server goes away
        for process in reversed(processes):
            local_prefect.stop(process)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="usage-pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("setup", help="create or update blocks and concurrency limits (idempotent)").set_defaults(func=cmd_setup)
    commands.add_parser("demo", help="build the embedded SQLite source and run real ticks end to end").set_defaults(func=cmd_demo)
    serve = commands.add_parser("serve", help="serve the four deployments in one process")
    serve.add_argument("--no-schedule", action="store_true", help="do not schedule detection every 300 s")
    serve.set_defaults(func=cmd_serve)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # configuration errors name the variable to fix
        print(f"usage-pipeline {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
