"""Hand-built source rows for integration tests, plus SQL ground truth computed independently."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal

import sqlalchemy as sa

from tests.conftest import BILLING_DB, V3_DB

PARTNER_A = "aaaaaaaa-0000-4000-8000-000000000001"
PARTNER_B = "bbbbbbbb-0000-4000-8000-000000000002"
PARTNER_C = "cccccccc-0000-4000-8000-000000000003"


@dataclass
class SourceBuilder:
    """Writes rows straight into the MariaDB source tables, as the billing system would."""

    billing: sa.Engine
    v3: sa.Engine
    _customers: itertools.count = field(default_factory=lambda: itertools.count(1000))

    def dealer(self, dealer_id: int, partner: str | None) -> None:
        with self.v3.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO dealer (dealer_id, dealer_name, dealer_partner_uuid) VALUES (%s, %s, %s)"
                " ON DUPLICATE KEY UPDATE dealer_partner_uuid = VALUES(dealer_partner_uuid)",
                (dealer_id, f"Dealer {dealer_id}", partner),
            )

    def service(self, customer: int, service: int, *, relevant: bool = True, name: str | None = "Svc",
                status: int = 3) -> None:
        with self.billing.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO v4_wh_service_data (service_data_FK_customer_id, service_data_FK_service_id,"
                " service_data_FK_service_status_id, service_data_csa_category_id, service_data_system_id,"
                " service_data_service_name) VALUES (%s, %s, %s, %s, %s, %s)",
                (customer, service, status, 1, 3 if relevant else 4, name),
            )

    def usage(self, dealer: int, customer: int, service: int, day: date, amount: str,
              modified: datetime | None, quantity: str = "1") -> int:
        with self.billing.begin() as conn:
            result = conn.exec_driver_sql(
                "INSERT INTO `usage` (usage_FK_customer_id, usage_FK_service_id, usage_FK_dealer_id, usage_date,"
                " usage_quantity, usage_amount, usage_modified) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (customer, service, dealer, day, Decimal(quantity), Decimal(amount), modified),
            )
            return int(result.lastrowid)

    def execute(self, sql: str, *params: object) -> int:
        with self.billing.begin() as conn:
            return conn.exec_driver_sql(sql, params or None).rowcount

    def standard(self) -> None:
        """Three partners: A (dealers 1, 2), B (dealer 3), C (dealer 4); dealer 9 unmapped."""
        for dealer, partner in ((1, PARTNER_A), (2, PARTNER_A), (3, PARTNER_B), (4, PARTNER_C), (9, None)):
            self.dealer(dealer, partner)
        self.service(501, 1, name="Voice")
        self.service(501, 2, name=None)
        self.service(502, 1, name="Voice", status=-3)
        self.service(503, 1, relevant=False, name="Other system")
        t = datetime(2026, 10, 1, 8, 0, 0, 123456)
        self.usage(1, 501, 1, date(2026, 9, 3), "10.5000", t, "2")
        self.usage(1, 501, 2, date(2026, 10, 4), "-3.2500", t.replace(hour=9))
        self.usage(2, 502, 1, date(2026, 10, 5), "7.0000", None)
        self.usage(3, 501, 1, date(2026, 10, 6), "4.0000", t.replace(hour=10), "3")
        self.usage(3, 503, 1, date(2026, 10, 6), "99.0000", t.replace(hour=11))  # excluded row
        self.usage(4, 502, 1, date(2026, 8, 30), "1.0000", t)
        self.usage(4, 502, 1, date(2026, 10, 30), "2.0000", t.replace(hour=7))
        self.usage(9, 501, 1, date(2026, 10, 1), "5.0000", t)


RELEVANT_JOIN = f"""
    FROM {BILLING_DB}.`usage` u
    JOIN {BILLING_DB}.v4_wh_service_data sd
      ON sd.service_data_FK_customer_id = u.usage_FK_customer_id
     AND sd.service_data_FK_service_id = u.usage_FK_service_id
     AND sd.service_data_system_id = 3
     AND sd.service_data_FK_service_status_id IN (-3, 3, 10, 11)
     AND sd.service_data_csa_category_id IN (1, 2, 3)
    JOIN {V3_DB}.dealer d ON d.dealer_id = u.usage_FK_dealer_id
"""


def usage_report_truth(engine: sa.Engine, partner: str) -> list[tuple]:
    sql = f"""
        SELECT CAST(DATE_FORMAT(u.usage_date, '%%Y-%%m-01') AS DATE) AS month, u.usage_FK_dealer_id,
               SUM(u.usage_quantity), SUM(u.usage_amount),
               COUNT(DISTINCT u.usage_FK_service_id), COUNT(DISTINCT u.usage_FK_customer_id)
        {RELEVANT_JOIN}
        WHERE LOWER(d.dealer_partner_uuid) = %s
        GROUP BY month, u.usage_FK_dealer_id ORDER BY month, u.usage_FK_dealer_id
    """
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(sql, (partner,))]


def active_services_truth(engine: sa.Engine, partner: str) -> list[tuple]:
    sql = f"""
        SELECT u.usage_FK_dealer_id, u.usage_FK_customer_id, u.usage_FK_service_id,
               MIN(u.usage_date), MAX(u.usage_date), SUM(u.usage_amount)
        {RELEVANT_JOIN}
        WHERE LOWER(d.dealer_partner_uuid) = %s
          AND DATE_FORMAT(u.usage_date, '%%Y-%%m') = (
              SELECT DATE_FORMAT(MAX(u.usage_date), '%%Y-%%m') {RELEVANT_JOIN} WHERE LOWER(d.dealer_partner_uuid) = %s)
        GROUP BY u.usage_FK_dealer_id, u.usage_FK_customer_id, u.usage_FK_service_id
        ORDER BY 1, 2, 3
    """
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(sql, (partner, partner))]
