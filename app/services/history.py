"""Prediction history: one row per single prediction, newest first."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Integer, Text, any_, bindparam, cast, func, select, true
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.pool import QueuePool

from app.database import Database, HistoryCount, PredictionHistory

logger = logging.getLogger("app.history")

# The total is the user's count, kept by triggers in the same transactions as the rows: as
# cheap at a million rows as at ten, and as current as the rows it is read with.
_COUNT = select(HistoryCount.total).where(HistoryCount.user_id == bindparam("user_id"))
_ROWS = (
    select(
        PredictionHistory.id,
        # The stored JSON text goes into the answer as it is: parsing it only to write it again is most of the work.
        cast(PredictionHistory.customer_data, Text).label("customer_data"),
        PredictionHistory.cluster,
        PredictionHistory.cluster_name,
        PredictionHistory.confidence,
        PredictionHistory.model_version,
        PredictionHistory.created_at,
    )
    .where(PredictionHistory.user_id == bindparam("user_id"))
    .order_by(PredictionHistory.created_at.desc(), PredictionHistory.id.desc())
    .limit(bindparam("limit"))
    .offset(bindparam("skip"))
)
# The page as keys only: answered from the (user_id, created_at) index alone, no table reads.
_KEYS = (
    select(PredictionHistory.id, PredictionHistory.created_at)
    .where(PredictionHistory.user_id == bindparam("user_id"))
    .order_by(PredictionHistory.created_at.desc(), PredictionHistory.id.desc())
    .limit(bindparam("limit"))
    .offset(bindparam("skip"))
)
# Rows by id, the ids given as one array (one statement whatever their number): a JSON
# array for SQLite, a PostgreSQL array for PostgreSQL.
_ITEM_IDS = func.json_each(bindparam("ids")).table_valued("value")
_ITEMS = select(*_ROWS.selected_columns).where(PredictionHistory.id.in_(select(_ITEM_IDS.c.value)))
_ITEMS_PG = select(*_ROWS.selected_columns).where(
    PredictionHistory.id == any_(bindparam("ids", type_=postgresql.ARRAY(Integer)))
)
# Over the network, the total and the page's keys in one statement (one round trip, no
# transaction needed for them to agree); a page past the end is one row of NULLs after the total.
_total = select(func.coalesce(_COUNT.scalar_subquery(), 0).label("total")).subquery("total")
_page_keys = _KEYS.subquery("page")
_TOTAL_AND_KEYS = (
    select(*_total.c, *_page_keys.c)
    .select_from(_total.outerjoin(_page_keys, true()))
    .order_by(_page_keys.c.created_at.desc(), _page_keys.c.id.desc())
)
# A reader never waits for a writer under WAL; should it ever be told to wait, it gives up this soon.
READ_BUSY_TIMEOUT_MS = 200


def _timestamp(value: datetime | str) -> str:
    """ISO 8601 in UTC as Pydantic writes it (`Z`, no fraction when it is zero)."""
    if isinstance(value, str):
        if len(value) == 26 and value[10] == " " and value[19] == ".":  # SQLite's "YYYY-MM-DD HH:MM:SS.ffffff"
            return f"{value[:10]}T{value[11:19] if value.endswith('.000000') else value[11:]}Z"
        value = datetime.fromisoformat(value)
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat() + "Z"


def item_json(row: Sequence[Any], quoted: dict[str | None, str]) -> str:
    """One HistoryItem as JSON from its row (id, customer_data, ..., created_at).

    The stored customer JSON is copied as it is; `quoted` keeps names and versions already
    quoted (they repeat from row to row); SQLite's timestamps are reshaped by slicing.
    """
    row_id, customer, cluster, name, confidence, version, created = row
    name_json = quoted.get(name)
    if name_json is None:
        name_json = quoted[name] = json.dumps(name)
    version_json = quoted.get(version)
    if version_json is None:
        version_json = quoted[version] = json.dumps(version)
    if isinstance(created, str) and len(created) == 26:  # SQLite's "YYYY-MM-DD HH:MM:SS.ffffff"
        stamp = created[:10] + "T" + created[11:19] if created.endswith(".000000") else created.replace(" ", "T")
    else:
        stamp = _timestamp(created)[:-1]
    return (
        f'{{"id":{row_id},"customer_data":{customer},"cluster":{cluster},"cluster_name":{name_json},'
        f'"confidence":{confidence!r},"model_version":{version_json},"created_at":"{stamp}Z"}}'
    )


def _page(items: Iterable[str], *, total: int, skip: int, limit: int) -> bytes:
    return f'{{"history":[{",".join(items)}],"total":{total},"skip":{skip},"limit":{limit}}}'.encode()


def page_json(rows: Sequence[Sequence[Any]], *, total: int, skip: int, limit: int) -> bytes:
    """A HistoryPage as JSON, written straight from the page's rows (id, customer_data, ..., created_at).

    What HistoryReader sends, from kept rows or fresh ones; tests/test_history_page.py holds it
    equal to HistoryPage's own serialization.
    """
    quoted: dict[str | None, str] = {}
    return _page([item_json(row, quoted) for row in rows], total=total, skip=skip, limit=limit)


class HistoryReader:
    """Pages of a user's history, as the JSON of a HistoryPage.

    The total and the page's keys come from one snapshot, so they agree, and every commit
    made before it (a prediction answered with 200) is in it. With SQLite the short reads run
    right on the event loop through a private read-only connection: under WAL a reader never
    waits for a writer, and the reads take less time than one trip to aiosqlite's thread
    and back. PostgreSQL, or any trouble with the private connection, uses the engine.

    History rows never change once written, so each row's JSON is kept, keyed by id and
    timestamp (SQLite may give a deleted row's id to a new row; never with the same
    microsecond). A page is then its keys, read from the index alone, and only the rows not
    kept yet are read and written out: a page of kept rows costs a fifth of a fresh one.
    Only rows the index lists for this user and page are ever sent, so a deleted row drops
    out at once (one deleted between the keys and the rows is left out of the page).
    """

    MAX_KEPT_ITEMS = 20_000  # about 10 MB

    def __init__(self, database: Database) -> None:
        self.database = database
        # A single statement needs no transaction around it: no BEGIN and ROLLBACK round trips.
        self._engine = database.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._engine_items = _ITEMS_PG if database.engine.dialect.name == "postgresql" else _ITEMS
        # Pages read through a server's pool at once: a few connections short of the pool, so
        # the rest of the service still finds one. Pages past that wait here, on a semaphore:
        # waiting in SQLAlchemy's async pool instead cost 40% more CPU a page with 64 in flight.
        pool = database.engine.pool
        self._slots: asyncio.Semaphore | None = None
        self._slot_timeout = 0.0
        if not database.is_sqlite and isinstance(pool, QueuePool):
            self._slots = asyncio.Semaphore(max(1, pool.size() - max(1, pool.size() // 10)))
            self._slot_timeout = pool.timeout()
        self._path: str | None = None
        if database.is_sqlite:
            name = database.engine.url.database
            if name and name != ":memory:" and not name.startswith("file:"):
                self._path = os.path.abspath(name)
                dialect = sqlite_dialect.dialect(paramstyle="named")
                self._count_sql = _COUNT.compile(dialect=dialect).string
                self._keys_sql = _KEYS.compile(dialect=dialect).string
                self._items_sql = _ITEMS.compile(dialect=dialect).string
        self._connection: sqlite3.Connection | None = None
        self._file: tuple[int, int] | None = None
        self._items: dict[tuple[int, str], str] = {}
        self._quoted: dict[str | None, str] = {}

    async def page(self, *, user_id: int, skip: int, limit: int) -> bytes:
        params = {"user_id": user_id, "skip": skip, "limit": limit}
        connection = self._sqlite_connection()
        if connection is not None:
            try:
                connection.execute("BEGIN")  # the total and the rows from one snapshot
                try:
                    counted = connection.execute(self._count_sql, params).fetchone()
                    total = counted[0] if counted is not None else 0
                    keys = connection.execute(self._keys_sql, params).fetchall()
                    self._keep_missing(connection, keys)
                finally:
                    connection.execute("COMMIT")
            except sqlite3.Error as exc:
                logger.warning("history read on the private SQLite connection failed (%s); using the engine", exc)
                self.close()
            else:
                items = self._items
                return _page([items[key] for key in keys], total=total, skip=skip, limit=limit)
        async with self._turn(), self._engine.connect() as conn:
            rows = (await conn.execute(_TOTAL_AND_KEYS, params)).all()
            total = rows[0][0] if rows else 0
            keys = [(row[1], row[2]) for row in rows if row[1] is not None]
            missing = self._missing(keys)
            page = {key: self._items[key] for key in keys if key in self._items}
            if missing:
                ids = missing if self._engine_items is _ITEMS_PG else json.dumps(missing)
                page.update(self._keep(await conn.execute(self._engine_items, {"ids": ids})))
        # Other pages may have been read meanwhile (and the kept rows cleared): this page's
        # rows are the ones just gathered.
        return _page([page[key] for key in keys if key in page], total=total, skip=skip, limit=limit)

    @asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """A place among the pages read through the pool; as the pool does, 503 after DB_POOL_TIMEOUT_SECONDS."""
        slots = self._slots
        if slots is None:
            yield
            return
        if slots.locked():
            try:
                async with asyncio.timeout(self._slot_timeout):
                    await slots.acquire()
            except TimeoutError:
                raise PoolTimeout(f"no history read slot free within {self._slot_timeout:g} s") from None
        else:
            await slots.acquire()  # free: taken at once, no suspension
        try:
            yield
        finally:
            slots.release()

    def _missing(self, keys: list[tuple[int, Any]]) -> list[int]:
        """Ids of the rows of `keys` that are not kept yet (all of them when the store is full)."""
        items = self._items
        missing = [row_id for row_id, created in keys if (row_id, created) not in items]
        if missing and len(items) + len(missing) > self.MAX_KEPT_ITEMS:
            items.clear()
            self._quoted.clear()
            missing = [row_id for row_id, _ in keys]
        return missing

    def _keep(self, rows: Iterable[Sequence[Any]]) -> dict[tuple[int, Any], str]:
        """Write out and keep each row's JSON; returns what was kept."""
        kept = {(row[0], row[6]): item_json(row, self._quoted) for row in rows}
        self._items.update(kept)
        return kept

    def _keep_missing(self, connection: sqlite3.Connection, keys: list[tuple[int, str]]) -> None:
        """Read and write out the rows of `keys` that are not kept yet."""
        missing = self._missing(keys)
        if missing:
            self._keep(connection.execute(self._items_sql, {"ids": json.dumps(missing)}))

    def _sqlite_connection(self) -> sqlite3.Connection | None:
        if self._path is None:
            return None
        # A stat per read (a microsecond): the file removed or replaced means this connection is stale.
        try:
            stat = os.stat(self._path)
        except OSError:
            self.close()
            return None
        if self._connection is not None and self._file == (stat.st_dev, stat.st_ino):
            return self._connection
        self.close()
        try:
            connection = sqlite3.connect(self._path, isolation_level=None, check_same_thread=True)
            connection.execute(f"PRAGMA busy_timeout={READ_BUSY_TIMEOUT_MS}")
            connection.execute("PRAGMA query_only=ON")
        except sqlite3.Error:
            return None
        self._connection, self._file = connection, (stat.st_dev, stat.st_ino)
        self._items.clear()  # a new file: nothing kept from the old one is known to be in it
        return connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


async def count_for_user(*, session: AsyncSession, user_id: int) -> int:
    query = select(func.count(PredictionHistory.id)).where(PredictionHistory.user_id == user_id)
    return (await session.execute(query)).scalar_one()
