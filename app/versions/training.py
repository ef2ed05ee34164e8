"""The training coordinator of one segmentation: one training at a time, across every worker.

A training takes the segmentation's turn (an in-process lock and the database lease of
app.versions.lease), fits in a child process (app.versions.fitting), matches the new centroids to
the active version's (app.ml.matching), records the version and its activation in one transaction
and switches the served version. Nothing is written until the fit has succeeded, so a failed,
timed-out or killed training leaves the previous version active.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from app.core.errors import Conflict, NotFound
from app.ml import ModelLoadError, SegmentationModel
from app.ml.matching import identify
from app.versions import progress
from app.versions.activation import acting, holding
from app.versions.fitting import TrainingTimeout, fit_in_subprocess
from app.versions.lease import TRAINING_RUNNING_MESSAGE, TrainingLease
from app.versions.repository import VersionRepository
from app.versions.served import ServedModel
from app.versions.serving import ServingCache

if TYPE_CHECKING:
    from app.core.config import Settings
    from app.core.metrics import Metrics

logger = logging.getLogger("app.models")

TRAINING_KEY = "training_lease"


def new_version_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


@dataclass(frozen=True)
class TrainingRequest:
    """What a training was asked for, with `wait=true` or as a job: the same values either way."""

    n_clusters: int | None
    random_state: int
    as_of: date | None
    by: str
    source: str | None = None
    """The data source to train on (app.sources), read when the training starts; None: the upload."""


@dataclass
class TrainingReservation:
    """A segmentation's training turn: its in-process lock taken, its lease held and kept alive."""

    key: str
    lease: str
    heartbeat: asyncio.Task


class TrainingCoordinator:
    """Trains and records new versions of one segmentation, one at a time."""

    def __init__(
        self,
        versions: VersionRepository,
        serving: ServingCache,
        lease: TrainingLease,
        *,
        name: str,
        settings: Settings,
        metrics: Metrics | None = None,
    ) -> None:
        self.versions = versions
        self.serving = serving
        self.lease = lease
        self.name = name
        self.settings = settings  # TRAIN_TIMEOUT_SECONDS read at each training
        self.metrics = metrics
        self._lock = asyncio.Lock()

    @property
    def running(self) -> bool:
        return self._lock.locked()

    # --- the turn --------------------------------------------------------------------------

    async def reserve(self) -> TrainingReservation:
        """Take this segmentation's training turn (409 while another training runs here or elsewhere).

        Held until `release`; a job takes it before answering 202, so a second request for the
        same segmentation is told at once that a training is running.
        """
        if self._lock.locked():
            raise Conflict(TRAINING_RUNNING_MESSAGE)
        await self._lock.acquire()
        try:
            lease = await self.lease.acquire()
        except BaseException:
            self._lock.release()
            raise
        return TrainingReservation(self.lease.key, lease, asyncio.create_task(self.lease.keep(lease)))

    async def release(self, reservation: TrainingReservation) -> None:
        reservation.heartbeat.cancel()
        try:
            await self.lease.release(reservation.lease)
        finally:
            self._lock.release()

    @asynccontextmanager
    async def _turn(self) -> AsyncIterator[TrainingReservation]:
        """The reservation of the job running this training (app.versions.progress), else one of its own."""
        reserved = progress.reservation()
        if isinstance(reserved, TrainingReservation) and reserved.key == self.lease.key:
            yield reserved
            return
        reservation = await self.reserve()
        try:
            yield reservation
        finally:
            await self.release(reservation)

    # --- training --------------------------------------------------------------------------

    async def train(
        self,
        data: Any,
        *,
        n_clusters: int | None,
        random_state: int,
        created_by: str | None,
        schema: dict[str, Any] | None = None,
    ) -> ServedModel:
        """Fit a new version, record it, make it active here and everywhere. A job (app.versions.progress)
        brings its own reservation and is told the phase."""
        async with self._turn():
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
                model.metadata_.setdefault("duration_seconds", round(time.perf_counter() - started, 3))
                served = await self._record(model, blob, created_by=created_by, what="trained")
                outcome = "success"
                return served
            except TrainingTimeout:
                outcome = "timeout"
                raise
            finally:
                if self.metrics is not None:
                    self.metrics.training_finished(outcome, time.perf_counter() - started, self.name)

    async def adopt(self, model: SegmentationModel, *, created_by: str | None) -> ServedModel:
        """Record a model fitted elsewhere (by the Spark engine) as a new version, as `train` records its fit.

        It gets a new version id and is checked by a round trip through its blob like any stored version.
        """
        async with self._turn():
            model.version = new_version_id()
            blob = await run_in_threadpool(model.to_bytes)
            model = await run_in_threadpool(SegmentationModel.from_bytes, blob)
            return await self._record(model, blob, created_by=created_by, what="recorded")

    async def _record(self, model: SegmentationModel, blob: bytes, *, created_by: str | None, what: str) -> ServedModel:
        """Match the new version to the active one (ids, keys, names), record it as active and serve it."""
        model, blob = await self._matched_to_active(model, blob)
        if holding.get():  # a policy's candidate: kept, not served, until its gate says so
            await self.versions.record(model, blob, created_by=created_by, activate=False)
            logger.info("recorded candidate version %s of %s (inactive)", model.version, self.name)
            return ServedModel(model)
        await self.versions.record(model, blob, created_by=created_by, by=acting.get())
        served = await self.serving.sync(candidate=model)
        meta = model.metadata_
        logger.info(
            "%s model version %s of %s (k=%s, n=%s%s) by %s",
            what,
            model.version,
            self.name,
            meta["n_clusters"],
            meta["n_samples"],
            f", {meta['algorithm']}" if what == "recorded" else "",
            created_by,
        )
        if served is None or served.version != model.version:
            served = ServedModel(model)  # activated elsewhere meanwhile; still report this one
        return served

    async def _matched_to_active(self, model: SegmentationModel, blob: bytes) -> tuple[SegmentationModel, bytes]:
        """The new model renumbered to keep the active version's ids, keys and names (app.ml.matching).

        The active version is read from the database, so a rename or an activation made by
        another worker a moment ago counts.
        """
        active, _ = await self.versions.active_state()
        previous = None
        if active is not None:
            try:
                previous = await self.versions.load(active)
            except (ModelLoadError, NotFound):
                logger.warning("active version %s not loadable: %s is trained unmatched", active, model.version)
        return await run_in_threadpool(identify, model, previous)
