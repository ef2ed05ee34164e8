"""Engine and session factory (the tables: app.core.tables)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

from sqlalchemy import (
    event,
)
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from app.core.tables import Base
from app.webhooks import tables as _webhook_tables  # noqa: F401 - its tables join Base.metadata

# A pooled server connection used within this many seconds is handed out as it is; one idle
# for longer is pinged first, and replaced if the server closed it meanwhile (a restart, an
# idle timeout). SQLAlchemy's `pool_pre_ping` pings on every checkout: with asyncpg that is
# BEGIN, a query and ROLLBACK, three round trips before each request's first statement.
PING_IDLE_SECONDS = 1.0


def _ping_idle_connections(sync_engine) -> None:
    @event.listens_for(sync_engine, "connect")
    def opened(_dbapi_connection, record) -> None:
        record.info["used_at"] = time.monotonic()

    @event.listens_for(sync_engine, "checkin")
    def returned(_dbapi_connection, record) -> None:
        record.info["used_at"] = time.monotonic()

    @event.listens_for(sync_engine, "checkout")
    def ping_if_idle(dbapi_connection, record, _proxy) -> None:
        if time.monotonic() - record.info.get("used_at", 0.0) <= PING_IDLE_SECONDS:
            return
        try:
            sync_engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:  # the pool opens a new connection instead
            raise DisconnectionError(f"a pooled connection was closed while idle: {exc}") from exc
        record.info["used_at"] = time.monotonic()


class Database:
    """One engine and one session factory for the process."""

    def __init__(
        self,
        url: str,
        *,
        echo: bool = False,
        busy_timeout: float = 15.0,
        pool_size: int = 20,
        pool_timeout: float = 30.0,
    ) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict = {"echo": echo}
        if self.is_sqlite:
            # How long a statement waits for another connection's write lock before "database is locked".
            kwargs["connect_args"] = {"timeout": busy_timeout}
        else:
            # `pool_size` connections stay open; a burst may open half as many more, each closed
            # again when it is given back.
            kwargs.update(pool_size=pool_size, max_overflow=max(1, pool_size // 2), pool_timeout=pool_timeout)
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", sqlite_pragmas(int(busy_timeout * 1000)))
            self._guard_sqlite_file()
        else:
            event.listen(self.engine.sync_engine, "do_connect", _report_unreachable_server)
            _ping_idle_connections(self.engine.sync_engine)
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)

    @property
    def sqlite_file(self) -> Path | None:
        """The database file of a file-backed SQLite database (None for a server or in-memory database)."""
        name = self.engine.url.database
        if not self.is_sqlite or not name or name == ":memory:" or name.startswith("file:"):
            return None
        return Path(name).resolve()

    def _guard_sqlite_file(self) -> None:
        """Once the database file exists, its removal is an outage (503), never a silent new database.

        Left alone, SQLite keeps serving the deleted file through the open connections and creates
        an empty file on the next connect.
        """
        path = self.sqlite_file
        if path is None:
            return
        opened = False
        sync_engine = self.engine.sync_engine

        @event.listens_for(sync_engine, "do_connect")
        def refuse_a_removed_file(dialect, _record, _cargs, _cparams) -> None:
            if opened and not path.exists():
                raise dialect.loaded_dbapi.OperationalError("unable to open database file: it was removed")

        @event.listens_for(sync_engine, "connect")
        def remember_the_file(_dbapi_connection, _record) -> None:
            nonlocal opened
            opened = True

        @event.listens_for(sync_engine, "checkout")
        def notice_removal(_dbapi_connection, _record, _proxy) -> None:
            if not path.exists():
                error = DisconnectionError("the database file was removed")
                error.invalidate_pool = True
                raise error

    async def create_tables(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)

    async def session(self) -> AsyncIterator[AsyncSession]:
        async with self.sessionmaker() as session:
            yield session

    async def dispose(self) -> None:
        await self.engine.dispose()


def _report_unreachable_server(dialect, _record, cargs, cparams):
    """Connect; a refused or unreachable server becomes a DBAPI OperationalError like any other outage.

    The driver raises plain OSError (ConnectionRefusedError, TimeoutError, DNS errors) for these,
    which SQLAlchemy passes through unwrapped and which would otherwise end as a 500.
    """
    try:
        return dialect.connect(*cargs, **cparams)
    except OSError as exc:
        raise dialect.loaded_dbapi.OperationalError(f"could not connect to the database server: {exc}") from exc


def sqlite_pragmas(busy_timeout_ms: int):
    """What every SQLite connection of the service sets on connect, through the engine or not."""

    def on_connect(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        # Switching a new file to WAL takes its lock without waiting on busy_timeout: two workers
        # opening a fresh database at once would see "database is locked". Try again a while.
        deadline = time.monotonic() + busy_timeout_ms / 1000
        while True:
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                break
            except Exception as exc:  # sqlite3 errors carry their SQLite error name
                busy = getattr(exc, "sqlite_errorname", "") in ("SQLITE_BUSY", "SQLITE_LOCKED")
                if not busy or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return on_connect
