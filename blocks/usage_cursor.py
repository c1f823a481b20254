"""The cursor block type (CONTRACT.md section 4); Prefect removed its own JSON block in 3.5."""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from pydantic import Field

CURSOR_DOCUMENT = "usage-change-detection"


class UsageCursor(Block):
    """Where usage-change detection remembers what it has materialized.

    Edit `value` to force rematerialization: `{}` rebuilds everything; removing
    or changing one dealer's entry in `dealer_last_modified` rebuilds that
    dealer's partner on the next tick.
    """

    _block_type_name = "Usage Cursor"
    _block_type_slug = "usage-cursor"
    _description = "Cursor of the usage-change-detection flow. Set value to {} to rebuild every partition."

    # Any, not dict: a value an operator mistyped must still load, so the
    # flow can warn about it instead of failing to read the block.
    value: Any = Field(default_factory=dict, description="JSON object; see the README's cursor section.")
