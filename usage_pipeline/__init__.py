"""The Prefect-free core of the usage pipeline: every rule, query and transform, as plain values.

Data moves one way, each step a value you can print:

    source snapshot (queries) -> diff against the cursor (cursor, detection) -> plan
    -> bronze extract (extract) -> silver and gold (transforms, materialize, lake)
    -> outcomes -> new cursor (detection) -> what operators see (tick_report, explain)

Modules here import nothing from `flows/`, `blocks/` or `orchestration/`, and nothing
from Prefect (tests/test_layout.py keeps that true), so all of it is tested without a
server. `orchestration/` wires it to Prefect; `flows/` holds the five deployments.
"""
