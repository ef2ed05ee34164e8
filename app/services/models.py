"""The served model: versions in the database, the local copy in models/, training and switching.

Every worker process keeps one `ServedModel` in memory and swaps it whole, so a request
that took `store.current` once sees one version from start to end. The database says which
version is active; a background task in each process follows it.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from app.config import Settings
from app.database import Database, ModelVersion, ServiceState, utcnow
from app.errors import Conflict, NotFound
from app.model import ModelLoadError, SegmentationModel
from app.preprocess import features_matrix

logger = logging.getLogger("app.models")

ACTIVE_KEY = "active_model_version"
TRAINING_KEY = "training_lease"
LEASE_HEARTBEAT_SECONDS = 5
LEASE_STALE_SECONDS = 30
NO_MODEL_MESSAGE = "No trained model yet: train one first with POST /train"


class ServedModel:
    """One loaded model version with what is derived from it once (charts, summaries)."""

    def __init__(self, model: SegmentationModel) -> None:
        self.model = model
        self.version: str = model.version
        self.metadata: dict[str, Any] = model.metadata
        self.segments: list[dict[str, Any]] = model.metadata["segments"]
        self.names: tuple[str, ...] = model.cluster_names
        self._charts: dict[str, str] | None = None
        self._charts_lock = asyncio.Lock()

    def predict_matrix(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.model.predict(features)

    def assign(self, records: Sequence[Any]) -> list[tuple[int, str, float]]:
        """(cluster, cluster_name, confidence) for objects or dicts carrying the features."""
        if len(records) == 1:
            return [self.model.predict_one(records[0])]
        labels, confidence = self.model.predict(features_matrix(records))
        return [(int(c), self.names[int(c)], float(p)) for c, p in zip(labels, confidence)]

    async def charts(self) -> dict[str, str]:
        async with self._charts_lock:
            if self._charts is None:
                from app.charts import render_cluster_charts

                pngs = await run_in_threadpool(render_cluster_charts, self.model)
                self._charts = {name: data_uri(png) for name, png in pngs.items()}
        return self._charts


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def new_version_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


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


class ModelStore:
    def __init__(self, *, settings: Settings, database: Database) -> None:
        self.settings = settings
        self.database = database
        self.current: ServedModel | None = None
        self._train_lock = asyncio.Lock()
        self._switch_lock = asyncio.Lock()
        self._sync_task: asyncio.Task | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self, *, follow: bool = True) -> None:
        local = await self._load_local()
        active = await self._active_version()
        if active is not None and (local is None or local.version != active):
            try:
                await self._switch_to(active, write_local=True)
            except (ModelLoadError, NotFound):
                logger.exception("active model version %s could not be loaded", active)
                self.current = ServedModel(local) if local is not None else None
        elif local is not None:
            self.current = ServedModel(local)
            if active is None:
                await self._register_local(local)
        if self.current is None:
            logger.warning("no model loaded: %s", NO_MODEL_MESSAGE)
        else:
            logger.info("serving model version %s", self.current.version)
        if follow:
            self._sync_task = asyncio.create_task(self._follow_database())

    async def stop(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            try:
                await self._sync_task
            except (asyncio.CancelledError, Exception):
                pass

    async def _load_local(self) -> SegmentationModel | None:
        try:
            return await run_in_threadpool(SegmentationModel.load, self.settings.model_dir)
        except ModelLoadError as exc:
            logger.warning("model files in %s not loaded: %s", self.settings.model_dir, exc)
            return None

    async def _register_local(self, model: SegmentationModel) -> None:
        """Model files trained before this database existed become its first version."""
        if not model.version:
            model.version = new_version_id()
        try:
            await self._record_version(model, created_by=None, activate=True)
        except Conflict:
            pass

    async def _follow_database(self) -> None:
        while True:
            await asyncio.sleep(self.settings.model_sync_seconds)
            try:
                active = await self._active_version()
                if active is not None and (self.current is None or self.current.version != active):
                    await self._switch_to(active, write_local=True)
            except asyncio.CancelledError:
                raise
            except Exception:  # a database hiccup must not end the follower
                logger.warning("could not check the active model version", exc_info=True)

    # --- reading ---------------------------------------------------------------------------

    def require(self) -> ServedModel:
        model = self.current
        if model is None:
            raise Conflict(NO_MODEL_MESSAGE)
        return model

    async def _active_version(self) -> str | None:
        async with self.database.sessionmaker() as session:
            state = await session.get(ServiceState, ACTIVE_KEY)
            return state.value if state is not None else None

    async def list_versions(self) -> tuple[list[dict[str, Any]], str | None]:
        active = await self._active_version()
        async with self.database.sessionmaker() as session:
            rows = (await session.execute(
                select(ModelVersion).order_by(ModelVersion.created_at.desc(), ModelVersion.version.desc())
            )).scalars().all()
        return [version_summary(row, active) for row in rows], active

    async def get_version(self, version: str) -> dict[str, Any]:
        active = await self._active_version()
        async with self.database.sessionmaker() as session:
            row = await session.get(ModelVersion, version)
        if row is None:
            raise NotFound("model version")
        details = row.details or {}
        return {
            **version_summary(row, active),
            "clusters": details.get("segments", []),
            "k_selection": details.get("k_selection"),
            "features": details.get("features", []),
            "trained_at": details.get("trained_at"),
            "library_versions": details.get("library_versions", {}),
        }

    # --- switching -------------------------------------------------------------------------

    async def _switch_to(self, version: str, *, write_local: bool) -> ServedModel:
        async with self._switch_lock:
            if self.current is not None and self.current.version == version:
                return self.current
            async with self.database.sessionmaker() as session:
                row = await session.get(ModelVersion, version)
            if row is None:
                raise NotFound("model version")
            model = await run_in_threadpool(SegmentationModel.from_bytes, row.artifact)
            model.version = version
            if write_local:
                await self._write_local(model)
            served = ServedModel(model)
            self.current = served
            logger.info("switched to model version %s", version)
            return served

    async def _write_local(self, model: SegmentationModel) -> None:
        try:
            await run_in_threadpool(model.save, self.settings.model_dir)
        except OSError:
            logger.warning("could not write the local model copy to %s", self.settings.model_dir, exc_info=True)

    async def activate(self, version: str) -> ServedModel:
        async with self.database.sessionmaker() as session:
            if await session.get(ModelVersion, version) is None:
                raise NotFound("model version")
            await self._set_active(session, version)
            await session.commit()
        return await self._switch_to(version, write_local=True)

    @staticmethod
    async def _set_active(session, version: str) -> None:
        state = await session.get(ServiceState, ACTIVE_KEY, with_for_update=True)
        if state is None:
            session.add(ServiceState(key=ACTIVE_KEY, value=version))
        else:
            state.value = version
            state.updated_at = utcnow()

    async def _record_version(self, model: SegmentationModel, *, created_by: str | None, activate: bool) -> None:
        blob = await run_in_threadpool(model.to_bytes)
        meta = model.metadata
        async with self.database.sessionmaker() as session:
            session.add(ModelVersion(
                version=model.version,
                created_by=created_by,
                n_clusters=int(meta["n_clusters"]),
                silhouette_score=meta.get("silhouette_score"),
                inertia=float(meta["inertia"]),
                n_samples=int(meta["n_samples"]),
                data_fingerprint=meta.get("data_fingerprint"),
                details={k: v for k, v in meta.items() if k != "elbow"},
                artifact=blob,
            ))
            if activate:
                await self._set_active(session, model.version)
            try:
                await session.commit()
            except IntegrityError:
                await session.rollback()
                raise Conflict("That model version already exists") from None

    # --- training --------------------------------------------------------------------------

    async def train(
        self, features: np.ndarray, *, n_clusters: int | None, random_state: int, created_by: str | None
    ) -> ServedModel:
        """Fit a new version, record it, make it active here and everywhere. One at a time."""
        if self._train_lock.locked():
            raise Conflict("A training is already running; try again when it has finished")
        async with self._train_lock:
            lease = await self._acquire_lease()
            heartbeat = asyncio.create_task(self._keep_lease(lease))
            try:
                started = time.perf_counter()
                model = await asyncio.wait_for(
                    run_in_threadpool(SegmentationModel.train, features, n_clusters=n_clusters,
                                      random_state=random_state),
                    timeout=self.settings.train_timeout_seconds,
                )
                model.version = new_version_id()
                model.metadata["version"] = model.version
                model.metadata.setdefault("duration_seconds", round(time.perf_counter() - started, 3))
                await self._record_version(model, created_by=created_by, activate=True)
                await self._write_local(model)
                served = ServedModel(model)
                async with self._switch_lock:
                    self.current = served
                logger.info("trained model version %s (k=%s, n=%s) by %s", model.version,
                            model.metadata["n_clusters"], model.metadata["n_samples"], created_by)
                return served
            finally:
                heartbeat.cancel()
                await self._release_lease(lease)

    async def _acquire_lease(self) -> str:
        token = secrets.token_hex(8)
        stale = utcnow() - timedelta(seconds=LEASE_STALE_SECONDS)
        async with self.database.sessionmaker() as session:
            result = await session.execute(
                update(ServiceState)
                .where(ServiceState.key == TRAINING_KEY,
                       or_(ServiceState.value.is_(None), ServiceState.updated_at < stale))
                .values(value=token, updated_at=utcnow())
            )
            if result.rowcount == 1:
                await session.commit()
                return token
            if await session.get(ServiceState, TRAINING_KEY) is None:
                session.add(ServiceState(key=TRAINING_KEY, value=token))
                try:
                    await session.commit()
                    return token
                except IntegrityError:
                    await session.rollback()
        raise Conflict("A training is already running; try again when it has finished")

    async def _keep_lease(self, token: str) -> None:
        while True:
            await asyncio.sleep(LEASE_HEARTBEAT_SECONDS)
            try:
                async with self.database.sessionmaker() as session:
                    await session.execute(update(ServiceState)
                                          .where(ServiceState.key == TRAINING_KEY, ServiceState.value == token)
                                          .values(updated_at=utcnow()))
                    await session.commit()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("could not renew the training lease", exc_info=True)

    async def _release_lease(self, token: str) -> None:
        async with self.database.sessionmaker() as session:
            await session.execute(update(ServiceState)
                                  .where(ServiceState.key == TRAINING_KEY, ServiceState.value == token)
                                  .values(value=None, updated_at=utcnow()))
            await session.commit()
