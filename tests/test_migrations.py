"""Alembic migrations: head matches the ORM models, old create_all databases are adopted, workers race safely.

Each test runs on SQLite and, when TEST_DATABASE_URL is set, on PostgreSQL (marked `postgres`: the
`database_url` fixture empties that database first, alembic_version included).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import JSON, column, delete, insert, inspect, select, table, text

from app.core.database import Database
from app.core.migrations import alembic_config, current_revisions, head_revisions, upgrade_database
from app.core.tables import Base, HistoryCount, PredictionHistory, User, UTCDateTime, utcnow

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.postgres


def _schema_diffs(connection) -> list:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return compare_metadata(context, Base.metadata)


async def _inspect(database: Database):
    async with database.engine.connect() as conn:
        revisions = await conn.run_sync(current_revisions)
        diffs = await conn.run_sync(_schema_diffs)
        tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    return revisions, diffs, tables


@pytest.fixture
async def database(database_url):
    db = Database(database_url, busy_timeout=5)
    yield db
    await db.dispose()


async def test_empty_database_migrates_to_head_matching_the_models(database):
    assert len(head_revisions()) == 1, "migration history has branched: merge the heads"
    await upgrade_database(database)
    revisions, diffs, tables = await _inspect(database)
    assert revisions == head_revisions()
    assert diffs == [], f"the models and the migrations disagree (add a revision): {diffs}"
    assert set(Base.metadata.tables) <= tables


async def test_upgrading_an_up_to_date_database_changes_nothing(database):
    await upgrade_database(database)
    async with database.sessionmaker() as session:
        await session.execute(
            insert(User).values(
                email="a@example.com",
                username="kept",
                hashed_password="x",
                role="user",
                is_active=True,
                token_version=0,
                created_at=utcnow(),
                updated_at=utcnow(),
            )
        )
        await session.commit()
    await upgrade_database(database)
    async with database.sessionmaker() as session:
        assert (await session.execute(select(User.username))).scalars().all() == ["kept"]


async def test_database_made_by_create_all_is_adopted_with_its_rows(database):
    # What the service did before migrations existed: create_all and no alembic_version.
    await database.create_tables()
    async with database.sessionmaker() as session:
        await session.execute(
            insert(User).values(
                email="old@example.com",
                username="old",
                hashed_password="x",
                role="admin",
                is_active=True,
                token_version=3,
                created_at=utcnow(),
                updated_at=utcnow(),
            )
        )
        await session.commit()
        await session.execute(text("DROP TABLE login_failures"))  # an older create_all lacked this table
        await session.commit()

    await upgrade_database(database)

    revisions, diffs, tables = await _inspect(database)
    assert revisions == head_revisions() and diffs == [] and "login_failures" in tables
    async with database.sessionmaker() as session:
        user = (await session.execute(select(User))).scalar_one()
    assert (user.username, user.role, user.token_version) == ("old", "admin", 3)


async def test_history_counts_are_taken_from_the_rows_on_upgrade_and_kept_after(database):
    """A database from before the per-user counts gets them from its rows; triggers keep them after."""

    def to_first_revision(connection) -> None:
        command.upgrade(alembic_config(connection), "0001")

    async with database.engine.begin() as conn:
        await conn.run_sync(to_first_revision)
        ids = []
        for name in ("many", "few", "none"):
            ids.append(
                (
                    await conn.execute(
                        insert(User)
                        .values(
                            email=f"{name}@example.com",
                            username=name,
                            hashed_password="x",
                            role="user",
                            is_active=True,
                            token_version=0,
                            created_at=utcnow(),
                            updated_at=utcnow(),
                        )
                        .returning(User.id)
                    )
                ).scalar_one()
            )
        rows = [
            {
                "user_id": user_id,
                "customer_data": {},
                "cluster": 0,
                "cluster_name": "c",
                "confidence": 1.0,
                "model_version": "v",
                "created_at": utcnow(),
            }
            for user_id, n in zip(ids, (5, 2), strict=False)  # "none" gets no rows
            for _ in range(n)
        ]
        # The table as revision 0001 made it (later revisions add columns the ORM class now has).
        first_history = table(
            "prediction_history",
            *(column(name) for name in ("user_id", "cluster", "cluster_name", "confidence", "model_version")),
            column("customer_data", JSON),
            column("created_at", UTCDateTime),
        )
        await conn.execute(insert(first_history), rows)

    await upgrade_database(database)

    async def counts() -> dict[int, int]:
        async with database.engine.connect() as conn:
            return dict((await conn.execute(select(HistoryCount.user_id, HistoryCount.total))).all())

    assert await counts() == {ids[0]: 5, ids[1]: 2}
    async with database.engine.begin() as conn:
        await conn.execute(insert(PredictionHistory), [{**rows[0], "user_id": ids[2]}] * 3)
        await conn.execute(
            delete(PredictionHistory).where(
                PredictionHistory.id.in_(
                    select(PredictionHistory.id).where(PredictionHistory.user_id == ids[0]).limit(2).scalar_subquery()
                )
            )
        )
    assert await counts() == {ids[0]: 3, ids[1]: 2, ids[2]: 3}


async def test_a_legacy_table_missing_a_column_is_refused_untouched(database):
    async with database.engine.begin() as conn:
        await conn.execute(
            text("CREATE TABLE users (id INTEGER PRIMARY KEY, email VARCHAR(320), username VARCHAR(50))")
        )
    with pytest.raises(RuntimeError, match="hashed_password"):
        await upgrade_database(database)
    async with database.engine.connect() as conn:
        tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        assert await conn.run_sync(current_revisions) == set()
    # Nothing was half-done: the migration ran in one transaction (or failed before any DDL).
    assert "alembic_version" not in tables and "customer_profiles" not in tables


async def test_downgrade_to_base_and_upgrade_again(database):
    await upgrade_database(database)

    def downgrade(connection) -> None:
        command.downgrade(alembic_config(connection), "base")

    async with database.engine.begin() as conn:
        await conn.run_sync(downgrade)
    _, _, tables = await _inspect(database)
    assert not set(Base.metadata.tables) & tables
    await upgrade_database(database)
    revisions, diffs, _ = await _inspect(database)
    assert revisions == head_revisions() and diffs == []


WORKER = """
import asyncio, sys, time
from app.core.database import Database
from app.core.migrations import upgrade_database

async def main(url, start_at):
    time.sleep(max(0.0, start_at - time.time()))
    database = Database(url, busy_timeout=30)
    try:
        await upgrade_database(database)
    finally:
        await database.dispose()

asyncio.run(main(sys.argv[1], float(sys.argv[2])))
"""


@pytest.mark.slow
async def test_workers_starting_at_once_migrate_exactly_once(database, database_url):
    """Four processes start together on one empty database: all succeed and the schema is whole."""
    start_at = time.time() + 2.5
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WORKER,
            database_url,
            str(start_at),
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(4)
    ]
    async with asyncio.timeout(300):
        outputs = await asyncio.gather(*(w.communicate() for w in workers))
    errors = [stderr.decode()[-2000:] for _, stderr in outputs]
    assert [w.returncode for w in workers] == [0, 0, 0, 0], errors
    revisions, diffs, _ = await _inspect(database)
    assert revisions == head_revisions() and diffs == []
    async with database.engine.connect() as conn:
        rows = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
    assert len(rows) == 1


@pytest.mark.slow
def test_alembic_command_line_upgrades_and_finds_no_pending_changes(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
    alembic = [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini")]
    upgraded = subprocess.run(
        [*alembic, "upgrade", "head"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert upgraded.returncode == 0, upgraded.stderr
    check = subprocess.run([*alembic, "check"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No new upgrade operations detected" in check.stdout + check.stderr


async def test_the_app_starts_on_a_migrated_database(client, app):
    assert (await client.get("/")).status_code == 200
    async with app.state.database.engine.connect() as conn:
        assert await conn.run_sync(current_revisions) == head_revisions()


async def test_an_existing_database_keeps_its_versions_and_history_as_defaults(database, database_url, tmp_path):
    """A database from before named segmentations: its versions and history become `default`'s."""
    import httpx
    from asgi_lifespan import LifespanManager

    from app.main import create_app
    from tests.conftest import make_settings

    def to_second_revision(connection) -> None:
        command.upgrade(alembic_config(connection), "0002")

    versions = table(
        "model_versions",
        *(column(name) for name in ("version", "created_by", "n_clusters", "silhouette_score", "inertia")),
        *(column(name) for name in ("n_samples", "data_fingerprint", "artifact")),
        column("details", JSON),
        column("created_at", UTCDateTime),
    )
    async with database.engine.begin() as conn:
        await conn.run_sync(to_second_revision)
        await conn.execute(
            insert(versions).values(
                version="v-old",
                created_by="someone",
                n_clusters=3,
                silhouette_score=0.5,
                inertia=10.0,
                n_samples=100,
                data_fingerprint=None,
                artifact=b"",
                details={},
                created_at=utcnow(),
            )
        )
    settings = make_settings(tmp_path, database_url)
    app = create_app(settings)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        from app.core.tables import Role
        from tests.conftest import create_user_direct, login_headers

        await create_user_direct(app, role=Role.analyst, username="keeper")
        headers = await login_headers(client, "keeper")
        listed = (await client.get("/segmentations/default/models", headers=headers)).json()
        assert [m["version"] for m in listed["models"]] == ["v-old"]
        assert [m["version"] for m in (await client.get("/models", headers=headers)).json()["models"]] == ["v-old"]
        names = [s["name"] for s in (await client.get("/segmentations", headers=headers)).json()["segmentations"]]
        assert names == ["default"]
