"""Where the service keeps what it writes on the hot path, behind interfaces the routes use."""

from __future__ import annotations

from app.core.database import Database
from app.history.storage.history import EngineHistoryRepository, HistoryRepository


def open_history_repository(database: Database, *, busy_timeout: float) -> HistoryRepository:
    """The history repository for this database: sqlite3 threads for a SQLite file, asyncpg's own calls
    for PostgreSQL, else the engine's execution path."""
    path = database.sqlite_file
    if path is not None:
        from app.history.storage.sqlite_history import SQLiteHistoryRepository

        return SQLiteHistoryRepository(path, busy_timeout=busy_timeout)
    if database.engine.dialect.name == "postgresql" and database.engine.dialect.driver == "asyncpg":
        from app.history.storage.postgres_history import PostgresHistoryRepository

        return PostgresHistoryRepository(database)
    return EngineHistoryRepository(database)


__all__ = ["EngineHistoryRepository", "HistoryRepository", "open_history_repository"]
