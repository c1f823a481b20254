"""The cursor block type (CONTRACT.md section 4); Prefect removed its own JSON block in 3.5."""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from pydantic import Field

CURSOR_DOCUMENT = "usage-change-detection"


class UsageCursor(Block):
    """Where usage-change detection remembers which source watermark each dealer's partition reflects.

    Edit `value` to force rematerialization: `{}` rebuilds everything; removing
    or changing one dealer's entry in `dealer_last_modified` rebuilds that
    dealer's partner on the next tick.
    """

    _block_type_name = "Usage Cursor"
    _block_type_slug = "usage-cursor"
    _description = (
        "Cursor of the usage-change-detection flow: per dealer, the newest relevant usage_modified its partition"
        " reflects. Set value to {} to rebuild every partition; remove a dealer's key to rebuild its partner."
    )

    # A JSON object in the schema, so that the UI's edit page shows the stored value and saving it
    # unchanged keeps it (a field without a type opens empty in the default UI and saves {}).
    # The flow reads the stored JSON as it is, so a value saved through the API that is not an
    # object still loads there, with a warning, instead of failing the tick.
    value: dict[str, Any] = Field(
        default_factory=dict,
        description='{"global_last_modified": timestamp, "dealer_last_modified": {"<dealer id>": timestamp or null}}',
    )
