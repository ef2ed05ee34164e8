"""Faults: broken model files, a locked or vanished database, unexpected errors, hostile bodies.

Whatever breaks, the client gets JSON `{"detail": ...}` with a status that says whose problem it
is (503 + Retry-After for an unavailable database, 409/422 for its own request) and never a
traceback or a server path.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from pathlib import Path

import httpx
import joblib
import pytest

from app.core.config import Settings
from app.core.database import Database
from app.core.tables import Role
from app.ml import KMEANS_FILE, METADATA_FILE, SCALER_FILE, SegmentationModel
from tests.conftest import CUSTOMER

LEAKS = ("Traceback", 'File "', "site-packages", "/tmp/", "/work/", "sqlalchemy", "sqlite3.", "asyncpg")


def assert_clean(response: httpx.Response) -> None:
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/json"), response.headers
        assert "detail" in response.json()
    for leak in LEAKS:
        assert leak not in response.text, (leak, response.text[:300])


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, (response.status_code, response.text[:300])
    assert int(response.headers["retry-after"]) >= 1
    assert "database" in response.json()["detail"].lower()
    assert_clean(response)


# --- model files that cannot be loaded at startup ------------------------------------------


def _save_valid_model(directory: Path) -> None:
    from app.ml.preprocess import load_training_matrix
    from generate_dataset import generate

    directory.mkdir(parents=True, exist_ok=True)
    csv_path = directory.parent / "seed.csv"
    generate(rows=300, seed=3).to_csv(csv_path, index=False)
    model = SegmentationModel.train(load_training_matrix(csv_path), n_clusters=3, random_state=0)
    model.version = "seeded-v1"
    model.metadata_["version"] = model.version
    model.save(directory)


def _garbage_kmeans(d: Path) -> None:
    (d / KMEANS_FILE).write_bytes(os.urandom(2048))


def _truncated_scaler(d: Path) -> None:
    data = (d / SCALER_FILE).read_bytes()
    (d / SCALER_FILE).write_bytes(data[: len(data) // 2])


def _empty_metadata(d: Path) -> None:
    (d / METADATA_FILE).write_bytes(b"")


def _directory_for_a_file(d: Path) -> None:
    (d / KMEANS_FILE).unlink()
    (d / KMEANS_FILE).mkdir()


def _wrong_object_pickled(d: Path) -> None:
    joblib.dump({"not": "a model"}, d / KMEANS_FILE)
    metadata = json.loads((d / METADATA_FILE).read_text())
    metadata.pop("artifacts", None)  # so the loader gets as far as unpickling it
    (d / METADATA_FILE).write_text(json.dumps(metadata))


def _metadata_not_an_object(d: Path) -> None:
    (d / METADATA_FILE).write_text("[1, 2, 3]")


BREAKAGES = {
    f.__name__.strip("_"): f
    for f in (
        _garbage_kmeans,
        _truncated_scaler,
        _empty_metadata,
        _directory_for_a_file,
        _wrong_object_pickled,
        _metadata_not_an_object,
    )
}


@pytest.fixture(params=list(BREAKAGES))
def broken_model_files(request, settings: Settings) -> str:
    """Model files that were valid once and are broken before the app starts."""
    _save_valid_model(settings.model_dir)
    BREAKAGES[request.param](settings.model_dir)
    return request.param


async def test_unloadable_model_files_leave_the_service_up_without_a_model(broken_model_files, client, user_headers):
    health = await client.get("/")
    assert health.status_code == 200
    assert health.json()["model_loaded"] is False and health.json()["model_version"] is None
    predicted = await client.post("/predict", json=CUSTOMER, headers=user_headers)
    assert predicted.status_code == 409 and "train" in predicted.json()["detail"].lower()
    assert_clean(predicted)


async def test_a_valid_model_directory_is_served_and_training_replaces_a_broken_one(settings, dataset):
    """The control case, then recovery: broken files, a training, a working model."""
    from asgi_lifespan import LifespanManager

    from app.main import create_app
    from tests.conftest import create_user_direct, login_headers

    _save_valid_model(settings.model_dir)
    _garbage_kmeans(settings.model_dir)
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=60):
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            assert (await client.get("/")).json()["model_loaded"] is False
            analyst = await create_user_direct(app, role=Role.analyst)
            headers = await login_headers(client, analyst["username"])
            trained = await client.post("/train", params={"n_clusters": 3}, headers=headers)
            assert trained.status_code == 200, trained.text
            assert (await client.get("/")).json()["model_loaded"] is True
            assert (await client.post("/predict", json=CUSTOMER, headers=headers)).status_code == 200


# --- a locked SQLite database ---------------------------------------------------------------


def _sqlite_path(settings: Settings) -> Path:
    assert settings.is_sqlite
    return Path(settings.database_url.split("///", 1)[1])


# File locking and removal are faults of an SQLite file: these run on SQLite alone.
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@sqlite_only
@pytest.mark.parametrize("settings_overrides", [{"db_busy_timeout_seconds": 0.2}], ids=["busy-0.2s"])
async def test_a_database_locked_by_another_process_gives_503_with_retry_after(client, make_user, settings):
    user, headers = await make_user(Role.user)
    holder = sqlite3.connect(_sqlite_path(settings), timeout=5, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        writes = [
            await client.post("/profiles/", json={"name": "p", **CUSTOMER}, headers=headers),
            await client.post(
                "/auth/register", json={"email": "new@example.com", "username": "newcomer", "password": "newcomer-pass"}
            ),
            await client.post("/auth/login", data={"username": user["username"], "password": "wrong-pass"}),
            await client.put("/users/me", json={"full_name": "Locked Out"}, headers=headers),
        ]
        for response in writes:
            assert_unavailable(response)
            assert "busy" in response.json()["detail"].lower()
        # Reads are not blocked by a writer (WAL): the service stays useful meanwhile.
        assert (await client.get("/auth/me", headers=headers)).status_code == 200
        assert (await client.get("/")).status_code == 200
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    created = await client.post("/profiles/", json={"name": "p", **CUSTOMER}, headers=headers)
    assert created.status_code == 201


@sqlite_only
@pytest.mark.parametrize("settings_overrides", [{"db_busy_timeout_seconds": 5}], ids=["busy-5s"])
async def test_a_lock_released_within_the_busy_timeout_only_delays_the_request(client, user_headers, settings):
    import asyncio
    import threading

    holder = sqlite3.connect(_sqlite_path(settings), timeout=5, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(0.3, lambda: (holder.execute("ROLLBACK"), holder.close()))
    release.start()
    try:
        response = await client.post("/profiles/", json={"name": "p", **CUSTOMER}, headers=user_headers)
    finally:
        release.join()
        await asyncio.sleep(0)
    assert response.status_code == 201


# --- a database that went away --------------------------------------------------------------


def _remove_database_files(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


@sqlite_only
async def test_the_database_file_removed_while_running_gives_a_clear_503(client, make_user, settings):
    path = _sqlite_path(settings)
    _, headers = await make_user(Role.user)
    assert (await client.get("/profiles/", headers=headers)).status_code == 200
    _remove_database_files(path)
    for method, path_, kwargs in (
        ("GET", "/profiles/", {"headers": headers}),
        ("POST", "/auth/login", {"data": {"username": "x", "password": "y"}}),
        ("POST", "/profiles/", {"json": {"name": "p", **CUSTOMER}, "headers": headers}),
    ):
        response = await client.request(method, path_, **kwargs)
        # A token check cached a moment ago may let the first call pass the gate; the data is still gone.
        assert_unavailable(response)
    assert not path.exists(), "the service must not quietly start a new empty database"
    health = await client.get("/")
    assert health.status_code == 200


@pytest.mark.postgres
async def test_an_unreachable_database_gives_503(client, app, make_user, settings, tmp_path):
    """The database server is down (PostgreSQL) or its directory is gone (SQLite)."""
    _, headers = await make_user(Role.user)
    if settings.is_sqlite:
        url = f"sqlite+aiosqlite:///{tmp_path / 'no-such-dir' / 'gone.db'}"
    else:
        url = "postgresql+asyncpg://postgres@127.0.0.1:1/unreachable"
    working = app.state.database
    app.state.database = Database(url, busy_timeout=0.2)
    app.state.auth_cache.ttl = 0
    try:
        for method, path, kwargs in (
            ("GET", "/profiles/", {"headers": headers}),
            ("POST", "/auth/login", {"data": {"username": "x", "password": "y"}}),
        ):
            assert_unavailable(await client.request(method, path, **kwargs))
    finally:
        await app.state.database.dispose()
        app.state.database = working


# --- unexpected errors ----------------------------------------------------------------------


async def test_an_unexpected_error_is_a_bare_500_without_internals(app, user_headers, monkeypatch):
    from app.profiles import service as profile_service

    async def explode(**_):
        raise RuntimeError("boom in /work/main/app/services/profiles.py with secret=hunter2")

    monkeypatch.setattr(profile_service, "list_own", explode)
    # As a server sees it: the response goes out, the exception goes to the log (not to the test).
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/profiles/", headers=user_headers)
    assert response.status_code == 500
    assert response.json() == {"detail": "Internal server error"}
    assert "hunter2" not in response.text
    assert_clean(response)
    # The hardening and CORS headers are there on this path too.
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/profiles/", headers={**user_headers, "Origin": "http://localhost:5173"})
    assert response.status_code == 500
    assert response.headers["access-control-allow-origin"] == "http://localhost:5173"


@pytest.mark.postgres
async def test_nul_characters_in_text_are_never_a_server_error(client, make_user):
    """SQLite stores them; PostgreSQL cannot, and says so with a 422 rather than a 500."""
    user, headers = await make_user(Role.analyst)
    probes = [
        await client.post("/profiles/", json={"name": "a\x00b", **CUSTOMER}, headers=headers),
        await client.put("/users/me", json={"full_name": "nul\x00name"}, headers=headers),
        await client.post("/auth/login", data={"username": "nul\x00user", "password": "whatever-pass"}),
        await client.post("/auth/login", json={"username": user["username"], "password": "a\x00b"}),
        await client.get("/models/v%001", headers=headers),
    ]
    for response in probes:
        assert response.status_code < 500, (response.request.url, response.text)
        assert_clean(response)


# --- hostile bodies on every operation ------------------------------------------------------

HOSTILE_BODIES = [
    ("application/json", b"{"),
    ("application/json", b"\xff\xfe\xfd"),
    ("application/json", b'{"a": NaN, "b": Infinity}'),
    ("application/json", b'{"age": 1e999999, "name": "\\ud800"}'),
    ("application/json", b"[" * 5000),
    ("application/json", b'"just a string"'),
    ("application/json", b"null"),
    ("application/json", json.dumps({"customers": [{"age": 2**70}], "name": "\x00", "skip": -1}).encode()),
    ("application/x-www-form-urlencoded", b"username=%00&password=%ff%fe"),
    ("multipart/form-data; boundary=zz", b'--zz\r\nContent-Disposition: form-data; name="file"\r\n\r\nx'),
    ("multipart/form-data", b"no boundary at all"),
    ("text/plain", b"hello"),
    ("application/xml", b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY e SYSTEM 'file:///etc/passwd'>]><x>&e;</x>"),
]


@pytest.mark.postgres
async def test_no_hostile_body_on_any_operation_yields_a_server_error(client, app, make_user, trained_model):
    _, headers = await make_user(Role.analyst)
    spec = app.openapi()
    seen = 0
    for path, operations in spec["paths"].items():
        concrete = path.replace("{user_id}", "1").replace("{profile_id}", "1").replace("{version}", "v1")
        for method in operations:
            if method not in ("post", "put"):
                continue
            for content_type, body in HOSTILE_BODIES:
                response = await client.request(
                    method.upper(), concrete, content=body, headers={**headers, "Content-Type": content_type}
                )
                assert response.status_code < 500, (method, path, content_type, body[:40], response.text[:300])
                assert_clean(response)
                seen += 1
    assert seen >= 100


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
# The model follower would meet a closed connection first and have the pool renewed.
@pytest.mark.parametrize("settings_overrides", [{"model_sync_seconds": 3600}], ids=["no-follower"])
async def test_pooled_connections_the_server_closed_while_idle_are_replaced(
    client, make_user, trained_model, database_url
):
    """A PostgreSQL restart or idle timeout closes pooled connections: the next requests still succeed."""
    import asyncpg

    from app.core.database import PING_IDLE_SECONDS

    _, headers = await make_user(Role.user)
    assert (await client.post("/predict", json=CUSTOMER, headers=headers)).status_code == 200
    assert (await client.get("/history", headers=headers)).status_code == 200
    admin = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        closed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await admin.close()
    assert closed >= 1
    await asyncio.sleep(PING_IDLE_SECONDS + 0.2)
    for _ in range(3):  # reads first: nothing retries them
        page = await client.get("/history", headers=headers)
        assert page.status_code == 200, page.text
        predicted = await client.post("/predict", json=CUSTOMER, headers=headers)
        assert predicted.status_code == 200, predicted.text
    assert (await client.get("/history", headers=headers)).json()["total"] == 4


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("settings_overrides", [{"db_pool_size": 1, "db_pool_timeout_seconds": 0.5}], ids=["pool-1"])
async def test_every_pooled_connection_in_use_is_503_busy_then_served(app, client, make_user, trained_model):
    _, headers = await make_user(Role.user)
    engine = app.state.database.engine
    async with engine.connect() as first, engine.connect() as second:  # the pool and its one extra
        await first.exec_driver_sql("SELECT 1")
        await second.exec_driver_sql("SELECT 1")
        busy = await client.get("/history", headers=headers)
        assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1, busy.text
        assert "busy" in busy.json()["detail"].lower()
        assert_clean(busy)
    assert (await client.get("/history", headers=headers)).status_code == 200


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("settings_overrides", [{"db_pool_size": 2}], ids=["pool-2"])
async def test_history_pages_beyond_the_pool_take_turns(client, make_user, trained_model):
    """More pages at once than the pool has room for wait their turn (within the default 30 s), none refused."""
    _, headers = await make_user(Role.user)
    for _ in range(3):
        assert (await client.post("/predict", json=CUSTOMER, headers=headers)).status_code == 200
    pages = await asyncio.gather(*(client.get("/history", headers=headers) for _ in range(12)))
    assert [(page.status_code, page.json().get("total")) for page in pages] == [(200, 3)] * 12


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("settings_overrides", [{"db_pool_size": 2, "db_pool_timeout_seconds": 0.5}], ids=["pool-2"])
async def test_a_history_page_kept_waiting_for_its_turn_is_503_busy(app, client, make_user, trained_model):
    """A page kept waiting DB_POOL_TIMEOUT_SECONDS behind one that cannot finish gets 503, as a request
    waiting for the pool itself does, and the page in front is answered once it can be."""
    _, headers = await make_user(Role.user)
    for _ in range(3):
        assert (await client.post("/predict", json=CUSTOMER, headers=headers)).status_code == 200

    engine = app.state.database.engine
    async with engine.connect() as locker:
        await locker.exec_driver_sql("LOCK TABLE history_counts IN ACCESS EXCLUSIVE MODE")
        held = asyncio.create_task(client.get("/history", headers=headers))  # takes the turn, waits on the lock
        deadline = time.monotonic() + 60
        while (await locker.exec_driver_sql("SELECT count(*) FROM pg_locks WHERE NOT granted")).scalar() < 1:
            assert time.monotonic() < deadline, "the first page never reached the lock"
            await asyncio.sleep(0.01)
        busy = await asyncio.wait_for(client.get("/history", headers=headers), 60)
        assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1, busy.text
        assert "busy" in busy.json()["detail"].lower()
        assert_clean(busy)
        await locker.rollback()
    assert (await held).json()["total"] == 3
    assert (await client.get("/history", headers=headers)).json()["total"] == 3
