"""The detection cursor: what the pipeline last materialized, as a small typed value.

Stored as JSON in the `usage-cursor` block (see CONTRACT.md section 4). The two
contract keys are what operators edit; the pipeline keeps its own keys beside
them and tolerates their absence. Parsing never raises: every unreadable part
becomes a warning and is treated as absent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from flows.partners import is_partner_uuid

TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def format_timestamp(value: datetime | None) -> str | None:
    """ISO-8601 UTC with microseconds, e.g. 2026-01-20T12:00:00.000000Z."""
    return None if value is None else value.strftime(TIMESTAMP_FORMAT)


def parse_timestamp(value: object) -> datetime | None:
    """Parse an ISO-8601 timestamp (or None) to a naive UTC datetime; raise ValueError otherwise."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected an ISO-8601 string or null, got {type(value).__name__}")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(timezone.utc).replace(tzinfo=None)
    return parsed


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


@dataclass(frozen=True)
class Cursor:
    global_last_modified: datetime | None = None
    dealer_last_modified: dict[int, datetime | None] = field(default_factory=dict)
    # None: the key is absent (new cursor or operator reset), so nothing is known.
    dealer_seen: dict[int, DealerSeen] | None = None
    partitions: dict[str, PartitionStatus] = field(default_factory=dict)
    reconciled_at: datetime | None = None
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
    def retry_partitions(self) -> set[str]:
        return {uuid for uuid, status in self.partitions.items() if status.failures > 0}

    def to_json(self) -> dict[str, Any]:
        return {
            "global_last_modified": format_timestamp(self.global_last_modified),
            "dealer_last_modified": {
                str(dealer): format_timestamp(ts) for dealer, ts in sorted(self.dealer_last_modified.items())
            },
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
                }
                for uuid, status in sorted(self.partitions.items())
            },
            "reconciled_at": format_timestamp(self.reconciled_at),
            "fingerprints": {str(dealer): fp for dealer, fp in sorted(self.fingerprints.items())},
        }

    def with_changes(self, **changes: Any) -> Cursor:
        return replace(self, **changes)


def parse_cursor(raw: object) -> tuple[Cursor, list[str]]:
    """Read a cursor value as operators may have left it; return it with one warning per problem."""
    warnings: list[str] = []
    if raw is None:
        return Cursor(), warnings
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            warnings.append(f"cursor value is not valid JSON ({exc}); starting from an empty cursor")
            return Cursor(), warnings
    if not isinstance(raw, dict):
        warnings.append(
            f"cursor value must be a JSON object, got {type(raw).__name__}; starting from an empty cursor"
        )
        return Cursor(), warnings

    def timestamp(where: str, value: object) -> tuple[bool, datetime | None]:
        try:
            return True, parse_timestamp(value)
        except ValueError as exc:
            warnings.append(f"cursor {where}: unparsable timestamp {value!r} ({exc}); treated as absent")
            return False, None

    def mapping(key: str) -> dict[str, Any] | None:
        value = raw.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            warnings.append(f"cursor {key} must be an object, got {type(value).__name__}; treated as absent")
            return None
        return value

    def dealer_id(key: str, where: str) -> int | None:
        try:
            return int(key)
        except ValueError:
            warnings.append(f"cursor {where}: dealer id {key!r} is not an integer; entry treated as absent")
            return None

    _, global_last_modified = timestamp("global_last_modified", raw.get("global_last_modified"))

    dealer_last_modified: dict[int, datetime | None] = {}
    for key, value in (mapping("dealer_last_modified") or {}).items():
        dealer = dealer_id(key, "dealer_last_modified")
        ok, ts = timestamp(f"dealer_last_modified[{key!r}]", value)
        if dealer is not None and ok:
            dealer_last_modified[dealer] = ts

    seen_raw = mapping("dealer_seen")
    dealer_seen: dict[int, DealerSeen] | None = None if seen_raw is None else {}
    for key, value in (seen_raw or {}).items():
        dealer = dealer_id(key, "dealer_seen")
        try:
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
        except (TypeError, KeyError, ValueError) as exc:
            warnings.append(f"cursor dealer_seen[{key!r}] is unreadable ({exc!r}); treated as absent")
            continue
        if dealer is not None and dealer_seen is not None:
            dealer_seen[dealer] = seen

    partitions: dict[str, PartitionStatus] = {}
    for key, value in (mapping("partitions") or {}).items():
        try:
            if not is_partner_uuid(key):
                raise ValueError("not a canonical partner UUID")
            failures = value.get("failures", 0)
            if not isinstance(failures, int) or failures < 0:
                raise ValueError(f"failures must be a non-negative integer, got {failures!r}")
            partitions[key.lower()] = PartitionStatus(
                materialized_at=parse_timestamp(value.get("materialized_at")),
                source_watermark=parse_timestamp(value.get("source_watermark")),
                failures=failures,
                last_error=value.get("last_error"),
            )
        except (AttributeError, TypeError, ValueError) as exc:
            warnings.append(f"cursor partitions[{key!r}] is unreadable ({exc}); treated as absent")

    _, reconciled_at = timestamp("reconciled_at", raw.get("reconciled_at"))
    fingerprints: dict[int, str] = {}
    for key, value in (mapping("fingerprints") or {}).items():
        dealer = dealer_id(key, "fingerprints")
        if not isinstance(value, str):
            warnings.append(f"cursor fingerprints[{key!r}] must be a string, got {value!r}; treated as absent")
        elif dealer is not None:
            fingerprints[dealer] = value

    cursor = Cursor(
        global_last_modified=global_last_modified,
        dealer_last_modified=dealer_last_modified,
        dealer_seen=dealer_seen,
        partitions=partitions,
        reconciled_at=reconciled_at,
        fingerprints=fingerprints,
    )
    return cursor, warnings
