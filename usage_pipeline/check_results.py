"""Check results and their severity, as plain values: what gates a publish, and what operators see of it.

Like Dagster's blocking asset checks: a failed blocking check fails the partition's run and
nothing of that partner is replaced. An operator downgrades a check to a warning by name
(USAGE_CHECKS_WARN_ONLY). The checks themselves are in usage_pipeline/checks.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace

from usage_pipeline.lake import GOLD_TABLES, SILVER_TABLES

RECONCILIATION_SOURCE = "reconciliation.source"
RECONCILIATION_TOTALS = "reconciliation.totals"
CHECK_NAMES = (
    RECONCILIATION_SOURCE, RECONCILIATION_TOTALS,
    "conservation.aggregated", "conservation.monthly", "conservation.usage_report", "conservation.active_services",
    *(f"grain.{table}" for table in (*SILVER_TABLES, *GOLD_TABLES)),
    *(f"schema.{table}" for table in (*SILVER_TABLES, *GOLD_TABLES)),
)


@dataclass(frozen=True)
class CheckResult:
    name: str
    expected: str
    actual: str
    passed: bool
    blocking: bool = True  # False: downgraded to a warning by USAGE_CHECKS_WARN_ONLY

    def describe(self) -> str:
        verdict = "passed" if self.passed else "FAILED" if self.blocking else "failed (warning only)"
        return f"{self.name} {verdict}: expected {self.expected}, got {self.actual}"


class ChecksFailed(RuntimeError):
    """A blocking check failed: the partition is not published and is retried on the next tick."""

    def __init__(self, partner: str, results: tuple[CheckResult, ...]) -> None:
        self.partner, self.results = partner, results
        failed = [r.describe() for r in results if not r.passed and r.blocking]
        super().__init__(f"partner {partner} not published, check(s) failed: {'; '.join(failed)}")

    def __reduce__(self) -> tuple:
        """Picklable (Prefect may persist a failed run's exception) despite the two-argument init."""
        return ChecksFailed, (self.partner, self.results)


class SourceMoved(RuntimeError):
    """The source changed while the tick ran: the partition is deferred to the next tick."""


def with_severity(result: CheckResult, warn_only: frozenset[str]) -> CheckResult:
    """The result downgraded to a warning if USAGE_CHECKS_WARN_ONLY names it."""
    return replace(result, blocking=result.blocking and result.name not in warn_only)


def gate(partner: str, results: list[CheckResult], warn_only: frozenset[str]) -> tuple[CheckResult, ...]:
    """Results with their severity applied; raises ChecksFailed if a blocking one failed."""
    graded = tuple(with_severity(r, warn_only) for r in results)
    if any(not r.passed and r.blocking for r in graded):
        raise ChecksFailed(partner, graded)
    return graded


def summary(results: Iterable[CheckResult]) -> str:
    """One line for `cursor show` and the state document: how many passed, and which did not."""
    results = list(results)
    failed = [r.name for r in results if not r.passed]
    passed = f"{len(results) - len(failed)}/{len(results)} passed"
    return passed if not failed else f"{passed}; failed: {', '.join(failed)}"


def as_json(results: Iterable[CheckResult]) -> str:
    """For a published file's Parquet metadata."""
    return json.dumps(as_payload(results), separators=(",", ":"))


def as_payload(results: Iterable[CheckResult]) -> list[dict]:
    return [asdict(r) for r in results]
