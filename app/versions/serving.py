"""The version a worker serves for one segmentation: loaded from the registry, swapped whole.

A request that took `serving.current` once sees one version from start to end. The database is the
truth; each process converges on its active version at start, after its own train or activate, and
from a background task that checks once per `model_sync_seconds`. For `default`, `models/` holds a
local copy of the active version (app.versions.local_copy).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from app.core.config import Settings
from app.core.errors import Conflict, NotFound
from app.ml import ModelLoadError, SegmentationModel
from app.ml.matching import renamed_since
from app.versions.local_copy import load_local_copy, save_local_copy
from app.versions.repository import VersionRepository
from app.versions.served import ServedModel

logger = logging.getLogger("app.models")

RETRY_UNLOADABLE_SECONDS = 30
_UNSET: Any = object()


class ServingCache:
    """The served version of one segmentation, kept in step with the registry's active version."""

    def __init__(
        self,
        versions: VersionRepository,
        *,
        name: str,
        no_model_message: str,
        settings: Settings,
        local_copy: Path | None = None,
    ) -> None:
        self.versions = versions
        self.name = name
        self.no_model_message = no_model_message
        self.settings = settings  # MODEL_SYNC_SECONDS read at each wait
        self.local_copy = local_copy
        self.current: ServedModel | None = None
        self._switch_lock = asyncio.Lock()
        self._switched_at = float("-inf")  # time.monotonic() of the last switch made here
        self._unloadable: dict[str, float] = {}  # version -> when loading it last failed
        self._sync_task: asyncio.Task | None = None

    def require(self) -> ServedModel:
        model = self.current
        if model is None:
            raise Conflict(self.no_model_message)
        return model

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self, *, follow: bool = True) -> None:
        local = await self._load_local()
        if local is not None and await self.versions.active_version() is None:
            await self.versions.adopt_first(local)
        try:
            await self.sync(candidate=local)
        except (ModelLoadError, NotFound):
            logger.exception("the active model version of %s could not be loaded", self.name)
        if self.current is None and local is not None:
            # The database names no loadable version: serve the local copy rather than nothing.
            self.current = ServedModel(local)
        if self.current is None:
            if self.local_copy is not None:
                logger.warning("no model loaded: %s", self.no_model_message)
        else:
            logger.info("serving model version %s of %s", self.current.version, self.name)
        if follow:
            self._sync_task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            try:
                await self._sync_task
            except (asyncio.CancelledError, Exception):
                pass

    async def _load_local(self) -> SegmentationModel | None:
        if self.local_copy is None:
            return None
        try:
            return await run_in_threadpool(load_local_copy, self.local_copy)
        except (ModelLoadError, OSError) as exc:
            logger.warning("model files in %s not loaded: %s", self.local_copy, exc)
            return None

    async def _write_local(self, model: SegmentationModel) -> None:
        if self.local_copy is None:
            return  # only `default` keeps files in models/
        try:
            await run_in_threadpool(save_local_copy, model, self.local_copy)
        except OSError:
            logger.warning("could not write the local model copy to %s", self.local_copy, exc_info=True)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.settings.model_sync_seconds)
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:  # a database hiccup or a broken version must not end the follower
                logger.warning("could not follow the active model version", exc_info=True)

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
        version renamed since it was loaded is loaded again. A reading older than this cache's
        last switch is read again rather than trusted.
        """
        async with self._switch_lock:
            stale = read_at is not None and read_at <= self._switched_at
            if active is _UNSET or candidate is not None or stale:
                active, names = await self.versions.active_state()
            if active is None:
                return self.current
            if (
                self.current is not None
                and self.current.version == active
                and not renamed_since(self.current.version, self.current.metadata, names)
            ):
                return self.current
            if (
                candidate is not None
                and candidate.version == active
                and not renamed_since(candidate.version, candidate.metadata_, names)
            ):
                model = candidate
            else:
                failed_at = self._unloadable.get(active)
                if failed_at is not None and time.monotonic() - failed_at < RETRY_UNLOADABLE_SECONDS:
                    return self.current
                try:
                    model = await self.versions.load(active)
                except (ModelLoadError, NotFound):
                    self._unloadable[active] = time.monotonic()
                    raise
            self._unloadable.pop(active, None)
            await self._write_local(model)
            served = ServedModel(model)
            self.current = served
            self._switched_at = time.monotonic()
            logger.info("now serving model version %s of %s", active, self.name)
            return served
