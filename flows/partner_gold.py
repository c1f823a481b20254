"""Gold for one partner: the reports, computed from the partner's silver file."""

from __future__ import annotations

import polars as pl
from prefect import flow, get_run_logger

from flows.lake import GOLD_TABLES, SILVER_TABLES, lake_root, partition_path, write_parquet_atomic
from flows.partner_silver import PartnerUUID
from flows.partners import parse_partner_uuid
from flows.runtime import partner_slot, tag_current_run
from flows.transforms import active_services, usage_report


@flow(name="partner-gold", flow_run_name="gold-{partner_uuid}")
def partner_gold(partner_uuid: PartnerUUID) -> dict[str, object]:
    partner = parse_partner_uuid(partner_uuid)
    tag_current_run(partner, "gold")
    root = lake_root()
    with partner_slot(partner):
        silver = partition_path(root, "silver", SILVER_TABLES[0], partner)
        if not silver.exists():
            raise FileNotFoundError(f"silver file {silver} is missing; run partner-silver for {partner} first")
        aggregated = pl.read_parquet(silver)
        report = usage_report(aggregated, partner)
        active = active_services(aggregated, partner)
        for table, frame in zip(GOLD_TABLES, (report, active)):
            write_parquet_atomic(frame, partition_path(root, "gold", table, partner))
    get_run_logger().info(
        "Gold for partner %s: %d report row(s), %d active service(s)", partner, report.height, active.height
    )
    return {"partner": partner, "usage_report_rows": report.height, "active_services_rows": active.height}
