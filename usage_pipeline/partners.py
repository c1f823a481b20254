"""Partner UUIDs: the one check every entry point (parameters, v3 rows, cursor) goes through."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field

# Canonical 8-4-4-4-12 hex form; either case is accepted, lower case is what we store.
PARTNER_UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
_PARTNER_UUID = re.compile(PARTNER_UUID_PATTERN)
# A flow parameter type: the server refuses a run whose value does not match, before it starts.
PartnerUUID = Annotated[str, Field(pattern=PARTNER_UUID_PATTERN, description="Partner UUID (8-4-4-4-12 hex)")]


class InvalidPartnerUUID(ValueError):
    """A value that is not a canonical partner UUID reached an entry point."""


def parse_partner_uuid(value: object, what: str = "partner_uuid") -> str:
    """Return `value` as a lower-case canonical UUID, or raise naming the bad value.

    The value ends up in file paths, run tags and concurrency-limit names, so
    nothing else may pass (no path separators, quotes or empty strings).
    """
    if not isinstance(value, str) or not _PARTNER_UUID.fullmatch(value):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise InvalidPartnerUUID(
            f"{what} must be a canonical 8-4-4-4-12 hex UUID, got {shown}"
        )
    return value.lower()


def is_partner_uuid(value: object) -> bool:
    return isinstance(value, str) and _PARTNER_UUID.fullmatch(value) is not None


def partner_tag(partner_uuid: str) -> str:
    return f"partner:{partner_uuid}"


def layer_tag(layer: str) -> str:
    return f"layer:{layer}"


def dealers_of(directory: dict[int, str | None], partner_uuid: str) -> list[int]:
    """The dealers the v3 directory maps to a partner, in order."""
    return sorted(dealer for dealer, partner in directory.items() if partner == partner_uuid)
