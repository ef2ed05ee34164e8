"""The source catalogue: declare, list, show, delete and preview sources (reading is app.sources.reading).

Each declaration is checked before it is kept: its form (a relative path without `..`, a URL of an
accepted kind without options, one SELECT) and, for PostgreSQL, its host against the address rule.
The same checks run again at every read, since what a path matches or a host resolves to can change.
"""

from __future__ import annotations

import datetime as dt
import decimal
import logging
import math
from typing import TYPE_CHECKING, Any

import pandas as pd
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from app.core.errors import Conflict, InvalidInput
from app.sources import crypto, files, sql, statements
from app.sources.reading import frames_of, load_source
from app.sources.schemas import PREVIEW_ROWS, SourceCreate, SourcePublic
from app.sources.tables import DataSource

if TYPE_CHECKING:
    from app.core.config import Settings
    from app.core.database import Database

logger = logging.getLogger("app.sources")


def public(row: DataSource) -> SourcePublic:
    return SourcePublic(
        name=row.name,
        kind=row.kind,  # type: ignore[arg-type]
        path=row.path,
        url=sql.shown_url(row.url, has_password=row.password_sealed is not None) if row.url else None,
        query=row.query,
        created_by=row.created_by,
        created_at=row.created_at,
    )


def json_cell(value: Any) -> Any:
    """A cell as JSON shows it: numbers and booleans as themselves, missing as null, the rest as text."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # NumPy scalars
        return json_cell(value.item())
    if isinstance(value, decimal.Decimal):
        return float(value) if value.is_finite() else None
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


class SourceCatalog:
    """The sources of this service, as one request sees them."""

    def __init__(self, *, database: Database, settings: Settings) -> None:
        self.database = database
        self.settings = settings

    async def create(self, body: SourceCreate, *, by: str) -> SourcePublic:
        row = DataSource(name=body.name, kind=body.kind, created_by=by)
        if body.kind == "file":
            await self._declare_file(row, body)
        else:
            await self._declare_sql(row, body)
        async with self.database.sessionmaker() as session:
            taken = await session.execute(select(DataSource.id).where(DataSource.name == body.name))
            if taken.first() is not None:
                raise Conflict(f"A source named {body.name} already exists")
            session.add(row)
            try:
                await session.commit()
            except IntegrityError:
                raise Conflict(f"A source named {body.name} already exists") from None
            await session.refresh(row)
        logger.info("source %s (%s) created by %s", row.name, row.kind, by)
        return public(row)

    async def _declare_file(self, row: DataSource, body: SourceCreate) -> None:
        if body.url is not None or body.query is not None:
            raise InvalidInput("A file source has a `path`; `url` and `query` are for kind sql")
        if body.path is None:
            raise InvalidInput("path: a file source needs the path (or glob) of its files under SOURCE_ROOT")
        if self.settings.source_root is None:
            raise InvalidInput(files.NO_ROOT)
        row.path = files.check_file_path(body.path)
        await run_in_threadpool(self._check_matches, row.path)

    def _check_matches(self, path: str) -> None:
        """The files the path matches now, if any, must be inside the root (none yet is fine: checked at read)."""
        try:
            files.resolve_files(self.settings.source_root, path)
        except InvalidInput as exc:
            if "no file under SOURCE_ROOT matches" not in exc.message:
                raise

    async def _declare_sql(self, row: DataSource, body: SourceCreate) -> None:
        if body.path is not None:
            raise InvalidInput("A SQL source has a `url` and a `query`; `path` is for kind file")
        if body.url is None or body.query is None:
            raise InvalidInput("A SQL source needs both `url` and `query`")
        location = sql.parse_url(body.url)
        row.query = statements.check_query(body.query)
        if location.is_sqlite:
            if self.settings.source_root is None:
                raise InvalidInput("SQLite sources are refused: SOURCE_ROOT is not set")
        else:
            await sql.check_host(location, allow_private=self.settings.source_allow_private)
        row.url = location.stored()
        if location.password:
            row.password_sealed = crypto.seal(location.password, secret_key=self.settings.secret_key)

    async def list(self) -> list[SourcePublic]:
        async with self.database.sessionmaker() as session:
            rows = (await session.execute(select(DataSource).order_by(DataSource.name))).scalars().all()
        return [public(row) for row in rows]

    async def get(self, name: str) -> SourcePublic:
        return public(await load_source(self.database, name))

    async def require(self, name: str) -> None:
        """404 unless a source of that name exists (before a job is started on it)."""
        await load_source(self.database, name)

    async def delete(self, name: str, *, by: str) -> None:
        row = await load_source(self.database, name)
        async with self.database.sessionmaker() as session:
            await session.execute(delete(DataSource).where(DataSource.id == row.id))
            await session.commit()
        logger.info("source %s deleted by %s", name, by)

    async def preview(self, name: str) -> dict[str, Any]:
        """The source's columns and first PREVIEW_ROWS rows, read now."""
        row = await load_source(self.database, name)
        columns: list[str] | None = None
        rows: list[list[Any]] = []
        chunks = frames_of(row, self.settings, chunk_rows=PREVIEW_ROWS)
        try:
            async for frame in chunks:
                if columns is None:
                    columns = [str(column) for column in frame.columns]
                for values in frame.itertuples(index=False, name=None):
                    rows.append([json_cell(value) for value in values])
                    if len(rows) == PREVIEW_ROWS:
                        break
                if len(rows) == PREVIEW_ROWS:
                    break
        finally:
            await chunks.aclose()
        if columns is None:
            raise InvalidInput(f"The source {name} gave no columns")
        return {"columns": columns, "rows": rows}
