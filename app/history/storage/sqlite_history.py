"""History on a SQLite file over plain sqlite3 connections, each on a thread of its own.

The one module of the service that talks to sqlite3 directly. Through aiosqlite every step
(cursor, insert, commit, reset) is a trip to its thread and back, and under load each return
waits for a turn of the busy event loop: the group commit, and so every prediction, took
tens of milliseconds. Here a batch is one trip to the writer thread and a page one trip to
the reader thread, and nothing blocking runs on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from operator import itemgetter
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import func, select, true
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import DBAPIError

from app.core.database import sqlite_pragmas
from app.core.tables import PREDICTION_HISTORY
from app.history.pages import page_bytes
from app.history.storage.history import (
    CURSOR_FOUND,
    ITEMS,
    MAX_KEPT_ITEMS,
    TOTAL,
    HistoryRepository,
    KeptItems,
    page_keys,
    trim,
    unknown_cursor,
)

T = TypeVar("T")

# A page's keys, [id, created_at] each, by (created_at, id).
_NEWEST_FIRST = itemgetter(1, 0)
# A reader never waits for a writer under WAL; should it ever be told to wait, it gives up this soon.
READ_BUSY_TIMEOUT_MS = 200


def _page_statement(*, before: bool) -> str:
    """The total, whether the cursor row exists and the page's keys as one JSON array, in one row.

    One statement is one snapshot (the total and the keys agree) and one row is a single
    SQLite step: the reader thread lets go of the GIL once per step and, with the event loop
    busy, may wait a while to get it back, so a page is shaped to need as few as it can.
    """
    keys = page_keys(before=before).subquery("page")
    keys_json = select(func.json_group_array(func.json_array(keys.c.id, keys.c.created_at))).scalar_subquery()
    found = CURSOR_FOUND if before else true()
    statement = select(TOTAL, found, keys_json)
    return str(statement.compile(dialect=sqlite_dialect.dialect(paramstyle="named")))


class BatchedThread:
    """One thread that runs the calls handed to it, the calls that arrive meanwhile in one hand-over.

    A hand-over to a thread and back (its queue, a wake-up each way, the GIL changing hands)
    costs more than a page read. Under load many pages arrive together: the first call hands
    itself over, the ones that arrive while it runs wait and go over together next, so the
    cost is shared by the batch. A lone call still takes one hand-over and no more.
    """

    def __init__(self, name: str, *, max_batch: int = 64) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.max_batch = max_batch
        self._pending: list[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]] = []
        self._draining: asyncio.Task[None] | None = None

    async def call(self, work: Callable[..., T], *args: Any) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((work, args, future))
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                live = [(work, args, future) for work, args, future in batch if not future.done()]
                outcomes = await loop.run_in_executor(self.executor, _run_each, [(w, a) for w, a, _ in live])
                for (_, _, future), (failed, value) in zip(live, outcomes, strict=True):
                    if future.done():  # its request was cancelled while the batch ran
                        continue
                    if failed:
                        future.set_exception(value)
                    else:
                        future.set_result(value)
        except BaseException as exc:  # the thread pool shut down, or the task was cancelled
            for _, _, future in self._pending:
                if not future.done():
                    future.set_exception(RuntimeError(f"history thread stopped: {exc!r}"))
            self._pending.clear()
            raise
        finally:
            self._draining = None

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)


def _run_each(calls: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> list[tuple[bool, Any]]:
    """On the thread: each call in turn, its result or its exception, one failing none of the others."""
    outcomes: list[tuple[bool, Any]] = []
    for work, args in calls:
        try:
            outcomes.append((False, work(*args)))
        except Exception as exc:
            outcomes.append((True, exc))
    return outcomes


def _removed() -> sqlite3.OperationalError:
    error = sqlite3.OperationalError("unable to open database file: it was removed")
    error.sqlite_errorcode = sqlite3.SQLITE_CANTOPEN  # type: ignore[attr-defined]
    error.sqlite_errorname = "SQLITE_CANTOPEN"  # type: ignore[attr-defined]
    return error


class _FileConnection:
    """One sqlite3 connection to the database file, used by one thread only.

    Like the async engine (see Database), a file removed from under it is an outage reported
    to the caller, never a silent read of (or write into) the removed file; a new file at the
    path gets a new connection.
    """

    def __init__(self, path: Path, setup: Callable[[sqlite3.Connection], None]) -> None:
        self.path = path
        self._setup = setup
        self._connection: sqlite3.Connection | None = None
        self._file: tuple[int, int] | None = None

    def get(self) -> sqlite3.Connection:
        try:
            stat = os.stat(self.path)
        except OSError:
            self.close()
            raise _removed() from None
        file = (stat.st_dev, stat.st_ino)
        if self._connection is None or self._file != file:
            self.close()
            connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                self._setup(connection)
            except sqlite3.Error:
                connection.close()
                raise
            self._connection, self._file = connection, file
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except sqlite3.Error:
                pass
            self._connection = None


class SQLiteHistoryRepository(HistoryRepository):
    """History on a SQLite file: the writer and the reader each a thread with its own connection.

    Rows are stored exactly as the async engine stores them: the statement is compiled from
    the table and each column goes through its SQLite bind processor (JSON text, UTC
    timestamps). A batch is one multi-row INSERT in autocommit mode (one statement is one
    transaction: one step, no BEGIN or COMMIT). A page is one statement on a read-only
    connection, which under WAL never waits for the writer, plus one for rows not kept yet;
    the kept rows (KeptItems) live on the reader thread alone. Errors come out as
    SQLAlchemy's exception classes, so the API maps them as it maps the engine's.
    """

    def __init__(
        self, path: Path, *, busy_timeout: float, max_batch: int = 500, max_kept: int = MAX_KEPT_ITEMS
    ) -> None:
        super().__init__(max_batch=max_batch)
        self.path = path
        dialect = sqlite_dialect.dialect()
        table = PREDICTION_HISTORY
        columns = [column for column in table.columns if column.name != "id"]
        self._names = [column.name for column in columns]
        self._processors = [column.type.dialect_impl(dialect).bind_processor(dialect) for column in columns]
        single = str(table.insert().compile(dialect=dialect, column_keys=self._names))
        self._head, _, self._values = single.partition(" VALUES ")  # "INSERT INTO ... (...)", "(?, ...)"
        self._statements: dict[int, str] = {}
        self._pages = {False: _page_statement(before=False), True: _page_statement(before=True)}
        self._items_sql = str(ITEMS.compile(dialect=sqlite_dialect.dialect(paramstyle="named")))
        self.kept = KeptItems(max_kept)
        busy_ms = int(busy_timeout * 1000)
        self._writer = _FileConnection(path, lambda connection: sqlite_pragmas(busy_ms)(connection, None))
        self._reader = _FileConnection(path, self._read_only)
        self._write_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="history-writer")
        self._reads = BatchedThread("history-reader")
        self._closed = False

    @staticmethod
    def _read_only(connection: sqlite3.Connection) -> None:
        connection.execute(f"PRAGMA busy_timeout={READ_BUSY_TIMEOUT_MS}")
        connection.execute("PRAGMA query_only=ON")

    async def insert(self, rows: list[dict[str, Any]]) -> None:
        await self._on(self._write_thread, self._insert, rows)

    async def page(self, *, user_id: int, skip: int, limit: int, before_id: int | None = None) -> bytes:
        return await self._reads.call(self._page, user_id, skip, limit, before_id)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        for thread, connection in ((self._write_thread, self._writer), (self._reads.executor, self._reader)):
            thread.submit(connection.close)
            await loop.run_in_executor(None, thread.shutdown)

    @staticmethod
    async def _on(thread: ThreadPoolExecutor, work: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(thread, work, *args)

    # ---- on the writer thread

    def _statement(self, count: int) -> str:
        statement = self._statements.get(count)
        if statement is None:
            statement = self._statements[count] = f"{self._head} VALUES {', '.join([self._values] * count)}"
        return statement

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        pairs = list(zip(self._names, self._processors, strict=True))
        params = [row[name] if process is None else process(row[name]) for row in rows for name, process in pairs]
        statement = self._statement(len(rows))
        try:
            self._writer.get().execute(statement, params)
        except sqlite3.Error as exc:
            if not isinstance(exc, sqlite3.IntegrityError):
                self._writer.close()  # whatever went wrong, the next batch starts on a fresh connection
            raise DBAPIError.instance(statement, None, exc, sqlite3.Error) from exc

    # ---- on the reader thread

    def _page(self, user_id: int, skip: int, limit: int, before_id: int | None) -> bytes:
        params = {"user_id": user_id, "skip": skip, "limit": limit + 1, "before_id": before_id}
        statement = self._pages[before_id is not None]
        kept = self.kept
        try:
            connection = self._reader.get()
            total, found, keys_json = connection.execute(statement, params).fetchone()
            if not found:
                raise unknown_cursor(before_id or 0)
            # Sorted here too: the order of json_group_array's elements is not a documented promise.
            ordered = sorted(json.loads(keys_json), key=_NEWEST_FIRST, reverse=True)
            keys, next_before_id = trim([(key[0], key[1]) for key in ordered], limit)
            items, missing = kept.lookup(keys)
            if missing:
                statement = self._items_sql
                items.update(kept.keep(connection.execute(statement, {"ids": json.dumps(missing)}).fetchall()))
        except sqlite3.Error as exc:
            self._reader.close()
            raise DBAPIError.instance(statement, None, exc, sqlite3.Error) from exc
        body = [items[key] for key in keys if key in items]
        return page_bytes(body, total=total, skip=skip, limit=limit, next_before_id=next_before_id)
