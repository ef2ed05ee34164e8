"""Bring a database to the current schema with the Alembic revisions in app/alembic.

Called by the app at startup and by create_admin.py (so `make run` migrates before serving).
Safe when several worker processes start at once: the work happens under a lock that
spans the whole migration (PostgreSQL advisory lock; SQLite `BEGIN IMMEDIATE`), and each
process re-reads the revision once it holds the lock, so only the first one migrates.
A database made by the old `create_all` (tables, no `alembic_version`) is adopted by the
first revision: its tables and rows are kept and only what is missing is added.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from app.core.database import Database

logger = logging.getLogger("app.core.migrations")

SCRIPT_LOCATION = Path(__file__).resolve().parent.parent / "alembic"
# Any constant shared by every process of this service; names the PostgreSQL advisory lock.
PG_MIGRATION_LOCK_ID = 0x5E6D_1A7E


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revisions() -> set[str]:
    return set(ScriptDirectory.from_config(alembic_config()).get_heads())


def current_revisions(connection: Connection) -> set[str]:
    return set(MigrationContext.configure(connection).get_current_heads())


async def upgrade_database(database: Database) -> None:
    heads = head_revisions()
    async with database.engine.connect() as conn:
        if await conn.run_sync(current_revisions) == heads:
            return
    async with database.engine.connect() as conn:
        await _take_migration_lock(conn, database.is_sqlite)
        await conn.run_sync(_upgrade_locked)
        await conn.commit()


async def _take_migration_lock(conn: AsyncConnection, is_sqlite: bool) -> None:
    """Held until the migration transaction ends; a second process waits here."""
    if is_sqlite:
        await conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif conn.dialect.name == "postgresql":
        await conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK_ID})")


def _upgrade_locked(connection: Connection) -> None:
    current = current_revisions(connection)
    if current == head_revisions():
        return  # another process migrated while this one waited for the lock
    if not current and inspect(connection).has_table("users"):
        logger.warning("adopting a database created before migrations (no alembic_version table)")
    logger.info("migrating the database from %s to head", ", ".join(sorted(current)) or "an empty schema")
    command.upgrade(alembic_config(connection), "head")
