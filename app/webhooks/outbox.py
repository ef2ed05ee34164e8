"""The outbox: the EventSink every domain queues its events into, in its own transaction.

`add` fans an event out to each active endpoint subscribed to it: one message (the body every attempt
sends) and one pending delivery per endpoint, written in the caller's session, so they commit or roll
back with the change they describe. The delivery worker (app.webhooks.delivery) sends them from there;
nothing is held in memory, so a restart loses none.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from pydantic_core import to_jsonable_python
from sqlalchemy import delete, insert, select
from sqlalchemy import event as orm_event
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.events import Event
from app.core.tables import utcnow
from app.webhooks.tables import WebhookDelivery, WebhookEndpoint, WebhookMessage


def new_message_id() -> str:
    """`msg_` then the time in milliseconds and 64 random bits: unique, and ordered as they were made."""
    return f"msg_{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


def message_body(event_type: str, data: Mapping[str, Any], at: datetime) -> str:
    """The body as sent: `{"type", "timestamp", "data"}` in compact JSON."""
    return json.dumps(
        {"type": event_type, "timestamp": at.isoformat(), "data": to_jsonable_python(dict(data))},
        separators=(",", ":"),
        ensure_ascii=False,
    )


class Outbox:
    """The EventSink of app.core.events; `on_commit` (the local worker's wake-up) runs after a commit
    that queued messages, so they go out at once rather than at the next poll."""

    def __init__(self, on_commit: Callable[[], None] | None = None) -> None:
        self.on_commit = on_commit

    async def add(
        self,
        session: AsyncSession,
        event: Event,
        data: Mapping[str, Any],
        *,
        segmentation_id: int | None = None,
        at: datetime | None = None,
    ) -> None:
        endpoints = (
            await session.execute(
                select(WebhookEndpoint.id, WebhookEndpoint.events).where(WebhookEndpoint.active.is_(True))
            )
        ).all()
        subscribed = [endpoint_id for endpoint_id, events in endpoints if event in (events or [])]
        if not subscribed:
            return
        at = at or utcnow()
        message_id = new_message_id()
        await session.execute(
            insert(WebhookMessage).values(
                id=message_id,
                event=event,
                segmentation_id=segmentation_id,
                body=message_body(event, data, at),
                created_at=utcnow(),
            )
        )
        now = utcnow()
        await session.execute(
            insert(WebhookDelivery),
            [
                {
                    "endpoint_id": endpoint_id,
                    "message_id": message_id,
                    "event": event,
                    "status": "pending",
                    "attempts": 0,
                    "failures": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                }
                for endpoint_id in subscribed
            ],
        )
        if self.on_commit is not None:
            wake = self.on_commit
            orm_event.listen(session.sync_session, "after_commit", lambda _session: wake(), once=True)


async def delete_pending_messages(session: AsyncSession, *, segmentation_id: int) -> None:
    """A deleted segmentation's messages not yet sent go with it (delivered and failed ones stay listed)."""
    of_it = select(WebhookMessage.id).where(WebhookMessage.segmentation_id == segmentation_id)
    await session.execute(
        delete(WebhookDelivery).where(WebhookDelivery.status == "pending", WebhookDelivery.message_id.in_(of_it))
    )
    kept = select(WebhookDelivery.message_id).where(WebhookDelivery.message_id == WebhookMessage.id).exists()
    await session.execute(delete(WebhookMessage).where(WebhookMessage.segmentation_id == segmentation_id, ~kept))
