"""Drift counting and reports: every scored customer counted per version, flushed in batches.

Each worker process keeps, per model version, the counts of what it scored since its last flush
(a few list increments per prediction on the event loop; a batch's counts are tallied in its
scoring thread and added here in one step). Every `drift_flush_seconds` (and when the worker
stops) the counts go to `drift_counts`: one row per version, time bucket and process, rewritten
with the bucket's running total, so a crash loses at most one flush interval. A report sums the
rows of a version since a moment (to the bucket) from every process, after flushing this one's.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.orm import defer

from app.core.config import Settings
from app.core.database import Database
from app.core.errors import Conflict, NotFound
from app.core.tables import DriftCount, ModelVersion, ServiceState, utcnow
from app.ml.drift import DriftReference, RowCounter
from app.versions.lease import HOST_ID
from app.versions.served import ServedModel

if TYPE_CHECKING:
    from app.core.metrics import Metrics
    from app.versions.store import ModelStore

logger = logging.getLogger("app.drift")

NO_REFERENCE = (
    "Model version {version} was trained before drift reference bins were kept with each version: "
    "train a new version to watch its drift"
)


@dataclass
class _Pending:
    """One version's counts since the last flush."""

    segmentation_id: int
    counter: RowCounter
    counts: list[int]
    sums: list[float]
    n: int = 0
    batch_counts: np.ndarray | None = None
    batch_sums: np.ndarray | None = None

    def totals(self) -> tuple[np.ndarray, np.ndarray]:
        counts = np.asarray(self.counts, dtype=np.int64)
        sums = np.asarray(self.sums, dtype=np.float64)
        if self.batch_counts is not None and self.batch_sums is not None:
            counts = counts + self.batch_counts
            sums = sums + self.batch_sums
        return counts, sums


@dataclass
class _Written:
    """This process's row of a version's current bucket, as last written."""

    bucket: datetime
    row_id: int
    counts: np.ndarray
    sums: np.ndarray
    n: int


@dataclass
class DriftCounter:
    """This process's drift counts, per model version; the event loop alone touches them."""

    database: Database
    settings: Settings
    metrics: Metrics | None = None
    enabled: bool = True
    writer: str = field(default_factory=lambda: f"{HOST_ID}:{os.getpid()}:{secrets.token_hex(4)}"[:160])
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _counters: dict[str, RowCounter | None] = field(default_factory=dict)
    _written: dict[str, _Written] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _task: asyncio.Task | None = None

    # --- counting (the hot path) -------------------------------------------------------------

    def _open(self, served: ServedModel, segmentation_id: int) -> _Pending | None:
        version = served.version
        if version not in self._counters:
            reference = served.model.drift_reference
            self._counters[version] = reference.row_counter() if reference is not None else None
        counter = self._counters[version]
        if counter is None:
            return None
        pending = self._pending[version] = _Pending(
            segmentation_id, counter, [0] * counter.size, [0.0] * counter.n_features
        )
        return pending

    def count_one(self, served: ServedModel, segmentation_id: int, record: dict[str, Any], cluster: int) -> None:
        """Count one scored customer (`record` its features as sent)."""
        if not self.enabled:
            return
        pending = self._pending.get(served.version) or self._open(served, segmentation_id)
        if pending is None:
            return
        pending.counter.add(pending.counts, pending.sums, record, cluster)
        pending.n += 1

    def add_batch(
        self, served: ServedModel, segmentation_id: int, counts: np.ndarray, sums: np.ndarray, n: int
    ) -> None:
        """Add a batch's tally (app.ml.drift.DriftReference.tally) of `n` scored rows."""
        if not self.enabled or n == 0:
            return
        pending = self._pending.get(served.version) or self._open(served, segmentation_id)
        if pending is None or len(counts) != len(pending.counts):
            return
        if pending.batch_counts is None or pending.batch_sums is None:
            pending.batch_counts, pending.batch_sums = counts.copy(), sums.copy()
        else:
            pending.batch_counts += counts
            pending.batch_sums += sums
        pending.n += n

    # --- flushing ----------------------------------------------------------------------------

    async def start(self, refresh: Callable[[], Awaitable[None]] | None = None) -> None:
        self._task = asyncio.create_task(self._run(refresh))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        await self.flush()

    async def _run(self, refresh: Callable[[], Awaitable[None]] | None) -> None:
        refreshed = time.monotonic()
        while True:
            await asyncio.sleep(self.settings.drift_flush_seconds)
            try:
                await self.flush()
                if refresh is not None and time.monotonic() - refreshed >= self.settings.drift_gauge_seconds:
                    refreshed = time.monotonic()
                    await refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # a database hiccup must not end the flusher; the counts wait for the next one
                logger.warning("could not write drift counts", exc_info=True)

    def _bucket(self) -> datetime:
        size = self.settings.drift_bucket_seconds
        return datetime.fromtimestamp(math.floor(time.time() / size) * size, UTC)

    async def flush(self) -> None:
        """Write the counts gathered since the last flush; on failure they are kept for the next one."""
        async with self._lock:
            pending, self._pending = self._pending, {}
            failed: Exception | None = None
            for version, counted in pending.items():
                if counted.n == 0:
                    continue
                counts, sums = counted.totals()
                try:
                    await self._write(version, counted.segmentation_id, counts, sums, counted.n)
                except Exception as exc:  # noqa: BLE001 - put back, re-raised below once all were tried
                    failed = exc
                    self._put_back(version, counted, counts, sums)
            if failed is not None:
                raise failed

    def _put_back(self, version: str, counted: _Pending, counts: np.ndarray, sums: np.ndarray) -> None:
        current = self._pending.get(version)
        if current is None:
            current = self._pending[version] = _Pending(
                counted.segmentation_id, counted.counter, [0] * len(counts), [0.0] * len(sums)
            )
        if current.batch_counts is None or current.batch_sums is None:
            current.batch_counts, current.batch_sums = counts, sums
        else:
            current.batch_counts = current.batch_counts + counts
            current.batch_sums = current.batch_sums + sums
        current.n += counted.n

    async def _write(self, version: str, segmentation_id: int, counts: np.ndarray, sums: np.ndarray, n: int) -> None:
        bucket = self._bucket()
        written = self._written.get(version)
        async with self.database.sessionmaker() as session:
            if written is not None and written.bucket == bucket:
                counts, sums, n = written.counts + counts, written.sums + sums, written.n + n
                row_id = written.row_id
                await session.execute(
                    update(DriftCount)
                    .where(DriftCount.id == row_id)
                    .values(n_rows=n, counts=counts.tolist(), sums=sums.tolist(), updated_at=utcnow())
                )
            else:
                row = DriftCount(
                    segmentation_id=segmentation_id,
                    model_version=version,
                    bucket_start=bucket,
                    writer=self.writer,
                    n_rows=n,
                    counts=counts.tolist(),
                    sums=sums.tolist(),
                )
                session.add(row)
                await session.flush()
                row_id = row.id
            await session.commit()
        self._written[version] = _Written(bucket, row_id, counts, sums, n)

    # --- reading -----------------------------------------------------------------------------

    async def totals(self, version: str, since: datetime, size: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Every process's counts of `version` from the bucket holding `since` on, this one's flushed first."""
        await self.flush()
        after = since - timedelta(seconds=self.settings.drift_bucket_seconds)
        query = select(DriftCount.n_rows, DriftCount.counts, DriftCount.sums).where(
            DriftCount.model_version == version, DriftCount.bucket_start > after
        )
        counts = np.zeros(size, dtype=np.int64)
        sums: np.ndarray | None = None
        n = 0
        async with self.database.sessionmaker() as session:
            for n_rows, row_counts, row_sums in (await session.execute(query)).all():
                if len(row_counts) != size:
                    continue  # not this version's layout (cannot happen unless edited by hand)
                counts += np.asarray(row_counts, dtype=np.int64)
                row = np.asarray(row_sums, dtype=np.float64)
                sums = row if sums is None else sums + row
                n += int(n_rows)
        return counts, sums if sums is not None else np.zeros(0), n


# --- reports -------------------------------------------------------------------------------------


async def _version_facts(store: ModelStore, version: str | None) -> tuple[str, dict[str, Any], datetime, bool]:
    """(version, its details, its activation, whether it is active) of `version` (None: the active one)."""
    async with store.database.sessionmaker() as session:
        active = (
            await session.execute(
                select(ServiceState.value, ServiceState.updated_at).where(ServiceState.key == store.active_key)
            )
        ).first()
        active_version = active[0] if active is not None else None
        if version is None:
            version = active_version if active_version is not None else store.require().version
        row = await session.get(ModelVersion, version, options=[defer(ModelVersion.artifact)])
    if row is None or row.segmentation_id != store.segmentation.id:
        raise NotFound("model version")
    is_active = version == active_version
    activated = active[1] if is_active and active is not None and active[1] is not None else row.created_at
    return version, row.details or {}, activated, is_active


async def report(
    counter: DriftCounter, store: ModelStore, *, version: str | None = None, since: datetime | None = None
) -> dict[str, Any]:
    """GET .../drift: PSI per feature and for the segment mix of what `version` scored since `since`."""
    version, details, activated, is_active = await _version_facts(store, version)
    current = store.current
    metadata = current.metadata if current is not None and current.version == version else details
    reference = DriftReference.from_dict(metadata.get("drift_reference"))
    if reference is None:
        raise Conflict(NO_REFERENCE.format(version=version))
    since = activated if since is None else since if since.tzinfo is not None else since.replace(tzinfo=UTC)
    counts, sums, n = await counter.totals(version, since, reference.size)
    if len(sums) != len(reference.features):
        sums = np.zeros(len(reference.features))
    body = reference.report(counts, sums, n)
    if is_active and counter.metrics is not None:
        counter.metrics.drift_computed(store.segmentation.name, body["features"])
    return {"segmentation": store.segmentation.name, "model_version": version, "since": since, **body}


async def status(counter: DriftCounter, store: ModelStore) -> str | None:
    """The active version's overall drift status since its activation; None without one or its bins."""
    if store.current is None:
        return None
    try:
        return (await report(counter, store))["status"]
    except (Conflict, NotFound):
        return None


async def refresh_gauges(counter: DriftCounter, stores: Callable[[], list[ModelStore]]) -> None:
    """Recompute the active versions' drift, which sets the segmentation_feature_psi gauge."""
    for store in stores():
        await status(counter, store)
