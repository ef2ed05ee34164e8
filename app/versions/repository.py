"""The version registry of one segmentation: its rows in `model_versions` and its active pointer, in SQL.

The active version is a row of `service_state` (`active_model_version`, or `...:<segmentation id>`),
beside the marker of the last segment rename (`segment_names:<id>`), so one statement reads both.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import defer
from starlette.concurrency import run_in_threadpool

from app.core.database import Database
from app.core.errors import Conflict, NotFound
from app.core.events import EventSink
from app.core.tables import ModelVersion, Segmentation, ServiceState, utcnow
from app.customers.repository import references_version
from app.ml import SegmentationModel
from app.ml.matching import identity_fields
from app.versions.activation import Actor
from app.versions.lease import rows_updated

logger = logging.getLogger("app.models")

ACTIVE_KEY = "active_model_version"
NAMES_KEY = "segment_names"


def version_summary(row: ModelVersion, active_version: str | None) -> dict[str, Any]:
    return {
        "version": row.version,
        "created_at": row.created_at,
        "created_by": row.created_by,
        "n_clusters": row.n_clusters,
        "silhouette_score": row.silhouette_score,
        "inertia": row.inertia,
        "n_samples": row.n_samples,
        "data_fingerprint": row.data_fingerprint,
        "active": row.version == active_version,
    }


class VersionRepository:
    """The versions of the segmentation `segmentation_id` (`is_default`: the seed's `default`)."""

    def __init__(
        self,
        database: Database,
        *,
        segmentation_id: int,
        is_default: bool,
        name: str = "default",
        events: EventSink | None = None,
    ) -> None:
        self.database = database
        self.segmentation_id = segmentation_id
        self.is_default = is_default
        self.name = name
        self.events = events
        self.active_key = ACTIVE_KEY if is_default else f"{ACTIVE_KEY}:{segmentation_id}"
        self.names_key = f"{NAMES_KEY}:{segmentation_id}"

    # --- reading ---------------------------------------------------------------------------

    async def active_version(self) -> str | None:
        async with self.database.sessionmaker() as session:
            return await self._active(session)

    async def _active(self, session: AsyncSession) -> str | None:
        return (
            await session.execute(select(ServiceState.value).where(ServiceState.key == self.active_key))
        ).scalar_one_or_none()

    async def active_state(self) -> tuple[str | None, str | None]:
        """The active version and the last rename's `{version}:{names_revision}`, in one statement."""
        async with self.database.sessionmaker() as session:
            rows = dict(
                (
                    await session.execute(
                        select(ServiceState.key, ServiceState.value).where(
                            ServiceState.key.in_([self.active_key, self.names_key])
                        )
                    )
                ).all()
            )
        return rows.get(self.active_key), rows.get(self.names_key)

    async def page(self, *, skip: int = 0, limit: int | None = None) -> tuple[list[dict[str, Any]], str | None, int]:
        """The versions newest first (a page of them), the active one and how many there are."""
        mine = ModelVersion.segmentation_id == self.segmentation_id
        query = (
            select(ModelVersion)
            .options(defer(ModelVersion.artifact), defer(ModelVersion.details))
            .where(mine)
            .order_by(ModelVersion.created_at.desc(), ModelVersion.version.desc())
            .offset(skip)
            .limit(limit)
        )
        async with self.database.sessionmaker() as session:
            active = await self._active(session)
            rows = (await session.execute(query)).scalars().all()
            total = (await session.execute(select(func.count()).select_from(ModelVersion).where(mine))).scalar_one()
        return [version_summary(row, active) for row in rows], active, int(total)

    async def detail(self, version: str) -> dict[str, Any]:
        """One version as GET .../models/{version} shows it (unknown: 404)."""
        async with self.database.sessionmaker() as session:
            active = await self._active(session)
            row = await session.get(ModelVersion, version, options=[defer(ModelVersion.artifact)])
        if row is None or row.segmentation_id != self.segmentation_id:
            raise NotFound("model version")
        details = row.details or {}
        return {
            **version_summary(row, active),
            "clusters": details.get("segments", []),
            "k_selection": details.get("k_selection"),
            "features": details.get("features", []),
            "trained_at": details.get("trained_at"),
            "library_versions": details.get("library_versions", {}),
            "missing_shares": details.get("missing_shares", {}),
            "algorithm": details.get("algorithm"),
            "out_of_core": details.get("out_of_core"),
            "value_model": details.get("value_model"),
            "warnings": details.get("warnings", []),
            **identity_fields(details),
        }

    async def load(self, version: str) -> SegmentationModel:
        """A version's model, from its artifact (unknown: 404; unreadable: ModelLoadError)."""
        async with self.database.sessionmaker() as session:
            blob = (
                await session.execute(
                    select(ModelVersion.artifact).where(
                        ModelVersion.version == version, ModelVersion.segmentation_id == self.segmentation_id
                    )
                )
            ).scalar_one_or_none()
        if blob is None:
            raise NotFound("model version")
        model = await run_in_threadpool(SegmentationModel.from_bytes, blob)
        model.version = version
        return model

    # --- writing ---------------------------------------------------------------------------

    async def activate(self, version: str, *, by: Actor | None = None) -> None:
        async with self.database.sessionmaker() as session:
            previous = await self._set_active(session, version)
            await self._announce(session, version, previous, by)
            await session.commit()

    async def delete(self, version: str) -> None:
        """Delete a version that is not the active one (the active one is a 409)."""
        async with self.database.sessionmaker() as session:
            if version == await self._active(session):
                raise Conflict(f"Model version {version} is the active one: activate another version first")
            if await references_version(session, self.segmentation_id, version):
                raise Conflict(f"Model version {version} scored a customer run: the customer base references it")
            gone = await rows_updated(
                session,
                delete(ModelVersion).where(
                    ModelVersion.version == version, ModelVersion.segmentation_id == self.segmentation_id
                ),
            )
            if not gone:
                raise NotFound("model version")
            await session.commit()

    async def _set_active(self, session: AsyncSession, version: str) -> str | None:
        """Point the active version at `version`; the version active before (None: none was).

        The first statement writes (SQLite takes its write lock there and never upgrades a read;
        PostgreSQL locks the row), so the previous version read next cannot change before commit.
        """
        mine = ServiceState.key == self.active_key
        now = utcnow()
        held = await rows_updated(session, update(ServiceState).where(mine).values(updated_at=now))
        previous = (await session.execute(select(ServiceState.value).where(mine))).scalar_one_or_none()
        if held == 0:
            session.add(ServiceState(key=self.active_key, value=version))
        else:
            await session.execute(update(ServiceState).where(mine).values(value=version, updated_at=now))
        return previous

    async def _announce(self, session: AsyncSession, version: str, previous: str | None, by: Actor | None) -> None:
        """`model.activated`, queued in the activation's own transaction."""
        if self.events is None:
            return
        data = {
            "segmentation": self.name,
            "model_version": version,
            "previous_version": previous,
            "by": by.as_dict() if by is not None else None,
        }
        await self.events.add(session, "model.activated", data, segmentation_id=self.segmentation_id)

    def _row(self, model: SegmentationModel, blob: bytes, *, created_by: str | None) -> ModelVersion:
        meta = model.metadata_
        return ModelVersion(
            version=model.version,
            segmentation_id=self.segmentation_id,
            created_by=created_by,
            n_clusters=int(meta["n_clusters"]),
            silhouette_score=meta.get("silhouette_score"),
            inertia=float(meta["inertia"]),
            n_samples=int(meta["n_samples"]),
            data_fingerprint=meta.get("data_fingerprint"),
            details={k: v for k, v in meta.items() if k != "elbow"},
            artifact=blob,
        )

    async def record(
        self,
        model: SegmentationModel,
        blob: bytes,
        *,
        created_by: str | None,
        by: Actor | None = None,
        activate: bool = True,
    ) -> None:
        """Insert the version and make it active in one transaction: both happen or neither
        (`activate=False`: a candidate, inserted inactive)."""
        async with self.database.sessionmaker() as session:
            try:
                if activate:
                    previous = await self._set_active(session, model.version)
                session.add(self._row(model, blob, created_by=created_by))
                if activate:
                    await self._announce(session, model.version, previous, by)
                if not self.is_default:
                    deleted = (
                        await session.execute(
                            select(Segmentation.deleted_at).where(Segmentation.id == self.segmentation_id)
                        )
                    ).scalar_one_or_none()
                    if deleted is not None:
                        raise NotFound("segmentation")
                await session.commit()
            except IntegrityError:
                await session.rollback()
                raise Conflict("That model version already exists") from None

    async def adopt_first(self, model: SegmentationModel) -> None:
        """Model files trained before this database had versions become its first, active version.

        Several workers may start together on a fresh database: the version id comes from the
        files, so they all record the same version, and only the first sets it active.
        """
        blob = await run_in_threadpool(model.to_bytes)
        if not model.version:
            model.version = "local-" + hashlib.sha256(blob).hexdigest()[:12]
        async with self.database.sessionmaker() as session:
            known = await session.get(ModelVersion, model.version, options=[defer(ModelVersion.artifact)])
        # Writes only from here: SQLite takes its write lock at the first statement, never upgrades.
        async with self.database.sessionmaker() as session:
            try:
                if known is None:
                    session.add(self._row(model, blob, created_by=None))
                claimed = await rows_updated(
                    session,
                    update(ServiceState)
                    .where(ServiceState.key == self.active_key, ServiceState.value.is_(None))
                    .values(value=model.version, updated_at=utcnow()),
                )
                if claimed == 0:
                    session.add(ServiceState(key=self.active_key, value=model.version))
                await session.commit()
                logger.info("recorded local model files as version %s", model.version)
            except IntegrityError:  # another worker recorded them, or set an active version, first
                await session.rollback()
