"""Fixtures: every test gets its own database, model folder and users, and talks HTTP to the app."""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import URL, make_url, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

TEST_SECRET = "test-secret-key-that-is-long-enough-for-hs256-000"
# Importing app.main builds the module-level app, and without SECRET_KEY the settings write a
# development .secret_key into the working directory: the checkout. The tests and the processes they
# start (which inherit this environment) sign with the test key instead; each app gets its own anyway.
os.environ.setdefault("SECRET_KEY", TEST_SECRET)

from app.core import security as auth  # noqa: E402
from app.core.config import Settings  # noqa: E402
from app.core.database import Database  # noqa: E402
from app.core.tables import Role  # noqa: E402
from app.main import create_app  # noqa: E402
from app.users import service as user_service  # noqa: E402

PASSWORD = "correct-horse-42"
_counter = itertools.count(1)


POSTGRES_SKIP_REASON = (
    "PostgreSQL case: set TEST_DATABASE_URL (e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/test) to run it"
)


# The modules that take longest, run first: pytest-xdist (`--dist loadfile`) hands whole modules to
# the workers in collection order, and a long one handed out last would keep one worker busy alone.
LONGEST_FIRST = (
    "test_spark.py",
    "test_fuzz.py",
    "test_cli.py",
    "test_multiprocess.py",
    "test_scoring_cli.py",
    "test_tour.py",
    "test_rfm.py",
    "test_browser.py",
    "test_drift.py",
    "test_segmentations.py",
    "test_webhooks.py",
    "test_policy_workers.py",
    "test_value_api.py",
    "test_migrations.py",
    "test_model.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest modules first. The bench smoke run (minutes, and it asserts no figure) only with `-m bench`
    or when nothing else was asked for (`pytest tests/test_bench_smoke.py`)."""
    items.sort(key=lambda item: LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST else 99)
    if "bench" in (config.getoption("markexpr") or ""):
        return
    benches = [item for item in items if item.get_closest_marker("bench")]
    if benches and len(benches) < len(items):
        config.hook.pytest_deselected(items=benches)
        items[:] = [item for item in items if not item.get_closest_marker("bench")]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """SQLite for every test; PostgreSQL as well for tests marked `postgres`, where behaviour depends on
    the database. A test that parametrizes `database_url` itself picks its backends."""
    if "database_url" not in metafunc.fixturenames or metafunc.definition.get_closest_marker("postgres") is None:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", "")
        if "database_url" in (names.replace(" ", "").split(",") if isinstance(names, str) else names):
            return
    metafunc.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)


@functools.cache
def postgres_url() -> str | None:
    """TEST_DATABASE_URL, or under pytest-xdist a database of this worker's own beside it on the same
    server (`<name>_gw0`, ...), so parallel workers never empty each other's tables. Created when missing."""
    url = os.environ.get("TEST_DATABASE_URL") or None
    if url is None:
        return None
    base = make_url(url)
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    own = base.set(database=f"{base.database}_{worker}") if worker else base
    # A thread of its own: this may be called from a running event loop (an async fixture).
    with ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, _create_database(base, own.database)).result()
    return own.render_as_string(hide_password=False)


async def _create_database(server: URL, name: str | None) -> None:
    last_error: Exception | None = None
    # The named database is the one known to exist; `postgres` is the fallback every server has.
    for maintenance in (server.database, "postgres"):
        engine = create_async_engine(server.set(database=maintenance), isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as conn:
                exists = await conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name})
                if not exists:
                    try:
                        await conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
                    except DBAPIError as exc:  # created by a concurrent run since the check
                        if getattr(exc.orig, "sqlstate", None) != "42P04":
                            raise
            return
        except (DBAPIError, OSError) as exc:
            last_error = exc
        finally:
            await engine.dispose()
    raise RuntimeError(f"could not create the test database {name!r} on {server!r}") from last_error


@pytest.fixture
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh database: a new SQLite file, or this worker's PostgreSQL test database emptied."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
        return
    url = postgres_url()
    if url is None:
        pytest.skip(POSTGRES_SKIP_REASON)
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        # Tables, sequences, triggers and their functions, alembic_version: everything a test left.
        await conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
        await conn.exec_driver_sql("CREATE SCHEMA public")
    await engine.dispose()
    yield url


def make_settings(tmp_path: Path, database_url: str, **overrides) -> Settings:
    values = {
        "database_url": database_url,
        "secret_key": TEST_SECRET,
        "model_dir": tmp_path / "models",
        "data_path": tmp_path / "data" / "customers.csv",
        "bcrypt_rounds": 4,
        "model_sync_seconds": 0.2,
        "metrics_enabled": True,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def settings_overrides() -> dict:
    """Tests override this to change one setting for their app."""
    return {}


@pytest.fixture
def settings(tmp_path: Path, database_url: str, settings_overrides: dict) -> Settings:
    return make_settings(tmp_path, database_url, **settings_overrides)


@pytest.fixture
async def app(settings: Settings):
    application = create_app(settings)
    async with LifespanManager(application, startup_timeout=60, shutdown_timeout=30):
        yield application


@pytest.fixture
async def client(app) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=120) as http:
        yield http


async def create_user_direct(
    app, *, role: Role = Role.user, username: str | None = None, password: str = PASSWORD
) -> dict:
    """Create a user in the app's database the way create_admin.py does, and return its details."""
    database: Database = app.state.database
    username = username or f"{role.value}{next(_counter)}"
    async with database.sessionmaker() as session:
        user = await user_service.create(
            session=session,
            email=f"{username}@example.com",
            username=username,
            full_name=username.title(),
            hashed_password=auth.hash_password(password, 4),
            role=role,
        )
    return {"id": user.id, "username": username, "password": password, "email": f"{username}@example.com"}


async def login_headers(client: httpx.AsyncClient, username: str, password: str = PASSWORD) -> dict[str, str]:
    response = await client.post("/auth/login", data={"username": username, "password": password})
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


@pytest.fixture
def make_user(app, client):
    """make_user(role) -> (user dict, auth headers)."""

    async def factory(role: Role = Role.user, username: str | None = None, password: str = PASSWORD):
        user = await create_user_direct(app, role=role, username=username, password=password)
        return user, await login_headers(client, user["username"], password)

    return factory


@pytest.fixture
async def user_headers(make_user) -> dict[str, str]:
    return (await make_user(Role.user))[1]


@pytest.fixture
async def analyst_headers(make_user) -> dict[str, str]:
    return (await make_user(Role.analyst))[1]


@pytest.fixture
async def admin_headers(make_user) -> dict[str, str]:
    return (await make_user(Role.admin))[1]


@pytest.fixture
def dataset(settings: Settings) -> Path:
    """A small generated customers.csv where the app looks for its default dataset."""
    from generate_dataset import generate

    settings.data_path.parent.mkdir(parents=True, exist_ok=True)
    generate(rows=800, seed=7).to_csv(settings.data_path, index=False)
    return settings.data_path


@pytest.fixture
async def trained_model(client, dataset, analyst_headers) -> dict:
    response = await client.post("/train", params={"n_clusters": 5}, headers=analyst_headers)
    assert response.status_code == 200, response.text
    return response.json()


CUSTOMER = {"sex": "Female", "age": 29, "annual_income": 85.0, "spending_score": 82, "purchase_frequency": 40}
