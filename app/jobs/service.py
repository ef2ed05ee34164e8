"""Training as a job: `POST .../train?wait=false` answers 202 at once and the training runs on in the worker.

What can be checked is checked before the 202 (the segmentation, the query values, the upload,
the training turn: a segmentation trains one at a time, 409 as with `wait=true`); the upload is
copied to a file the job owns (JOB_DIR), removed when the job ends. The job then trains exactly as
the synchronous call does (the Trainer it is given: app.segmentations.service.SegmentationTrainer) and keeps the outcome in its row of
`training_jobs`: the train result, or the error body the synchronous call would have answered.

The worker running a job writes a heartbeat every JOB_HEARTBEAT_SECONDS, and at each one reads
whether a DELETE (received by any worker) asked for a cancel. A job whose worker is gone (no
heartbeat for JOB_STALE_SECONDS, or its process on this host no longer exists) is marked failed
when it is next looked at and when any worker starts; a worker that stops fails its own jobs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
from collections.abc import Awaitable, Callable, Container, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from app.core.config import Settings
from app.core.database import Database
from app.core.errors import ML_ERROR_STATUS, AppError, Conflict, ml_error_body
from app.core.tables import TrainingJob, utcnow
from app.jobs.repository import FINAL, LIVE, WORKER_STOPPED, JobRepository, job_body, stamp
from app.ml.errors import MLError
from app.versions import progress
from app.versions.lease import HOST_ID
from app.versions.store import ModelStore
from app.versions.training import TrainingRequest, TrainingReservation

if TYPE_CHECKING:
    from app.core.metrics import Metrics

logger = logging.getLogger("app.jobs")

CANCELLED = "Cancelled; the active version is unchanged"
UPLOAD_SUFFIX = ".upload"
# How long a DELETE waits for the worker running the job to stop it, in heartbeats (plus a margin).
CANCEL_WAIT_HEARTBEATS = 3
CANCEL_WAIT_MARGIN_SECONDS = 5.0


def new_worker_id() -> str:
    """A job runner as jobs name their worker: the lease's host identity, the process id and a token of
    its own (two apps in one process, as tests run them, are two workers)."""
    return f"{HOST_ID}:{os.getpid()}:{secrets.token_hex(4)}"


def worker_gone(worker: str | None) -> bool:
    """True when `worker` was a process on this host that no longer exists."""
    parts = (worker or "").rsplit(":", 2)
    if len(parts) != 3 or parts[0] != HOST_ID or not parts[1].isdigit():
        return False
    pid = parts[1]
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def is_stale(row: TrainingJob, *, worker: str, running: Container[str], stale_seconds: float) -> bool:
    """A live job whose worker is gone: `worker` (this one) without it, a dead process here, or silent too long."""
    if row.state not in LIVE:
        return False
    if row.worker == worker:
        return row.id not in running
    if worker_gone(row.worker):
        return True
    cutoff = utcnow() - timedelta(seconds=stale_seconds)
    return row.heartbeat_at is None or row.heartbeat_at < cutoff


class Trainer(Protocol):
    """What a job runs: the checks and the training of a `wait=true` request (SegmentationTrainer)."""

    def check(self, store: ModelStore, request: TrainingRequest, *, has_file: bool) -> None: ...

    async def train(self, store: ModelStore, upload: IO[bytes] | None, request: TrainingRequest) -> dict[str, Any]:
        """Train a version; returns the train result's fields."""
        ...


@dataclass
class RunningJob:
    """A job this worker runs: what the training reports to it (app.versions.progress) and how to stop it."""

    id: str
    store: ModelStore
    reservation: TrainingReservation
    upload: Path | None
    size: int | None
    phase_name: str = "queued"
    phases: list[dict[str, Any]] = field(default_factory=list)
    reading: IO[bytes] | None = None
    task: asyncio.Task | None = None
    stop_reason: str | None = None  # "cancelled", "stopped" (this worker stops), "lost" (the row was settled)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def phase(self, name: str) -> None:
        self.phase_name = name
        self.phases.append({"phase": name, "at": stamp(utcnow())})
        self.changed.set()

    def fraction(self) -> float | None:
        """The share of the upload read so far, while reading it (the file's offset, read without a lock)."""
        if self.phase_name != "reading" or self.reading is None or not self.size:
            return None
        try:
            offset = os.lseek(self.reading.fileno(), 0, os.SEEK_CUR)
        except (OSError, ValueError):
            return None
        return round(min(offset / self.size, 1.0), 4)

    def stop(self, reason: str) -> bool:
        """Stop the training, unless it is recording its version (then it finishes: nothing half-done)."""
        if self.task is None or self.task.done() or self.stop_reason is not None:
            return False
        if reason == "cancelled" and self.phase_name == "recording":
            return False
        self.stop_reason = reason
        self.task.cancel()
        return True


class JobRunner:
    """The training jobs of this worker, and every worker's jobs as the `training_jobs` table has them."""

    def __init__(self, *, trainer: Trainer, settings: Settings, database: Database, metrics: Metrics | None = None):
        self.trainer = trainer
        self.settings = settings
        self.rows = JobRepository(database)
        self.metrics = metrics
        self.worker = new_worker_id()
        self._running: dict[str, RunningJob] = {}
        # Called with each job this worker marks failed because the worker running it was gone (a kill,
        # a crash): what else the job stood for can be settled too (a policy fire's event).
        self.on_settled: list[Callable[[TrainingJob], Awaitable[None]]] = []

    def _upload_path(self, job_id: str) -> Path:
        return self.settings.job_directory / f"{job_id}{UPLOAD_SUFFIX}"

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Fail every job whose worker is gone (a restart finds its own jobs of before so)."""
        settled = 0
        for row in await self.rows.live():
            if self._is_stale(row) and await self._settle(row):
                settled += 1
        if settled:
            logger.warning("marked %d training jobs failed: the worker running them stopped", settled)

    async def stop(self) -> None:
        """This worker stops: its jobs end as failed (their trainings are stopped, nothing recorded)."""
        jobs = list(self._running.values())
        for job in jobs:
            job.stop("stopped")
        tasks = [job.task for job in jobs if job.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- starting --------------------------------------------------------------------------

    async def submit(
        self,
        store: ModelStore,
        *,
        upload: IO[bytes] | None,
        filename: str | None,
        request: TrainingRequest,
        result_model: type[BaseModel],
        trainer: Trainer | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Check the request, take the segmentation's training turn, keep the upload; the job then runs on.

        `trainer`: what the job runs instead of the runner's own (a retraining policy's fire);
        `parameters`: more of them to record with the job (the policy trigger it carries out)."""
        trainer = trainer or self.trainer
        trainer.check(store, request, has_file=upload is not None)
        reservation = await store.reserve_training()
        job_id = secrets.token_hex(8)
        now = utcnow()
        info = store.segmentation
        job = RunningJob(id=job_id, store=store, reservation=reservation, upload=None, size=None)
        job.phase("receiving")
        self._running[job_id] = job  # from now on, this worker's live job (never taken as stale)
        row = TrainingJob(
            id=job_id,
            segmentation_id=info.id,
            segmentation=info.name,
            state="queued",
            phase=job.phase_name,
            fraction=None,
            phases=list(job.phases),
            parameters={
                "n_clusters": request.n_clusters,
                "random_state": request.random_state,
                "as_of": request.as_of.isoformat() if request.as_of is not None else None,
                "file": filename if upload is not None else None,
                "bytes": None,
                **(parameters or {}),
            },
            cancel_requested=False,
            created_by=request.by,
            created_at=now,
            worker=self.worker,
            heartbeat_at=now,
        )
        try:
            await self.rows.add(row)
            if upload is not None:
                job.upload = self._upload_path(job_id)
                job.size = await run_in_threadpool(_keep_upload, upload, job.upload)
            job.phase("queued")
            stored = await self.rows.queued(
                job_id, phases=list(job.phases), parameters={**row.parameters, "bytes": job.size}
            )
        except BaseException:
            self._running.pop(job_id, None)
            await store.release_training(reservation)
            _remove(job.upload)
            await self.rows.remove(job_id)
            raise
        job.task = asyncio.create_task(self._run(job, trainer, request, result_model), name=f"training-job-{job_id}")
        logger.info("training job %s of %s started by %s", job_id, info.name, request.by)
        return job_body(stored)

    # --- running ---------------------------------------------------------------------------

    async def _run(
        self, job: RunningJob, trainer: Trainer, request: TrainingRequest, result_model: type[BaseModel]
    ) -> None:
        token = progress.current_job.set(job)
        watcher = asyncio.create_task(self._watch(job))
        outcome: tuple[str, dict[str, Any] | None, dict[str, Any] | None, int | None]
        try:
            await self._started(job)
            if job.upload is not None:
                job.reading = job.upload.open("rb")
            try:
                fields = await trainer.train(job.store, job.reading, request)
            finally:
                if job.reading is not None:
                    job.reading.close()
            result = result_model(**fields).model_dump(mode="json")
            outcome = ("succeeded", result, None, None)
        except asyncio.CancelledError:
            if job.stop_reason == "cancelled":
                outcome = ("cancelled", None, {"detail": CANCELLED}, None)
            else:
                outcome = ("failed", None, {"detail": WORKER_STOPPED}, None)
        except AppError as exc:
            outcome = ("failed", None, exc.body(), exc.status_code)
        except MLError as exc:
            outcome = ("failed", None, ml_error_body(exc), ML_ERROR_STATUS)
        except Exception:
            logger.exception("training job %s failed", job.id)
            outcome = ("failed", None, {"detail": "Internal server error"}, 500)
        finally:
            watcher.cancel()
            progress.current_job.reset(token)
        try:
            await job.store.release_training(job.reservation)
        finally:
            _remove(job.upload)
            try:
                await self._finish(job, *outcome)
            except Exception:  # the row stays live and is failed as its worker's (this one's) job it no longer runs
                logger.exception("could not record the end of training job %s", job.id)
            # Only now: a live row of this worker's that it no longer runs counts as stale.
            self._running.pop(job.id, None)
            if self.metrics is not None:
                self.metrics.training_job_finished(outcome[0], job.store.segmentation.name)
            logger.info("training job %s of %s %s", job.id, job.store.segmentation.name, outcome[0])

    async def _started(self, job: RunningJob) -> None:
        job.phase("reading")
        await self.rows.running(job.id, phase=job.phase_name, phases=list(job.phases))

    async def _watch(self, job: RunningJob) -> None:
        """The heartbeat: progress written, and a cancel (or the job settled as stale meanwhile) acted on."""
        while True:
            try:
                await asyncio.wait_for(job.changed.wait(), self.settings.job_heartbeat_seconds)
            except TimeoutError:
                pass
            job.changed.clear()
            try:
                live, cancel = await self.rows.heartbeat(
                    job.id, phase=job.phase_name, phases=list(job.phases), fraction=job.fraction()
                )
            except asyncio.CancelledError:
                raise
            except Exception:  # a database hiccup: the next heartbeat tries again
                logger.warning("could not write the heartbeat of training job %s", job.id, exc_info=True)
                continue
            if not live:
                job.stop("lost")  # failed as stale by another worker: stop rather than record a version
            elif cancel:
                job.stop("cancelled")

    async def _finish(
        self,
        job: RunningJob,
        state: str,
        result: dict[str, Any] | None,
        error: dict[str, Any] | None,
        error_status: int | None,
    ) -> None:
        job.phase(state)
        await self.rows.finish(
            job.id, state=state, phases=list(job.phases), result=result, error=error, error_status=error_status
        )

    # --- reading ---------------------------------------------------------------------------

    def _is_stale(self, row: TrainingJob) -> bool:
        return is_stale(row, worker=self.worker, running=self._running, stale_seconds=self.settings.job_stale_seconds)

    async def _settle(self, row: TrainingJob) -> bool:
        """Mark a stale job failed (unless its worker spoke or finished it meanwhile); its upload is removed."""
        settled = await self.rows.fail_stale(row)
        if settled:
            _remove(self._upload_path(row.id))
            logger.warning("training job %s failed: its worker %s stopped", row.id, row.worker)
            if self.metrics is not None:
                self.metrics.training_job_finished("failed", row.segmentation)
            for hook in self.on_settled:
                try:
                    await hook(row)
                except Exception:  # the job stays failed; what the hook records is the hook's business
                    logger.exception("could not settle what training job %s stood for", row.id)
        return bool(settled)

    async def _fresh(self, rows: Sequence[TrainingJob]) -> list[TrainingJob]:
        """The rows as they are once every stale one among them is marked failed."""
        fresh = []
        for row in rows:
            if self._is_stale(row):
                await self._settle(row)
                row = await self.rows.get(row.id)
            fresh.append(row)
        return fresh

    async def get(self, job_id: str) -> dict[str, Any]:
        (row,) = await self._fresh([await self.rows.get(job_id)])
        return job_body(row)

    async def page(
        self, *, skip: int, limit: int, segmentation_id: int | None = None, state: str | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        """Jobs newest first (of one segmentation, in one state) and how many match."""
        rows, total = await self.rows.page(skip=skip, limit=limit, segmentation_id=segmentation_id, state=state)
        return [job_body(row) for row in await self._fresh(rows)], total

    # --- cancelling ------------------------------------------------------------------------

    async def cancel(self, job_id: str, *, by: str) -> dict[str, Any]:
        """Cancel a queued or running job, whichever worker runs it; the active version stays (a finished job: 409)."""
        (row,) = await self._fresh([await self.rows.get(job_id)])
        if row.state in FINAL:
            raise Conflict(f"The job has already {_ended(row.state)}: only a queued or running job can be cancelled")
        asked = await self.rows.ask_cancel(job_id)
        if asked:
            logger.info("training job %s: cancel asked by %s", job_id, by)
        wait = self.settings.job_heartbeat_seconds * CANCEL_WAIT_HEARTBEATS + CANCEL_WAIT_MARGIN_SECONDS
        local = self._running.get(job_id)
        if local is not None and local.task is not None:
            local.stop("cancelled")
            await asyncio.wait({local.task}, timeout=wait)
        else:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait
            while loop.time() < deadline:
                if (await self.rows.get(job_id)).state not in LIVE:
                    break
                await asyncio.sleep(min(0.2, self.settings.job_heartbeat_seconds))
        (row,) = await self._fresh([await self.rows.get(job_id)])
        if row.state in ("succeeded", "failed"):
            raise Conflict(f"The job {_ended(row.state)} before it could be cancelled")
        return job_body(row)


def _ended(state: str) -> str:
    return {"succeeded": "succeeded", "failed": "failed", "cancelled": "been cancelled"}[state]


def _keep_upload(source: IO[bytes], target: Path) -> int:
    """Copy the request's upload (closed after the response) to the job's own file; returns its size."""
    target.parent.mkdir(parents=True, exist_ok=True)
    source.seek(0)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(source, out, 1024 * 1024)
    return target.stat().st_size


def _remove(path: Path | None) -> None:
    if path is None:
        return
    try:
        path.unlink(missing_ok=True)
    except OSError:
        logger.warning("could not remove the job file %s", path, exc_info=True)
