"""Gold for one partner: the reports, computed from the partner's silver, checked, then published.

Given `staged_silver` (the silver run that staged it: a tick's, or a cascading manual one),
it publishes that silver and its gold together; without it, it builds from the published
silver and publishes gold alone.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_flow_run

from orchestration.events import partition_event_if_manual
from orchestration.runtime import tag_current_run
from orchestration.slots import partner_slot
from usage_pipeline.materialize import GoldResult, build_gold
from usage_pipeline.partners import PartnerUUID, parse_partner_uuid
from usage_pipeline.settings import load_settings


@flow(name="partner-gold", flow_run_name="gold-{partner_uuid}")
def partner_gold(partner_uuid: PartnerUUID, staged_silver: str | None = None) -> GoldResult:
    partner = parse_partner_uuid(partner_uuid)
    settings = load_settings()
    tag_current_run(partner, "gold")
    with partition_event_if_manual(partner) as checks:
        with partner_slot(partner, settings):
            result = build_gold(settings.lake_path, partner, staged_silver, str(current_flow_run.id),
                                settings.warn_only_checks)
        checks.extend(result.checks)
    get_run_logger().info(
        "Gold for partner %s: %d report row(s), %d active service(s); published %s; checks: %s",
        partner, result.usage_report_rows, result.active_services_rows, ", ".join(result.published_tables),
        "; ".join(c.describe() for c in result.checks),
    )
    return result
