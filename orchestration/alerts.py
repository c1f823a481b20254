"""The three automations of CONTRACT.md section 8, created or updated by name by `usage-pipeline setup`.

All notify the Prefect notification block named by USAGE_ALERT_BLOCK (Slack, e-mail,
custom webhook...). Running setup again updates them in place (thresholds included),
so there is always exactly one of each.
"""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

from prefect.automations import Automation, EventTrigger, Posture, SendNotification
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import BlockDocumentFilter, BlockDocumentFilterName
from prefect.client.schemas.objects import BlockDocument
from prefect.exceptions import ObjectNotFound

from orchestration.events import (
    EPISODE_LABEL,
    FAILED_EVENT,
    FAILURES_LABEL,
    MATERIALIZED_EVENT,
    PARTITION_RESOURCE_PREFIX,
    PENDING_EVENT,
    TICK_EVENT,
    TICK_RESOURCE,
)
from usage_pipeline.settings import Settings

STALLED = "usage-detection-stalled"
FAILING = "usage-partition-failing"
STALE = "usage-partition-stale"


class AlertSetupError(ValueError):
    """An alert block that cannot be found; the message names it."""


def notification_block_id(name: str) -> UUID:
    """`slug/name` (e.g. custom-webhook/ops) or a bare document name that exactly one block has."""
    with get_client(sync_client=True) as client:
        if "/" in name:
            slug, document = name.split("/", 1)
            try:
                return client.read_block_document_by_name(document, slug).id
            except ObjectNotFound:
                raise AlertSetupError(f"USAGE_ALERT_BLOCK={name!r}: no block {document!r} of type {slug!r}") from None
        # The client has no name filter for block documents; the server's filter endpoint has.
        named = BlockDocumentFilter(name=BlockDocumentFilterName(any_=[name]))
        response = client.request(
            "POST", "/block_documents/filter",
            json={"block_documents": named.model_dump(mode="json"), "include_secrets": False, "limit": 2},
        )
        documents = [BlockDocument.model_validate(document) for document in response.json()]
    if len(documents) != 1:
        found = "no block" if not documents else f"{len(documents)} blocks"
        raise AlertSetupError(f"USAGE_ALERT_BLOCK={name!r}: {found} of that name; use <block-type-slug>/{name}")
    return documents[0].id


def automations(block_id: UUID, stall_seconds: int, failed_ticks: int, stale_seconds: int) -> list[Automation]:
    stalled = Automation(
        name=STALLED,
        description=f"No {TICK_EVENT} event within {stall_seconds} s: usage-change detection is not running.",
        # `after` + `for_each`: each tick restarts the window, and a stall notifies once (not every
        # `within` seconds) until ticks resume. It arms at the first tick after setup.
        trigger=EventTrigger(
            posture=Posture.Proactive,
            after={TICK_EVENT},
            expect={TICK_EVENT},
            match={"prefect.resource.id": TICK_RESOURCE},
            for_each={"prefect.resource.id"},
            threshold=1,
            within=timedelta(seconds=stall_seconds),
        ),
        actions=[
            SendNotification(
                block_document_id=block_id,
                subject="usage pipeline: detection stalled",
                body=(
                    f"Usage-change detection has been silent for {stall_seconds} s: no {TICK_EVENT} event since"
                    " the last tick ({{ event.occurred }}: {{ event.payload.summary }}), so no billing change"
                    " reaches the partner reports. Check the usage-change-detection deployment in the Prefect UI"
                    " (schedule paused? worker or serve process down?)."
                ),
            )
        ],
    )
    failing = Automation(
        name=FAILING,
        description=f"A partner partition failed {failed_ticks} ticks in a row.",
        trigger=EventTrigger(
            posture=Posture.Reactive,
            expect={FAILED_EVENT},
            match={"prefect.resource.id": f"{PARTITION_RESOURCE_PREFIX}*", FAILURES_LABEL: str(failed_ticks)},
            threshold=1,
            within=timedelta(0),
        ),
        actions=[
            SendNotification(
                block_document_id=block_id,
                subject="usage pipeline: partition {{ event.payload.partner }} failing",
                body=(
                    "Partner {{ event.payload.partner }} failed {{ event.payload.consecutive_failures }} detection"
                    " ticks in a row (it is retried every tick). Last error: {{ event.payload.last_error }}"
                ),
            )
        ],
    )
    stale = Automation(
        name=STALE,
        description=f"A partner partition found needing a rebuild is still not published {stale_seconds} s later.",
        # Opened by the pending event a tick emits before its runs, closed by the materialized event of the same
        # partition and episode: the server's own clock fires it, so it fires when later ticks fail, hang or stop.
        # Partitions current when detection stalls were never announced pending: usage-detection-stalled covers them.
        trigger=EventTrigger(
            posture=Posture.Proactive,
            after={PENDING_EVENT},
            expect={MATERIALIZED_EVENT},
            match={"prefect.resource.id": f"{PARTITION_RESOURCE_PREFIX}*"},
            for_each={"prefect.resource.id", EPISODE_LABEL},
            threshold=1,
            within=timedelta(seconds=stale_seconds),
        ),
        actions=[
            SendNotification(
                block_document_id=block_id,
                subject="usage pipeline: partition {{ event.payload.partner }} stale",
                body=(
                    "Partner {{ event.payload.partner }} was found needing a rebuild at"
                    " {{ event.payload.pending_since }} ({{ event.payload.reasons | join('; ') }}) and is still not"
                    f" published {stale_seconds} s later (last published: {{{{ event.payload.last_published }}}})."
                    " `usage-pipeline cursor show` lists its failed ticks and last error; if no tick has run since,"
                    f" see {STALLED}."
                ),
            )
        ],
    )
    return [stalled, failing, stale]


def ensure_automation(wanted: Automation) -> str:
    try:
        existing = Automation.read(name=wanted.name)
    except ValueError:  # Prefect's "not found"
        wanted.create()
        return "created"
    wanted.id = existing.id
    wanted.update()
    return "updated"


def setup_alerts(settings: Settings) -> list[str]:
    """Create or update the three automations when USAGE_ALERT_BLOCK is set; otherwise say how to."""
    stall, failed, stale = settings.alert_stall_seconds, settings.alert_failed_ticks, settings.alert_stale_seconds
    if not settings.alert_block:
        return [
            "alerts: off. To turn them on, create a Prefect notification block (Blocks -> Add, e.g. Slack Webhook"
            " or Custom Webhook) and re-run setup with USAGE_ALERT_BLOCK=<block-type-slug>/<block name>"
            f" (thresholds: USAGE_ALERT_STALL_SECONDS={stall}, USAGE_ALERT_FAILED_TICKS={failed},"
            f" USAGE_ALERT_STALE_SECONDS={stale})"
        ]
    block_id = notification_block_id(settings.alert_block)
    done = [f"{a.name} {ensure_automation(a)}" for a in automations(block_id, stall, failed, stale)]
    return [f"alerts to {settings.alert_block}: {', '.join(done)} (stalled after {stall} s, failing after {failed}"
            f" ticks, stale after {stale} s)"]
