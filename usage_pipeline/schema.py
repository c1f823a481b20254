"""The source schema (CONTRACT.md section 1) and the rule of relevant usage, written once with SQLAlchemy Core.

SQLAlchemy quotes `usage` (a reserved word in MariaDB) and renders the same
statements for MySQL/MariaDB and the embedded SQLite source. The pipeline only
reads; `metadata.create_all` is used by the demo and the tests to build sources.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

billing_metadata = sa.MetaData()
v3_metadata = sa.MetaData()

MODIFIED_TYPE = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

usage = sa.Table(
    "usage",
    billing_metadata,
    sa.Column("usage_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("usage_FK_customer_id", sa.Integer, nullable=False),
    sa.Column("usage_FK_service_id", sa.Integer, nullable=False),
    sa.Column("usage_FK_dealer_id", sa.Integer, nullable=False),
    sa.Column("usage_date", sa.Date, nullable=False),
    sa.Column("usage_quantity", sa.Numeric(18, 4, asdecimal=True), nullable=False),
    sa.Column("usage_amount", sa.Numeric(18, 4, asdecimal=True), nullable=False),
    sa.Column("usage_modified", MODIFIED_TYPE, nullable=True),
    sa.Index("idx_usage_dealer_modified", "usage_FK_dealer_id", "usage_modified"),
    sa.Index("idx_usage_customer_service", "usage_FK_customer_id", "usage_FK_service_id"),
)

service_data = sa.Table(
    "v4_wh_service_data",
    billing_metadata,
    sa.Column("service_data_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("service_data_FK_customer_id", sa.Integer, nullable=False),
    sa.Column("service_data_FK_service_id", sa.Integer, nullable=False),
    sa.Column("service_data_FK_service_status_id", sa.Integer, nullable=False),
    sa.Column("service_data_csa_category_id", sa.Integer, nullable=False),
    sa.Column("service_data_system_id", sa.Integer, nullable=False),
    sa.Column("service_data_service_name", sa.String(100), nullable=True),
    sa.UniqueConstraint(
        "service_data_FK_customer_id", "service_data_FK_service_id", name="uq_service_data_customer_service"
    ),
)

dealer = sa.Table(
    "dealer",
    v3_metadata,
    sa.Column("dealer_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("dealer_name", sa.String(100), nullable=False),
    sa.Column("dealer_partner_uuid", sa.CHAR(36), nullable=True),
)

RELEVANT_SYSTEM_ID = 3
RELEVANT_STATUS_IDS = (-3, 3, 10, 11)
RELEVANT_CSA_CATEGORY_IDS = (1, 2, 3)

# The rule of "relevant usage": a usage row counts when it joins one of these service rows.
RELEVANT_SERVICE = sa.and_(
    service_data.c.service_data_system_id == RELEVANT_SYSTEM_ID,
    service_data.c.service_data_FK_service_status_id.in_(RELEVANT_STATUS_IDS),
    service_data.c.service_data_csa_category_id.in_(RELEVANT_CSA_CATEGORY_IDS),
)
# The join every detection query and the per-dealer extracts use.
relevant_usage = usage.join(
    service_data,
    sa.and_(
        service_data.c.service_data_FK_customer_id == usage.c.usage_FK_customer_id,
        service_data.c.service_data_FK_service_id == usage.c.usage_FK_service_id,
        RELEVANT_SERVICE,
    ),
)

INDEX_ADVICE = (
    "CREATE INDEX idx_usage_dealer_modified ON `usage` (usage_FK_dealer_id, usage_modified);"
)

