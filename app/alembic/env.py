"""Alembic environment: runs the migrations on a connection the app hands over, or on DATABASE_URL.

`app.core.migrations.upgrade_database` passes a (sync facade of an async) connection in
`config.attributes["connection"]`, already inside a transaction and holding the migration
lock. The `alembic` command line has none, so it opens the app's async engine itself.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

import app.customers.tables  # noqa: F401 - its tables join Base.metadata
from app.core.tables import Base
from app.policies import tables as _policy_tables  # noqa: F401 - its tables join Base.metadata
from app.sources import tables as _source_tables  # noqa: F401 - its table joins Base.metadata
from app.webhooks import tables as _webhook_tables  # noqa: F401 - its tables join Base.metadata

config = context.config
target_metadata = Base.metadata


def _configure(**kwargs) -> None:
    url = kwargs.get("url") or str(kwargs["connection"].engine.url)
    context.configure(
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place: batch mode copies the table instead.
        render_as_batch=url.startswith("sqlite"),
        compare_type=True,
        **kwargs,
    )


def _run_on(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def _database_url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from app.core.config import get_settings

    return get_settings().database_url


async def _run_online() -> None:
    engine = create_async_engine(_database_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_on)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    _configure(url=_database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()
elif config.attributes.get("connection") is not None:
    _run_on(config.attributes["connection"])
else:
    asyncio.run(_run_online())
