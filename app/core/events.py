"""The events the service tells its subscribers about, and the one door they go out through.

A domain that has something to tell (a run completed, a version activated, drift moved) calls
`EventSink.add` with the session of the write it belongs to, so the event is kept in the same
transaction as the change it describes: both land or neither does. What happens next (the
webhook outbox and its deliveries) is the sink's business, not the caller's.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal, Protocol

from sqlalchemy.ext.asyncio import AsyncSession

Event = Literal["run.completed", "segment.changed", "model.activated", "model.held", "drift.changed"]
EVENTS: tuple[Event, ...] = ("run.completed", "segment.changed", "model.activated", "model.held", "drift.changed")


class EventSink(Protocol):
    async def add(
        self,
        session: AsyncSession,
        event: Event,
        data: Mapping[str, Any],
        *,
        segmentation_id: int | None = None,
        at: datetime | None = None,
    ) -> None:
        """Keep `event` in `session`'s transaction (the caller commits); `at` defaults to now."""
        ...
