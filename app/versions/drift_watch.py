"""The drift watch: every DRIFT_CHECK_MINUTES one worker, whichever claims the turn, reads each live
segmentation's drift status (app.versions.drift) and queues `drift.changed` when it moved between
stable, moderate and significant since the last check.

The turn is a row of service_state whose `updated_at` is when it was last taken: a worker takes it
with an UPDATE that succeeds only once that is an interval old, so across any number of workers the
check runs once per interval. Each segmentation's last status is a row beside it
(`drift_status:<id>` = `<version> <status>`); a newly active version starts from its first status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError

from app.core.database import Database
from app.core.errors import Conflict, NotFound
from app.core.events import EventSink
from app.core.tables import ServiceState, utcnow
from app.versions import drift
from app.versions.lease import HOST_ID, rows_updated

if TYPE_CHECKING:
    from app.versions.drift import DriftCounter
    from app.versions.store import ModelStore

logger = logging.getLogger("app.drift")

TURN_KEY = "drift_check"
STATUS_KEY = "drift_status"
STATUSES = ("stable", "moderate", "significant")


class DriftWatch:
    def __init__(
        self,
        *,
        database: Database,
        counter: DriftCounter,
        stores: Callable[[], list[ModelStore]],
        events: EventSink,
        interval_seconds: float,
        on_move: Callable[[ModelStore, str, str], Awaitable[None]] | None = None,
    ) -> None:
        self.on_move = on_move
        """Told (after the commit) when a status moved: the retraining policies' drift trigger."""
        self.database = database
        self.counter = counter
        self.stores = stores
        self.events = events
        self.interval = interval_seconds
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="drift-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(max(0.2, self.interval / 2))
            try:
                if await self._take_turn():
                    await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # a database hiccup: the next turn tries again
                logger.warning("drift check failed", exc_info=True)

    async def _take_turn(self) -> bool:
        now = utcnow()
        due = now - timedelta(seconds=self.interval)
        async with self.database.sessionmaker() as session:
            taken = await rows_updated(
                session,
                update(ServiceState)
                .where(ServiceState.key == TURN_KEY, or_(ServiceState.updated_at <= due, ServiceState.value.is_(None)))
                .values(value=HOST_ID, updated_at=now),
            )
            if taken:
                await session.commit()
                return True
            await session.rollback()
            exists = (
                await session.execute(select(ServiceState.key).where(ServiceState.key == TURN_KEY))
            ).scalar_one_or_none()
        if exists is not None:
            return False
        async with self.database.sessionmaker() as session:  # the very first turn
            session.add(ServiceState(key=TURN_KEY, value=HOST_ID, updated_at=now))
            try:
                await session.commit()
                return True
            except IntegrityError:
                return False

    async def check(self) -> None:
        """Each live segmentation's status now, against the last one seen; drift.changed where it moved."""
        for store in self.stores():
            if store.current is None:
                continue
            try:
                report = await drift.report(self.counter, store)
                if report["status"] in STATUSES:
                    await self._compare(store, report["model_version"], report["status"], report["features"])
            except (Conflict, NotFound):
                continue  # no bins, or deleted meanwhile
            except Exception:  # one segmentation's failure must not hold up the others
                logger.warning("drift check of %s failed", store.segmentation.name, exc_info=True)

    async def _compare(self, store: ModelStore, version: str, status: str, features: list) -> None:
        info = store.segmentation
        key = f"{STATUS_KEY}:{info.id}"
        seen = f"{version} {status}"
        async with self.database.sessionmaker() as session:
            held = await rows_updated(
                session, update(ServiceState).where(ServiceState.key == key).values(updated_at=utcnow())
            )
            before = (
                await session.execute(select(ServiceState.value).where(ServiceState.key == key))
            ).scalar_one_or_none()
            if before == seen:
                await session.rollback()
                return
            if held:
                await session.execute(update(ServiceState).where(ServiceState.key == key).values(value=seen))
            else:
                session.add(ServiceState(key=key, value=seen))
            last_version, _, last_status = (before or "").partition(" ")
            if last_version == version and last_status in STATUSES:
                data = {
                    "segmentation": info.name,
                    "model_version": version,
                    "from": last_status,
                    "to": status,
                    "features": features,
                }
                await self.events.add(session, "drift.changed", data, segmentation_id=info.id)
                logger.info("drift of %s moved from %s to %s", info.name, last_status, status)
            await session.commit()
        if last_version == version and last_status in STATUSES and last_status != status and self.on_move is not None:
            await self.on_move(store, last_status, status)
