"""Unit tests for flows/transforms.py on small hand-computed examples (CONTRACT.md section 6)."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

import polars as pl
import pytest

from usage_pipeline.transforms import (
    ACTIVE_SERVICES_SCHEMA,
    AGGREGATED_SCHEMA,
    BRONZE_SCHEMA,
    MONTHLY_BY_SERVICE_SCHEMA,
    USAGE_REPORT_SCHEMA,
    BadSourceRows,
    active_services,
    billing_monthly_usage_by_service,
    billing_usage_aggregated,
    in_dealer_order,
    money_from_units,
    normalize_bronze,
    sort_by_dealer,
    usage_report,
)

P = "aaaaaaaa-0000-4000-8000-000000000001"
COLUMNS = list(BRONZE_SCHEMA)


def d(text: str) -> Decimal:
    return Decimal(text)


# usage_id, dealer, customer, service, usage_date, quantity, amount, usage_modified, status, service name
ROWS = [
    (1, 1, 100, 10, date(2026, 1, 5), d("1"), d("10.5"), datetime(2026, 1, 5, 10), 3, "Voice"),
    (2, 1, 100, 10, date(2026, 1, 5), d("2"), d("4.25"), datetime(2026, 1, 6, 9), 3, "Voice"),
    (3, 1, 101, 10, date(2026, 1, 20), d("1.5"), d("3"), None, 3, "Voice"),
    (4, 1, 100, 11, date(2026, 2, 1), d("3"), d("7"), datetime(2026, 2, 2), 10, None),
    (5, 2, 200, 11, date(2026, 2, 15), d("1"), d("1.1111"), datetime(2026, 2, 15), 10, "Data"),
    (6, 2, 200, 11, date(2026, 2, 28), d("2"), d("2.2222"), datetime(2026, 3, 1), 10, "Data"),
    (7, 2, 201, 10, date(2026, 1, 31), d("0.5"), d("0.0001"), datetime(2026, 2, 1), 3, "Voice"),
    (8, 1, 100, 10, date(2026, 2, 10), d("1"), d("5"), datetime(2026, 2, 10), 3, "Voice"),
]


def raw_frame(rows=ROWS, **overrides) -> pl.DataFrame:
    data = {name: [row[i] for row in rows] for i, name in enumerate(COLUMNS)}
    data.update(overrides)
    return pl.DataFrame(data, strict=False)


@pytest.fixture
def bronze() -> pl.DataFrame:
    return normalize_bronze(raw_frame())


@pytest.fixture
def aggregated(bronze) -> pl.DataFrame:
    return billing_usage_aggregated(bronze, P)


def schema_of(frame: pl.DataFrame) -> dict:
    return dict(frame.schema)


# --- normalize_bronze ---------------------------------------------------------------------------


def test_normalize_bronze_casts_to_the_declared_schema_and_sorts_by_dealer():
    shuffled = list(reversed(ROWS))
    raw = pl.DataFrame(
        {
            "extra_column": ["x"] * len(shuffled),
            "usage_id": pl.Series([r[0] for r in shuffled], dtype=pl.Int32),
            "dealer_id": pl.Series([r[1] for r in shuffled], dtype=pl.Int16),
            "customer_id": [r[2] for r in shuffled],
            "service_id": [r[3] for r in shuffled],
            "usage_date": [r[4] for r in shuffled],
            "quantity": [float(r[5]) for r in shuffled],
            "amount": [str(r[6]) for r in shuffled],
            "usage_modified": [r[7].isoformat() if r[7] else None for r in shuffled],  # text, as SQLite gives it
            "service_status_id": [r[8] for r in shuffled],
            "service_name": [r[9] for r in shuffled],
        }
    )
    frame = normalize_bronze(raw)
    assert schema_of(frame) == BRONZE_SCHEMA
    assert frame.columns == COLUMNS  # extra column dropped, declared order
    assert frame["dealer_id"].to_list() == [1, 1, 1, 1, 1, 2, 2, 2]
    assert frame["usage_id"].to_list() == [1, 2, 3, 4, 8, 5, 6, 7]  # by dealer, then usage_id
    first = frame.row(0, named=True)
    assert first == {
        "usage_id": 1,
        "dealer_id": 1,
        "customer_id": 100,
        "service_id": 10,
        "usage_date": date(2026, 1, 5),
        "quantity": Decimal("1.0000"),
        "amount": Decimal("10.5000"),
        "usage_modified": datetime(2026, 1, 5, 10),
        "service_status_id": 3,
        "service_name": "Voice",
    }
    assert frame.filter(pl.col("usage_id") == 3)["usage_modified"].to_list() == [None]  # NULL allowed
    assert frame.filter(pl.col("usage_id") == 4)["service_name"].to_list() == [None]  # NULL allowed


def test_normalize_bronze_sorts_by_dealer_then_usage_id_whatever_the_input_order():
    in_usage_order = normalize_bronze(raw_frame(sorted(ROWS)))  # as a scan of `usage` gives them (stable path)
    shuffled = normalize_bronze(raw_frame(ROWS[3:] + ROWS[:3]))
    for frame in (in_usage_order, shuffled):
        assert frame.select("dealer_id", "usage_id").rows() == [(1, 1), (1, 2), (1, 3), (1, 4), (1, 8), (2, 5), (2, 6), (2, 7)]


def test_sort_by_dealer_returns_a_frame_already_in_order_as_it_is_and_sorts_any_other(bronze):
    """A batch is sorted once on its way into the table: the second sort_by_dealer only checks."""
    assert in_dealer_order(bronze) and sort_by_dealer(bronze) is bronze
    for unordered in (bronze.reverse(), pl.concat([bronze.tail(3), bronze.head(5)])):
        assert not in_dealer_order(unordered)
        assert sort_by_dealer(unordered).equals(bronze)
    in_usage_order = bronze.sort("usage_id")  # as a scan of `usage` gives them: the stable sort's path
    assert not in_dealer_order(in_usage_order) and sort_by_dealer(in_usage_order).equals(bronze)
    for dealers, ids in (([1, 1], [7, 7]), ([2, 1], [1, 2]), ([1, None, 2], [1, 2, 3]), ([1, 1], [1, None]),
                         ([2**63 - 1, -(2**63)], [1, 2])):
        assert not in_dealer_order(pl.DataFrame({"dealer_id": dealers, "usage_id": ids}, schema=dict.fromkeys(
            ("dealer_id", "usage_id"), pl.Int64))), (dealers, ids)
    assert in_dealer_order(bronze.head(1)) and in_dealer_order(bronze.clear())


def test_money_from_units_is_exact_over_the_whole_decimal_18_4_range():
    units = [999_999_999_999_999_999, -999_999_999_999_999_999, 1, -1, 0, 135_180, None]
    frame = money_from_units(pl.DataFrame({"amount": units, "usage_id": range(7)}), ("amount", "quantity"))
    assert frame.schema == pl.Schema({"amount": pl.Decimal(18, 4), "usage_id": pl.Int64})  # absent columns ignored
    assert frame["amount"].to_list() == [
        d("99999999999999.9999"), d("-99999999999999.9999"), d("0.0001"), d("-0.0001"), d("0"), d("13.518"), None,
    ]


@pytest.mark.parametrize("units", [10**18, -(10**18)])
def test_money_from_units_rejects_values_beyond_decimal_18_4(units):
    with pytest.raises(BadSourceRows, match=r"1 amount value\(s\) beyond DECIMAL\(18,4\)"):
        money_from_units(pl.DataFrame({"amount": [units, 1]}), ("amount",))


@pytest.mark.parametrize("values", [[d("10.5")], [1.5]])
def test_money_from_units_refuses_columns_that_are_not_units(values):
    with pytest.raises(TypeError, match="amount must hold integer money units"):
        money_from_units(pl.DataFrame({"amount": values}), ("amount",))


def test_normalize_bronze_keeps_decimal_amounts_exact(bronze):
    assert bronze["amount"].sum() == Decimal("33.0834")
    assert bronze["quantity"].sum() == Decimal("12")


@pytest.mark.parametrize("column", ["usage_id", "dealer_id", "customer_id", "service_id", "usage_date", "quantity", "amount"])
def test_normalize_bronze_rejects_nulls_in_not_null_columns(column):
    values = [row[COLUMNS.index(column)] for row in ROWS]
    values[2] = None
    with pytest.raises(BadSourceRows) as caught:
        normalize_bronze(raw_frame(**{column: values}))
    message = str(caught.value)
    assert "NULL" in message
    assert f"'{column}': 1" in message


def test_normalize_bronze_reports_every_column_with_nulls():
    quantity = [row[5] for row in ROWS]
    amount = [row[6] for row in ROWS]
    quantity[0] = quantity[1] = None
    amount[4] = None
    with pytest.raises(BadSourceRows) as caught:
        normalize_bronze(raw_frame(quantity=quantity, amount=amount))
    assert "'quantity': 2" in str(caught.value)
    assert "'amount': 1" in str(caught.value)


def test_normalize_bronze_rejects_duplicate_usage_ids():
    ids = [row[0] for row in ROWS]
    ids[1] = ids[0]
    ids[5] = ids[4]
    with pytest.raises(BadSourceRows) as caught:
        normalize_bronze(raw_frame(usage_id=ids))
    assert "2 duplicate usage_id" in str(caught.value)


def test_normalize_bronze_rejects_missing_columns():
    with pytest.raises(BadSourceRows) as caught:
        normalize_bronze(raw_frame().drop("amount", "service_name"))
    assert "amount" in str(caught.value)
    assert "service_name" in str(caught.value)


def test_normalize_bronze_of_an_empty_extract_has_the_full_schema():
    raw = pl.DataFrame({c: [] for c in COLUMNS})  # all-Null columns, as an empty query result may give
    frame = normalize_bronze(raw)
    assert frame.height == 0
    assert schema_of(frame) == BRONZE_SCHEMA


def test_normalize_bronze_accepts_datetime_usage_modified(bronze):
    assert bronze.schema["usage_modified"] == pl.Datetime("us")
    assert bronze.filter(pl.col("usage_id") == 6)["usage_modified"].to_list() == [datetime(2026, 3, 1)]


# --- silver: billing_usage_aggregated -------------------------------------------------------------


def test_billing_usage_aggregated_by_hand(aggregated):
    assert schema_of(aggregated) == AGGREGATED_SCHEMA
    rows = aggregated.rows(named=True)
    keyed = {(r["dealer_id"], r["customer_id"], r["service_id"], r["usage_date"]): r for r in rows}
    assert list(keyed) == [
        (1, 100, 10, date(2026, 1, 5)),
        (1, 100, 10, date(2026, 2, 10)),
        (1, 100, 11, date(2026, 2, 1)),
        (1, 101, 10, date(2026, 1, 20)),
        (2, 200, 11, date(2026, 2, 15)),
        (2, 200, 11, date(2026, 2, 28)),
        (2, 201, 10, date(2026, 1, 31)),
    ]
    two_rows = keyed[(1, 100, 10, date(2026, 1, 5))]  # usage 1 + 2
    assert two_rows["quantity"] == Decimal("3")
    assert two_rows["amount"] == Decimal("14.75")
    assert two_rows["usage_rows"] == 2
    assert two_rows["last_modified"] == datetime(2026, 1, 6, 9)
    assert two_rows["service_name"] == "Voice"
    assert two_rows["service_status_id"] == 3
    assert keyed[(1, 101, 10, date(2026, 1, 20))]["last_modified"] is None  # only NULL timestamps
    assert keyed[(1, 100, 11, date(2026, 2, 1))]["service_name"] is None
    assert keyed[(2, 201, 10, date(2026, 1, 31))]["amount"] == Decimal("0.0001")
    assert all(r["partner_uuid"] == P for r in rows)
    assert aggregated["usage_rows"].sum() == len(ROWS)
    assert aggregated["amount"].sum() == Decimal("33.0834")


def test_billing_usage_aggregated_is_the_same_whatever_the_order_of_its_rows(bronze, aggregated):
    for shuffled in (bronze.reverse(), bronze.sample(fraction=1.0, shuffle=True, seed=7)):
        assert billing_usage_aggregated(shuffled, P).equals(aggregated)


# --- silver: billing_monthly_usage_by_service -------------------------------------------------------


def test_monthly_usage_by_service_by_hand(aggregated):
    monthly = billing_monthly_usage_by_service(aggregated, P)
    assert schema_of(monthly) == MONTHLY_BY_SERVICE_SCHEMA
    assert monthly.drop("partner_uuid").rows() == [
        # month, service, name, quantity, amount, usage_rows, customers
        (date(2026, 1, 1), 10, "Voice", Decimal("5"), Decimal("17.7501"), 4, 3),  # usage 1,2,3,7; cust 100,101,201
        (date(2026, 2, 1), 10, "Voice", Decimal("1"), Decimal("5"), 1, 1),  # usage 8
        (date(2026, 2, 1), 11, "Data", Decimal("6"), Decimal("10.3333"), 3, 2),  # usage 4,5,6; cust 100,200
    ]
    assert monthly["partner_uuid"].to_list() == [P] * 3


def test_month_is_the_first_day_of_the_month():
    rows = [
        (1, 1, 100, 10, date(2026, 1, 31), d("1"), d("1"), None, 3, "S"),
        (2, 1, 100, 10, date(2026, 2, 1), d("1"), d("1"), None, 3, "S"),
        (3, 1, 100, 10, date(2024, 2, 29), d("1"), d("1"), None, 3, "S"),
        (4, 1, 100, 10, date(2025, 12, 31), d("1"), d("1"), None, 3, "S"),
    ]
    monthly = billing_monthly_usage_by_service(billing_usage_aggregated(normalize_bronze(raw_frame(rows)), P), P)
    assert monthly.schema["month"] == pl.Date
    assert monthly["month"].to_list() == [date(2024, 2, 1), date(2025, 12, 1), date(2026, 1, 1), date(2026, 2, 1)]


# --- gold: usage_report -----------------------------------------------------------------------------


def test_usage_report_by_hand(aggregated):
    report = usage_report(aggregated, P)
    assert schema_of(report) == USAGE_REPORT_SCHEMA
    assert report.drop("partner_uuid").rows() == [
        # month, dealer, quantity, amount, services, customers
        (date(2026, 1, 1), 1, Decimal("4.5"), Decimal("17.75"), 1, 2),  # usage 1,2,3
        (date(2026, 1, 1), 2, Decimal("0.5"), Decimal("0.0001"), 1, 1),  # usage 7
        (date(2026, 2, 1), 1, Decimal("4"), Decimal("12"), 2, 1),  # usage 4,8: services 10, 11
        (date(2026, 2, 1), 2, Decimal("3"), Decimal("3.3333"), 1, 1),  # usage 5,6
    ]
    assert report["partner_uuid"].to_list() == [P] * 4


# --- gold: active_services --------------------------------------------------------------------------


def test_active_services_covers_only_the_partners_latest_month(aggregated):
    active = active_services(aggregated, P)
    assert schema_of(active) == ACTIVE_SERVICES_SCHEMA
    assert active.drop("partner_uuid").rows() == [
        # dealer, customer, service, name, status, first, last, amount (February only)
        (1, 100, 10, "Voice", 3, date(2026, 2, 10), date(2026, 2, 10), Decimal("5")),  # not January's 14.75
        (1, 100, 11, None, 10, date(2026, 2, 1), date(2026, 2, 1), Decimal("7")),
        (2, 200, 11, "Data", 10, date(2026, 2, 15), date(2026, 2, 28), Decimal("3.3333")),
    ]
    # customer 101 and 201 used services only in January: not active
    assert set(active["customer_id"].to_list()) == {100, 200}


def test_active_services_latest_month_is_per_partner_not_per_dealer():
    rows = [
        (1, 1, 100, 10, date(2026, 3, 3), d("1"), d("2"), None, 3, "S"),
        (2, 2, 200, 10, date(2026, 2, 27), d("1"), d("8"), None, 3, "S"),  # dealer 2 is quiet in March
    ]
    active = active_services(billing_usage_aggregated(normalize_bronze(raw_frame(rows)), P), P)
    assert active["dealer_id"].to_list() == [1]
    assert active["amount"].to_list() == [Decimal("2")]


# --- empty input ------------------------------------------------------------------------------------


def test_empty_input_gives_empty_frames_with_the_full_schema():
    bronze = normalize_bronze(raw_frame([]))
    assert bronze.height == 0 and schema_of(bronze) == BRONZE_SCHEMA
    aggregated = billing_usage_aggregated(bronze, P)
    outputs = {
        "aggregated": (aggregated, AGGREGATED_SCHEMA),
        "monthly": (billing_monthly_usage_by_service(aggregated, P), MONTHLY_BY_SERVICE_SCHEMA),
        "report": (usage_report(aggregated, P), USAGE_REPORT_SCHEMA),
        "active": (active_services(aggregated, P), ACTIVE_SERVICES_SCHEMA),
    }
    for name, (frame, schema) in outputs.items():
        assert frame.height == 0, name
        assert schema_of(frame) == schema, name
        assert frame.columns == list(schema), name


def test_contract_columns_are_present():
    contract = {
        "bronze": (BRONZE_SCHEMA, "usage_id, dealer_id, customer_id, service_id, usage_date, quantity, amount, "
                                  "usage_modified, service_status_id, service_name"),
        "aggregated": (AGGREGATED_SCHEMA, "partner_uuid, dealer_id, customer_id, service_id, usage_date, quantity, "
                                          "amount, usage_rows, last_modified"),
        "monthly": (MONTHLY_BY_SERVICE_SCHEMA, "partner_uuid, month, service_id, service_name, quantity, amount, "
                                               "usage_rows, customers"),
        "report": (USAGE_REPORT_SCHEMA, "partner_uuid, month, dealer_id, quantity, amount, services, customers"),
        "active": (ACTIVE_SERVICES_SCHEMA, "partner_uuid, dealer_id, customer_id, service_id, service_name, "
                                           "service_status_id, first_usage_date, last_usage_date, amount"),
    }
    for name, (schema, columns) in contract.items():
        missing = [c for c in columns.split(", ") if c not in schema]
        assert missing == [], name
    for schema in (MONTHLY_BY_SERVICE_SCHEMA, USAGE_REPORT_SCHEMA):
        assert schema["month"] == pl.Date
