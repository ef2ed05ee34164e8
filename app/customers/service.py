"""Scoring runs and what they leave: the customer base, its changes, a customer, an audience.

A run is a job of its own (the row in `customer_runs`): checked before it starts, then scored, staged,
merged and landed by a task of the worker that took it, which beats the row's heartbeat. With
`wait=true` the request waits for that task (a client that goes away does not stop it). One run per
segmentation at a time (a partial unique index: 409); a run whose worker is gone is marked failed
when the next one starts and when any worker starts.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import IO, Any

import pandas as pd
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.concurrency import run_in_threadpool

from app.core.config import Settings
from app.core.database import Database
from app.core.errors import ML_ERROR_STATUS, AppError, Conflict, InvalidInput, NotFound, ml_error_body
from app.core.events import EventSink
from app.core.tables import utcnow
from app.customers import scoring
from app.customers.repository import CustomerBaseRepository, stale_before
from app.customers.schemas import HISTORY_LIMIT, Run
from app.customers.tables import ACTIVE, RUNNING, CustomerRun
from app.jobs.service import new_worker_id, worker_gone
from app.ml.errors import MLError
from app.ml.matching import segment_key_of
from app.segmentations.csv_answers import inert_column
from app.segmentations.kinds.registry import kind_of
from app.versions.store import ModelStore, ServedModel

logger = logging.getLogger("app.customers")

WORKER_STOPPED = "The worker running it stopped before it finished; the customer base is unchanged"
LOST = "The run was marked failed meanwhile (its heartbeat was late); the customer base is unchanged"
CHANGES_PER_MESSAGE = 1000
RUN_RUNNING = "A run of this segmentation is running; try again when it has finished"


def run_body(row: CustomerRun) -> dict[str, Any]:
    return {
        "run_id": row.id,
        "segmentation": row.segmentation,
        "model_version": row.model_version,
        "mode": row.mode,
        "status": row.status,
        "n_customers": row.n_customers,
        "n_new": row.n_new,
        "n_changed": row.n_changed,
        "n_unchanged": row.n_unchanged,
        "n_gone": row.n_gone,
        "started_at": row.started_at,
        "finished_at": row.finished_at,
        "previous_run_id": row.previous_run_id,
        "created_by": row.created_by,
        "parameters": dict(row.parameters or {}),
        "error": row.error,
        "error_status": row.error_status,
    }


class RunLost(Exception):
    """The run's row was marked failed by another worker: stop without landing."""


@dataclass
class RunRequest:
    mode: str
    as_of: date | None
    by: str
    filename: str | None


@dataclass
class ActiveRun:
    """A run this worker is running."""

    row: CustomerRun
    store: ModelStore
    served: ServedModel
    request: RunRequest
    upload: Path
    task: asyncio.Task | None = None
    lost: bool = False
    error: BaseException | None = field(default=None, repr=False)


def _error_of(exc: BaseException) -> tuple[dict[str, Any], int]:
    if isinstance(exc, AppError):
        return exc.body(), exc.status_code
    if isinstance(exc, MLError):
        return ml_error_body(exc), ML_ERROR_STATUS
    return {"detail": "Internal server error"}, 500


class CustomerBase:
    """Every segmentation's customer base: runs started here, and the reads of what they left."""

    def __init__(self, *, settings: Settings, database: Database, events: EventSink | None = None) -> None:
        self.settings = settings
        self.database = database
        self.events = events
        self.rows = CustomerBaseRepository(database)
        self.worker = new_worker_id()
        self._running: dict[int, ActiveRun] = {}
        self._submitting = 0  # runs being added: their rows may exist before they are in _running
        self._cleanup: asyncio.Task | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Fail every run whose worker is gone (a restart finds its own runs of before so), then tidy up."""
        failed = 0
        for row in await self.rows.running():
            if self._is_stale(row) and await self.rows.fail(row, {"detail": WORKER_STOPPED}, None):
                failed += 1
        if failed:
            logger.warning("marked %d customer runs failed: the worker running them stopped", failed)
        self._tidy()

    async def stop(self) -> None:
        runs = list(self._running.values())
        for run in runs:
            if run.task is not None:
                run.task.cancel()
        tasks = [run.task for run in runs if run.task is not None]
        if self._cleanup is not None:
            self._cleanup.cancel()
            tasks.append(self._cleanup)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _is_stale(self, row: CustomerRun) -> bool:
        if row.status != RUNNING:
            return False
        if row.worker == self.worker:
            return row.id not in self._running and not self._submitting
        if worker_gone(row.worker):
            return True
        return row.heartbeat_at is None or row.heartbeat_at < stale_before(self.settings.job_stale_seconds)

    def _tidy(self) -> None:
        """Remove in the background what no reader needs any more (one tidying at a time)."""
        if self._cleanup is not None and not self._cleanup.done():
            return

        async def tidy() -> None:
            try:
                await self.rows.cleanup()
            except asyncio.CancelledError:
                raise
            except Exception:  # the next run tidies again
                logger.warning("could not remove old customer base rows", exc_info=True)

        self._cleanup = asyncio.create_task(tidy(), name="customer-base-cleanup")

    # --- starting a run --------------------------------------------------------------------

    def check(self, store: ModelStore, *, has_file: bool, as_of: date | None) -> ServedModel:
        """What a run must satisfy before its upload is read; returns the version it scores with."""
        kind = kind_of(store.segmentation)
        if not has_file:
            raise InvalidInput('Send the customers as a multipart `file` (CSV or Parquet), or JSON {"source": NAME}')
        if as_of is not None and not kind.takes_as_of:
            raise InvalidInput("`as_of` is for segmentations of kind rfm")
        if kind.name == "custom" and scoring.id_column_of(store) is None:
            raise InvalidInput(
                f"Segmentation {store.segmentation.name} declares no id_column: a run needs each customer's id"
            )
        return store.require()

    async def submit(self, store: ModelStore, *, upload: IO[bytes], request: RunRequest) -> ActiveRun:
        """Check the request, take the segmentation's run turn, keep the upload; the run then goes on."""
        served = self.check(store, has_file=True, as_of=request.as_of)
        path = await run_in_threadpool(_keep_upload, upload, self.settings.job_directory)
        self._submitting += 1
        try:
            row = await self._add_run(store, served, request, size=path.stat().st_size)
            run = ActiveRun(row=row, store=store, served=served, request=request, upload=path)
            self._running[row.id] = run
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        finally:
            self._submitting -= 1
        run.task = asyncio.create_task(self._run(run), name=f"customer-run-{row.id}")
        logger.info("run %d of %s started by %s", row.id, store.segmentation.name, request.by)
        return run

    async def _add_run(self, store: ModelStore, served: ServedModel, request: RunRequest, size: int) -> CustomerRun:
        info = store.segmentation
        for _ in range(2):
            previous = await self.rows.current(info.id)
            now = utcnow()
            row = CustomerRun(
                segmentation_id=info.id,
                segmentation=info.name,
                model_version=served.version,
                mode=request.mode,
                status=RUNNING,
                previous_run_id=previous.id if previous is not None else None,
                parameters={
                    "as_of": request.as_of.isoformat() if request.as_of is not None else None,
                    "file": request.filename,
                    "bytes": size,
                },
                created_by=request.by,
                started_at=now,
                worker=self.worker,
                heartbeat_at=now,
            )
            added = await self.rows.add_run(row)
            if added is not None:
                return added
            # Another run is running: unless its worker is gone, that is a 409.
            stale = [r for r in await self.rows.running(info.id) if self._is_stale(r)]
            if not stale or not await self.rows.fail(stale[0], {"detail": WORKER_STOPPED}, None):
                raise Conflict(RUN_RUNNING)
        raise Conflict(RUN_RUNNING)

    async def wait(self, run: ActiveRun) -> dict[str, Any]:
        """The run's answer once it has ended: the landed run, or its error raised."""
        assert run.task is not None
        await asyncio.shield(run.task)
        if run.error is not None:
            raise run.error
        return run_body(run.row)

    # --- running ---------------------------------------------------------------------------

    async def _run(self, run: ActiveRun) -> None:
        watcher = asyncio.create_task(self._watch(run))
        try:
            landed: CustomerRun | None = None
            try:
                landed = await self._score_and_land(run)
                if landed is None:
                    raise RunLost()
            except asyncio.CancelledError:  # this worker stops
                run.error = AppError(WORKER_STOPPED, status_code=503)
            except RunLost:
                run.error = Conflict(LOST)
            except (AppError, MLError) as exc:
                run.error = exc
            except Exception as exc:
                logger.exception("run %d failed", run.row.id)
                run.error = exc
            if landed is not None and run.error is None:
                run.row = landed
                logger.info("run %d of %s completed", landed.id, landed.segmentation)
                return
            body, status = _error_of(run.error or RunLost())
            try:
                await self.rows.fail_own(run.row.id, body, status)
            except Exception:  # the row stays running and is failed as stale
                logger.exception("could not record the end of run %d", run.row.id)
            refreshed = await self._reread(run)
            if refreshed is not None:
                run.row = refreshed
        finally:
            watcher.cancel()
            await run_in_threadpool(run.upload.unlink, missing_ok=True)
            self._running.pop(run.row.id, None)
            self._tidy()

    async def _reread(self, run: ActiveRun) -> CustomerRun | None:
        try:
            return await self.rows.get(run.row.segmentation_id, run.row.id)
        except Exception:  # noqa: BLE001 - the failure itself is what matters
            return None

    async def _watch(self, run: ActiveRun) -> None:
        while True:
            await asyncio.sleep(self.settings.job_heartbeat_seconds)
            try:
                alive = await self.rows.heartbeat(run.row.id)
            except asyncio.CancelledError:
                raise
            except Exception:  # a database hiccup: the next heartbeat tries again
                logger.warning("could not write the heartbeat of run %d", run.row.id, exc_info=True)
                continue
            if not alive:
                run.lost = True

    async def _beat(self, run: ActiveRun) -> None:
        if run.lost:
            raise RunLost()

    async def _score_and_land(self, run: ActiveRun) -> CustomerRun | None:
        store, served, row = run.store, run.served, run.row
        kind = kind_of(store.segmentation)
        clock = time.perf_counter()
        phases: dict[str, float] = {}

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            phases[name] = round(now - clock, 3)
            clock = now

        def score() -> scoring.ScoredCustomers:
            with run.upload.open("rb") as fh:
                if kind.takes_as_of:
                    return scoring.score_log(served, store, fh, run.request.as_of)
                return scoring.score_rows(served, store, fh)

        scored = await run_in_threadpool(score)
        lap("scoring")
        await self._beat(run)
        await self.rows.set_customers(row.id, len(scored))
        await self.rows.stage(row.id, scored, lambda: self._beat(run))
        lap("staging")
        await self.rows.merge(
            run_id=row.id,
            previous_run_id=row.previous_run_id,
            replace=run.request.mode == "replace",
            model_version=served.version,
            ranges=self.rows.merge_ranges(scored),
            beat=lambda: self._beat(run),
        )
        lap("merging")
        counts = _counts(await self.rows.tally(row.id), len(scored))
        await self._beat(run)
        landed = await self.rows.land(row.id, counts, self._queue_events)
        lap("landing")
        logger.info("run %d of %s: %d customers, seconds per phase %s", row.id, row.segmentation, len(scored), phases)
        return landed

    async def _queue_events(self, session: AsyncSession, run: CustomerRun) -> None:
        """run.completed, and segment.changed (CHANGES_PER_MESSAGE changes each), in the landing's transaction."""
        sink = self.events
        if sink is None:
            return
        body = Run(**run_body(run)).model_dump(mode="json")
        await sink.add(session, "run.completed", body, segmentation_id=run.segmentation_id)
        n_changes = (run.n_new or 0) + (run.n_changed or 0) + (run.n_gone or 0)
        parts = math.ceil(n_changes / CHANGES_PER_MESSAGE)
        part = 0
        async for rows in self.rows.changes_in_order(session, run.id, CHANGES_PER_MESSAGE):
            part += 1
            changes = [
                {
                    "customer_id": c.customer_id,
                    "change": c.change,
                    "from_cluster_id": c.from_cluster_id,
                    "to_cluster_id": c.to_cluster_id,
                    "from_segment_key": c.from_segment_key,
                    "to_segment_key": c.to_segment_key,
                }
                for c in rows
            ]
            data = {
                "run_id": run.id,
                "segmentation": run.segmentation,
                "part": part,
                "parts": parts,
                "changes": changes,
            }
            await sink.add(session, "segment.changed", data, segmentation_id=run.segmentation_id)

    # --- reading runs ----------------------------------------------------------------------

    async def runs(self, store: ModelStore, *, skip: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        rows, total = await self.rows.page(store.segmentation.id, skip=skip, limit=limit)
        return [run_body(await self._settled(row)) for row in rows], total

    async def run(self, store: ModelStore, run_id: int) -> dict[str, Any]:
        return run_body(await self._settled(await self._get(store, run_id)))

    async def _get(self, store: ModelStore, run_id: int) -> CustomerRun:
        row = await self.rows.get(store.segmentation.id, run_id)
        if row is None:
            raise NotFound("run")
        return row

    async def _settled(self, row: CustomerRun) -> CustomerRun:
        """The row as it is once a stale running run is marked failed."""
        if self._is_stale(row) and await self.rows.fail(row, {"detail": WORKER_STOPPED}, None):
            fresh = await self.rows.get(row.segmentation_id, row.id)
            return fresh if fresh is not None else row
        return row

    # --- changes ---------------------------------------------------------------------------

    async def changes(self, store: ModelStore, run_id: int, *, after: str | None, limit: int) -> dict[str, Any]:
        row = await self._get(store, run_id)
        rows = await self.rows.changes(row.id, after=after, limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return {
            "run_id": row.id,
            "previous_run_id": row.previous_run_id,
            "entered": dict(row.entered or {}),
            "left": dict(row.left or {}),
            "items": [
                {
                    "customer_id": r[0],
                    "change": r[1],
                    "from_cluster_id": r[2],
                    "to_cluster_id": r[3],
                    "from_segment_key": r[4],
                    "to_segment_key": r[5],
                }
                for r in rows
            ],
            "next_after": rows[-1][0] if more and rows else None,
        }

    async def changes_csv(self, store: ModelStore, run_id: int) -> AsyncIterator[bytes]:
        """Every change of a run as CSV; the first page is read before the answer starts (a 404 stays a 404)."""
        row = await self._get(store, run_id)
        header = ["customer_id", "change", "from_cluster_id", "to_cluster_id", "from_segment_key", "to_segment_key"]

        async def page(after: str | None) -> list[tuple[Any, ...]]:
            return await self.rows.changes(row.id, after=after, limit=STREAM_PAGE)

        return _csv_stream(header, page, lambda rows: rows)

    # --- a customer ------------------------------------------------------------------------

    async def customer(self, store: ModelStore, customer_id: str) -> dict[str, Any]:
        membership, history = await self.rows.customer(store.segmentation.id, customer_id, HISTORY_LIMIT)
        if membership is None:
            raise NotFound("customer")
        segments = _active_segments(store)
        cluster_id, cluster_name = segments.get(membership.segment_key or "", (None, None))
        return {
            "customer_id": membership.customer_id,
            "status": membership.status,
            "cluster_id": cluster_id if membership.status == ACTIVE else None,
            "cluster_name": cluster_name if membership.status == ACTIVE else None,
            "segment_key": membership.segment_key,
            "confidence": membership.confidence,
            "model_version": membership.model_version,
            "since_run_id": membership.since_run_id,
            "p_alive": membership.p_alive,
            "clv": membership.clv,
            "history": [
                {
                    "run_id": run_id,
                    "cluster_id": segments.get(key or "", (None, None))[0],
                    "cluster_name": segments.get(key or "", (None, None))[1],
                    "segment_key": key,
                }
                for run_id, key, _ in history
            ],
        }

    # --- an audience -----------------------------------------------------------------------

    def _segment(self, store: ModelStore, cluster_id: int) -> tuple[ServedModel, dict[str, Any], str]:
        served = store.require()
        if not 0 <= cluster_id < len(served.segments):
            raise NotFound("segment")
        segment = served.segments[cluster_id]
        return served, segment, segment_key_of(segment, served.version)

    def _filters(self, store: ModelStore, query: Any) -> dict[str, float | None]:
        filters = {name: getattr(query, name, None) for name in ("min_p_alive", "max_p_alive", "min_clv")}
        if any(v is not None for v in filters.values()) and not kind_of(store.segmentation).takes_as_of:
            raise InvalidInput("`min_p_alive`, `max_p_alive` and `min_clv` are for segmentations of kind rfm")
        return filters

    async def audience(self, store: ModelStore, cluster_id: int, query: Any) -> dict[str, Any]:
        _, segment, key = self._segment(store, cluster_id)
        filters = self._filters(store, query)
        current = await self.rows.current(store.segmentation.id)
        rows: list[tuple[Any, ...]] = []
        if current is not None:
            rows = await self.rows.audience(current.id, key, after=query.after, limit=query.limit + 1, **filters)
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        rfm = kind_of(store.segmentation).takes_as_of
        return {
            "segmentation": store.segmentation.name,
            "cluster_id": cluster_id,
            "cluster_name": segment["cluster_name"],
            "segment_key": key,
            "run_id": current.id if current is not None else None,
            "items": [
                {"customer_id": r[0], "confidence": r[1], "since_run_id": r[2]}
                | ({"p_alive": r[3], "clv": r[4]} if rfm else {})
                for r in rows
            ],
            "next_after": rows[-1][0] if more and rows else None,
        }

    async def audience_csv(self, store: ModelStore, cluster_id: int, query: Any) -> AsyncIterator[bytes]:
        _, segment, key = self._segment(store, cluster_id)
        filters = self._filters(store, query)
        current = await self.rows.current(store.segmentation.id)
        rfm = kind_of(store.segmentation).takes_as_of
        header = ["customer_id", "cluster_id", "cluster_name", "segment_key", "confidence", "since_run_id"]
        if rfm:
            header += ["p_alive", "clv"]
        name = inert_column(pd.Series([segment["cluster_name"]], dtype=object))[0]

        async def page(after: str | None) -> list[tuple[Any, ...]]:
            if current is None:
                return []
            return await self.rows.audience(current.id, key, after=after, limit=STREAM_PAGE, **filters)

        def lines(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
            if rfm:
                return [(r[0], cluster_id, name, key, r[1], r[2], r[3], r[4]) for r in rows]
            return [(r[0], cluster_id, name, key, r[1], r[2]) for r in rows]

        return _csv_stream(header, page, lines)


STREAM_PAGE = 50_000


def _csv_stream(header: list[str], page: Any, lines: Any) -> AsyncIterator[bytes]:
    """Pages read one after another by customer id (each a short read), written as CSV in a thread."""

    def render(rows: list[tuple[Any, ...]], with_header: bool) -> bytes:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        if with_header:
            writer.writerow(header)
        if rows:
            ids = inert_column(pd.Series([r[0] for r in rows], dtype=object))
            writer.writerows((cid, *row[1:]) for cid, row in zip(ids, lines(rows), strict=True))
        return out.getvalue().encode()

    async def stream() -> AsyncIterator[bytes]:
        # The next page is read while this one is written out.
        pending = asyncio.ensure_future(page(None))
        first = True
        try:
            while True:
                rows = await pending
                more = len(rows) == STREAM_PAGE
                if more:
                    pending = asyncio.ensure_future(page(rows[-1][0]))
                yield await run_in_threadpool(render, rows, first)
                first = False
                if not more:
                    return
        finally:
            pending.cancel()

    return stream()


def _active_segments(store: ModelStore) -> dict[str, tuple[int, str]]:
    """{segment_key: (cluster_id, cluster_name)} in the active version."""
    served = store.current
    if served is None:
        return {}
    return {
        segment_key_of(segment, served.version): (int(segment["cluster_id"]), str(segment["cluster_name"]))
        for segment in served.segments
    }


def _counts(tally: list[tuple[str, str | None, str | None, int]], n_customers: int) -> dict[str, Any]:
    counts = {"new": 0, "changed": 0, "gone": 0}
    entered: dict[str, int] = {}
    left: dict[str, int] = {}
    for change, from_key, to_key, n in tally:
        counts[change] = counts.get(change, 0) + n
        if to_key is not None:
            entered[to_key] = entered.get(to_key, 0) + n
        if from_key is not None:
            left[from_key] = left.get(from_key, 0) + n
    return {
        "n_customers": n_customers,
        "n_new": counts["new"],
        "n_changed": counts["changed"],
        "n_unchanged": n_customers - counts["new"] - counts["changed"],
        "n_gone": counts["gone"],
        "entered": entered,
        "left": left,
    }


def _keep_upload(source: IO[bytes], directory: Path) -> Path:
    """Copy the request's upload (closed after the response) to a file the run owns."""
    directory.mkdir(parents=True, exist_ok=True)
    source.seek(0)
    fd, name = tempfile.mkstemp(prefix="run-", suffix=".upload", dir=directory)
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(source, out, 1024 * 1024)
    return Path(name)
