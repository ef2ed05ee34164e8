"""Prediction history: one row per single prediction, newest first."""
from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Text, bindparam, cast, func, select
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncSession

from app.database import Database, PredictionHistory

logger = logging.getLogger("app.history")

_COUNT = select(func.count(PredictionHistory.id)).where(PredictionHistory.user_id == bindparam("user_id"))
_PAGE = (
    select(
        PredictionHistory.id,
        # The stored JSON text goes into the answer as it is: parsing it only to write it again is most of the work.
        cast(PredictionHistory.customer_data, Text),
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
# A reader never waits for a writer under WAL; should it ever be told to wait, it gives up this soon.
READ_BUSY_TIMEOUT_MS = 200


def _timestamp(value: datetime | str) -> str:
    """ISO 8601 in UTC as Pydantic writes it (`Z`, no fraction when it is zero)."""
    if isinstance(value, str):
        if len(value) == 26 and value[10] == " " and value[19] == ".":  # SQLite's "YYYY-MM-DD HH:MM:SS.ffffff"
            end = 19 if value.endswith(".000000") else 26
            return f"{value[:10]}T{value[11:end]}Z"
        value = datetime.fromisoformat(value)
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    return value.isoformat() + "Z"


def page_json(rows: Sequence[Sequence[Any]], *, total: int, skip: int, limit: int) -> bytes:
    """A HistoryPage as JSON, written straight from the rows of _PAGE."""
    quoted: dict[str | None, str] = {}  # names and versions repeat from row to row

    def text(value: str | None) -> str:
        result = quoted.get(value)
        if result is None:
            result = quoted[value] = json.dumps(value)
        return result

    items = ",".join(
        f'{{"id":{row_id},"customer_data":{customer},"cluster":{cluster},"cluster_name":{text(name)},'
        f'"confidence":{float(confidence)!r},"model_version":{text(version)},"created_at":"{_timestamp(created)}"}}'
        for row_id, customer, cluster, name, confidence, version, created in rows
    )
    return f'{{"history":[{items}],"total":{total},"skip":{skip},"limit":{limit}}}'.encode()


class HistoryReader:
    """Pages of a user's history, as the JSON of a HistoryPage.

    With SQLite the two short indexed reads run right on the event loop through a private
    read-only connection: under WAL a reader never waits for a writer, and both reads take
    less time than one trip to aiosqlite's thread and back. Each page is read in one
    transaction, and every commit made before the read (a prediction answered with 200)
    is in it. PostgreSQL, or any trouble with the private connection, uses the engine.
    """

    def __init__(self, database: Database) -> None:
        self.database = database
        self._path: str | None = None
        if database.is_sqlite:
            name = database.engine.url.database
            if name and name != ":memory:" and not name.startswith("file:"):
                self._path = os.path.abspath(name)
                compiled = _COUNT.compile(dialect=sqlite_dialect.dialect(paramstyle="named"))
                self._count_sql = compiled.string
                compiled = _PAGE.compile(dialect=sqlite_dialect.dialect(paramstyle="named"))
                self._page_sql = compiled.string
        self._connection: sqlite3.Connection | None = None
        self._file: tuple[int, int] | None = None

    async def page(self, *, user_id: int, skip: int, limit: int) -> bytes:
        params = {"user_id": user_id, "skip": skip, "limit": limit}
        connection = self._sqlite_connection()
        if connection is not None:
            try:
                connection.execute("BEGIN")
                try:
                    total = connection.execute(self._count_sql, params).fetchone()[0]
                    rows = connection.execute(self._page_sql, params).fetchall()
                finally:
                    connection.execute("COMMIT")
                return page_json(rows, total=total, skip=skip, limit=limit)
            except sqlite3.Error as exc:
                logger.warning("history read on the private SQLite connection failed (%s); using the engine", exc)
                self.close()
        async with self.database.engine.connect() as conn:
            total = (await conn.execute(_COUNT, params)).scalar_one()
            rows = (await conn.execute(_PAGE, params)).all()
        return page_json(rows, total=total, skip=skip, limit=limit)

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
        return connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


async def count_for_user(*, session: AsyncSession, user_id: int) -> int:
    query = select(func.count(PredictionHistory.id)).where(PredictionHistory.user_id == user_id)
    return (await session.execute(query)).scalar_one()
