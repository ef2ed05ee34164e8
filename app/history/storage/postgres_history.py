"""History on PostgreSQL through asyncpg's own calls, on connections of the engine's pool.

The engine's execution path (execution context, result processing, one Python object per
row, the isolation level set and reset around each checkout) was most of a history page's
cost. Here a connection is checked out of the engine's pool as usual and the statements,
compiled once from the same SQLAlchemy constructs, run on its asyncpg connection
(`AsyncConnection.get_raw_connection().driver_connection`): a page is one statement that
returns one row, and a batch of rows is one INSERT over arrays, its own transaction.
asyncpg's errors come out as SQLAlchemy's exception classes, so the API maps them as it maps
the engine's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import asyncpg
from sqlalchemy import Select, func, select, true
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import QueuePool

from app.core.database import PING_IDLE_SECONDS, Database
from app.core.tables import PREDICTION_HISTORY
from app.history.pages import page_bytes
from app.history.storage.history import (
    CURSOR_FOUND,
    ITEMS_PG,
    MAX_KEPT_ITEMS,
    TOTAL,
    EngineHistoryRepository,
    KeptItems,
    page_keys,
    unknown_cursor,
)

# Columns a history insert names, in order; the array type each is passed as.
_INSERT_COLUMNS = (
    ("user_id", "integer"),
    ("customer_data", "text"),
    ("cluster", "integer"),
    ("cluster_name", "text"),
    ("confidence", "double precision"),
    ("model_version", "text"),
    ("created_at", "timestamptz"),
    ("segmentation_id", "integer"),
    ("segmentation", "text"),
)
_INSERT = (
    f"INSERT INTO {PREDICTION_HISTORY.name} ({', '.join(name for name, _ in _INSERT_COLUMNS)}) "
    f"SELECT user_id, customer_data::json, cluster, cluster_name, confidence, model_version, created_at, "
    f"segmentation_id, segmentation "
    f"FROM unnest({', '.join(f'${n}::{kind}[]' for n, (_, kind) in enumerate(_INSERT_COLUMNS, 1))}) "
    f"AS given({', '.join(name for name, _ in _INSERT_COLUMNS)})"
)


def _page_statement(*, before: bool) -> Select:
    """The total, whether the cursor row exists and the page's ids (newest first, one past the page) in one row."""
    keys = page_keys(before=before).subquery("page")
    ids = select(func.array_agg(aggregate_order_by(keys.c.id, keys.c.created_at.desc(), keys.c.id.desc())))
    return select(TOTAL, CURSOR_FOUND if before else true(), ids.scalar_subquery())


class _Statement:
    """A statement compiled once for asyncpg: its text and the order of its parameters."""

    def __init__(self, statement: Select, database: Database) -> None:
        compiled = statement.compile(dialect=database.engine.dialect)
        self.sql = compiled.string
        self.names = list(compiled.positiontup or [])

    def args(self, params: dict[str, Any]) -> list[Any]:
        return [params[name] for name in self.names]


def _translated(exc: Exception, statement: str) -> DBAPIError:
    """asyncpg's error as the SQLAlchemy exception the engine would have raised (the original as `orig`)."""
    sqlstate = str(getattr(exc, "sqlstate", "") or "")
    kind: type[DBAPIError]
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        kind = IntegrityError
    elif sqlstate.startswith("22"):
        kind = DataError
    elif isinstance(exc, asyncpg.SyntaxOrAccessError):
        kind = ProgrammingError
    elif isinstance(exc, asyncpg.PostgresError) and not sqlstate.startswith(("08", "53", "57")):
        kind = DBAPIError
    else:  # the connection or the server is gone or refusing work: an outage
        kind = OperationalError
    return kind(statement, None, exc, connection_invalidated=kind is OperationalError)


class _HeldConnections:
    """Up to `size` of the engine's pooled connections kept checked out between history statements.

    A checkout from the pool and back cost about as much as the statement itself. A connection
    idle for longer than the pool's ping interval goes back to the pool, whose checkout pings
    it; one asyncpg saw closed (a restart, an idle timeout) or one broken by an error is
    invalidated and never reused. Connections past `size` go straight back to the pool.
    """

    def __init__(self, engine: AsyncEngine, size: int) -> None:
        self._engine = engine
        self._size = size
        self._idle: list[tuple[AsyncConnection, Any, float]] = []

    async def take(self) -> tuple[AsyncConnection, Any]:
        while self._idle:
            conn, driver, since = self._idle.pop()
            if driver.is_closed():
                await self.discard(conn)
            elif time.monotonic() - since > PING_IDLE_SECONDS:
                await conn.close()
            else:
                return conn, driver
        conn = await self._engine.connect()
        try:
            raw = await conn.get_raw_connection()
        except BaseException:
            await conn.close()
            raise
        return conn, raw.driver_connection

    async def give_back(self, conn: AsyncConnection, driver: Any) -> None:
        if len(self._idle) < self._size:
            self._idle.append((conn, driver, time.monotonic()))
        else:
            await conn.close()

    @staticmethod
    async def discard(conn: AsyncConnection) -> None:
        with suppress(Exception):
            await conn.invalidate()
        with suppress(Exception):
            await conn.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn, _, _ in idle:
            with suppress(Exception):
                await conn.close()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """An asyncpg connection; given back when the block ends cleanly, else invalidated."""
        conn, driver = await self.take()
        try:
            yield driver
        except (DBAPIError, asyncio.CancelledError):
            # The statement failed or was interrupted midway: the connection's state is unknown.
            await self.discard(conn)
            raise
        except BaseException:
            await self.give_back(conn, driver)
            raise
        else:
            await self.give_back(conn, driver)


class PostgresHistoryRepository(EngineHistoryRepository):
    """History on PostgreSQL: the engine repository's rules, each step one asyncpg call.

    Ids come from a sequence and are never given again, so a kept row is keyed by its id alone.
    """

    def __init__(self, database: Database, *, max_batch: int = 500, max_kept: int = MAX_KEPT_ITEMS) -> None:
        super().__init__(database, max_batch=max_batch, max_kept=max_kept)
        # The statements below run outside the engine's transactions (asyncpg autocommits
        # each one), so no isolation level is set and reset around each checkout.
        pool = database.engine.pool
        self._held = _HeldConnections(database.engine, pool.size() // 4 if isinstance(pool, QueuePool) else 0)
        self.kept = KeptItems(max_kept, keyed_by_id=True)
        self._pages = {before: _Statement(_page_statement(before=before), database) for before in (False, True)}
        self._items_sql = _Statement(ITEMS_PG, database)
        self._processors = []
        dialect = database.engine.dialect
        for name, _ in _INSERT_COLUMNS:
            column = PREDICTION_HISTORY.c[name]
            self._processors.append((name, column.type.dialect_impl(dialect).bind_processor(dialect)))

    async def insert(self, rows: list[dict[str, Any]]) -> None:
        columns: list[list[Any]] = [[] for _ in self._processors]
        for row in rows:
            for values, (name, process) in zip(columns, self._processors, strict=True):
                values.append(row[name] if process is None else process(row[name]))
        async with self._held.connection() as conn:
            await self._call(conn, "execute", _INSERT, columns)

    async def page(self, *, user_id: int, skip: int, limit: int, before_id: int | None = None) -> bytes:
        params = {"user_id": user_id, "skip": skip, "limit": limit + 1, "before_id": before_id}
        statement = self._pages[before_id is not None]
        kept = self.kept
        async with self._turn(), self._held.connection() as conn:
            total, found, ids = await self._call(conn, "fetchrow", statement.sql, statement.args(params))
            if not found:
                raise unknown_cursor(before_id or 0)
            ids = ids or []
            next_before_id = None
            if len(ids) > limit:
                ids = ids[:limit]
                next_before_id = ids[-1]
            items, missing = kept.lookup(ids)
            if missing:
                rows = await self._call(conn, "fetch", self._items_sql.sql, [missing])
                items.update(kept.keep(rows))
        body = [items[row_id] for row_id in ids if row_id in items] if missing else [items[row_id] for row_id in ids]
        return page_bytes(body, total=total, skip=skip, limit=limit, next_before_id=next_before_id)

    async def close(self) -> None:
        await self._held.close()

    @staticmethod
    async def _call(conn: Any, method: str, sql: str, args: Sequence[Any]) -> Any:
        try:
            return await getattr(conn, method)(sql, *args)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise _translated(exc, sql) from exc
