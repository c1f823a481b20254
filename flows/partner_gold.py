"""Gold for one partner: the reports, computed from the partner's silver file."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.lake import lake_root
from flows.materialize import build_gold
from flows.partners import PartnerUUID, parse_partner_uuid
from flows.runtime import partner_slot, tag_current_run


@flow(name="partner-gold", flow_run_name="gold-{partner_uuid}")
def partner_gold(partner_uuid: PartnerUUID) -> dict[str, object]:
    partner = parse_partner_uuid(partner_uuid)
    tag_current_run(partner, "gold")
    with partner_slot(partner):
        result = build_gold(lake_root(), partner)
    get_run_logger().info(
        "Gold for partner %s: %d report row(s), %d active service(s)",
        partner, result["usage_report_rows"], result["active_services_rows"],
    )
    return result
