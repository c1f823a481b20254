"""What one tick decided and did, as a plain value: the flow's result, the artifacts' and events' source."""

from __future__ import annotations

from dataclasses import dataclass, field

from usage_pipeline.cursor import Cursor
from usage_pipeline.detection import PartitionOutcome, Plan, RunOutcome


@dataclass
class TickReport:
    """Everything one tick decided and did; returned as the flow's result and shown in the UI."""

    dry_run: bool
    requested: frozenset[str] = frozenset()  # partners the operator asked to rebuild
    full_refresh: bool = False
    plan: Plan | None = None
    bronze: RunOutcome | None = None
    partitions: dict[str, PartitionOutcome] = field(default_factory=dict)
    episodes: dict[str, str] = field(default_factory=dict)  # planned partner -> its pending episode (cursor.py)
    cursor: Cursor | None = None
    cursor_saved: bool = False
    source_seconds: float | None = None  # the v3 and billing reads for the snapshot (the first two alongside the cursor read)
    suspects: frozenset[int] = frozenset()  # dealers the rolling reconciliation found changed, re-checked here
    reconciliation_overdue_seconds: float | None = None  # how late its cycle is (None: it has not run yet)
    skipped: str | None = None  # why the tick did nothing (source down, another tick running)
    bronze_table: dict | None = None  # the bronze table after the tick: version, files, last maintenance

    @property
    def ok(self) -> bool:
        return (self.bronze is None or self.bronze.ok) and all(o.ok for o in self.partitions.values())

    def summary(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        assert self.plan is not None
        unknown = f"; unknown partner(s) not rebuilt: {', '.join(self.plan.unknown_partners)}" if self.plan.unknown_partners else ""
        if self.plan.is_empty:
            return "no changes" + unknown
        text = self.plan.describe() + unknown
        if self.dry_run:
            return f"dry run: {text} would run" + (" (with bronze)" if self.plan.runs_bronze else "")
        if self.bronze is not None and not self.bronze.ok:
            return f"{text}, bronze failed: {self.bronze.state}"
        good = sum(o.ok for o in self.partitions.values())
        return f"{text}, {good}/{len(self.partitions)} ok"


class TickFailed(Exception):
    """A tick that did not fully succeed, as its Failed state's data: the one-line summary, which is what
    Prefect shows and logs, with the whole report attached for a caller in the same process."""

    def __init__(self, report: TickReport) -> None:
        super().__init__(report.summary())
        self.report = report

