"""Unit tests for flows/cursor.py: parsing tolerance (CONTRACT.md section 4), format, round trip."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest

from tests.cursors import combined
from usage_pipeline.cursor import (
    Cursor,
    DealerSeen,
    PartitionStatus,
    format_timestamp,
    parse_cursor,
    parse_timestamp,
)

PARTNER_A = "aaaaaaaa-0000-4000-8000-000000000001"
PARTNER_B = "bbbbbbbb-0000-4000-8000-000000000002"
TS = "2026-01-20T12:00:00.000000Z"
T = datetime(2026, 1, 20, 12, 0, 0)
CONTRACT_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


def seen_entry(partner: str | None = PARTNER_A, relevant: bool = True, ts: str | None = TS) -> dict:
    return {"raw_max": ts, "relevant": relevant, "last_modified": ts if relevant else None, "partner": partner}


def full_cursor() -> Cursor:
    """A cursor using every field, with awkward values (None timestamps, microseconds)."""
    return Cursor(
        global_last_modified=datetime(2026, 1, 20, 12, 0, 0, 123456),
        dealer_last_modified={1: datetime(2026, 1, 20, 12, 0, 0, 123456), 3: None, 12: datetime(2025, 12, 31, 23, 59, 59)},
        dealer_seen={
            1: DealerSeen(datetime(2026, 1, 20, 12, 0, 0, 123456), True, datetime(2026, 1, 20, 12, 0, 0, 123456), PARTNER_A),
            3: DealerSeen(None, True, None, PARTNER_B),
            7: DealerSeen(datetime(2026, 1, 1), False, None, None),
            12: DealerSeen(datetime(2026, 1, 2), True, datetime(2025, 12, 31, 23, 59, 59), PARTNER_A),
        },
        partitions={
            PARTNER_A: PartitionStatus(datetime(2026, 1, 20, 12, 5), datetime(2026, 1, 20, 12), 0, None,
                                       checks="13/13 passed"),
            PARTNER_B: PartitionStatus(None, None, 2, "partner-silver Failed: boom", datetime(2026, 1, 20, 11, 55)),
        },
        suspects_checked_through=41,
        fingerprints={1: "3:6:6.0000:30.0000", 3: "1:9:1.0000:2.5000", 12: "0:0:0:0"},
    )


# --- timestamps -----------------------------------------------------------------------------


def test_format_timestamp_is_contract_format_with_microseconds_and_z():
    assert format_timestamp(T) == "2026-01-20T12:00:00.000000Z"
    assert format_timestamp(datetime(2026, 1, 2, 3, 4, 5, 6)) == "2026-01-02T03:04:05.000006Z"
    assert format_timestamp(None) is None


def test_to_json_writes_every_timestamp_in_contract_format():
    value = combined(full_cursor())
    stamps = [value["global_last_modified"]]
    stamps += [v for v in value["dealer_last_modified"].values() if v is not None]
    for seen in value["dealer_seen"].values():
        stamps += [v for v in (seen["raw_max"], seen["last_modified"]) if v is not None]
    for status in value["partitions"].values():
        stamps += [v for v in (status["materialized_at"], status["source_watermark"], status["pending_since"])
                   if v is not None]
    assert len(stamps) == 11
    for stamp in stamps:
        assert CONTRACT_TIMESTAMP.match(stamp), stamp
    assert value["global_last_modified"] == "2026-01-20T12:00:00.123456Z"
    assert value["dealer_last_modified"] == {
        "1": "2026-01-20T12:00:00.123456Z",
        "3": None,
        "12": "2025-12-31T23:59:59.000000Z",
    }


def test_parse_timestamp_accepts_z_and_returns_naive_utc():
    parsed = parse_timestamp(TS)
    assert parsed == T
    assert parsed.tzinfo is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2026-01-20T14:00:00+02:00", datetime(2026, 1, 20, 12, 0)),
        ("2026-01-20T22:30:00.000001-05:00", datetime(2026, 1, 21, 3, 30, 0, 1)),  # crosses midnight
        ("2026-01-20T12:00:00+00:00", datetime(2026, 1, 20, 12, 0)),
        ("2026-01-20T12:00:00", datetime(2026, 1, 20, 12, 0)),  # naive: taken as UTC
    ],
)
def test_parse_timestamp_converts_offsets_to_utc(text, expected):
    parsed = parse_timestamp(text)
    assert parsed == expected
    assert parsed.tzinfo is None


def test_offsets_in_cursor_entries_are_converted_to_utc():
    cursor, warnings = parse_cursor(
        {
            "global_last_modified": "2026-01-20T14:00:00+02:00",
            "dealer_last_modified": {"1": "2026-01-20T07:00:00-05:00"},
        }
    )
    assert warnings == []
    assert cursor.global_last_modified == T
    assert cursor.dealer_last_modified == {1: T}
    assert combined(cursor)["global_last_modified"] == TS


@pytest.mark.parametrize("bad", ["yesterday", "", "2026-13-01T00:00:00Z", "2026-01-20T25:00:00Z", 1737374400, 1.5, True, [TS], {"t": TS}])
def test_parse_timestamp_rejects_unparsable_values(bad):
    with pytest.raises(ValueError):
        parse_timestamp(bad)


def test_parse_timestamp_none_is_none():
    assert parse_timestamp(None) is None


# --- whole value: absent, empty, not an object ---------------------------------------------------


def test_missing_block_is_an_empty_first_run_cursor_without_warnings():
    cursor, warnings = parse_cursor(None)
    assert cursor == Cursor()
    assert warnings == []
    assert cursor.is_first_run


@pytest.mark.parametrize("raw", [{}, "{}", " {} "])
def test_empty_object_is_a_first_run_without_warnings(raw):
    cursor, warnings = parse_cursor(raw)
    assert cursor == Cursor()
    assert warnings == []
    assert cursor.is_first_run
    assert cursor.dealer_seen is None


@pytest.mark.parametrize(
    "raw, type_name",
    [
        ([1, 2], "list"),
        ("[1, 2]", "list"),
        ('"hello"', "str"),
        (42, "int"),
        ("42", "int"),
        (3.5, "float"),
        (True, "bool"),
        ("null", "NoneType"),
    ],
)
def test_non_object_value_warns_naming_its_type_and_starts_empty(raw, type_name):
    cursor, warnings = parse_cursor(raw)
    assert cursor == Cursor()
    assert cursor.is_first_run
    assert len(warnings) == 1
    assert "must be a JSON object" in warnings[0]
    assert type_name in warnings[0]


@pytest.mark.parametrize("raw", ['{"global_last_modified": ', "not json at all", "", "{'single': 'quotes'}"])
def test_invalid_json_string_warns_and_starts_empty(raw):
    cursor, warnings = parse_cursor(raw)
    assert cursor == Cursor()
    assert cursor.is_first_run
    assert len(warnings) == 1
    assert "not valid JSON" in warnings[0]


def test_json_string_value_is_parsed_like_the_object():
    value = {"global_last_modified": TS, "dealer_last_modified": {"1": TS, "3": None}}
    from_text, warnings_text = parse_cursor(json.dumps(value))
    from_object, warnings_object = parse_cursor(value)
    assert warnings_text == warnings_object == []
    assert from_text == from_object
    assert from_text.dealer_last_modified == {1: T, 3: None}


def test_contract_example_parses_without_warnings():
    cursor, warnings = parse_cursor(
        {"global_last_modified": TS, "dealer_last_modified": {"1": TS, "3": None}}
    )
    assert warnings == []
    assert cursor.global_last_modified == T
    assert cursor.dealer_last_modified == {1: T, 3: None}
    assert cursor.dealer_seen is None  # pipeline keys absent: tolerated
    assert cursor.partitions == {}
    assert cursor.fingerprints == {}
    assert not cursor.is_first_run


def test_unknown_keys_are_ignored_silently():
    cursor, warnings = parse_cursor({"global_last_modified": TS, "dealer_last_modified": {"1": TS}, "note": [1, 2]})
    assert warnings == []
    assert cursor.dealer_last_modified == {1: T}


# --- unreadable parts: warning naming the problem, part absent, the rest kept ---------------------


def test_unparsable_global_timestamp_warns_and_keeps_dealers():
    cursor, warnings = parse_cursor({"global_last_modified": "yesterday", "dealer_last_modified": {"1": TS}})
    assert len(warnings) == 1
    assert "global_last_modified" in warnings[0]
    assert "'yesterday'" in warnings[0]
    assert cursor.global_last_modified is None
    assert cursor.dealer_last_modified == {1: T}
    assert not cursor.is_first_run


def test_unparsable_global_timestamp_with_no_dealers_is_first_run():
    cursor, warnings = parse_cursor({"global_last_modified": 12345, "dealer_last_modified": {}})
    assert len(warnings) == 1
    assert "global_last_modified" in warnings[0]
    assert cursor.is_first_run


def test_unparsable_dealer_timestamps_drop_only_those_dealers():
    cursor, warnings = parse_cursor(
        {
            "global_last_modified": TS,
            "dealer_last_modified": {"1": "garbage", "2": TS, "3": None, "4": 17, "5": {"x": 1}},
        }
    )
    assert cursor.dealer_last_modified == {2: T, 3: None}
    assert len(warnings) == 3
    for key, value in (("'1'", "'garbage'"), ("'4'", "17"), ("'5'", "{'x': 1}")):
        assert any("dealer_last_modified" in w and key in w and value in w for w in warnings), (key, warnings)
    assert all("treated as absent" in w for w in warnings)


@pytest.mark.parametrize("bad", [[["1", TS]], "1", 5, True])
def test_dealer_last_modified_not_an_object_warns_and_is_absent(bad):
    cursor, warnings = parse_cursor({"global_last_modified": TS, "dealer_last_modified": bad})
    assert cursor.dealer_last_modified == {}
    assert cursor.global_last_modified == T
    assert len(warnings) == 1
    assert "dealer_last_modified must be an object" in warnings[0]
    assert type(bad).__name__ in warnings[0]


def test_null_dealer_last_modified_is_absent_without_warning():
    cursor, warnings = parse_cursor({"global_last_modified": None, "dealer_last_modified": None})
    assert warnings == []
    assert cursor.is_first_run


@pytest.mark.parametrize("key", ["abc", "1.5", "", "dealer-1", "0x1f"])
def test_non_integer_dealer_keys_warn_and_drop_only_that_entry(key):
    cursor, warnings = parse_cursor({"dealer_last_modified": {key: TS, "2": TS}})
    assert cursor.dealer_last_modified == {2: T}
    assert len(warnings) == 1
    assert "is not an integer" in warnings[0]
    assert repr(key) in warnings[0]


def test_non_integer_dealer_keys_in_pipeline_maps_are_dropped_with_warnings():
    cursor, warnings = parse_cursor(
        {
            "dealer_last_modified": {"1": TS},
            "dealer_seen": {"x": seen_entry(), "1": seen_entry()},
            "fingerprints": {"y": "1:1:1:1", "1": "fp"},
        }
    )
    assert cursor.dealer_seen == {1: DealerSeen(T, True, T, PARTNER_A)}
    assert cursor.fingerprints == {1: "fp"}
    assert any("dealer_seen" in w and "'x'" in w for w in warnings)
    assert any("fingerprints" in w and "'y'" in w for w in warnings)


@pytest.mark.parametrize(
    "entry, hint",
    [
        ("not an object", "TypeError"),
        (["raw_max", TS], "TypeError"),
        (None, "TypeError"),
        ({"relevant": True, "last_modified": TS, "partner": PARTNER_A}, "raw_max"),  # key missing
        ({**seen_entry(), "relevant": "yes"}, "relevant"),
        ({**seen_entry(), "relevant": 1}, "relevant"),
        ({**seen_entry(), "raw_max": "soon"}, "soon"),
        ({**seen_entry(), "last_modified": 99}, "int"),
        ({**seen_entry(), "partner": "not-a-uuid"}, "not-a-uuid"),
        ({**seen_entry(), "partner": "../../etc"}, "../../etc"),
        ({**seen_entry(), "partner": PARTNER_A.replace("-", "")}, PARTNER_A.replace("-", "")),
        ({**seen_entry(), "partner": "{" + PARTNER_A + "}"}, PARTNER_A),
        ({**seen_entry(), "partner": PARTNER_A + "\n"}, PARTNER_A),
        ({**seen_entry(), "partner": " " + PARTNER_A}, PARTNER_A),
        ({**seen_entry(), "partner": ""}, "''"),
        ({**seen_entry(), "partner": 5}, "5"),
    ],
)
def test_bad_dealer_seen_entry_warns_and_keeps_the_others(entry, hint):
    cursor, warnings = parse_cursor({"dealer_last_modified": {"1": TS, "2": TS}, "dealer_seen": {"1": entry, "2": seen_entry()}})
    assert cursor.dealer_seen == {2: DealerSeen(T, True, T, PARTNER_A)}
    assert len(warnings) == 1, warnings
    assert "dealer_seen['1']" in warnings[0]
    assert hint in warnings[0]
    assert "treated as absent" in warnings[0]
    # the contract keys are untouched by a bad pipeline key
    assert cursor.dealer_last_modified == {1: T, 2: T}


def test_dealer_seen_partner_upper_case_is_accepted_and_lower_cased():
    cursor, warnings = parse_cursor({"dealer_seen": {"1": seen_entry(partner=PARTNER_A.upper())}})
    assert warnings == []
    assert cursor.dealer_seen[1].partner == PARTNER_A


def test_dealer_seen_unmapped_partner_null_is_valid():
    cursor, warnings = parse_cursor({"dealer_seen": {"1": seen_entry(partner=None, relevant=False)}})
    assert warnings == []
    assert cursor.dealer_seen == {1: DealerSeen(T, False, None, None)}


@pytest.mark.parametrize("bad", ["x", [1], 3])
def test_dealer_seen_not_an_object_warns_and_is_absent(bad):
    cursor, warnings = parse_cursor({"dealer_last_modified": {"1": TS}, "dealer_seen": bad})
    assert cursor.dealer_seen is None  # absent: detection will check every dealer
    assert len(warnings) == 1
    assert "dealer_seen must be an object" in warnings[0]


def test_dealer_seen_with_only_bad_entries_is_present_but_empty():
    cursor, warnings = parse_cursor({"dealer_seen": {"1": "junk"}})
    assert cursor.dealer_seen == {}
    assert len(warnings) == 1


@pytest.mark.parametrize(
    "key, entry, hint",
    [
        ("not-a-uuid", {"failures": 0}, "not-a-uuid"),
        ("../../etc", {"failures": 1}, "../../etc"),
        ("x' OR '1'='1", {"failures": 1}, "x' OR '1'='1"),
        (PARTNER_B.replace("-", ""), {"failures": 1}, PARTNER_B.replace("-", "")),
        (PARTNER_B, "junk", PARTNER_B),
        (PARTNER_B, [1, 2], PARTNER_B),
        (PARTNER_B, {"failures": -1}, "-1"),
        (PARTNER_B, {"failures": "2"}, "'2'"),
        (PARTNER_B, {"failures": 1.5}, "1.5"),
        (PARTNER_B, {"materialized_at": "never"}, "never"),
        (PARTNER_B, {"source_watermark": 5}, PARTNER_B),
    ],
)
def test_bad_partition_entry_warns_and_keeps_the_others(key, entry, hint):
    good = {"materialized_at": TS, "source_watermark": TS, "failures": 0, "last_error": None}
    cursor, warnings = parse_cursor({"partitions": {key: entry, PARTNER_A: good}})
    assert cursor.partitions == {PARTNER_A: PartitionStatus(T, T, 0, None)}
    assert len(warnings) == 1, warnings
    assert "partitions[" in warnings[0]
    assert hint in warnings[0]
    assert "treated as absent" in warnings[0]


def test_partition_keys_are_lower_cased_and_missing_fields_default():
    cursor, warnings = parse_cursor({"partitions": {PARTNER_A.upper(): {"failures": 3, "last_error": "boom"}}})
    assert warnings == []
    assert cursor.partitions == {PARTNER_A: PartitionStatus(None, None, 3, "boom")}
    assert cursor.retry_partitions == {PARTNER_A}


def test_a_partition_written_before_pending_since_existed_is_not_pending():
    """State documents of older versions have no `pending_since`: the next tick that plans the partition
    finds it newly pending (and announces it)."""
    cursor, warnings = parse_cursor({}, {"partitions": {PARTNER_A: {"materialized_at": TS, "source_watermark": TS,
                                                                    "failures": 2, "last_error": "boom"}}})
    assert warnings == []
    assert cursor.partitions[PARTNER_A].pending_since is None
    assert cursor.partitions[PARTNER_A].lag_seconds(T + timedelta(hours=1)) == 0


def test_pending_since_round_trips_and_an_unparsable_one_drops_the_entry_with_a_warning():
    pending = PartitionStatus(T, T, 1, "boom", pending_since=T + timedelta(minutes=5))
    state = Cursor(partitions={PARTNER_A: pending}).state_document()
    assert state["partitions"][PARTNER_A]["pending_since"] == "2026-01-20T12:05:00.000000Z"
    assert parse_cursor({}, json.loads(json.dumps(state)))[0].partitions == {PARTNER_A: pending}
    cursor, warnings = parse_cursor({}, {"partitions": {PARTNER_A: {"failures": 1, "pending_since": "soon"}}})
    assert cursor.partitions == {} and len(warnings) == 1 and "soon" in warnings[0]


def test_lag_counts_from_pending_since_and_is_zero_when_published():
    assert PartitionStatus(materialized_at=T).lag_seconds(T + timedelta(days=3)) == 0
    pending = PartitionStatus(T, T, 2, "boom", pending_since=T)
    assert pending.lag_seconds(T + timedelta(minutes=31, microseconds=500000)) == 1860.5
    assert pending.lag_seconds(T - timedelta(seconds=5)) == 0  # another machine's clock behind: never negative


def test_the_episode_is_named_by_the_publish_it_follows():
    assert PartitionStatus().episode == PartitionStatus(failures=3, pending_since=T).episode == "never"
    published = PartitionStatus(materialized_at=datetime(2026, 1, 20, 12, 0, 0, 5))
    assert published.episode == "2026-01-20T12:00:00.000005Z"
    assert PartitionStatus(published.materialized_at, None, 4, "boom", T).episode == published.episode


def test_partitions_not_an_object_warns_and_is_absent():
    cursor, warnings = parse_cursor({"partitions": [PARTNER_A]})
    assert cursor.partitions == {}
    assert len(warnings) == 1
    assert "partitions must be an object" in warnings[0]


@pytest.mark.parametrize("bad", ["7", 1.5, True, [7], -1])
def test_an_unreadable_suspects_checked_through_warns_and_re_checks_every_suspect(bad):
    state = {**full_cursor().state_document(), "suspects_checked_through": bad}
    cursor, warnings = parse_cursor({"dealer_last_modified": {"1": TS}}, state)
    assert cursor.suspects_checked_through == 0
    assert cursor.dealer_last_modified == {1: T}
    assert len(warnings) == 1
    assert "suspects_checked_through" in warnings[0] and "re-checks every suspect" in warnings[0]


def test_bad_fingerprint_entry_warns_and_keeps_the_others():
    """CONTRACT section 4: an unparsable entry gives a WARNING naming the problem (here it was silently dropped)."""
    cursor, warnings = parse_cursor({"fingerprints": {"1": 5, "2": "2:3:4.0000:5.0000"}})
    assert cursor.fingerprints == {2: "2:3:4.0000:5.0000"}
    assert len(warnings) == 1, warnings
    assert "fingerprints" in warnings[0]
    assert "'1'" in warnings[0]


def test_every_problem_gets_its_own_warning_and_good_parts_survive():
    raw = {
        "global_last_modified": "bogus",
        "dealer_last_modified": {"1": TS, "2": "bad", "x": TS},
        "dealer_seen": {"1": seen_entry(), "2": {"raw_max": TS}},
        "partitions": {PARTNER_A: {"failures": 1}, "nope": {}},
        "suspects_checked_through": 3,
        "fingerprints": {"1": "fp1"},
    }
    cursor, warnings = parse_cursor(raw)
    assert len(warnings) == 5, warnings
    assert cursor.global_last_modified is None
    assert cursor.dealer_last_modified == {1: T}
    assert cursor.dealer_seen == {1: DealerSeen(T, True, T, PARTNER_A)}
    assert cursor.partitions == {PARTNER_A: PartitionStatus(failures=1)}
    assert cursor.suspects_checked_through == 3
    assert cursor.fingerprints == {1: "fp1"}


@pytest.mark.parametrize(
    "raw",
    [
        {"dealer_last_modified": {"1": [TS]}},
        {"dealer_seen": {"1": {"raw_max": [], "relevant": True, "last_modified": None, "partner": None}}},
        {"dealer_seen": {"1": {"raw_max": None, "relevant": None, "last_modified": None, "partner": {"a": 1}}}},
        {"partitions": {PARTNER_A: None}},
        {"partitions": {PARTNER_A: {"failures": None}}},
        {"partitions": {"1": 1}},
        {"fingerprints": [1]},
        {"global_last_modified": {"nested": [1, 2, {"x": None}]}},
        {1: 2},
        b"{}",
    ],
)
def test_parse_cursor_never_raises(raw):
    cursor, warnings = parse_cursor(raw)
    assert isinstance(cursor, Cursor)
    assert isinstance(warnings, list)
    assert all(isinstance(w, str) for w in warnings)


# --- round trip -----------------------------------------------------------------------------------


def test_round_trip_through_json_text_is_lossless():
    cursor = full_cursor()
    text = json.dumps(combined(cursor))  # must be plain JSON (no datetimes, no int keys)
    parsed, warnings = parse_cursor(json.loads(text))
    assert warnings == []
    assert parsed == cursor
    assert combined(parsed) == combined(cursor)


def test_round_trip_keeps_dealer_keys_as_strings_sorted_numerically():
    value = combined(full_cursor())
    assert list(value["dealer_last_modified"]) == ["1", "3", "12"]
    assert list(value["dealer_seen"]) == ["1", "3", "7", "12"]


def test_round_trip_of_an_empty_source_cursor_is_not_a_first_run():
    """Written by the pipeline for a source without relevant rows: dealer_seen present, nothing relevant."""
    cursor = Cursor(dealer_seen={7: DealerSeen(T, False, None, None)})
    assert not cursor.is_first_run
    parsed, warnings = parse_cursor(json.loads(json.dumps(combined(cursor))))
    assert warnings == []
    assert parsed == cursor
    assert not parsed.is_first_run


def test_round_trip_of_a_fresh_cursor_stays_a_first_run():
    """A cursor with no memory (dealer_seen None) must not become "written for an empty source"."""
    cursor = Cursor()
    assert cursor.is_first_run
    parsed, warnings = parse_cursor(json.loads(json.dumps(combined(cursor))))
    assert warnings == []
    assert parsed.is_first_run
    assert parsed == cursor


# --- is_first_run ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        None,
        {},
        {"global_last_modified": None, "dealer_last_modified": {}},
        {"global_last_modified": None, "dealer_last_modified": None},
        {"global_last_modified": "", "dealer_last_modified": {}},  # unparsable -> absent
        # operator reset of the two contract keys; the pipeline's dealer_seen still lists relevant dealers
        {"global_last_modified": None, "dealer_last_modified": {}, "dealer_seen": {"1": seen_entry()}},
        # the pipeline's keys without the contract keys
        {"partitions": {PARTNER_A: {"failures": 0}}, "fingerprints": {"1": "x"}, "reconciled_at": TS},
    ],
)
def test_first_run_when_both_contract_keys_are_empty(raw):
    cursor, _ = parse_cursor(raw)
    assert cursor.is_first_run


@pytest.mark.parametrize(
    "raw",
    [
        {"global_last_modified": TS, "dealer_last_modified": {}},
        {"global_last_modified": None, "dealer_last_modified": {"1": TS}},
        {"global_last_modified": None, "dealer_last_modified": {"3": None}},  # dealer with only NULL timestamps
        {"global_last_modified": TS, "dealer_last_modified": {"1": TS}},
    ],
)
def test_not_first_run_when_a_contract_key_is_set(raw):
    cursor, warnings = parse_cursor(raw)
    assert warnings == []
    assert not cursor.is_first_run


@pytest.mark.parametrize(
    "dealer_seen",
    [
        {},  # the source had no usage rows at all
        {"7": seen_entry(partner=None, relevant=False), "8": seen_entry(partner=PARTNER_A, relevant=False)},
    ],
)
def test_not_first_run_when_we_wrote_empty_keys_for_a_source_without_relevant_rows(dealer_seen):
    cursor, warnings = parse_cursor({"global_last_modified": None, "dealer_last_modified": {}, "dealer_seen": dealer_seen})
    assert warnings == []
    assert cursor.dealer_seen is not None
    assert not cursor.is_first_run


def test_first_run_when_dealer_seen_records_a_relevant_dealer():
    cursor = Cursor(
        dealer_seen={7: DealerSeen(T, False, None, None), 8: DealerSeen(T, True, T, PARTNER_A)},
    )
    assert cursor.is_first_run


def test_retry_partitions_are_those_with_failures():
    cursor = Cursor(
        partitions={
            PARTNER_A: PartitionStatus(failures=0),
            PARTNER_B: PartitionStatus(failures=2, last_error="x"),
        }
    )
    assert cursor.retry_partitions == {PARTNER_B}


def test_with_changes_returns_a_new_cursor():
    cursor = full_cursor()
    changed = cursor.with_changes(global_last_modified=T + timedelta(hours=1))
    assert changed.global_last_modified == T + timedelta(hours=1)
    assert cursor.global_last_modified == datetime(2026, 1, 20, 12, 0, 0, 123456)
    assert changed.dealer_last_modified == cursor.dealer_last_modified


def test_aware_utc_datetimes_from_parsing_compare_equal_to_naive_source_values():
    """The source gives naive UTC datetimes; parsed cursor values must compare equal, not raise."""
    parsed = parse_timestamp("2026-01-20T12:00:00.000000+00:00")
    assert parsed == datetime(2026, 1, 20, 12)
    assert parsed == datetime(2026, 1, 20, 12, tzinfo=UTC).replace(tzinfo=None)


# --- the block and the state store -----------------------------------------------------------------


def test_block_value_holds_exactly_the_two_operator_keys():
    assert list(full_cursor().block_value()) == ["global_last_modified", "dealer_last_modified"]
    assert set(full_cursor().state_document()) == {"dealer_seen", "partitions", "suspects_checked_through",
                                                   "fingerprints"}


def test_a_state_written_while_ticks_reconciled_loads_with_no_suspect_taken_yet():
    """Before usage-reconciliation ran on its own, the state held the cycle's position: dropped on load."""
    state = json.loads(json.dumps(full_cursor().state_document()))
    del state["suspects_checked_through"]
    state.update(reconciled_at=TS, reconcile_next_dealer=7)
    parsed, warnings = parse_cursor(full_cursor().block_value(), state)
    assert warnings == [] and parsed == full_cursor().with_changes(suspects_checked_through=0)
    assert "reconciled_at" not in parsed.state_document()


def test_block_and_state_round_trip_separately():
    cursor = full_cursor()
    block, state = json.loads(json.dumps(cursor.block_value())), json.loads(json.dumps(cursor.state_document()))
    parsed, warnings = parse_cursor(block, state)
    assert warnings == [] and parsed == cursor


def test_an_old_block_with_bookkeeping_keys_migrates_without_loss():
    parsed, warnings = parse_cursor(combined(full_cursor()), None)
    assert warnings == [] and parsed == full_cursor()
    assert set(parsed.block_value()) == {"global_last_modified", "dealer_last_modified"}


def test_the_store_wins_over_bookkeeping_keys_left_in_the_block():
    """A crash after the store was written but before the block lost its old keys."""
    stale_block = combined(Cursor(dealer_seen={}, fingerprints={1: "old"}))
    stale_block.update(full_cursor().block_value())
    parsed, warnings = parse_cursor(stale_block, full_cursor().state_document())
    assert warnings == [] and parsed == full_cursor()


def test_no_store_and_no_old_keys_means_no_bookkeeping():
    parsed, warnings = parse_cursor(full_cursor().block_value(), None)
    assert warnings == []
    assert parsed.dealer_seen is None and not parsed.is_first_run
    assert parsed.dealer_last_modified == full_cursor().dealer_last_modified


@pytest.mark.parametrize("state, hint", [([1], "must be a JSON object"), ("{", "not valid JSON")])
def test_an_unreadable_state_document_warns_and_counts_as_missing(state, hint):
    parsed, warnings = parse_cursor(full_cursor().block_value(), state)
    assert parsed.dealer_seen is None
    assert len(warnings) == 1 and "pipeline state" in warnings[0] and hint in warnings[0]


def test_state_warnings_name_the_store_not_the_block():
    state = full_cursor().state_document()
    state["partitions"]["not-a-uuid"] = {"failures": 1}
    _, warnings = parse_cursor(full_cursor().block_value(), state)
    assert warnings == ["pipeline state partitions['not-a-uuid'] is unreadable (ValueError('not a canonical partner UUID')); treated as absent"]
