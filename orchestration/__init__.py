"""Prefect glue: connector blocks and slots (runtime), the tick's body (tick), artifacts (report),
events and alerts, set-up, the deployments declared in prefect.yaml, the local server and the CLI.

The flows in `flows/` call into this package; it never imports them (it loads them by
entrypoint where it must run one).
"""
