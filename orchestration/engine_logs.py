"""A failed tick logs its one-line summary, not a traceback of Prefect's engine.

When a deployment run's flow returns a Failed state, Prefect's engine re-raises the state's
exception after the run has ended and logs it at ERROR with a traceback of its own internals
("Engine execution exited with unexpected exception"). For a tick that traceback says nothing
the run's "Finished in state Failed('<summary>')" line and its artifacts do not already say.
"""

from __future__ import annotations

import logging

from usage_pipeline.tick_report import TickFailed

ENGINE_EXIT_MESSAGE = "Engine execution exited with unexpected exception"


class ReportedTickFailure(logging.Filter):
    """Drops the engine's re-raise of a TickFailed; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        raised = record.exc_info[1] if record.exc_info else None
        return not (record.msg == ENGINE_EXIT_MESSAGE and isinstance(raised, TickFailed))


def quiet_reported_tick_failures() -> None:
    """Install the filter on Prefect's flow-run logger, once per process."""
    logger = logging.getLogger("prefect.flow_runs")
    if not any(isinstance(existing, ReportedTickFailure) for existing in logger.filters):
        logger.addFilter(ReportedTickFailure())
