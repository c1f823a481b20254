"""Gold for one partner: the reports, computed from the partner's silver file."""

from __future__ import annotations

from prefect import flow, get_run_logger

from orchestration.runtime import partner_slot, tag_current_run
from usage_pipeline.materialize import GoldResult, build_gold
from usage_pipeline.partners import PartnerUUID, parse_partner_uuid
from usage_pipeline.settings import load_settings


@flow(name="partner-gold", flow_run_name="gold-{partner_uuid}")
def partner_gold(partner_uuid: PartnerUUID) -> GoldResult:
    partner = parse_partner_uuid(partner_uuid)
    settings = load_settings()
    tag_current_run(partner, "gold")
    with partner_slot(partner, settings):
        result = build_gold(settings.lake_path, partner)
    get_run_logger().info(
        "Gold for partner %s: %d report row(s), %d active service(s)",
        partner, result.usage_report_rows, result.active_services_rows,
    )
    return result
