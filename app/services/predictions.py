"""Writing predictions: single ones into history through a group commit, batches as one counted row."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
from sqlalchemy.ext.asyncio import async_sessionmaker

from app.database import BatchPrediction, PredictionHistory, utcnow

logger = logging.getLogger("app.predictions")


class HistoryWriter:
    """Many requests wait on one shared transaction: a 200 still means the row is committed.

    Rows queue up while the previous commit is in flight and are then inserted and
    committed together, so the database sees one transaction per burst, not per request.
    """

    def __init__(self, sessionmaker: async_sessionmaker, max_batch: int = 500) -> None:
        self.sessionmaker = sessionmaker
        self.max_batch = max_batch
        self._pending: list[tuple[dict[str, Any], asyncio.Future]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        for _, future in self._pending:
            if not future.done():
                future.set_exception(RuntimeError("service is shutting down"))
        self._pending.clear()

    async def add(self, row: dict[str, Any]) -> None:
        if self._task is None or self._task.done():
            await self._insert([row])
            return
        future = asyncio.get_running_loop().create_future()
        self._pending.append((row, future))
        self._wake.set()
        await future

    async def _insert(self, rows: list[dict[str, Any]]) -> None:
        async with self.sessionmaker() as session:
            # A Core insert: the ORM's bulk path costs about twice as much per row.
            await session.execute(PredictionHistory.__table__.insert(), rows)
            await session.commit()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
                await self._flush(batch)

    async def _flush(self, batch: list[tuple[dict[str, Any], asyncio.Future]]) -> None:
        try:
            await self._insert([row for row, _ in batch])
            results: list[BaseException | None] = [None] * len(batch)
        except Exception:
            # One bad row (say, its user was deleted meanwhile) must not fail the others.
            results = []
            for row, _ in batch:
                try:
                    await self._insert([row])
                    results.append(None)
                except Exception as exc:  # reported to that row's request alone
                    results.append(exc)
        for (_, future), error in zip(batch, results):
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


def history_row(*, user_id: int, customer: dict[str, Any], cluster: int, cluster_name: str, confidence: float,
                model_version: str) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "customer_data": customer,
        "cluster": cluster,
        "cluster_name": cluster_name,
        "confidence": confidence,
        "model_version": model_version,
        "created_at": utcnow(),
    }


async def record_batch(*, sessionmaker: async_sessionmaker, user_id: int, model_version: str,
                       labels: np.ndarray, n_failed: int) -> None:
    counts = np.bincount(np.asarray(labels, dtype=np.int64)) if len(labels) else np.zeros(0, dtype=np.int64)
    async with sessionmaker() as session:
        session.add(BatchPrediction(
            user_id=user_id, model_version=model_version, n_rows=int(len(labels)) + n_failed, n_failed=n_failed,
            cluster_counts={str(k): int(v) for k, v in enumerate(counts) if v},
        ))
        await session.commit()
