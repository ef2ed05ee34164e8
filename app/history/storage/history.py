"""Prediction history behind one interface: a group commit for writes, keyset pages for reads.

`HistoryRepository` is what the routes use; `EngineHistoryRepository` is the default, over the
SQLAlchemy async engine (SQLite and PostgreSQL alike). app.history.storage.open_history_repository
picks the implementation.
"""

from __future__ import annotations

import asyncio
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Hashable, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

from sqlalchemy import Integer, Select, Text, any_, bindparam, cast, exists, func, literal_column, select, true, tuple_
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import QueuePool

from app.core.database import Database
from app.core.errors import AppError
from app.core.tables import PREDICTION_HISTORY, HistoryCount, PredictionHistory
from app.history.pages import item_json, page_bytes

logger = logging.getLogger("app.history")

History = PredictionHistory

# The total is the user's count, kept by triggers in the same transactions as the rows: as
# cheap at a million rows as at ten, and as current as the rows it is read with.
COUNT = select(HistoryCount.total).where(HistoryCount.user_id == bindparam("user_id"))
TOTAL = func.coalesce(COUNT.scalar_subquery(), literal_column("0"))
# Whether `before_id` names a row of this user's history.
CURSOR_FOUND = exists().where(History.id == bindparam("before_id"), History.user_id == bindparam("user_id"))
ITEM_COLUMNS = (
    History.id,
    # The stored JSON text goes into the answer as it is: parsing it only to write it again is most of the work.
    cast(History.customer_data, Text).label("customer_data"),
    History.cluster,
    History.cluster_name,
    History.confidence,
    History.model_version,
    History.created_at,
    History.segmentation,
)
# Rows by id, the ids given as one array (one statement whatever their number): a JSON
# array for SQLite, a PostgreSQL array for PostgreSQL.
_ITEM_IDS = func.json_each(bindparam("ids")).table_valued("value")
ITEMS = select(*ITEM_COLUMNS).where(History.id.in_(select(_ITEM_IDS.c.value)))
ITEMS_PG = select(*ITEM_COLUMNS).where(History.id == any_(bindparam("ids", type_=postgresql.ARRAY(Integer))))


def page_keys(*, before: bool) -> Select:
    """A page as keys (id, created_at), newest first: read from the (user_id, created_at, id) index alone.

    With `before`, only rows older than row `before_id` (same user) count, compared as the pair
    (created_at, id): a range of the index, so a page deep in a long history costs what the
    first one costs. `skip` then counts from that row.
    """
    query = select(History.id, History.created_at).where(History.user_id == bindparam("user_id"))
    if before:
        cursor = (
            select(History.created_at)
            .where(History.id == bindparam("before_id"), History.user_id == bindparam("user_id"))
            .scalar_subquery()
        )
        query = query.where(tuple_(History.created_at, History.id) < tuple_(cursor, bindparam("before_id")))
    return (
        query.order_by(History.created_at.desc(), History.id.desc()).limit(bindparam("limit")).offset(bindparam("skip"))
    )


def _total_and_keys(*, before: bool) -> Select:
    """The total, whether the cursor row exists and the page's keys in one statement.

    Over the network that is one round trip, with no transaction needed for them to agree; a
    page past the end is one row of NULLs after the total.
    """
    found = CURSOR_FOUND if before else true()
    head = select(TOTAL.label("total"), found.label("found")).subquery("head")
    keys = page_keys(before=before).subquery("page")
    return (
        select(*head.c, *keys.c)
        .select_from(head.outerjoin(keys, true()))
        .order_by(keys.c.created_at.desc(), keys.c.id.desc())
    )


TOTAL_AND_KEYS = {False: _total_and_keys(before=False), True: _total_and_keys(before=True)}

# How many history rows' JSON a repository keeps (about 500 bytes each: about 10 MB).
MAX_KEPT_ITEMS = 20_000


def unknown_cursor(before_id: int) -> AppError:
    # A well-formed id that names no row of this history (another user's included): not found,
    # as someone else's profile is; a malformed one is FastAPI's 422.
    return AppError(f"before_id {before_id} is not a prediction in this history", status_code=404)


class KeptItems:
    """Each history row's JSON as a plain string, at most `max_items` of them (MAX_KEPT_ITEMS).

    History rows never change once written, so a page is its keys, read from the index alone,
    and only the rows not kept yet are read and written out. Rows are keyed by id and
    timestamp (SQLite may give a deleted row's id to a new row; never with the same
    microsecond). When a page would pass the bound, everything kept is dropped and the page
    starts the store over: the bound holds and a cold page costs what it cost without it.
    """

    def __init__(self, max_items: int = MAX_KEPT_ITEMS, *, keyed_by_id: bool = False) -> None:
        self.max_items = max_items
        self._by_id = keyed_by_id  # where ids are never given again (PostgreSQL's sequences)
        self._items: dict[Hashable, str] = {}
        self._quoted: dict[str | None, str] = {}

    def __len__(self) -> int:
        return len(self._items)

    def lookup(self, keys: Sequence[Any]) -> tuple[dict[Hashable, str], list[int]]:
        """The kept JSON of the rows of `keys`, and the ids of those not kept (all when the store is full)."""
        items = self._items
        get = items.get
        found: dict[Hashable, str] = {}
        missing = []
        for key in keys:
            item = get(key)
            if item is None:
                missing.append(key)
            else:
                found[key] = item
        if missing and len(items) + len(missing) > self.max_items:
            self.clear()
            found, missing = {}, list(keys)
        return found, missing if self._by_id else [key[0] for key in missing]

    def keep(self, rows: Iterable[Sequence[Any]]) -> dict[Hashable, str]:
        """Write out and keep each row's JSON (rows of ITEM_COLUMNS); returns what was kept."""
        by_id, quoted = self._by_id, self._quoted
        kept = {(row[0] if by_id else (row[0], row[6])): item_json(row, quoted) for row in rows}
        self._items.update(kept)
        return kept

    def clear(self) -> None:
        self._items.clear()
        self._quoted.clear()


def trim(keys: list[tuple[int, Any]], limit: int) -> tuple[list[tuple[int, Any]], int | None]:
    """A page's keys (read one past `limit`) and the `before_id` of the next page (None at the end)."""
    if len(keys) > limit:
        keys = keys[:limit]
        return keys, keys[-1][0]
    return keys, None


class HistoryRepository(ABC):
    """Where prediction history is written and read; one instance per process.

    Writes go through a group commit: many requests wait on one shared transaction, and a
    return from `add` still means the row is committed. Rows queue up while the previous
    commit is in flight and are then inserted and committed together, so the database sees
    one transaction per burst, not per request. Implementations provide `insert` (rows in one
    transaction) and `page` (a page as the JSON of a HistoryPage).
    """

    def __init__(self, *, max_batch: int = 500) -> None:
        self.max_batch = max_batch
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop committing; whatever still waits is told the service is shutting down."""
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await self._task
        for _, future in self._pending:
            if not future.done():
                future.set_exception(RuntimeError("service is shutting down"))
        self._pending.clear()
        await self.close()

    async def add(self, row: dict[str, Any]) -> None:
        """Store one history row; returns once it is committed."""
        if self._task is None or self._task.done():
            await self.insert([row])
            return
        future = asyncio.get_running_loop().create_future()
        self._pending.append((row, future))
        self._wake.set()
        await future

    @abstractmethod
    async def insert(self, rows: list[dict[str, Any]]) -> None:
        """Insert the rows in one transaction."""

    @abstractmethod
    async def page(self, *, user_id: int, skip: int, limit: int, before_id: int | None = None) -> bytes:
        """One page of a user's history, newest first, as the JSON of a HistoryPage.

        The total and the page's keys come from one snapshot, so they agree, and every commit
        made before the call (a prediction answered with 200) is in it. `before_id` must name a
        row of this user's history (else a 404).
        """

    async def close(self) -> None:  # noqa: B027 - nothing to release unless an implementation holds more
        """Release what the implementation holds beyond the engine."""

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                await self._flush(batch)

    async def _flush(self, batch: list[tuple[dict[str, Any], asyncio.Future[None]]]) -> None:
        results: list[BaseException | None]
        try:
            await self.insert([row for row, _ in batch])
            results = [None] * len(batch)
        except Exception:
            # One bad row (say, its user was deleted meanwhile) must not fail the others.
            results = []
            for row, _ in batch:
                try:
                    await self.insert([row])
                    results.append(None)
                except Exception as exc:  # reported to that row's request alone
                    results.append(exc)
        for (_, future), error in zip(batch, results, strict=True):
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


class EngineHistoryRepository(HistoryRepository):
    """History over the async engine: any database the service runs on."""

    def __init__(self, database: Database, *, max_batch: int = 500, max_kept: int = MAX_KEPT_ITEMS) -> None:
        super().__init__(max_batch=max_batch)
        # A single statement needs no transaction around it: no BEGIN and ROLLBACK round trips.
        self._engine = database.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._writes = database.engine
        self._postgres = database.engine.dialect.name == "postgresql"
        self.kept = KeptItems(max_kept)
        # Pages read through a server's pool at once: a few connections short of the pool, so
        # the rest of the service still finds one. Pages past that wait here, on a semaphore:
        # waiting in SQLAlchemy's async pool instead costs far more CPU a page.
        pool = database.engine.pool
        self._slots: asyncio.Semaphore | None = None
        self._slot_timeout = 0.0
        if not database.is_sqlite and isinstance(pool, QueuePool):
            self._slots = asyncio.Semaphore(max(1, pool.size() - max(1, pool.size() // 10)))
            self._slot_timeout = pool.timeout()

    async def insert(self, rows: list[dict[str, Any]]) -> None:
        async with self._writes.begin() as conn:
            # A Core insert: the ORM's bulk path costs about twice as much per row.
            await conn.execute(PREDICTION_HISTORY.insert(), rows)

    async def page(self, *, user_id: int, skip: int, limit: int, before_id: int | None = None) -> bytes:
        params = {"user_id": user_id, "skip": skip, "limit": limit + 1, "before_id": before_id}
        kept = self.kept
        async with self._turn(), self._engine.connect() as conn:
            rows = (await conn.execute(TOTAL_AND_KEYS[before_id is not None], params)).all()
            total, found = rows[0][0], rows[0][1]
            if not found:
                raise unknown_cursor(before_id or 0)
            keys, next_before_id = trim([(row[2], row[3]) for row in rows if row[2] is not None], limit)
            items, missing = kept.lookup(keys)
            if missing:
                statement = ITEMS_PG if self._postgres else ITEMS
                ids = missing if self._postgres else json.dumps(missing)
                items.update(kept.keep(await conn.execute(statement, {"ids": ids})))
        # Other pages may have been read meanwhile (and the kept rows cleared): this page's
        # rows are the ones just gathered; one deleted between the keys and the rows is left out.
        body = [items[key] for key in keys if key in items]
        return page_bytes(body, total=total, skip=skip, limit=limit, next_before_id=next_before_id)

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


async def segmentation_page(
    database: Database, *, user_id: int, segmentation_id: int, skip: int, limit: int, before_id: int | None = None
) -> bytes:
    """A page of one user's history made with one segmentation, newest first, as a HistoryPage's JSON.

    Read in one transaction over the (user_id, segmentation_id, created_at, id) index; the
    total is counted, as no per-segmentation count is kept.
    """
    mine = (History.user_id == user_id) & (History.segmentation_id == segmentation_id)
    query = select(*ITEM_COLUMNS).where(mine)
    async with database.engine.connect() as conn:
        total = (await conn.execute(select(func.count()).select_from(History).where(mine))).scalar_one()
        if before_id is not None:
            found = (await conn.execute(select(History.id).where(History.id == before_id, mine))).first()
            if found is None:
                raise unknown_cursor(before_id)
            cursor = select(History.created_at).where(History.id == before_id).scalar_subquery()
            query = query.where(tuple_(History.created_at, History.id) < tuple_(cursor, before_id))
        query = query.order_by(History.created_at.desc(), History.id.desc()).offset(skip).limit(limit + 1)
        rows = (await conn.execute(query)).all()
    next_before_id = rows[limit - 1][0] if len(rows) > limit else None
    quoted: dict[str | None, str] = {}
    items = [item_json(row, quoted) for row in rows[:limit]]
    return page_bytes(items, total=int(total), skip=skip, limit=limit, next_before_id=next_before_id)
