"""The model versions of one segmentation: in the database, served in memory, trained and switched.

Every worker process keeps one `ServedModel` per segmentation in memory and swaps it whole, so a
request that took `store.current` once sees one version from start to end. The database is the
truth: it holds every version's artifacts and says which one is active, and each process
converges on that (at startup, after its own train or activate, and from a background task that
checks once per `model_sync_seconds`). For `default`, `models/` holds a local copy of the active
version (app.services.local_copy). Fitting runs in a child process (app.services.training),
one at a time per segmentation across every worker (app.services.lease).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import defer
from starlette.concurrency import run_in_threadpool

from app.config import Settings
from app.database import (
    DEFAULT_SEGMENTATION,
    DEFAULT_SEGMENTATION_ID,
    DEFAULT_SEGMENTATION_KIND,
    Database,
    ModelVersion,
    Segmentation,
    ServiceState,
    utcnow,
)
from app.errors import Conflict, NotFound
from app.ml.matching import identify, identity_fields, renamed_since
from app.model import ModelLoadError, SegmentationModel
from app.services import progress
from app.services.lease import HOST_ID, TRAINING_RUNNING_MESSAGE, TrainingLease, rows_updated
from app.services.local_copy import load_local_copy, save_local_copy
from app.services.served import ServedModel, data_uri
from app.services.training import TrainingTimeout, fit_in_subprocess

if TYPE_CHECKING:
    from app.observability import Metrics

logger = logging.getLogger("app.models")

ACTIVE_KEY = "active_model_version"
NAMES_KEY = "segment_names"
"""`segment_names:{segmentation id}` holds `{version}:{names_revision}` of the last rename, so every
worker sees an analyst's rename of the version it serves (app.services.identity)."""
TRAINING_KEY = "training_lease"
RETRY_UNLOADABLE_SECONDS = 30
NO_MODEL_MESSAGE = "No trained model yet: train one first with POST /train"
_UNSET: Any = object()


@dataclass(frozen=True)
class SegmentationInfo:
    """What a worker knows of a segmentation besides its versions (a row of `segmentations`)."""

    id: int
    name: str
    kind: str
    feature_schema: dict[str, Any] = field(default_factory=dict)
    description: str | None = None
    created_by: str | None = None
    created_at: datetime | None = None

    @property
    def is_default(self) -> bool:
        return self.id == DEFAULT_SEGMENTATION_ID

    @classmethod
    def from_row(cls, row: Segmentation) -> SegmentationInfo:
        return cls(
            id=row.id,
            name=row.name,
            kind=row.kind,
            feature_schema=dict(row.feature_schema or {}),
            description=row.description,
            created_by=row.created_by,
            created_at=row.created_at,
        )


DEFAULT_INFO = SegmentationInfo(id=DEFAULT_SEGMENTATION_ID, name=DEFAULT_SEGMENTATION, kind=DEFAULT_SEGMENTATION_KIND)


@dataclass
class TrainingReservation:
    """A segmentation's training turn: its in-process lock taken, its lease held and kept alive."""

    key: str
    lease: str
    heartbeat: asyncio.Task


def new_version_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


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
    """One segmentation's versions: list, load, activate, delete, train; and the one it serves."""

    def __init__(
        self,
        *,
        settings: Settings,
        database: Database,
        metrics: Metrics | None = None,
        segmentation: SegmentationInfo = DEFAULT_INFO,
    ) -> None:
        self.settings = settings
        self.database = database
        self.metrics = metrics
        self.segmentation = segmentation
        default = segmentation.is_default
        self.active_key = ACTIVE_KEY if default else f"{ACTIVE_KEY}:{segmentation.id}"
        self.names_key = f"{NAMES_KEY}:{segmentation.id}"
        self.lease = TrainingLease(database, TRAINING_KEY if default else f"{TRAINING_KEY}:{segmentation.id}")
        self.no_model_message = (
            NO_MODEL_MESSAGE
            if default
            else f"No trained model yet in segmentation {segmentation.name}: train one first with "
            f"POST /segmentations/{segmentation.name}/train"
        )
        self.current: ServedModel | None = None
        # How this segmentation's `customer` body is checked, made on first use (its schema never changes).
        self.body_adapter: TypeAdapter[Any] | None = None
        self._train_lock = asyncio.Lock()
        self._switch_lock = asyncio.Lock()
        self._switched_at = float("-inf")  # time.monotonic() of the last switch made here
        self._sync_task: asyncio.Task | None = None
        self._unloadable: dict[str, float] = {}  # version -> when loading it last failed

    @property
    def model_dir(self) -> Path:
        return Path(self.settings.model_dir)

    @property
    def training(self) -> bool:
        return self._train_lock.locked()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self, *, follow: bool = True) -> None:
        local = await self._load_local() if self.segmentation.is_default else None
        if local is not None and await self._active_version() is None:
            await self._adopt_local(local)
        try:
            await self.sync(candidate=local)
        except (ModelLoadError, NotFound):
            logger.exception("the active model version of %s could not be loaded", self.segmentation.name)
        if self.current is None and local is not None:
            # The database names no loadable version: serve the local copy rather than nothing.
            self.current = ServedModel(local)
        if self.current is None:
            if self.segmentation.is_default:
                logger.warning("no model loaded: %s", self.no_model_message)
        else:
            logger.info("serving model version %s of %s", self.current.version, self.segmentation.name)
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
            return await run_in_threadpool(load_local_copy, self.model_dir)
        except (ModelLoadError, OSError) as exc:
            logger.warning("model files in %s not loaded: %s", self.model_dir, exc)
            return None

    async def _adopt_local(self, model: SegmentationModel) -> None:
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
                    session.add(self._version_row(model, blob, created_by=None))
                claimed = await rows_updated(
                    session,
                    update(ServiceState)
                    .where(ServiceState.key == self.active_key, ServiceState.value.is_(None))
                    .values(value=model.version, updated_at=utcnow()),
                )
                if claimed == 0:
                    session.add(ServiceState(key=self.active_key, value=model.version))
                await session.commit()
                logger.info("recorded the model files in %s as version %s", self.model_dir, model.version)
            except IntegrityError:  # another worker recorded them, or set an active version, first
                await session.rollback()

    async def _follow_database(self) -> None:
        while True:
            await asyncio.sleep(self.settings.model_sync_seconds)
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:  # a database hiccup or a broken version must not end the follower
                logger.warning("could not follow the active model version", exc_info=True)

    # --- reading ---------------------------------------------------------------------------

    def require(self) -> ServedModel:
        model = self.current
        if model is None:
            raise Conflict(self.no_model_message)
        return model

    async def _active_version(self) -> str | None:
        async with self.database.sessionmaker() as session:
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

    async def version_model(self, version: str) -> SegmentationModel:
        """The model of one of this segmentation's versions: the served one, else loaded (unknown: 404)."""
        current = self.current
        if current is not None and current.version == version:
            return current.model
        try:
            return await self._load_version(version)
        except ModelLoadError as exc:
            raise Conflict(f"Model version {version} cannot be loaded: {exc}") from None

    async def list_versions(self) -> tuple[list[dict[str, Any]], str | None]:
        versions, active, _ = await self.page_versions()
        return versions, active

    async def page_versions(
        self, *, skip: int = 0, limit: int | None = None
    ) -> tuple[list[dict[str, Any]], str | None, int]:
        """This segmentation's versions newest first (a page of them), the active one and how many there are."""
        mine = ModelVersion.segmentation_id == self.segmentation.id
        query = (
            select(ModelVersion)
            .options(defer(ModelVersion.artifact), defer(ModelVersion.details))
            .where(mine)
            .order_by(ModelVersion.created_at.desc(), ModelVersion.version.desc())
            .offset(skip)
            .limit(limit)
        )
        async with self.database.sessionmaker() as session:
            active = (
                await session.execute(select(ServiceState.value).where(ServiceState.key == self.active_key))
            ).scalar_one_or_none()
            rows = (await session.execute(query)).scalars().all()
            total = (await session.execute(select(func.count()).select_from(ModelVersion).where(mine))).scalar_one()
        return [version_summary(row, active) for row in rows], active, int(total)

    async def get_version(self, version: str) -> dict[str, Any]:
        async with self.database.sessionmaker() as session:
            active = (
                await session.execute(select(ServiceState.value).where(ServiceState.key == self.active_key))
            ).scalar_one_or_none()
            row = await session.get(ModelVersion, version, options=[defer(ModelVersion.artifact)])
        if row is None or row.segmentation_id != self.segmentation.id:
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
            **identity_fields(details),
        }

    async def _load_version(self, version: str) -> SegmentationModel:
        async with self.database.sessionmaker() as session:
            blob = (
                await session.execute(
                    select(ModelVersion.artifact).where(
                        ModelVersion.version == version, ModelVersion.segmentation_id == self.segmentation.id
                    )
                )
            ).scalar_one_or_none()
        if blob is None:
            raise NotFound("model version")
        model = await run_in_threadpool(SegmentationModel.from_bytes, blob)
        model.version = version
        return model

    # --- switching -------------------------------------------------------------------------

    async def sync(
        self,
        *,
        candidate: SegmentationModel | None = None,
        active: Any = _UNSET,
        names: Any = None,
        read_at: float | None = None,
    ) -> ServedModel | None:
        """Serve the version the database says is active; `candidate` is used when it is that version.

        Reading the active version and swapping happen under one lock, so a slower switch can
        never put back a version the database has already moved on from. `active`, when given,
        is the active version as the caller read it at `read_at` (time.monotonic(); the registry
        reads every segmentation's in one statement), `names` the rename marker beside it: a
        version renamed since it was loaded is loaded again. A reading older than this store's
        last switch is read again rather than trusted.
        """
        async with self._switch_lock:
            stale = read_at is not None and read_at <= self._switched_at
            if active is _UNSET or candidate is not None or stale:
                active, names = await self.active_state()
            if active is None:
                return self.current
            if self.current is not None and self.current.version == active and not renamed_since(self.current, names):
                return self.current
            if candidate is not None and candidate.version == active and not renamed_since(candidate, names):
                model = candidate
            else:
                failed_at = self._unloadable.get(active)
                if failed_at is not None and time.monotonic() - failed_at < RETRY_UNLOADABLE_SECONDS:
                    return self.current
                try:
                    model = await self._load_version(active)
                except (ModelLoadError, NotFound):
                    self._unloadable[active] = time.monotonic()
                    raise
            self._unloadable.pop(active, None)
            await self._write_local(model)
            served = ServedModel(model)
            self.current = served
            self._switched_at = time.monotonic()
            logger.info("now serving model version %s of %s", active, self.segmentation.name)
            return served

    async def _write_local(self, model: SegmentationModel) -> None:
        if not self.segmentation.is_default:
            return  # only `default` keeps files in models/
        try:
            await run_in_threadpool(save_local_copy, model, self.model_dir)
        except OSError:
            logger.warning("could not write the local model copy to %s", self.model_dir, exc_info=True)

    async def activate(self, version: str) -> ServedModel:
        """Make `version` the active one everywhere, after checking that it loads."""
        try:
            model = await self._load_version(version)
        except ModelLoadError as exc:
            raise Conflict(f"Model version {version} cannot be loaded: {exc}") from None
        async with self.database.sessionmaker() as session:
            await self._set_active(session, version)
            await session.commit()
        served = await self.sync(candidate=model)
        logger.info("activated model version %s of %s", version, self.segmentation.name)
        return served if served is not None else ServedModel(model)

    async def delete_version(self, version: str) -> None:
        """Delete a version that is not the active one (the active one is a 409)."""
        async with self.database.sessionmaker() as session:
            active = (
                await session.execute(select(ServiceState.value).where(ServiceState.key == self.active_key))
            ).scalar_one_or_none()
            if version == active:
                raise Conflict(f"Model version {version} is the active one: activate another version first")
            gone = await session.execute(
                delete(ModelVersion).where(
                    ModelVersion.version == version, ModelVersion.segmentation_id == self.segmentation.id
                )
            )
            if not getattr(gone, "rowcount", 0):
                raise NotFound("model version")
            await session.commit()
        logger.info("deleted model version %s of %s", version, self.segmentation.name)

    async def _set_active(self, session, version: str) -> None:
        """Point the active version at `version` with writes only (no read to upgrade from)."""
        updated = await rows_updated(
            session,
            update(ServiceState).where(ServiceState.key == self.active_key).values(value=version, updated_at=utcnow()),
        )
        if updated == 0:
            session.add(ServiceState(key=self.active_key, value=version))

    def _version_row(self, model: SegmentationModel, blob: bytes, *, created_by: str | None) -> ModelVersion:
        meta = model.metadata
        return ModelVersion(
            version=model.version,
            segmentation_id=self.segmentation.id,
            created_by=created_by,
            n_clusters=int(meta["n_clusters"]),
            silhouette_score=meta.get("silhouette_score"),
            inertia=float(meta["inertia"]),
            n_samples=int(meta["n_samples"]),
            data_fingerprint=meta.get("data_fingerprint"),
            details={k: v for k, v in meta.items() if k != "elbow"},
            artifact=blob,
        )

    async def _record_version(self, model: SegmentationModel, blob: bytes, *, created_by: str | None) -> None:
        """Insert the version and make it active in one transaction: both happen or neither."""
        async with self.database.sessionmaker() as session:
            try:
                session.add(self._version_row(model, blob, created_by=created_by))
                await self._set_active(session, model.version)
                if not self.segmentation.is_default:
                    deleted = (
                        await session.execute(
                            select(Segmentation.deleted_at).where(Segmentation.id == self.segmentation.id)
                        )
                    ).scalar_one_or_none()
                    if deleted is not None:
                        raise NotFound("segmentation")
                await session.commit()
            except IntegrityError:
                await session.rollback()
                raise Conflict("That model version already exists") from None

    # --- training --------------------------------------------------------------------------

    async def _matched_to_active(self, model: SegmentationModel, blob: bytes) -> tuple[SegmentationModel, bytes]:
        """The new model renumbered to keep the active version's ids, keys and names (app.ml.matching).

        The active version is read from the database, so a rename or an activation made by
        another worker a moment ago counts.
        """
        active, _ = await self.active_state()
        previous = None
        if active is not None:
            try:
                previous = await self._load_version(active)
            except (ModelLoadError, NotFound):
                logger.warning("active version %s not loadable: %s is trained unmatched", active, model.version)
        return await run_in_threadpool(identify, model, previous)

    async def reserve_training(self) -> TrainingReservation:
        """Take this segmentation's training turn (409 while another training runs here or elsewhere).

        Held until `release_training`; a job takes it before answering 202, so a second request
        for the same segmentation is told at once that a training is running.
        """
        if self._train_lock.locked():
            raise Conflict(TRAINING_RUNNING_MESSAGE)
        await self._train_lock.acquire()
        try:
            lease = await self.lease.acquire()
        except BaseException:
            self._train_lock.release()
            raise
        return TrainingReservation(self.lease.key, lease, asyncio.create_task(self.lease.keep(lease)))

    async def release_training(self, reservation: TrainingReservation) -> None:
        reservation.heartbeat.cancel()
        try:
            await self.lease.release(reservation.lease)
        finally:
            self._train_lock.release()

    async def train(
        self,
        data: Any,
        *,
        n_clusters: int | None,
        random_state: int,
        created_by: str | None,
        schema: dict[str, Any] | None = None,
    ) -> ServedModel:
        """Fit a new version, record it, make it active here and everywhere. One at a time.

        Nothing is written until the fit has succeeded, and then the version row and the
        active pointer go in one transaction, so a failed, timed-out or killed training
        leaves the previous model active. A job (app.services.progress) brings its own
        reservation and is told the phase.
        """
        async with self._training_turn():
            started = time.perf_counter()
            outcome = "failed"
            try:
                progress.phase("fitting")
                model, blob = await fit_in_subprocess(
                    data,
                    schema=schema,
                    n_clusters=n_clusters,
                    random_state=random_state,
                    version=new_version_id(),
                    time_limit=self.settings.train_timeout_seconds,
                )
                progress.phase("recording")
                model, blob = await self._matched_to_active(model, blob)
                model.metadata.setdefault("duration_seconds", round(time.perf_counter() - started, 3))
                await self._record_version(model, blob, created_by=created_by)
                served = await self.sync(candidate=model)
                logger.info(
                    "trained model version %s of %s (k=%s, n=%s) by %s",
                    model.version,
                    self.segmentation.name,
                    model.metadata["n_clusters"],
                    model.metadata["n_samples"],
                    created_by,
                )
                outcome = "success"
                if served is None or served.version != model.version:
                    served = ServedModel(model)  # activated elsewhere meanwhile; still report this one
                return served
            except TrainingTimeout:
                outcome = "timeout"
                raise
            finally:
                if self.metrics is not None:
                    self.metrics.training_finished(outcome, time.perf_counter() - started, self.segmentation.name)

    @asynccontextmanager
    async def _training_turn(self) -> AsyncIterator[TrainingReservation]:
        """The reservation of the job running this training (app.services.progress), else one of its own."""
        reserved = progress.reservation()
        if isinstance(reserved, TrainingReservation) and reserved.key == self.lease.key:
            yield reserved
            return
        reservation = await self.reserve_training()
        try:
            yield reservation
        finally:
            await self.release_training(reservation)

    async def adopt(self, model: SegmentationModel, *, created_by: str | None) -> ServedModel:
        """Record a model fitted elsewhere (by the Spark engine) as a new version, as `train` records its fit.

        It gets a new version id, is checked by a round trip through its blob like any stored
        version, matched to the active version (ids, keys, names), recorded and made active.
        """
        # The same turn as a training: one at a time per segmentation, across workers.
        async with self._training_turn():
            version = new_version_id()
            model.version = version
            blob = await run_in_threadpool(model.to_bytes)
            model = await run_in_threadpool(SegmentationModel.from_bytes, blob)
            model, blob = await self._matched_to_active(model, blob)
            await self._record_version(model, blob, created_by=created_by)
            served = await self.sync(candidate=model)
            logger.info(
                "recorded model version %s of %s (k=%s, n=%s, %s) by %s",
                version,
                self.segmentation.name,
                model.metadata["n_clusters"],
                model.metadata["n_samples"],
                model.metadata.get("algorithm"),
                created_by,
            )
            if served is None or served.version != model.version:
                served = ServedModel(model)
            return served


__all__ = [
    "ACTIVE_KEY",
    "NAMES_KEY",
    "DEFAULT_INFO",
    "HOST_ID",
    "NO_MODEL_MESSAGE",
    "TRAINING_KEY",
    "TRAINING_RUNNING_MESSAGE",
    "ModelStore",
    "SegmentationInfo",
    "ServedModel",
    "TrainingReservation",
    "TrainingTimeout",
    "data_uri",
    "new_version_id",
    "version_summary",
]
