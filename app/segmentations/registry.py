"""Named segmentations: a line of model versions per name, each over its own feature schema.

The `segmentations` table is the truth; every worker keeps a `ModelStore` per live segmentation
and follows the table (created, edited, deleted elsewhere) and every segmentation's active
version, reading them all in two statements per `model_sync_seconds`. `default` (id 1, kind
`customer`) always exists: its store is the one the seed's routes use.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from app.core.config import Settings
from app.core.database import Database
from app.core.errors import Conflict, NotFound
from app.core.tables import (
    DEFAULT_SEGMENTATION,
    DEFAULT_SEGMENTATION_ID,
    ModelVersion,
    Segmentation,
    ServiceState,
    utcnow,
)
from app.customers.repository import delete_base, has_running_run
from app.policies.repository import delete_policy
from app.segmentations.kinds.registry import DEFAULT_KIND, KINDS, get_kind
from app.versions.store import ACTIVE_KEY, NAMES_KEY, TRAINING_KEY, ModelStore, SegmentationInfo
from app.webhooks.outbox import delete_pending_messages

if TYPE_CHECKING:
    from app.core.metrics import Metrics

logger = logging.getLogger("app.segmentations")

NAME_RULE = re.compile(r"[a-z0-9_-]{2,40}")
DEFAULT_DESCRIPTION = "The seed's customer features: age, annual income, spending score, purchase frequency"


class SegmentationRegistry:
    def __init__(
        self, *, settings: Settings, database: Database, default: ModelStore, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.database = database
        self.metrics = metrics
        self.default = default
        self._stores: dict[str, ModelStore] = {DEFAULT_SEGMENTATION: default}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self, *, follow: bool = True) -> None:
        await self._ensure_default()
        await self.refresh()
        if follow:
            self._task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    async def _ensure_default(self) -> None:
        """A database made by `create_all` has no `default` row yet: add it (once, whoever is first)."""
        async with self.database.sessionmaker() as session:
            if await session.get(Segmentation, DEFAULT_SEGMENTATION_ID) is not None:
                return
        async with self.database.sessionmaker() as session:
            session.add(
                Segmentation(
                    id=DEFAULT_SEGMENTATION_ID,
                    name=DEFAULT_SEGMENTATION,
                    kind=DEFAULT_KIND,
                    description=DEFAULT_DESCRIPTION,
                    feature_schema=KINDS[DEFAULT_KIND].declare(features=None, id_column=None, columns=None),
                )
            )
            try:
                await session.commit()
            except IntegrityError:
                await session.rollback()

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.settings.model_sync_seconds)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # a database hiccup must not end the follower
                logger.warning("could not follow the segmentations", exc_info=True)

    async def refresh(self) -> None:
        """Bring this worker's stores in line with the table, and each one to its active version."""
        # The table is read under the lock that `create` takes to add its store: a snapshot read
        # before a segmentation was created here can then never drop that segmentation's store.
        async with self._lock:
            read_at = time.monotonic()
            async with self.database.sessionmaker() as session:
                rows = (
                    (await session.execute(select(Segmentation).where(Segmentation.deleted_at.is_(None))))
                    .scalars()
                    .all()
                )
                actives = dict(
                    (
                        await session.execute(
                            select(ServiceState.key, ServiceState.value).where(
                                or_(ServiceState.key.like(f"{ACTIVE_KEY}:%"), ServiceState.key.like(f"{NAMES_KEY}:%"))
                            )
                        )
                    ).all()
                )
            live = {row.name: SegmentationInfo.from_row(row) for row in rows}
            for name in list(self._stores):
                if name != DEFAULT_SEGMENTATION and (
                    name not in live or live[name].id != self._stores[name].segmentation.id
                ):
                    del self._stores[name]
            for name, info in live.items():
                store = self._stores.get(name)
                if name == DEFAULT_SEGMENTATION:
                    if store is not None and store.segmentation != info:
                        store.segmentation = info
                    continue
                if store is None:
                    self._stores[name] = store = self._store(info)
                elif store.segmentation != info:
                    store.segmentation = info  # its description changed
        for store in list(self._stores.values()):
            if store is self.default:
                continue  # it follows the database itself
            try:
                await store.sync(
                    active=actives.get(store.active_key), names=actives.get(store.names_key), read_at=read_at
                )
            except Exception:  # one broken version must not hold up the others
                logger.warning("could not load the active version of %s", store.segmentation.name, exc_info=True)

    def _store(self, info: SegmentationInfo) -> ModelStore:
        return ModelStore(
            settings=self.settings,
            database=self.database,
            metrics=self.metrics,
            segmentation=info,
            events=self.default.events,
        )

    # --- reading ---------------------------------------------------------------------------

    def stores(self) -> list[ModelStore]:
        """Every live segmentation's store, `default` first, then by name."""
        return sorted(self._stores.values(), key=lambda s: (not s.segmentation.is_default, s.segmentation.name))

    async def get(self, name: str) -> ModelStore:
        """The segmentation named `name`; one created by another worker a moment ago is found too."""
        store = self._stores.get(name)
        if store is None and NAME_RULE.fullmatch(name):
            await self.refresh()
            store = self._stores.get(name)
        if store is None:
            raise NotFound("segmentation")
        return store

    # --- writing ---------------------------------------------------------------------------

    async def create(
        self,
        *,
        name: str,
        kind: str,
        description: str | None,
        features: list[dict[str, Any]] | None,
        id_column: str | None,
        created_by: str | None,
        columns: dict[str, Any] | None = None,
    ) -> ModelStore:
        declared = get_kind(kind).declare(features=features, id_column=id_column, columns=columns)
        async with self.database.sessionmaker() as session:
            live = (
                await session.execute(
                    select(func.count()).select_from(Segmentation).where(Segmentation.deleted_at.is_(None))
                )
            ).scalar_one()
            if live >= self.settings.max_segmentations:
                raise Conflict(
                    f"At most {self.settings.max_segmentations} segmentations may exist (MAX_SEGMENTATIONS): "
                    "delete one first"
                )
            row = Segmentation(
                name=name, kind=kind, description=description, feature_schema=declared, created_by=created_by
            )
            session.add(row)
            try:
                await session.commit()
            except IntegrityError:
                await session.rollback()
                raise Conflict(f"A segmentation named {name} already exists") from None
            info = SegmentationInfo.from_row(row)
        async with self._lock:
            store = self._stores.get(name)
            if store is None or store.segmentation.id != info.id:
                store = self._stores[name] = self._store(info)
        logger.info("created segmentation %s (kind %s) by %s", name, kind, created_by)
        return store

    async def describe(self, name: str, description: str | None) -> ModelStore:
        store = await self.get(name)
        async with self.database.sessionmaker() as session:
            await session.execute(
                update(Segmentation).where(Segmentation.id == store.segmentation.id).values(description=description)
            )
            await session.commit()
        store.segmentation = replace(store.segmentation, description=description)
        return store

    async def delete(self, name: str) -> None:
        """Delete a segmentation with all its versions; its history rows stay, tied to it."""
        store = await self.get(name)
        info = store.segmentation
        if info.is_default:
            raise Conflict("The default segmentation cannot be deleted")
        if store.training:
            raise Conflict("A training of this segmentation is running; delete it when it has finished")
        async with self.database.sessionmaker() as session:
            if await has_running_run(session, info.id):
                raise Conflict("A run of this segmentation is running; delete it when it has finished")
            await delete_base(session, info.id)
            await session.execute(
                update(Segmentation)
                .where(Segmentation.id == info.id, Segmentation.deleted_at.is_(None))
                .values(deleted_at=utcnow())
            )
            await session.execute(delete(ModelVersion).where(ModelVersion.segmentation_id == info.id))
            await session.execute(
                delete(ServiceState).where(
                    ServiceState.key.in_([f"{ACTIVE_KEY}:{info.id}", f"{TRAINING_KEY}:{info.id}", store.names_key])
                )
            )
            await delete_pending_messages(session, segmentation_id=info.id)
            await delete_policy(session, info.id)
            await session.commit()
        async with self._lock:
            if self._stores.get(name) is store:
                del self._stores[name]
        logger.info("deleted segmentation %s", name)
