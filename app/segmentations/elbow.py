"""K selection over the default dataset, cached per file and range (GET /elbow and its chart)."""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachetools import LRUCache
from starlette.concurrency import run_in_threadpool

from app.core.config import Settings
from app.core.errors import Conflict
from app.ml import elbow as compute_elbow
from app.ml.preprocess import (
    DataValidationError,
    load_training_matrix,
)
from app.segmentations.results import ElbowResult
from app.segmentations.scoring import NO_DATASET
from app.versions.served import data_uri

DATASET_CHECK_SECONDS = 1.0

# How long the dataset file is taken as unchanged before it is looked at again.


ELBOW_CACHE_ENTRIES = 64


def _file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class _ElbowEntry:
    """One dataset content and k range: the figures, and their JSON and chart once asked for."""

    result: dict[str, Any]
    json: bytes | None = None
    chart: str | None = None


class ElbowCache:
    """Elbow figures of the default dataset, computed once per dataset content and k range.

    At most ELBOW_CACHE_ENTRIES (dataset, k range) entries are kept, the least recently used
    dropped first; entries are plain values (dicts, bytes, strings), shared safely by requests.
    """

    def __init__(self, settings: Settings, max_entries: int = ELBOW_CACHE_ENTRIES) -> None:
        self.settings = settings
        self._entries: LRUCache[tuple[str, int, int], _ElbowEntry] = LRUCache(maxsize=max_entries)
        # Only while a computation runs: the callers asking for the same key meanwhile wait for it.
        self._locks: dict[tuple[str, int, int], asyncio.Lock] = {}
        self._stat: tuple[float, int] | None = None
        self._fingerprint: str | None = None
        self._checked_at = -math.inf

    def _fresh_fingerprint(self) -> str | None:
        if self._fingerprint is not None and time.monotonic() - self._checked_at < DATASET_CHECK_SECONDS:
            return self._fingerprint
        return None

    async def _dataset_fingerprint(self) -> str:
        # The file is looked at no more than once a second, not on every request.
        fresh = self._fresh_fingerprint()
        if fresh is not None:
            return fresh
        path = Path(self.settings.data_path)
        try:
            stat = await run_in_threadpool(path.stat)
        except OSError:
            self._fingerprint = None
            raise Conflict(NO_DATASET.format(path=path)) from None
        key = (stat.st_mtime, stat.st_size)
        fingerprint = self._fingerprint
        if self._stat != key or fingerprint is None:
            fingerprint = await run_in_threadpool(_file_fingerprint, path)
            self._fingerprint, self._stat = fingerprint, key
        self._checked_at = time.monotonic()
        return fingerprint

    async def get(self, k_min: int = 2, k_max: int = 10) -> dict[str, Any]:
        return (await self._entry(k_min, k_max)).result

    def ready_json(self, k_min: int = 2, k_max: int = 10) -> bytes | None:
        """The answer of `get_json` when it is at hand without waiting for anything, else None."""
        fingerprint = self._fresh_fingerprint()
        entry = self._entries.get((fingerprint, k_min, k_max)) if fingerprint is not None else None
        return entry.json if entry is not None else None

    async def get_json(self, k_min: int = 2, k_max: int = 10) -> bytes:
        """GET /elbow as JSON, serialized once per dataset and k range."""
        entry = await self._entry(k_min, k_max)
        if entry.json is None:
            entry.json = ElbowResult(**entry.result).model_dump_json().encode()
        return entry.json

    async def chart(self, k_min: int = 2, k_max: int = 10) -> tuple[str, int]:
        entry = await self._entry(k_min, k_max)
        if entry.chart is None:
            from app.charts import render_elbow_chart

            entry.chart = data_uri(await run_in_threadpool(render_elbow_chart, entry.result))
        return entry.chart, int(entry.result["optimal_k"])

    async def _entry(self, k_min: int, k_max: int) -> _ElbowEntry:
        key = (await self._dataset_fingerprint(), k_min, k_max)
        entry = self._entries.get(key)
        if entry is not None:
            return entry
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                entry = self._entries.get(key)
                if entry is None:
                    entry = _ElbowEntry(await self._compute(k_min, k_max))
                    self._entries[key] = entry
        finally:
            if not lock.locked() and self._locks.get(key) is lock:
                del self._locks[key]
        return entry

    async def _compute(self, k_min: int, k_max: int) -> dict[str, Any]:
        features = await run_in_threadpool(load_training_matrix, Path(self.settings.data_path))
        k_max_fit = min(k_max, len(features) - 1)
        if k_max_fit < k_min:
            raise DataValidationError(f"The dataset has too few rows for k up to {k_max}", [])
        return await run_in_threadpool(compute_elbow, features, k_min=k_min, k_max=k_max_fit)


# Elbow figures kept: datasets x k ranges (a few kB each).
