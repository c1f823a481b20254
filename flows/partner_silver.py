"""Silver for one partner: its dealers' bronze rows, aggregated per day and per month and service.

Started by hand (UI, `prefect deployment run`), it stages its checked tables and rebuilds the
partner's gold right after, as a `gold-<uuid>` subflow run that publishes all four files
together, unless `cascade=false`: then silver publishes its own two. The detection tick passes
`cascade=false, publish=false` and runs gold itself.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run as current_flow_run
from prefect.tasks import exponential_backoff

from flows.partner_gold import partner_gold
from orchestration.events import partition_event_if_manual
from orchestration.runtime import (
    read_dealer_directory,
    run_subflow,
    tag_current_run,
    tick_shared,
    without_task_tags,
)
from orchestration.slots import partner_slot
from usage_pipeline.materialize import SilverResult, build_silver
from usage_pipeline.partners import PartnerUUID, dealers_of, layer_tag, parse_partner_uuid, partner_tag
from usage_pipeline.settings import load_settings


@task(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5)
def read_partner_dealers(partner_uuid: str) -> list[int]:
    """The partner's dealers, read from v3 now: a manual or deployment run has no tick to ask."""
    return dealers_of(read_dealer_directory(), partner_uuid)


def partner_dealers(partner_uuid: str) -> list[int]:
    """As the running tick planned them (one v3 read per tick), else read from v3 now."""
    shared = tick_shared()
    if shared is not None:
        return dealers_of(shared.directory, partner_uuid)
    with without_task_tags():
        return read_partner_dealers(partner_uuid)


@flow(name="partner-silver", flow_run_name="silver-{partner_uuid}")
def partner_silver(partner_uuid: PartnerUUID, cascade: bool = True, bronze_version: int | None = None,
                   publish: bool = True) -> SilverResult:
    """`bronze_version`: the bronze table version to read (a tick passes the one its bronze run
    committed); None reads the newest. `publish=false` only stages the tables, for a gold run
    given this run's id as `staged_silver`; with `cascade`, gold publishes them anyway."""
    partner = parse_partner_uuid(partner_uuid)
    settings = load_settings()
    tag_current_run(partner, "silver")
    shared = tick_shared()
    with partition_event_if_manual(partner, publishes=publish or cascade) as checks:
        with partner_slot(partner, settings):
            dealers = partner_dealers(partner)
            result = build_silver(settings.lake_path, partner, dealers, bronze_version, str(current_flow_run.id),
                                  publish and not cascade, settings.warn_only_checks,
                                  shared.source_fingerprints(dealers) if shared else None)
        checks.extend(result.checks)
        get_run_logger().info(
            "Silver for partner %s: %d dealer(s), %d bronze row(s) of version %d -> %d daily and %d monthly row(s),"
            " %s; checks: %s", partner, len(result.dealers), result.bronze_rows, result.bronze_version,
            result.aggregated_rows, result.monthly_rows, "published" if result.published else "staged",
            "; ".join(c.describe() for c in result.checks),
        )
        if cascade:  # after the slot is released: gold takes the partner's slot itself
            gold = run_subflow(partner_gold, {"partner_uuid": partner, "staged_silver": result.publish_id},
                               f"gold-{partner}", [partner_tag(partner), layer_tag("gold")])
            checks.extend(gold.checks)
            if not gold.ok:
                raise RuntimeError(f"nothing of partner {partner} was published: {gold.name} ended {gold.state}:"
                                   f" {gold.message}")
    return result
