"""The served model: versions in the database, the local copy in models/, training and switching.

Every worker process keeps one `ServedModel` in memory and swaps it whole, so a request
that took `store.current` once sees one version from start to end. The database is the
truth: it holds every version's artifacts and says which one is active, and each process
converges on that (at startup, after its own train or activate, and from a background task
that checks once per `model_sync_seconds`). `models/` is only a local copy of the active
version, written atomically under a file lock.

Fitting runs in a child process: the server keeps its event loop and its GIL for requests,
and a training that passes `train_timeout_seconds` is killed rather than left running. The
child also ends when its parent dies, so a killed server leaves no orphan behind.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from pydantic import BaseModel
from sqlalchemy import CursorResult, Update, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import defer
from starlette.concurrency import run_in_threadpool

from app.config import Settings
from app.database import Database, ModelVersion, ServiceState, utcnow
from app.errors import AppError, Conflict, NotFound
from app.model import METADATA_FILE, ModelLoadError, SegmentationModel
from app.preprocess import DataValidationError, features_matrix

try:
    import fcntl
except ImportError:  # not on POSIX: the local copy is then written without a lock
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from app.observability import Metrics

logger = logging.getLogger("app.models")

ACTIVE_KEY = "active_model_version"
TRAINING_KEY = "training_lease"
LEASE_HEARTBEAT_SECONDS = 5
LEASE_STALE_SECONDS = 30
RETRY_UNLOADABLE_SECONDS = 30
STALE_TEMP_SECONDS = 60
NO_MODEL_MESSAGE = "No trained model yet: train one first with POST /train"
TRAINING_RUNNING_MESSAGE = "A training is already running; try again when it has finished"
LOCK_FILE = ".lock"


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
        self._responses: dict[str, bytes] = {}

    def response_json(self, name: str, build: Callable[[], BaseModel]) -> bytes:
        """A response body that only depends on this version, serialized on first use."""
        body = self._responses.get(name)
        if body is None:
            body = self._responses[name] = build().model_dump_json().encode()
        return body

    def predict_matrix(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.model.predict(features)

    def assign(self, records: Sequence[Any]) -> list[tuple[int, str, float]]:
        """(cluster, cluster_name, confidence) for objects or dicts carrying the features."""
        if len(records) == 1:
            return [self.model.predict_one(records[0])]
        labels, confidence = self.model.predict(features_matrix(records))
        return [(int(c), self.names[int(c)], float(p)) for c, p in zip(labels, confidence, strict=True)]

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


# --- the local copy in models/ ---------------------------------------------------------------


@contextlib.contextmanager
def _directory_lock(directory: Path, *, shared: bool = False) -> Iterator[None]:
    """An advisory lock on the model folder, so processes sharing it never interleave a save."""
    directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(directory / LOCK_FILE, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _holds_version(directory: Path, version: str) -> bool:
    """True when `directory` holds an intact copy of `version` (a save cut short does not count)."""
    try:
        if json.loads((directory / METADATA_FILE).read_text("utf-8")).get("version") != version:
            return False
        return SegmentationModel.load(directory).version == version
    except (OSError, ValueError, AttributeError, ModelLoadError):
        return False


def load_local_copy(directory: Path) -> SegmentationModel:
    """The model in `directory`, after removing temporary files a killed save left behind."""
    with _directory_lock(directory):
        cutoff = time.time() - STALE_TEMP_SECONDS
        for leftover in directory.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if leftover.stat().st_mtime < cutoff:
                    leftover.unlink()
        return SegmentationModel.load(directory)


def save_local_copy(model: SegmentationModel, directory: Path) -> bool:
    """Write `model` as the local copy unless it already is; True when files were written."""
    with _directory_lock(directory):
        if _holds_version(directory, model.version):
            return False
        model.save(directory)
        return True


# --- fitting in a child process --------------------------------------------------------------

_TrainingContext = multiprocessing.context.ForkServerContext | multiprocessing.context.SpawnContext
_context: _TrainingContext | None = None


def _training_context() -> _TrainingContext:
    """A fork server with the ML stack imported once, so each training starts in milliseconds."""
    global _context
    if _context is None:
        context: _TrainingContext
        if "forkserver" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["app.services.models"])
        else:
            context = multiprocessing.get_context("spawn")
        _context = context
    return _context


def _exit_when_parent_dies(conn) -> None:
    # The parent never writes: EOF here means it is gone (or gave up on this training).
    try:
        conn.recv_bytes()
    except (EOFError, OSError):
        pass
    os._exit(1)


def _fit_in_child(conn, features: np.ndarray, n_clusters: int | None, random_state: int, version: str) -> None:
    threading.Thread(target=_exit_when_parent_dies, args=(conn,), daemon=True).start()
    try:
        model = SegmentationModel.train(features, n_clusters=n_clusters, random_state=random_state)
        model.version = version
        message: tuple = ("ok", model.to_bytes())
    except DataValidationError as exc:
        message = ("invalid", exc.message, exc.problems, exc.offending_rows)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which logs it
        message = ("error", f"{type(exc).__name__}: {exc}")
    conn.send(message)
    conn.close()


class TrainingTimeout(AppError):
    """The request asked for more work than TRAIN_TIMEOUT_SECONDS allows: a client error, not an outage."""

    status_code = 422

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"Training did not finish within {seconds:g} seconds (TRAIN_TIMEOUT_SECONDS) and was "
            "stopped; the active model is unchanged. Train on fewer rows or with a fixed n_clusters."
        )


async def _rows_updated(session: AsyncSession, statement: Update) -> int:
    """How many rows an UPDATE changed (its result is a cursor result, which has the count)."""
    result = cast(CursorResult[Any], await session.execute(statement))
    return result.rowcount


async def _wait_readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def fit_in_subprocess(
    features: np.ndarray, *, n_clusters: int | None, random_state: int, version: str, time_limit: float
) -> tuple[SegmentationModel, bytes]:
    """Train in a child process; return the model and its artifact blob. Killed after `time_limit` seconds."""
    context = _training_context()
    parent_end, child_end = context.Pipe()
    process = context.Process(
        target=_fit_in_child,
        args=(child_end, features, n_clusters, random_state, version),
        name="segmentation-training",
        daemon=True,
    )
    try:
        await run_in_threadpool(process.start)
        child_end.close()
        try:
            await asyncio.wait_for(_wait_readable(parent_end.fileno()), time_limit)
        except TimeoutError:
            raise TrainingTimeout(time_limit) from None
        try:
            message = await run_in_threadpool(parent_end.recv)
        except (EOFError, OSError):
            await run_in_threadpool(process.join, 5)
            raise RuntimeError(f"the training process ended without a result (exit code {process.exitcode})")
    finally:
        parent_end.close()
        if process.is_alive():
            process.kill()
        if process.pid is not None:
            await run_in_threadpool(process.join, 5)
    if message[0] == "invalid":
        raise DataValidationError(message[1], message[2], message[3])
    if message[0] != "ok":
        raise RuntimeError(f"training failed: {message[1]}")
    blob = message[1]
    return await run_in_threadpool(SegmentationModel.from_bytes, blob), blob


# --- the training lease ----------------------------------------------------------------------


def _host_identity() -> str:
    """This host as lease holders are told apart: the hostname and, on Linux, the PID namespace,
    so two containers that happen to share a hostname never judge each other's process ids."""
    try:
        namespace = f"/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        namespace = ""
    return (socket.gethostname()[:80] + namespace).replace(":", "_")


HOST_ID = _host_identity()


def _lease_value(token: str) -> str:
    return f"{HOST_ID}:{os.getpid()}:{token}"


def _holder_is_dead(value: str | None) -> bool:
    """True when the lease was taken by a process on this host that no longer exists."""
    if not value:
        return False
    parts = value.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != HOST_ID or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False  # ours: the in-process lock decides
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# --- the store -------------------------------------------------------------------------------


class ModelStore:
    def __init__(self, *, settings: Settings, database: Database, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.database = database
        self.metrics = metrics
        self.current: ServedModel | None = None
        self._train_lock = asyncio.Lock()
        self._switch_lock = asyncio.Lock()
        self._sync_task: asyncio.Task | None = None
        self._unloadable: dict[str, float] = {}  # version -> when loading it last failed

    @property
    def model_dir(self) -> Path:
        return Path(self.settings.model_dir)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self, *, follow: bool = True) -> None:
        local = await self._load_local()
        if local is not None and await self._active_version() is None:
            await self._adopt_local(local)
        try:
            await self.sync(candidate=local)
        except (ModelLoadError, NotFound):
            logger.exception("the active model version could not be loaded")
        if self.current is None and local is not None:
            # The database names no loadable version: serve the local copy rather than nothing.
            self.current = ServedModel(local)
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
                claimed = await _rows_updated(
                    session,
                    update(ServiceState)
                    .where(ServiceState.key == ACTIVE_KEY, ServiceState.value.is_(None))
                    .values(value=model.version, updated_at=utcnow()),
                )
                if claimed == 0:
                    session.add(ServiceState(key=ACTIVE_KEY, value=model.version))
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
            raise Conflict(NO_MODEL_MESSAGE)
        return model

    async def _active_version(self) -> str | None:
        async with self.database.sessionmaker() as session:
            return (
                await session.execute(select(ServiceState.value).where(ServiceState.key == ACTIVE_KEY))
            ).scalar_one_or_none()

    async def list_versions(self) -> tuple[list[dict[str, Any]], str | None]:
        async with self.database.sessionmaker() as session:
            active = (
                await session.execute(select(ServiceState.value).where(ServiceState.key == ACTIVE_KEY))
            ).scalar_one_or_none()
            rows = (
                (
                    await session.execute(
                        select(ModelVersion)
                        .options(defer(ModelVersion.artifact), defer(ModelVersion.details))
                        .order_by(ModelVersion.created_at.desc(), ModelVersion.version.desc())
                    )
                )
                .scalars()
                .all()
            )
        return [version_summary(row, active) for row in rows], active

    async def get_version(self, version: str) -> dict[str, Any]:
        async with self.database.sessionmaker() as session:
            active = (
                await session.execute(select(ServiceState.value).where(ServiceState.key == ACTIVE_KEY))
            ).scalar_one_or_none()
            row = await session.get(ModelVersion, version, options=[defer(ModelVersion.artifact)])
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

    async def _load_version(self, version: str) -> SegmentationModel:
        async with self.database.sessionmaker() as session:
            blob = (
                await session.execute(select(ModelVersion.artifact).where(ModelVersion.version == version))
            ).scalar_one_or_none()
        if blob is None:
            raise NotFound("model version")
        model = await run_in_threadpool(SegmentationModel.from_bytes, blob)
        model.version = version
        return model

    # --- switching -------------------------------------------------------------------------

    async def sync(self, *, candidate: SegmentationModel | None = None) -> ServedModel | None:
        """Serve the version the database says is active; `candidate` is used when it is that version.

        Reading the active version and swapping happen under one lock, so a slower switch can
        never put back a version the database has already moved on from.
        """
        async with self._switch_lock:
            active = await self._active_version()
            if active is None or (self.current is not None and self.current.version == active):
                return self.current
            if candidate is not None and candidate.version == active:
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
            logger.info("now serving model version %s", active)
            return served

    async def _write_local(self, model: SegmentationModel) -> None:
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
        logger.info("activated model version %s", version)
        return served if served is not None else ServedModel(model)

    @staticmethod
    async def _set_active(session, version: str) -> None:
        """Point the active version at `version` with writes only (no read to upgrade from)."""
        updated = await _rows_updated(
            session,
            update(ServiceState).where(ServiceState.key == ACTIVE_KEY).values(value=version, updated_at=utcnow()),
        )
        if updated == 0:
            session.add(ServiceState(key=ACTIVE_KEY, value=version))

    @staticmethod
    def _version_row(model: SegmentationModel, blob: bytes, *, created_by: str | None) -> ModelVersion:
        meta = model.metadata
        return ModelVersion(
            version=model.version,
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
                await session.commit()
            except IntegrityError:
                await session.rollback()
                raise Conflict("That model version already exists") from None

    # --- training --------------------------------------------------------------------------

    async def train(
        self, features: np.ndarray, *, n_clusters: int | None, random_state: int, created_by: str | None
    ) -> ServedModel:
        """Fit a new version, record it, make it active here and everywhere. One at a time.

        Nothing is written until the fit has succeeded, and then the version row and the
        active pointer go in one transaction, so a failed, timed-out or killed training
        leaves the previous model active.
        """
        if self._train_lock.locked():
            raise Conflict(TRAINING_RUNNING_MESSAGE)
        async with self._train_lock:
            lease = await self._acquire_lease()
            heartbeat = asyncio.create_task(self._keep_lease(lease))
            started = time.perf_counter()
            outcome = "failed"
            try:
                model, blob = await fit_in_subprocess(
                    features,
                    n_clusters=n_clusters,
                    random_state=random_state,
                    version=new_version_id(),
                    time_limit=self.settings.train_timeout_seconds,
                )
                model.metadata.setdefault("duration_seconds", round(time.perf_counter() - started, 3))
                await self._record_version(model, blob, created_by=created_by)
                served = await self.sync(candidate=model)
                logger.info(
                    "trained model version %s (k=%s, n=%s) by %s",
                    model.version,
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
                heartbeat.cancel()
                await self._release_lease(lease)
                if self.metrics is not None:
                    self.metrics.training_finished(outcome, time.perf_counter() - started)

    async def _acquire_lease(self) -> str:
        """Take the database-wide training lease, or raise 409 while another process holds it.

        A lease is free when released, when its holder stopped renewing it, or when its holder
        was a process on this host that no longer exists (a killed server, restarted at once).
        """
        value = _lease_value(secrets.token_hex(8))
        stale = utcnow() - timedelta(seconds=LEASE_STALE_SECONDS)
        async with self.database.sessionmaker() as session:
            held = (
                await session.execute(select(ServiceState.value).where(ServiceState.key == TRAINING_KEY))
            ).scalar_one_or_none()
        free = or_(ServiceState.value.is_(None), ServiceState.updated_at < stale)
        if _holder_is_dead(held):
            free = or_(free, ServiceState.value == held)
        async with self.database.sessionmaker() as session:
            taken = await _rows_updated(
                session,
                update(ServiceState)
                .where(ServiceState.key == TRAINING_KEY, free)
                .values(value=value, updated_at=utcnow()),
            )
            if taken == 1:
                await session.commit()
                return value
            await session.rollback()
        if held is None:  # no lease row yet: the first training ever
            async with self.database.sessionmaker() as session:
                session.add(ServiceState(key=TRAINING_KEY, value=value))
                try:
                    await session.commit()
                    return value
                except IntegrityError:
                    await session.rollback()
        raise Conflict(TRAINING_RUNNING_MESSAGE)

    async def _keep_lease(self, value: str) -> None:
        while True:
            await asyncio.sleep(LEASE_HEARTBEAT_SECONDS)
            try:
                async with self.database.sessionmaker() as session:
                    await session.execute(
                        update(ServiceState)
                        .where(ServiceState.key == TRAINING_KEY, ServiceState.value == value)
                        .values(updated_at=utcnow())
                    )
                    await session.commit()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("could not renew the training lease", exc_info=True)

    async def _release_lease(self, value: str) -> None:
        async with self.database.sessionmaker() as session:
            await session.execute(
                update(ServiceState)
                .where(ServiceState.key == TRAINING_KEY, ServiceState.value == value)
                .values(value=None, updated_at=utcnow())
            )
            await session.commit()
