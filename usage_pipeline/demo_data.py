"""Synthetic billing and v3 data: the demo source, and the tests' and benchmarks' fixtures.

Realistic on purpose: several partners, an unmapped dealer, NULL timestamps,
NULL service names, negative amounts (credits), and rows the billing filters
exclude (other systems, inactive statuses, other CSA categories).
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from usage_pipeline.schema import billing_metadata, dealer, service_data, usage, v3_metadata


@dataclass(frozen=True)
class DemoShape:
    partners: int = 3
    dealers_per_partner: int = 2
    unmapped_dealers: int = 1
    customers_per_dealer: int = 4
    services: int = 5
    rows_per_customer: int = 12
    seed: int = 7


def partner_uuid(index: int, seed: int = 7) -> str:
    return str(uuid.UUID(int=random.Random(seed * 1000 + index).getrandbits(128), version=4))


def create_schema(billing: Engine, v3: Engine) -> None:
    billing_metadata.create_all(billing)
    v3_metadata.create_all(v3)


def populate(billing: Engine, v3: Engine, shape: DemoShape = DemoShape(), now: datetime | None = None) -> dict:
    """Fill empty source tables; return what was made (partners and dealer ids) for printing and tests."""
    rng = random.Random(shape.seed)
    now = now or datetime(2026, 11, 1, 12, 0, 0)
    partners = [partner_uuid(i, shape.seed) for i in range(shape.partners)]
    dealers = []
    dealer_rows = []
    dealer_id = 1
    for partner in partners:
        for _ in range(shape.dealers_per_partner):
            dealer_rows.append({"dealer_id": dealer_id, "dealer_name": f"Dealer {dealer_id}", "dealer_partner_uuid": partner})
            dealers.append(dealer_id)
            dealer_id += 1
    unmapped = []
    for _ in range(shape.unmapped_dealers):
        dealer_rows.append({"dealer_id": dealer_id, "dealer_name": f"Dealer {dealer_id}", "dealer_partner_uuid": None})
        unmapped.append(dealer_id)
        dealers.append(dealer_id)
        dealer_id += 1

    service_rows = []
    usage_rows = []
    customer_id = 100
    for owner in dealers:
        for _ in range(shape.customers_per_dealer):
            customer_id += 1
            for service_id in range(1, shape.services + 1):
                excluded = rng.random() < 0.2
                service_rows.append(
                    {
                        "service_data_FK_customer_id": customer_id,
                        "service_data_FK_service_id": service_id,
                        "service_data_FK_service_status_id": rng.choice([2, 5]) if excluded else rng.choice([-3, 3, 10, 11]),
                        "service_data_csa_category_id": rng.choice([1, 2, 3]),
                        "service_data_system_id": 3 if rng.random() > 0.05 else 4,
                        "service_data_service_name": None if service_id == 5 else f"Service {service_id}",
                    }
                )
            for _ in range(shape.rows_per_customer):
                day = date(2026, 9, 1) + timedelta(days=rng.randrange(61))
                amount = Decimal(rng.randrange(-500, 5000)) / 100
                usage_rows.append(
                    {
                        "usage_FK_customer_id": customer_id,
                        "usage_FK_service_id": rng.randrange(1, shape.services + 1),
                        "usage_FK_dealer_id": owner,
                        "usage_date": day,
                        "usage_quantity": Decimal(rng.randrange(1, 10_000)) / 100,
                        "usage_amount": amount,
                        "usage_modified": None
                        if rng.random() < 0.05
                        else now - timedelta(minutes=rng.randrange(60 * 24 * 30), microseconds=rng.randrange(10**6)),
                    }
                )
    with v3.begin() as conn:
        conn.execute(sa.insert(dealer), dealer_rows)
    with billing.begin() as conn:
        conn.execute(sa.insert(service_data), service_rows)
        conn.execute(sa.insert(usage), usage_rows)
    mapped = {p: [r["dealer_id"] for r in dealer_rows if r["dealer_partner_uuid"] == p] for p in partners}
    return {"partners": mapped, "unmapped_dealers": unmapped, "usage_rows": len(usage_rows)}


def touch_dealer(billing: Engine, dealer_id: int, when: datetime) -> int:
    """Mark every usage row of one dealer as modified at `when` (what a billing correction does)."""
    with billing.begin() as conn:
        result = conn.execute(sa.update(usage).where(usage.c.usage_FK_dealer_id == dealer_id).values(usage_modified=when))
    return result.rowcount
