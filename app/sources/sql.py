"""SQL sources: one SELECT against PostgreSQL, or against a SQLite file under SOURCE_ROOT, read-only.

A URL is `postgresql+asyncpg://` or `postgresql+psycopg://` (the service reads either with its own
PostgreSQL driver, asyncpg) or `sqlite:///relative/path.db`; URL query options are refused, as they
could change how the connection is made. The password is split off at once: it is kept sealed
(app.sources.crypto), and no URL or error this module builds ever carries it.

PostgreSQL: the host passes the address rule (app.sources.addresses) at every read, the connection
goes to the checked address, every transaction of the session is read-only
(`default_transaction_read_only`) and the query runs inside `BEGIN READ ONLY` with `statement_timeout`,
through a server-side cursor read in chunks. SQLite: the file is opened read-only (`mode=ro`), with
`query_only` on, an authorizer that allows reading only, and each step stopped past the timeout.
"""

from __future__ import annotations

import sqlite3
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pandas as pd
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from starlette.concurrency import run_in_threadpool

from app.core.errors import InvalidInput
from app.sources import addresses
from app.sources.files import check_relative_path, inside_root, source_root

POSTGRES_DRIVERS = ("postgresql+asyncpg", "postgresql+psycopg")
SQLITE_DRIVERS = ("sqlite", "sqlite+aiosqlite", "sqlite+pysqlite")
MAX_URL_LENGTH = 2000
CONNECT_TIMEOUT_SECONDS = 10.0
# A fetch may take its statement_timeout, and a little more on the wire, before the client gives up.
FETCH_MARGIN_SECONDS = 5.0
APPLICATION_NAME = "customer-segmentation-source"
PASSWORD_MASK = "***"


@dataclass(frozen=True)
class SqlLocation:
    """A parsed source URL: its parts without the password, and the password apart."""

    url: URL
    password: str | None

    @property
    def is_sqlite(self) -> bool:
        return self.url.drivername in SQLITE_DRIVERS

    def stored(self) -> str:
        """The URL as the database keeps it: no password."""
        return self.url.render_as_string(hide_password=False)


def without_password(url: URL) -> URL:
    # URL.set(password=None) keeps the password: None there means "unchanged".
    return URL.create(url.drivername, url.username, None, url.host, url.port, url.database)


def parse_url(text: str) -> SqlLocation:
    """A source URL checked for its form (not its host: see `check_host`); 422 names what is wrong."""
    if len(text) > MAX_URL_LENGTH:
        raise InvalidInput(f"url: at most {MAX_URL_LENGTH} characters")
    try:
        url = make_url(text.strip())
    except (ArgumentError, ValueError, TypeError):
        # The message would quote the URL, password and all.
        raise InvalidInput(
            "url: not a valid database URL (e.g. postgresql+asyncpg://reader:...@db:5432/shop)"
        ) from None
    if url.query:
        raise InvalidInput("url: URL query options (`?...`) are not accepted")
    if url.drivername in SQLITE_DRIVERS:
        if url.username or url.password or url.host or url.port:
            raise InvalidInput("url: a SQLite URL names only a file: sqlite:///path/relative/to/SOURCE_ROOT.db")
        if not url.database or url.database == ":memory:":
            raise InvalidInput("url: a SQLite URL must name a file under SOURCE_ROOT")
        check_relative_path(url.database, what="url")
        return SqlLocation(url=without_password(url), password=None)
    if url.drivername not in POSTGRES_DRIVERS:
        raise InvalidInput(
            "url: must be postgresql+asyncpg://, postgresql+psycopg:// or sqlite:/// (a file under SOURCE_ROOT)"
        )
    if not url.host:
        raise InvalidInput("url: a PostgreSQL URL must name its host")
    if url.port is not None and not 0 < url.port < 65536:
        raise InvalidInput("url: the port must be between 1 and 65535")
    if not url.database:
        raise InvalidInput("url: a PostgreSQL URL must name its database")
    if not url.username:
        raise InvalidInput("url: a PostgreSQL URL must name its user (a read-only role is best)")
    return SqlLocation(url=without_password(url), password=url.password)


def shown_url(stored: str, *, has_password: bool) -> str:
    """The URL as clients see it: the password, when there is one, as `***`."""
    url = make_url(stored)
    if not has_password:
        return url.render_as_string(hide_password=False)
    return URL.create(url.drivername, url.username, "x", url.host, url.port, url.database).render_as_string(
        hide_password=True
    )


async def check_host(location: SqlLocation, *, allow_private: bool) -> addresses.IPAddress | None:
    """The address a PostgreSQL source connects to, once its host passed the rule (SQLite: None)."""
    if location.is_sqlite:
        return None
    assert location.url.host is not None
    return await addresses.checked_address(location.url.host, location.url.port or 5432, allow_private=allow_private)


# --- reading ------------------------------------------------------------------------------------


def _timed_out(seconds: float) -> InvalidInput:
    return InvalidInput(
        f"The source's query was cancelled: a statement ran past {seconds:g} s (SOURCE_STATEMENT_TIMEOUT_SECONDS)"
    )


async def postgres_frames(
    location: SqlLocation,
    query: str,
    *,
    allow_private: bool,
    timeout_seconds: float,
    chunk_rows: int,
) -> AsyncIterator[pd.DataFrame]:
    """The query's rows, `chunk_rows` at a time (always at least one frame: it carries the columns)."""
    address = await check_host(location, allow_private=allow_private)
    url = location.url
    try:
        connection = await asyncpg.connect(
            host=str(address),
            port=url.port or 5432,
            user=url.username,
            password=location.password,
            database=url.database,
            timeout=CONNECT_TIMEOUT_SECONDS,
            server_settings={
                "default_transaction_read_only": "on",
                "statement_timeout": str(max(1, int(timeout_seconds * 1000))),
                "application_name": APPLICATION_NAME,
            },
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise InvalidInput(f"Could not connect to the source's database at {url.host}: {_reason(exc)}") from None
    fetch_timeout = timeout_seconds + FETCH_MARGIN_SECONDS
    try:
        async with connection.transaction(readonly=True):
            statement = await connection.prepare(query, timeout=fetch_timeout)
            columns = [attribute.name for attribute in statement.get_attributes()]
            cursor = await statement.cursor(timeout=fetch_timeout)
            yielded = False
            while True:
                records = await cursor.fetch(chunk_rows, timeout=fetch_timeout)
                if not records:
                    break
                yielded = True
                yield await run_in_threadpool(_frame, records, columns)
            if not yielded:
                yield pd.DataFrame(columns=columns)
    except asyncpg.QueryCanceledError:
        raise _timed_out(timeout_seconds) from None
    except TimeoutError:
        raise _timed_out(timeout_seconds) from None
    except asyncpg.ReadOnlySQLTransactionError as exc:
        raise InvalidInput(f"The source's query tried to write, and sources only read: {_reason(exc)}") from None
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise InvalidInput(f"The source's query failed: {_reason(exc)}") from None
    finally:
        try:
            await connection.close(timeout=5)
        except Exception:  # noqa: BLE001 - a connection that will not close cleanly is dropped
            connection.terminate()


def _frame(records: list[Any], columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame.from_records([tuple(record) for record in records], columns=columns)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


# SQLite: what the authorizer lets a query do. Everything else (ATTACH, PRAGMA, writes) is denied.
_SQLITE_ALLOWED = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    getattr(sqlite3, "SQLITE_RECURSIVE", 33),
}


def _sqlite_authorizer(action: int, *_: Any) -> int:
    return sqlite3.SQLITE_OK if action in _SQLITE_ALLOWED else sqlite3.SQLITE_DENY


def sqlite_file(root: Path | None, location: SqlLocation) -> Path:
    """The SQLite file a source names, resolved inside SOURCE_ROOT (checked at every read)."""
    assert location.url.database is not None
    base = source_root(root)
    return inside_root(base, base / check_relative_path(location.url.database, what="url"), location.url.database)


def sqlite_frames(path: Path, query: str, *, timeout_seconds: float, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The query's rows from a SQLite file opened read-only (blocking: run it in a worker thread)."""
    deadline = [time.monotonic() + timeout_seconds]
    try:
        connection = sqlite3.connect(
            f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True, check_same_thread=False, timeout=5
        )
    except sqlite3.Error as exc:
        raise InvalidInput(f"The source's SQLite file cannot be opened: {_reason(exc)}") from None
    try:
        connection.execute("PRAGMA query_only = ON")
        connection.set_authorizer(_sqlite_authorizer)
        connection.set_progress_handler(lambda: int(time.monotonic() > deadline[0]), 1000)
        cursor = connection.execute(query)
        columns = [description[0] for description in cursor.description or ()]
        yielded = False
        while True:
            deadline[0] = time.monotonic() + timeout_seconds
            rows = cursor.fetchmany(chunk_rows)
            if not rows:
                break
            yielded = True
            yield pd.DataFrame.from_records(rows, columns=columns)
        if not yielded:
            yield pd.DataFrame(columns=columns)
    except sqlite3.OperationalError as exc:
        if "interrupted" in str(exc):
            raise _timed_out(timeout_seconds) from None
        if "not authorized" in str(exc) or "readonly" in str(exc):
            raise InvalidInput(
                f"The source's query tried more than reading, and sources only read: {_reason(exc)}"
            ) from None
        raise InvalidInput(f"The source's query failed: {_reason(exc)}") from None
    except sqlite3.Error as exc:
        raise InvalidInput(f"The source's query failed: {_reason(exc)}") from None
    finally:
        connection.close()
