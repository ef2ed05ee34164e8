"""The one door to a source's data, for every caller: training, scoring runs, retraining policies.

    async with open_source(database, settings, "crm") as data:
        ...  # data.file: the source as one CSV (header first), data.columns, data.rows, data.size

`open_source` looks the source up (404 when unknown), checks it again as it reads (a file source's
matches resolved inside SOURCE_ROOT, a SQL source's host against the address rule, its query run
read-only with the statement timeout) and streams its rows in chunks into a temporary CSV: kept in
memory while small, on disk past that, never more than `max_bytes` (default MAX_TRAIN_UPLOAD_MB,
413 past it). The CSV is what an upload of the same data would be, so a caller hands `data.file` to
the code that takes an upload (a kind's `train`, a run's batch scoring) and every check and limit
of that path holds for sources too. `source_frames` gives the same rows as pandas chunks for a
caller that wants to consume them as they come. Problems reading a source are 422s whose `detail`
says what went wrong; a password is never part of one. Blocking reads run in worker threads.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, TypeVar

import pandas as pd
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from app.core.errors import NotFound, PayloadTooLarge
from app.sources import crypto, files, sql
from app.sources.tables import DataSource

if TYPE_CHECKING:
    from app.core.config import Settings
    from app.core.database import Database

CHUNK_ROWS = 50_000
"""Rows read, converted and written at a time."""
SPOOL_BYTES = 16 * 1024 * 1024
"""A source's CSV is kept in memory up to this size, then in a temporary file."""

T = TypeVar("T")
_END = object()


@dataclass
class SourceData:
    """A source read once: its rows as one CSV file (header first, positioned at its start)."""

    name: str
    columns: list[str]
    rows: int
    size: int
    file: IO[bytes]


async def load_source(database: Database, name: str) -> DataSource:
    """The source's row; 404 when there is none of that name."""
    async with database.sessionmaker() as session:
        row = (await session.execute(select(DataSource).where(DataSource.name == name))).scalar_one_or_none()
    if row is None:
        raise NotFound("source")
    return row


async def _in_threads(chunks: Iterator[T]) -> AsyncIterator[T]:
    """A blocking iterator consumed from the event loop, each step in a worker thread."""
    try:
        while True:
            item = await run_in_threadpool(next, chunks, _END)
            if item is _END:
                return
            yield item  # type: ignore[misc]
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            await run_in_threadpool(close)


async def frames_of(
    row: DataSource, settings: Settings, *, chunk_rows: int = CHUNK_ROWS
) -> AsyncGenerator[pd.DataFrame]:
    """The rows of a source row, in chunks: always at least one frame (an empty one carries the columns)."""
    if row.kind == "file":
        assert row.path is not None
        found = await run_in_threadpool(files.resolve_files, settings.source_root, row.path)
        async for frame in _in_threads(files.read_frames(found, chunk_rows=chunk_rows)):
            yield frame
        return
    assert row.url is not None and row.query is not None
    location = sql.parse_url(row.url)
    if location.is_sqlite:
        path = await run_in_threadpool(sql.sqlite_file, settings.source_root, location)
        chunks = sql.sqlite_frames(
            path, row.query, timeout_seconds=settings.source_statement_timeout_seconds, chunk_rows=chunk_rows
        )
        async for frame in _in_threads(chunks):
            yield frame
        return
    password = crypto.unseal(row.password_sealed, secret_key=settings.secret_key) if row.password_sealed else None
    location = sql.SqlLocation(url=location.url, password=password)
    async for frame in sql.postgres_frames(
        location,
        row.query,
        allow_private=settings.source_allow_private,
        timeout_seconds=settings.source_statement_timeout_seconds,
        chunk_rows=chunk_rows,
    ):
        yield frame


async def source_frames(
    database: Database, settings: Settings, name: str, *, chunk_rows: int = CHUNK_ROWS
) -> AsyncIterator[pd.DataFrame]:
    """The named source's rows as pandas chunks (404 when unknown)."""
    row = await load_source(database, name)
    async for frame in frames_of(row, settings, chunk_rows=chunk_rows):
        yield frame


def _csv_bytes(frame: pd.DataFrame, *, header: bool) -> bytes:
    return frame.to_csv(index=False, header=header, lineterminator="\n").encode("utf-8")


@asynccontextmanager
async def open_source(
    database: Database, settings: Settings, name: str, *, max_bytes: int | None = None
) -> AsyncIterator[SourceData]:
    """The named source read into a temporary CSV (see the module's docstring), removed on exit."""
    row = await load_source(database, name)
    limit = settings.max_train_upload_bytes if max_bytes is None else max_bytes
    out = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, mode="w+b", prefix="source-")
    try:
        columns: list[str] = []
        rows = 0
        size = 0
        chunks = frames_of(row, settings)
        try:
            async for frame in chunks:
                first = size == 0
                if first:
                    columns = [str(column) for column in frame.columns]
                data = await run_in_threadpool(_csv_bytes, frame, header=first)
                size += len(data)
                if size > limit:
                    raise PayloadTooLarge(
                        f"The source {name} holds more than {limit / (1024 * 1024):g} MB of CSV "
                        "(MAX_TRAIN_UPLOAD_MB): narrow its query or path"
                    )
                await run_in_threadpool(out.write, data)
                rows += len(frame)
        finally:
            await chunks.aclose()
        await run_in_threadpool(out.seek, 0)
        yield SourceData(name=name, columns=columns, rows=rows, size=size, file=out)  # type: ignore[arg-type]
    finally:
        await run_in_threadpool(out.close)
