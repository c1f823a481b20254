"""The detection cursor: what the pipeline last materialized, as a small typed value.

It is stored in two places (README "The cursor and the pipeline's state"):

- the `usage-cursor` block holds the contract's two operator keys
  (`global_last_modified`, `dealer_last_modified`; CONTRACT.md section 4), which
  operators edit in the Prefect UI;
- the pipeline's own bookkeeping (what it saw per dealer, fingerprints, partition
  freshness and failures) lives in the lake beside the data it describes
  (`flows/state_store.py`).

Parsing never raises: every unreadable part becomes a warning and is treated as
absent. A block written by an older version still carries the bookkeeping keys;
they are read from there until the store exists (migration).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypedDict

from usage_pipeline.partners import is_partner_uuid

OPERATOR_KEYS = ("global_last_modified", "dealer_last_modified")
STATE_KEYS = ("dealer_seen", "partitions", "reconciled_at", "fingerprints")


def format_timestamp(value: datetime | None) -> str | None:
    """A naive UTC datetime as ISO-8601 with microseconds, e.g. 2026-01-20T12:00:00.000000Z."""
    return None if value is None else value.isoformat(timespec="microseconds") + "Z"  # strftime takes 2.3x as long


def utc_now() -> datetime:
    """The current time as the cursor's timestamps are: naive UTC."""
    return datetime.now(UTC).replace(tzinfo=None)


def parse_timestamp(value: object) -> datetime | None:
    """Parse an ISO-8601 timestamp (or None) to a naive UTC datetime; raise ValueError otherwise."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected an ISO-8601 string or null, got {type(value).__name__}")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


class DealerSeenDocument(TypedDict):
    raw_max: str | None
    relevant: bool
    last_modified: str | None
    partner: str | None


class PartitionDocument(TypedDict):
    materialized_at: str | None
    source_watermark: str | None
    failures: int
    last_error: str | None
    checks: str | None
    pending_since: str | None  # absent in documents written before issue 19: read as None


class StateDocument(TypedDict):
    """The pipeline's state file (`usage_pipeline/lake.py`), as `Cursor.state_document` writes it
    and `parse_cursor` reads it back. Dealer ids are JSON keys, so strings."""

    dealer_seen: dict[str, DealerSeenDocument] | None
    partitions: dict[str, PartitionDocument]
    # Absent in documents written before the reconciliation had a deployment of its own: 0.
    suspects_checked_through: int
    fingerprints: dict[str, str]


class BlockValue(TypedDict):
    """The `usage-cursor` block's `value` (CONTRACT.md section 4)."""

    global_last_modified: str | None
    dealer_last_modified: dict[str, str | None]


@dataclass(frozen=True)
class DealerSeen:
    """What the last successful tick saw of one dealer; lets a tick skip unchanged dealers."""

    raw_max: datetime | None  # MAX(usage_modified) over all its rows (the cheap index probe)
    relevant: bool  # whether it had relevant rows
    last_modified: datetime | None  # the relevant MAX written to dealer_last_modified
    partner: str | None  # the partner its rows were materialized under


@dataclass(frozen=True)
class PartitionStatus:
    """Freshness of one partner partition, shown to operators and used for retries."""

    materialized_at: datetime | None = None  # last time silver and gold both succeeded
    source_watermark: datetime | None = None  # newest relevant usage_modified it reflects
    failures: int = 0  # consecutive ticks on which it failed; > 0 means retry next tick
    last_error: str | None = None
    # The first tick that found it needing a rebuild, None once published. Not a source timestamp:
    # those may be NULL, backdated, or gone with a deleted row.
    pending_since: datetime | None = None
    checks: str | None = None  # its last run's check results in a line (check_results.summary)

    def lag_seconds(self, now: datetime) -> float:
        """How long the partition has waited for a rebuild (0 when published), as operators see it."""
        return 0.0 if self.pending_since is None else max(0.0, (now - self.pending_since).total_seconds())

    @property
    def episode(self) -> str:
        """Names the partition's pending episode by the publish it follows ("never" before the first):
        the same from the tick that finds it pending to the one that publishes it, even across a tick
        that died before saving the state, and new after every publish (usage-partition-stale)."""
        return format_timestamp(self.materialized_at) or "never"


@dataclass(frozen=True)
class Cursor:
    global_last_modified: datetime | None = None
    dealer_last_modified: dict[int, datetime | None] = field(default_factory=dict)
    # None: no bookkeeping (new cursor, or the store was lost), so nothing is known.
    dealer_seen: dict[int, DealerSeen] | None = None
    partitions: dict[str, PartitionStatus] = field(default_factory=dict)
    # The last slice of the rolling reconciliation whose suspects a tick re-checked
    # (usage_pipeline/reconciliation.py, ReconciliationState.unchecked_suspects).
    suspects_checked_through: int = 0
    fingerprints: dict[int, str] = field(default_factory=dict)

    @property
    def is_first_run(self) -> bool:
        """Both contract keys empty means "start over", unless we wrote them so ourselves
        because the source had no relevant rows (then there is nothing to redo)."""
        if self.global_last_modified is not None or self.dealer_last_modified:
            return False
        source_was_empty = self.dealer_seen is not None and not any(
            seen.relevant for seen in self.dealer_seen.values()
        )
        return not source_was_empty

    @property
    def known_dealers(self) -> frozenset[int]:
        """Every dealer the pipeline's state or the operator keys name: what the rolling reconciliation covers."""
        return frozenset(self.dealer_seen or {}) | frozenset(self.dealer_last_modified)

    @property
    def retry_partitions(self) -> set[str]:
        return {uuid for uuid, status in self.partitions.items() if status.failures > 0}

    def block_value(self) -> BlockValue:
        """The operator keys, as the `usage-cursor` block stores them."""
        return {
            "global_last_modified": format_timestamp(self.global_last_modified),
            "dealer_last_modified": {
                str(dealer): format_timestamp(ts) for dealer, ts in sorted(self.dealer_last_modified.items())
            },
        }

    def state_document(self) -> StateDocument:
        """The pipeline's bookkeeping, as its store keeps it."""
        return {
            "dealer_seen": None
            if self.dealer_seen is None
            else {
                str(dealer): {
                    "raw_max": format_timestamp(seen.raw_max),
                    "relevant": seen.relevant,
                    "last_modified": format_timestamp(seen.last_modified),
                    "partner": seen.partner,
                }
                for dealer, seen in sorted(self.dealer_seen.items())
            },
            "partitions": {
                uuid: {
                    "materialized_at": format_timestamp(status.materialized_at),
                    "source_watermark": format_timestamp(status.source_watermark),
                    "failures": status.failures,
                    "last_error": status.last_error,
                    "checks": status.checks,
                    "pending_since": format_timestamp(status.pending_since),
                }
                for uuid, status in sorted(self.partitions.items())
            },
            "suspects_checked_through": self.suspects_checked_through,
            "fingerprints": {str(dealer): fp for dealer, fp in sorted(self.fingerprints.items())},
        }

    def with_changes(self, **changes: Any) -> Cursor:
        return replace(self, **changes)


class _Reader:
    """Reads one JSON document leniently, collecting a warning per unreadable part."""

    def __init__(self, where: str, document: dict[str, Any], warnings: list[str]) -> None:
        self.where, self.document, self.warnings = where, document, warnings

    def warn(self, text: str) -> None:
        self.warnings.append(f"{self.where} {text}")

    def timestamp(self, label: str, value: object) -> tuple[bool, datetime | None]:
        try:
            return True, parse_timestamp(value)
        except ValueError as exc:
            self.warn(f"{label}: unparsable timestamp {value!r} ({exc}); treated as absent")
            return False, None

    def mapping(self, key: str) -> dict[str, Any] | None:
        value = self.document.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.warn(f"{key} must be an object, got {type(value).__name__}; treated as absent")
            return None
        return value

    def dealer_id(self, key: str, label: str) -> int | None:
        try:
            return int(key)
        except ValueError:
            self.warn(f"{label}: dealer id {key!r} is not an integer; entry treated as absent")
            return None

    def entries(self, key: str, parse: Callable[[str, Any], Any], errors: tuple[type[Exception], ...]) -> dict | None:
        """Parse every entry of the object at `key` with `parse(key, value) -> (key, value)`; None if absent."""
        raw = self.mapping(key)
        if raw is None:
            return None
        parsed = {}
        for entry_key, value in raw.items():
            try:
                item = parse(entry_key, value)
            except errors as exc:
                self.warn(f"{key}[{entry_key!r}] is unreadable ({exc!r}); treated as absent")
                continue
            if item is not None:
                parsed[item[0]] = item[1]
        return parsed


def _as_object(raw: object, what: str, warnings: list[str]) -> dict[str, Any] | None:
    if raw is None:
        return None
    if isinstance(raw, str | bytes):
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            warnings.append(f"{what} is not valid JSON ({exc}); starting from an empty {what}")
            return None
    if not isinstance(raw, dict):
        warnings.append(f"{what} must be a JSON object, got {type(raw).__name__}; starting from an empty {what}")
        return None
    return raw


def _operator_keys(reader: _Reader) -> dict[str, Any]:
    _, global_last_modified = reader.timestamp("global_last_modified", reader.document.get("global_last_modified"))
    dealer_last_modified: dict[int, datetime | None] = {}
    for key, value in (reader.mapping("dealer_last_modified") or {}).items():
        dealer = reader.dealer_id(key, "dealer_last_modified")
        ok, ts = reader.timestamp(f"dealer_last_modified[{key!r}]", value)
        if dealer is not None and ok:
            dealer_last_modified[dealer] = ts
    return {"global_last_modified": global_last_modified, "dealer_last_modified": dealer_last_modified}


def _dealer_seen_entry(reader: _Reader) -> Callable[[str, Any], tuple[int, DealerSeen] | None]:
    def parse(key: str, value: Any) -> tuple[int, DealerSeen] | None:
        partner = value["partner"]
        if partner is not None and not is_partner_uuid(partner):
            raise ValueError(f"partner {partner!r} is not a canonical UUID")
        if not isinstance(value["relevant"], bool):
            raise ValueError("relevant must be true or false")
        seen = DealerSeen(
            raw_max=parse_timestamp(value["raw_max"]),
            relevant=value["relevant"],
            last_modified=parse_timestamp(value["last_modified"]),
            partner=partner.lower() if partner else None,
        )
        dealer = reader.dealer_id(key, "dealer_seen")
        return None if dealer is None else (dealer, seen)

    return parse


def _partition_entry(key: str, value: Any) -> tuple[str, PartitionStatus]:
    if not is_partner_uuid(key):
        raise ValueError("not a canonical partner UUID")
    failures = value.get("failures", 0)
    if not isinstance(failures, int) or isinstance(failures, bool) or failures < 0:
        raise ValueError(f"failures must be a non-negative integer, got {failures!r}")
    last_error = value.get("last_error")
    if last_error is not None and not isinstance(last_error, str):
        raise ValueError(f"last_error must be a string or null, got {last_error!r}")
    checks = value.get("checks")
    if checks is not None and not isinstance(checks, str):
        raise ValueError(f"checks must be a string or null, got {checks!r}")
    return key.lower(), PartitionStatus(
        materialized_at=parse_timestamp(value.get("materialized_at")),
        source_watermark=parse_timestamp(value.get("source_watermark")),
        failures=failures,
        last_error=last_error,
        checks=checks,
        pending_since=parse_timestamp(value.get("pending_since")),
    )


def _fingerprint_entry(reader: _Reader) -> Callable[[str, Any], tuple[int, str] | None]:
    def parse(key: str, value: Any) -> tuple[int, str] | None:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {value!r}")
        dealer = reader.dealer_id(key, "fingerprints")
        return None if dealer is None else (dealer, value)

    return parse


def _suspects_checked_through(reader: _Reader) -> int:
    value = reader.document.get("suspects_checked_through", 0)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    reader.warn(f"suspects_checked_through: expected a non-negative integer, got {value!r};"
                " treated as 0 (the next tick re-checks every suspect the rolling reconciliation left)")
    return 0


def _bookkeeping(reader: _Reader) -> dict[str, Any]:
    entry_errors = (AttributeError, TypeError, KeyError, ValueError)
    return {
        "dealer_seen": reader.entries("dealer_seen", _dealer_seen_entry(reader), entry_errors),
        "partitions": reader.entries("partitions", _partition_entry, entry_errors) or {},
        "suspects_checked_through": _suspects_checked_through(reader),
        "fingerprints": reader.entries("fingerprints", _fingerprint_entry(reader), entry_errors) or {},
    }


def is_current_layout(block_value: object, state: object) -> bool:
    """Whether the block holds only the operator keys and the state document exactly this version's keys:
    a legacy layout is rewritten by the next save, even of an unchanged cursor."""
    return (isinstance(block_value, dict) and set(block_value) == set(OPERATOR_KEYS)
            and isinstance(state, dict) and set(state) == set(StateDocument.__annotations__))


def parse_cursor(block_value: object, state: object = None) -> tuple[Cursor, list[str]]:
    """Read the block's `value` and the pipeline's state as they may have been left; one warning per problem.

    `state` None means the store has no document: the bookkeeping then comes from
    bookkeeping keys an older version left in the block, if any (they are dropped
    from the block on the next save), else it is unknown (`dealer_seen` None).
    """
    warnings: list[str] = []
    operator = _as_object(block_value, "cursor value", warnings) or {}
    fields = _operator_keys(_Reader("cursor", operator, warnings))
    stored = _as_object(state, "pipeline state", warnings)
    if stored is not None:
        fields.update(_bookkeeping(_Reader("pipeline state", stored, warnings)))
    elif any(key in operator for key in STATE_KEYS):
        fields.update(_bookkeeping(_Reader("cursor", operator, warnings)))
    return Cursor(**fields), warnings
