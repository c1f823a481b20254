"""Silver for one partner: its dealers' bronze rows, aggregated per day and per month and service."""

from __future__ import annotations

from typing import Annotated

from prefect import flow, get_run_logger, task
from prefect.tasks import exponential_backoff
from pydantic import Field

from flows.lake import lake_root
from flows.materialize import build_silver
from flows.partners import PARTNER_UUID_PATTERN, parse_partner_uuid
from flows.runtime import partner_slot, read_dealer_directory, tag_current_run

PartnerUUID = Annotated[str, Field(pattern=PARTNER_UUID_PATTERN, description="Partner UUID (8-4-4-4-12 hex)")]


@task(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5)
def partner_dealers(partner_uuid: str) -> list[int]:
    """The partner's dealers, read from v3 now (not from the tick), so manual runs are right too."""
    return sorted(d for d, p in read_dealer_directory().items() if p == partner_uuid)


@flow(name="partner-silver", flow_run_name="silver-{partner_uuid}")
def partner_silver(partner_uuid: PartnerUUID) -> dict[str, object]:
    partner = parse_partner_uuid(partner_uuid)
    tag_current_run(partner, "silver")
    with partner_slot(partner):
        result = build_silver(lake_root(), partner, partner_dealers(partner))
    get_run_logger().info(
        "Silver for partner %s: %d dealer(s), %d bronze row(s) -> %d daily and %d monthly row(s)",
        partner, len(result["dealers"]), result["bronze_rows"], result["aggregated_rows"], result["monthly_rows"],
    )
    return result
