"""Checks gating a partner's publish, without Prefect: each check broken on purpose leaves the published
files byte-identical; staged silver and gold publish together; provenance in every file."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest

from usage_pipeline import checks, materialize
from usage_pipeline.check_results import CHECK_NAMES, ChecksFailed, SourceMoved, summary
from usage_pipeline.lake import (
    GOLD_TABLES,
    SILVER_TABLES,
    STAGING_DIR,
    partition_path,
    provenance,
    staged_path,
)
from usage_pipeline.materialize import SourceFingerprints, build_gold, build_silver, refresh_bronze
from usage_pipeline.transforms import MONEY, dealer_stats, normalize_bronze

P = "aaaaaaaa-0000-4000-8000-000000000001"
FILES = [("silver", t) for t in SILVER_TABLES] + [("gold", t) for t in GOLD_TABLES]


def bronze_rows(amount: str = "7") -> pl.DataFrame:
    return normalize_bronze(pl.DataFrame({
        "usage_id": [1, 2, 3, 4], "dealer_id": [1, 1, 2, 2], "customer_id": [10, 11, 10, 10],
        "service_id": [5, 5, 6, 6],
        "usage_date": [date(2026, 9, 30), date(2026, 10, 1), date(2026, 10, 1), date(2026, 10, 2)],
        "quantity": [Decimal("1.5"), Decimal("2"), Decimal("3"), Decimal("0.0001")],
        "amount": [Decimal("10"), Decimal("-2.25"), Decimal(amount), Decimal("1")],
        "usage_modified": [datetime(2026, 10, 1, 9), datetime(2026, 10, 2, 9), None, datetime(2026, 10, 3)],
        "service_status_id": [3, 3, 10, 10], "service_name": ["a", "a", None, None],
    }))


@pytest.fixture
def published(tmp_path: Path) -> tuple[Path, dict[tuple[str, str], bytes]]:
    """A lake with partner P's four files published once; returns the root and the files' bytes."""
    root = tmp_path / "lake"
    refresh_bronze(root, lambda _: bronze_rows(), None)
    build_gold(root, P, build_silver(root, P, [1, 2], publish=False).publish_id)
    return root, snapshot(root)


def snapshot(root: Path) -> dict[tuple[str, str], bytes]:
    return {(layer, table): partition_path(root, layer, table, P).read_bytes() for layer, table in FILES}


def staging_left(root: Path) -> list[Path]:
    return [p for p in (root / STAGING_DIR).rglob("*") if p.is_file()] if (root / STAGING_DIR).exists() else []


def test_a_good_build_passes_every_check_and_records_its_provenance_in_all_four_files(published):
    root, _ = published
    silver = build_silver(root, P, [1, 2], publish=False)
    assert [c.name for c in silver.checks] == ["conservation.aggregated", "conservation.monthly",
                                               "grain.billing_usage_aggregated", "schema.billing_usage_aggregated",
                                               "grain.billing_monthly_usage_by_service",
                                               "schema.billing_monthly_usage_by_service"]
    assert all(c.passed and c.blocking for c in silver.checks)
    assert silver.checks[0].expected == silver.checks[0].actual == "rows=4 quantity=6.5001 amount=15.7500"
    before = snapshot(root)
    assert not silver.published and snapshot(root) == before  # staged only
    gold = build_gold(root, P, silver.publish_id)
    assert gold.published_tables == (*SILVER_TABLES, *GOLD_TABLES) and all(c.passed for c in gold.checks)
    assert summary(gold.checks) == "6/6 passed"
    assert staging_left(root) == []
    for layer, table in FILES:
        origin = provenance(partition_path(root, layer, table, P))
        assert origin["publish_id"] == silver.publish_id and origin["bronze_version"] == "0"
        assert origin["source_watermark"] == "2026-10-03T00:00:00"
        assert all(c["passed"] for c in json.loads(origin["checks"]))


def dropping_a_row(transform):
    return lambda *args: transform(*args).slice(1)


def with_a_duplicate_key(transform):
    return lambda *args: (lambda frame: pl.concat([frame, frame.head(1)]))(transform(*args))


def with_amount_as_float(transform):
    return lambda *args: transform(*args).with_columns(pl.col("amount").cast(pl.Float64))


BREAKS = [
    ("billing_usage_aggregated", dropping_a_row, "conservation.aggregated"),
    ("billing_monthly_usage_by_service", dropping_a_row, "conservation.monthly"),
    ("usage_report", with_a_duplicate_key, "grain.usage_report"),
    ("active_services", with_amount_as_float, "schema.active_services"),
]


@pytest.mark.parametrize(("transform", "breaking", "check"), BREAKS, ids=[b[2] for b in BREAKS])
def test_a_broken_check_publishes_nothing_of_the_partner_and_names_the_check(published, monkeypatch, transform,
                                                                             breaking, check):
    root, before = published
    monkeypatch.setattr(materialize, transform, breaking(getattr(materialize, transform)))
    with pytest.raises(ChecksFailed) as failed:
        build_gold(root, P, build_silver(root, P, [1, 2], publish=False).publish_id)
    assert check in str(failed.value) and "expected" in str(failed.value)
    assert check in [r.name for r in failed.value.results if not r.passed]
    assert snapshot(root) == before and staging_left(root) == []


def test_a_check_downgraded_to_a_warning_publishes_and_says_it_failed(published, monkeypatch):
    root, before = published
    monkeypatch.setattr(materialize, "usage_report", with_a_duplicate_key(materialize.usage_report))
    warn_only = frozenset({"grain.usage_report", "conservation.usage_report"})
    gold = build_gold(root, P, build_silver(root, P, [1, 2], publish=False).publish_id, warn_only=warn_only)
    failed = {c.name: c for c in gold.checks if not c.passed}
    assert set(failed) == warn_only and not any(c.blocking for c in failed.values())
    assert "failed (warning only)" in failed["grain.usage_report"].describe()
    assert snapshot(root) != before


def test_a_silver_that_cascades_not_publishes_its_own_two_files_after_its_checks(published, monkeypatch):
    root, before = published
    refresh_bronze(root, lambda _: bronze_rows("8"), [2])
    silver = build_silver(root, P, [1, 2])
    assert silver.published and silver.bronze_version == 1 and staging_left(root) == []
    after = snapshot(root)
    assert all(after[f] != before[f] for f in FILES[:2]) and all(after[f] == before[f] for f in FILES[2:])
    monkeypatch.setattr(materialize, "billing_usage_aggregated", dropping_a_row(materialize.billing_usage_aggregated))
    with pytest.raises(ChecksFailed, match="conservation.aggregated"):
        build_silver(root, P, [1, 2])
    assert snapshot(root) == after


def source(expected: pl.DataFrame, again: pl.DataFrame | None = None) -> tuple[SourceFingerprints, list]:
    """What a tick's source query said of dealers 1 and 2, asking again saying `again`; and the asks."""
    asked = []

    def read_again(dealers):
        asked.append(dealers)
        return dealer_stats((expected if again is None else again).lazy())

    return SourceFingerprints(dealer_stats(expected.lazy()), [1, 2], read_again), asked


def test_bronze_rows_matching_the_source_pass_the_reconciliation_without_asking_again(published):
    root, _ = published
    fingerprints, asked = source(bronze_rows())
    silver = build_silver(root, P, [1, 2], publish=False, source=fingerprints)
    assert silver.checks[0].name == "reconciliation.source" and silver.checks[0].passed
    assert asked == []


def test_a_bronze_slice_whose_sums_differ_from_the_source_fails_the_reconciliation(published):
    root, before = published
    with pytest.raises(ChecksFailed, match="reconciliation.source") as failed:
        build_silver(root, P, [1, 2], publish=False, source=source(bronze_rows("7.0001"))[0])
    (check,) = [r for r in failed.value.results if not r.passed]
    assert check.expected.startswith("2=2:7:3.0001:8.0001:") and check.actual.startswith("2=2:7:3.0001:8.0000:")
    assert snapshot(root) == before and staging_left(root) == []


def test_a_source_that_moved_during_the_tick_defers_the_partition(published):
    root, before = published
    fingerprints, asked = source(bronze_rows("7.0001"), again=bronze_rows("7.0002"))
    with pytest.raises(SourceMoved, match=r"source moved: dealer\(s\) \[2\]"):
        build_silver(root, P, [1, 2], publish=False, source=fingerprints)
    assert asked == [[2]] and snapshot(root) == before


def test_a_dealer_the_source_says_has_no_rows_must_have_none_in_bronze():
    rows = bronze_rows()
    stats = dealer_stats(rows.lazy())
    result = checks.reconciliation_check({1: stats[1]}, stats, [1, 2])
    assert not result.passed and result.expected == "2=no rows" and result.actual.startswith("2=2:")
    assert checks.reconciliation_check({1: stats[1]}, {1: stats[1]}, [1, 2]).passed
    assert checks.mismatched({}, {}, [3]) == []


def money_frame(quantity: list, amount: list) -> pl.DataFrame:
    return pl.DataFrame({"quantity": quantity, "amount": amount}, schema={"quantity": MONEY, "amount": MONEY})


def test_the_start_over_totals_check_compares_exact_units_and_every_part():
    read = checks.ExtractRead()
    read.every.add(money_frame([Decimal("6.5001"), None, Decimal(1)], [Decimal("15.75"), Decimal(0), Decimal(2)]))
    read.every.add(money_frame([None], [None]))
    read.kept.add(money_frame([Decimal("6.5001"), None], [Decimal("15.75"), Decimal(0)]))
    assert read == checks.ExtractRead.from_json(read.to_json())
    assert read.every == checks.UsageTotals(4, Decimal("7.5001"), Decimal("17.7500"))
    source = checks.SourceTotals(checks.UsageTotals(4, Decimal("7.5001"), Decimal("17.75")), 2, 12)
    table = checks.UsageTotals(2, Decimal("6.5001"), Decimal("15.75"))
    assert checks.totals_check(source, checks.ExtractTotals(read, table, 12)).passed

    wrong_write = checks.ExtractTotals(read, checks.UsageTotals(2, Decimal("6.5001"), Decimal("15.7501")), 12)
    failed = checks.totals_check(source, wrong_write)
    assert not failed.passed and failed.describe() == (
        "reconciliation.totals FAILED: expected usage rows=4 quantity=7.5001 amount=17.7500; relevant rows=2"
        " usage_id_sum=12; relevant quantity=6.5001 amount=15.7500, got usage rows=4 quantity=7.5001"
        " amount=17.7500; relevant rows=2 usage_id_sum=12; relevant quantity=6.5001 amount=15.7501 (differs: relevant money)")
    assert not checks.totals_check(source, checks.ExtractTotals(read, table, 13)).passed  # another row, same count
    other_read = checks.ExtractRead(checks.UsageTotals(4, Decimal("7.5002"), Decimal("17.75")), read.kept)
    assert not checks.totals_check(source, checks.ExtractTotals(other_read, table, 12)).passed

    # Asked again after the extract: only a part the source's answer moved on may differ unexplained.
    busy = replace(source, usage=checks.UsageTotals(5, Decimal("8.5001"), Decimal("18.75")))
    extract = checks.ExtractTotals(read, table, 12)
    assert not checks.unexplained_by_the_source(source, busy, extract)  # the usage scan moved: inconclusive
    row_lost = checks.ExtractTotals(read, table, 11)
    assert checks.unexplained_by_the_source(source, busy, row_lost)  # the relevant rows did not move
    assert checks.unexplained_by_the_source(source, busy, wrong_write)  # nothing on the source explains a write
    moved_rows = replace(busy, relevant_rows=3, relevant_id_sum=20)
    assert not checks.unexplained_by_the_source(source, moved_rows, row_lost)


def test_gold_without_staged_silver_builds_from_the_published_one_and_publishes_gold_alone(published, monkeypatch):
    root, before = published
    gold = build_gold(root, P)
    assert gold.published_tables == GOLD_TABLES
    silver_origin = provenance(partition_path(root, "silver", SILVER_TABLES[0], P))
    gold_origin = provenance(partition_path(root, "gold", GOLD_TABLES[0], P))
    assert gold_origin["publish_id"] == gold.publish_id != silver_origin["publish_id"]
    assert gold_origin["bronze_version"] == silver_origin["bronze_version"]
    assert snapshot(root)[FILES[0]] == before[FILES[0]]


def test_a_staged_silver_that_is_gone_fails_gold_and_a_foreign_id_never_reaches_a_path(published):
    root, before = published
    with pytest.raises(FileNotFoundError, match="run partner-silver"):
        build_gold(root, P, "0b3f6a52-3c0e-4c39-9a52-8e1f1d3c2a10")
    with pytest.raises(ValueError, match="not a run id"):
        build_gold(root, P, "../../silver")
    with pytest.raises(ValueError, match="not a run id"):
        staged_path(root, "x/..", "silver", SILVER_TABLES[0], P)
    assert snapshot(root) == before


def test_every_check_has_a_unique_documented_name():
    assert len(set(CHECK_NAMES)) == len(CHECK_NAMES) == 14
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert [name for name in CHECK_NAMES if f"`{name}`" not in readme] == []


@pytest.mark.parametrize(("keys", "duplicates"), [
    ({"a": [1, 1, 2, 2], "b": [1, 2, 1, 2]}, 0),  # sorted by the key: neighbours tell
    ({"a": [1, 1, 2, 2], "b": [1, 1, 1, 2]}, 1),
    ({"a": [2, 1, 2, 1], "b": [1, 1, 1, 1]}, 2),  # another order: counted by hashing
    ({"a": [1, 2, 1, 3], "b": [5, 5, 5, 5]}, 1),
    ({"a": [1, None, None, 2], "b": [1, 1, 1, 1]}, 1),  # null keys: hashed too
    ({"a": [7], "b": [7]}, 0),
])
def test_duplicate_keys_whatever_the_frames_order(keys, duplicates):
    assert checks.duplicate_keys(pl.DataFrame(keys), ("a", "b")) == duplicates


def test_bronze_matching_the_source_as_it_is_after_the_extract_passes(published):
    """The extract caught a change made after the tick's source query: right data, published; the
    cursor keeps the earlier fingerprint, so the next tick sees the change and redoes it."""
    root, before = published
    fingerprints, asked = source(bronze_rows("6"), again=bronze_rows())
    silver = build_silver(root, P, [1, 2], publish=False, source=fingerprints)
    assert asked == [[2]] and silver.checks[0].passed and "as the source after the extract" in silver.checks[0].actual


def test_a_moving_source_publishes_with_a_warning_when_the_reconciliation_is_warn_only(published):
    root, before = published
    fingerprints, _ = source(bronze_rows("7.0001"), again=bronze_rows("7.0002"))
    silver = build_silver(root, P, [1, 2], publish=False, source=fingerprints,
                          warn_only=frozenset({"reconciliation.source"}))
    assert not silver.checks[0].passed and not silver.checks[0].blocking


def test_columns_out_of_the_documented_order_fail_the_schema_check():
    frame = pl.DataFrame(schema=dict(reversed(checks.SCHEMAS["usage_report"].items())))
    result = checks.schema_check("usage_report", frame)
    assert not result.passed and result.actual.startswith("columns in the order customers, services")


def test_a_checks_failure_survives_pickling_with_its_results():
    import pickle

    failed = ChecksFailed(P, (checks.compare("grain.usage_report", "0", "1"),))
    copy = pickle.loads(pickle.dumps(failed))
    assert (copy.partner, copy.results, str(copy)) == (failed.partner, failed.results, str(failed))
