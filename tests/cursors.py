"""The cursor as one document, the way versions before the state store kept it in the block."""

from __future__ import annotations

from typing import Any

from usage_pipeline.cursor import Cursor


def combined(cursor: Cursor) -> dict[str, Any]:
    """Operator keys and bookkeeping in one object: `parse_cursor` reads it as a block to migrate."""
    return {**cursor.block_value(), **cursor.state_document()}
