"""Writing predictions: single ones into history through a group commit, batches as one counted row."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import async_sessionmaker

from app.database import BatchPrediction, Database, PredictionHistory, utcnow
from app.database import _sqlite_pragmas as sqlite_pragmas

logger = logging.getLogger("app.predictions")


class HistoryWriter:
    """Many requests wait on one shared transaction: a 200 still means the row is committed.

    Rows queue up while the previous commit is in flight and are then inserted and
    committed together, so the database sees one transaction per burst, not per request.

    With SQLite a batch is inserted and committed in one trip to a thread of its own, over a
    synchronous connection to the same file. Through aiosqlite every step (cursor, insert,
    commit, reset) is a trip to its thread and back, and under load each return waits for
    a turn of the busy event loop: the commit cycle, and so every prediction, took tens of
    milliseconds.
    """

    def __init__(self, database: Database, *, busy_timeout: float = 15.0, max_batch: int = 500) -> None:
        self.sessionmaker = database.sessionmaker
        self.max_batch = max_batch
        self._pending: list[tuple[dict[str, Any], asyncio.Future]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._sqlite: _SQLiteBatchWriter | None = None
        if database.is_sqlite:
            path = database.engine.url.database
            if path and path != ":memory:" and not path.startswith("file:"):
                self._sqlite = _SQLiteBatchWriter(os.path.abspath(path), busy_timeout)

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
        if self._sqlite is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._sqlite.close)

    async def add(self, row: dict[str, Any]) -> None:
        if self._task is None or self._task.done():
            await self._insert([row])
            return
        future = asyncio.get_running_loop().create_future()
        self._pending.append((row, future))
        self._wake.set()
        await future

    async def _insert(self, rows: list[dict[str, Any]]) -> None:
        if self._sqlite is not None:
            await self._sqlite.insert(rows)
            return
        async with self.sessionmaker() as session:
            # A Core insert: the ORM's bulk path costs about twice as much per row.
            await session.execute(PredictionHistory.__table__.insert(), rows)
            await session.commit()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
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


def history_row(
    *, user_id: int, customer: dict[str, Any], cluster: int, cluster_name: str, confidence: float, model_version: str
) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "customer_data": customer,
        "cluster": cluster,
        "cluster_name": cluster_name,
        "confidence": confidence,
        "model_version": model_version,
        "created_at": utcnow(),
    }


async def record_batch(
    *, sessionmaker: async_sessionmaker, user_id: int, model_version: str, labels: np.ndarray, n_failed: int
) -> None:
    counts = np.bincount(np.asarray(labels, dtype=np.int64)) if len(labels) else np.zeros(0, dtype=np.int64)
    async with sessionmaker() as session:
        session.add(
            BatchPrediction(
                user_id=user_id,
                model_version=model_version,
                n_rows=int(len(labels)) + n_failed,
                n_failed=n_failed,
                cluster_counts={str(k): int(v) for k, v in enumerate(counts) if v},
            )
        )
        await session.commit()


class _SQLiteBatchWriter:
    """Inserts a batch of history rows in one statement on a thread of its own, over one plain
    sqlite3 connection to the same file.

    Rows are stored exactly as the async engine stores them: the statement is compiled from
    the table and each column goes through its SQLite bind processor (JSON text, UTC
    timestamps). The work is shaped around the GIL, which the busy event loop holds nearly
    all the time and gives up only every few milliseconds: every time the writer lets go of
    it (a system call, each SQLite step) it may wait that long to get it back. So the batch is
    one multi-row INSERT in autocommit mode (one statement is one transaction: one step, no
    BEGIN or COMMIT), the file is looked at on the event loop before the hand-over, and no
    SQLAlchemy engine sits in between (its checkout and transaction handling cost about 70 µs
    a batch). Errors come out as SQLAlchemy's exception classes, so the API maps them as it
    maps the engine's. Like the async engine (see Database), a database file removed from
    under it is an outage reported to the caller, never a silent write into the removed file.
    """

    def __init__(self, path: str, busy_timeout: float) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        dialect = sqlite_dialect.dialect()
        table = PredictionHistory.__table__
        columns = [column for column in table.columns if column.name != "id"]
        self._names = [column.name for column in columns]
        self._processors = [column.type.dialect_impl(dialect).bind_processor(dialect) for column in columns]
        single = str(table.insert().compile(dialect=dialect, column_keys=self._names))
        self._head, _, self._values = single.partition(" VALUES ")  # "INSERT INTO ... (...)", "(?, ...)"
        self._statements: dict[int, str] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="history-writer")
        self._connection: sqlite3.Connection | None = None
        self._file: tuple[int, int] | None = None

    async def insert(self, rows: list[dict[str, Any]]) -> None:
        try:
            stat = os.stat(self.path)
        except OSError:
            raise OperationalError(
                self._statement(len(rows)),
                None,
                sqlite3.OperationalError("unable to open database file: it was removed"),
            ) from None
        await asyncio.get_running_loop().run_in_executor(self._executor, self._insert, rows, (stat.st_dev, stat.st_ino))

    def _statement(self, count: int) -> str:
        statement = self._statements.get(count)
        if statement is None:
            statement = self._statements[count] = f"{self._head} VALUES {', '.join([self._values] * count)}"
        return statement

    def _insert(self, rows: list[dict[str, Any]], file: tuple[int, int]) -> None:
        pairs = list(zip(self._names, self._processors))
        params = [row[name] if process is None else process(row[name]) for row in rows for name, process in pairs]
        statement = self._statement(len(rows))
        try:
            if self._connection is None or self._file != file:
                self._disconnect()  # a new file at the path: stop writing into the old one
                connection = sqlite3.connect(
                    self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
                )
                sqlite_pragmas(int(self.busy_timeout * 1000))(connection, None)
                self._connection, self._file = connection, file
            self._connection.execute(statement, params)
        except sqlite3.Error as exc:
            if not isinstance(exc, sqlite3.IntegrityError):
                self._disconnect()  # whatever went wrong, the next batch starts on a fresh connection
            raise DBAPIError.instance(statement, None, exc, sqlite3.Error) from exc

    def _disconnect(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except sqlite3.Error:
                pass
            self._connection = None

    def close(self) -> None:
        self._executor.submit(self._disconnect)
        self._executor.shutdown(wait=True)
