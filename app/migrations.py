"""Bring a database to the current schema."""
from __future__ import annotations

from app.database import Database


async def upgrade_database(database: Database) -> None:
    await database.create_tables()
