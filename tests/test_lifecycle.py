"""Model lifecycle in one process: versions, activation and rollback, batch scoring against single
predictions, restarts over a damaged local copy, adopted model files, the training lease and time limit,
and a second model store (another worker) following the database."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import time
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta

import httpx
import pandas as pd
import psutil
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import update

from app.core.database import Database
from app.core.tables import ModelVersion, ServiceState, utcnow
from app.main import create_app
from app.ml import SegmentationModel
from app.ml.preprocess import load_training_matrix
from app.segmentations import scoring as segmentation
from app.versions.lease import HOST_ID
from app.versions.store import TRAINING_KEY, ModelStore
from generate_dataset import generate
from tests.conftest import CUSTOMER

# Seconds a poll waits for what the configured intervals make happen in well under a second.
DEADLINE = 60.0

SUMMARY_FIELDS = (
    "version",
    "created_at",
    "created_by",
    "n_clusters",
    "silhouette_score",
    "inertia",
    "n_samples",
    "data_fingerprint",
    "active",
)


@asynccontextmanager
async def running(settings, port: int = 50001):
    """Another instance of the app on the same settings: a restart, or a second server."""
    application = create_app(settings)
    async with LifespanManager(application, startup_timeout=60, shutdown_timeout=30):
        transport = httpx.ASGITransport(app=application, client=("127.0.0.1", port))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=120) as http:
            yield application, http


async def eventually(condition, give_up_after: float = DEADLINE) -> None:
    """Poll until condition() holds; only a mechanism that never delivers reaches `give_up_after`."""
    deadline = time.monotonic() + give_up_after
    while not condition():
        assert time.monotonic() < deadline, f"condition still not met after {give_up_after} s"
        await asyncio.sleep(0.02)


def local_version(settings) -> str:
    return json.loads((settings.model_dir / "metadata.json").read_text())["version"]


def upload(frame: pd.DataFrame) -> dict:
    return {"file": ("customers.csv", frame.to_csv(index=False).encode(), "text/csv")}


# --- versions -----------------------------------------------------------------------------------


async def test_every_training_is_an_immutable_version(client, dataset, analyst_headers):
    me = (await client.get("/auth/me", headers=analyst_headers)).json()
    first = (await client.post("/train", params={"n_clusters": 4}, headers=analyst_headers)).json()
    before = (await client.get(f"/models/{first['model_version']}", headers=analyst_headers)).json()
    second = (
        await client.post(
            "/train", params={"n_clusters": 3}, files=upload(generate(rows=400, seed=9)), headers=analyst_headers
        )
    ).json()
    listing = (await client.get("/models", headers=analyst_headers)).json()
    assert [m["version"] for m in listing["models"]] == [second["model_version"], first["model_version"]]
    for item in listing["models"]:
        assert set(SUMMARY_FIELDS) <= set(item)
        assert item["created_by"] == me["username"]
    newest, oldest = listing["models"]
    assert (newest["n_samples"], newest["n_clusters"]) == (400, 3)
    assert (oldest["n_samples"], oldest["n_clusters"]) == (800, 4)
    assert newest["data_fingerprint"] != oldest["data_fingerprint"]
    after = (await client.get(f"/models/{first['model_version']}", headers=analyst_headers)).json()
    assert {**before, "active": None} == {**after, "active": None}  # only the active flag moved
    assert before["active"] is True and after["active"] is False
    assert len(after["clusters"]) == 4 and after["features"] and after["library_versions"]
    assert after["k_selection"]["method"] == "fixed"


async def test_rollback_and_roll_forward_switch_everything(
    client, trained_model, settings, analyst_headers, user_headers
):
    first = trained_model["model_version"]
    second = (await client.post("/train", params={"n_clusters": 3}, headers=analyst_headers)).json()["model_version"]
    for version, k in ((first, 5), (second, 3), (first, 5)):
        response = await client.post(f"/models/{version}/activate", headers=analyst_headers)
        assert response.status_code == 200 and response.json()["version"] == version
        assert response.json()["active"] is True
        assert (await client.get("/")).json()["model_version"] == version
        assert (await client.get("/clusters", headers=user_headers)).json()["n_clusters"] == k
        predicted = (await client.post("/predict", json=CUSTOMER, headers=user_headers)).json()
        assert predicted["model_version"] == version
        assert local_version(settings) == version
        batch = await client.post("/predict/batch", json={"customers": [CUSTOMER] * 3}, headers=user_headers)
        assert batch.json()["model_version"] == version
    history = (await client.get("/history", headers=user_headers)).json()["history"]
    assert [h["model_version"] for h in history] == [first, second, first]
    again = await client.post(f"/models/{first}/activate", headers=analyst_headers)
    assert again.status_code == 200  # activating the active version is harmless


# --- batch scoring --------------------------------------------------------------------------------


async def test_batch_csv_and_json_agree_with_single_predictions(client, trained_model, user_headers):
    frame = generate(rows=300, seed=21)
    records = [
        {
            "sex": r.Sex,
            "age": int(r.Age),
            "annual_income": float(r.Annual_Income),
            "spending_score": int(r.Spending_Score),
            "purchase_frequency": int(r.Purchase_Frequency),
        }
        for r in frame.itertuples()
    ]
    from_json = (await client.post("/predict/batch", json={"customers": records}, headers=user_headers)).json()
    from_csv = (await client.post("/predict/batch", files=upload(frame), headers=user_headers)).json()
    as_csv = await client.post("/predict/batch", files=upload(frame), headers={**user_headers, "Accept": "text/csv"})
    assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv")
    table = pd.read_csv(io.StringIO(as_csv.text))
    assert list(table.columns) == [*frame.columns, "cluster", "cluster_name", "confidence", "error"]
    assert list(table["CustomerID"]) == list(frame["CustomerID"])
    assert from_json["model_version"] == from_csv["model_version"] == trained_model["model_version"]
    assert len(from_json["predictions"]) == len(from_csv["predictions"]) == len(table) == 300
    for a, b, (_, row) in zip(from_json["predictions"], from_csv["predictions"], table.iterrows(), strict=True):
        assert (a["cluster"], a["cluster_name"]) == (b["cluster"], b["cluster_name"])
        assert (int(row["cluster"]), row["cluster_name"]) == (a["cluster"], a["cluster_name"])
        assert a["confidence"] == b["confidence"] and row["confidence"] == pytest.approx(a["confidence"], abs=1e-6)
    for i in range(0, 300, 20):
        single = (await client.post("/predict", json=records[i], headers=user_headers)).json()
        assert (single["cluster"], single["cluster_name"]) == (
            from_csv["predictions"][i]["cluster"],
            from_csv["predictions"][i]["cluster_name"],
        )
        assert single["confidence"] == pytest.approx(from_csv["predictions"][i]["confidence"], abs=1e-9)
    assert table["error"].isna().all()


BAD_ROWS = {  # row number -> (cells, the field its error names)
    3: ("x3,Male,thirty,40.0,50,20", "age: not a number"),
    9: ("x9,Male,30,,50,20", "annual_income: empty"),
    15: ("x15,Male,30,NaN,50,20", "annual_income"),
    22: ("x22,Male,30,40.0,150,20", "spending_score: out of range"),
    28: ("x28,Robot,30,40.0,50,20", "sex"),
    30: ("x30,Male,30.5,40.0,50,20", "age: not a whole number"),
}


async def test_a_csv_batch_marks_each_bad_row_across_chunks(
    client, trained_model, user_headers, admin_headers, monkeypatch
):
    monkeypatch.setattr(segmentation, "SCORE_CHUNK_ROWS", 7)  # 30 rows: five chunks
    lines = ["CustomerID,Sex,Age,Annual_Income,Spending_Score,Purchase_Frequency,cluster"]
    for row in range(1, 31):
        lines.append(BAD_ROWS[row][0] + ",old" if row in BAD_ROWS else f"x{row},Female,{20 + row},55.5,60,25,old")
    body = {"file": ("mixed.csv", ("\n".join(lines) + "\n").encode(), "text/csv")}

    as_csv = await client.post("/predict/batch", files=body, headers={**user_headers, "Accept": "text/csv"})
    assert as_csv.status_code == 200, as_csv.text
    table = pd.read_csv(io.StringIO(as_csv.text), keep_default_na=False)
    assert list(table["CustomerID"]) == [f"x{row}" for row in range(1, 31)]
    assert list(table.columns).count("cluster") == 1  # the input's own "cluster" column gave way
    for row in range(1, 31):
        cells = table.iloc[row - 1]
        if row in BAD_ROWS:
            assert BAD_ROWS[row][1] in cells["error"] and cells["cluster"] == "" and cells["cluster_name"] == ""
        else:
            assert cells["error"] == "" and cells["cluster"] != "" and 0 <= float(cells["confidence"]) <= 1

    as_json = await client.post("/predict/batch", files=body, headers=user_headers)
    assert as_json.status_code == 422
    refused = as_json.json()
    assert refused["detail"].startswith("6 of 30 rows") and [e["row"] for e in refused["errors"]] == sorted(BAD_ROWS)

    stats = (await client.get("/admin/stats", headers=admin_headers)).json()
    assert stats["total_predictions"] == 24  # the scored rows of the CSV answer; the refused batch counts none
    assert (await client.get("/history", headers=user_headers)).json()["total"] == 0


async def test_a_csv_batch_with_a_missing_column_or_no_rows_is_422(client, trained_model, user_headers):
    no_income = {"file": ("a.csv", b"Age,Spending_Score,Purchase_Frequency\n30,50,20\n", "text/csv")}
    response = await client.post("/predict/batch", files=no_income, headers=user_headers)
    assert response.status_code == 422 and "annual_income" in str(response.json()["detail"])
    header_only = {"file": ("b.csv", b"Age,Annual_Income,Spending_Score,Purchase_Frequency\n", "text/csv")}
    response = await client.post("/predict/batch", files=header_only, headers=user_headers)
    assert response.status_code == 422 and "no data rows" in str(response.json()["detail"])


# --- restarts and crash safety --------------------------------------------------------------------


async def test_a_restart_serves_the_database_version_and_repairs_a_torn_local_copy(
    client, trained_model, settings, analyst_headers, tmp_path
):
    first = trained_model["model_version"]
    second = (await client.post("/train", params={"n_clusters": 3}, headers=analyst_headers)).json()["model_version"]
    # A save killed between its renames: kmeans.pkl of the old version next to the new metadata,
    # and a temporary file it never moved into place.
    async with Database(settings.database_url).sessionmaker() as session:
        old = SegmentationModel.from_bytes((await session.get(ModelVersion, first)).artifact)
    old.save(tmp_path / "old")
    (settings.model_dir / "kmeans.pkl").write_bytes((tmp_path / "old" / "kmeans.pkl").read_bytes())
    leftover = settings.model_dir / ".kmeans.pkl.killed.tmp"
    leftover.write_bytes(b"half a pickle")
    os.utime(leftover, (time.time() - 3600, time.time() - 3600))

    async with running(settings) as (_, restarted):
        assert (await restarted.get("/")).json()["model_version"] == second
    assert SegmentationModel.load(settings.model_dir).version == second
    assert not leftover.exists()


async def test_model_files_from_before_the_database_are_adopted_once(settings):
    features = load_training_matrix(generate(rows=500, seed=4).to_csv(index=False).encode())
    model = SegmentationModel.train(features, n_clusters=4)
    model.save(settings.model_dir)
    async with AsyncExitStack() as stack:
        (app_a, http_a), (app_b, http_b) = await asyncio.gather(
            stack.enter_async_context(running(settings, 50001)), stack.enter_async_context(running(settings, 50002))
        )
        assert (await http_a.get("/")).json()["model_version"] == model.version
        assert (await http_b.get("/")).json()["model_version"] == model.version
        versions, active = await app_a.state.models.list_versions()
    assert active == model.version and [v["version"] for v in versions] == [model.version]
    assert versions[0]["created_by"] is None and versions[0]["n_samples"] == 500


async def test_a_version_whose_artifact_cannot_be_loaded_is_never_activated(
    app, client, trained_model, analyst_headers, user_headers
):
    first = trained_model["model_version"]
    second = (await client.post("/train", params={"n_clusters": 3}, headers=analyst_headers)).json()["model_version"]
    async with app.state.database.sessionmaker() as session:
        await session.execute(update(ModelVersion).where(ModelVersion.version == first).values(artifact=b"not a model"))
        await session.commit()
    response = await client.post(f"/models/{first}/activate", headers=analyst_headers)
    assert response.status_code == 409 and "cannot be loaded" in response.json()["detail"]
    assert (await client.get("/models", headers=analyst_headers)).json()["active_version"] == second
    assert (await client.post("/predict", json=CUSTOMER, headers=user_headers)).json()["model_version"] == second


def _training_children() -> list[psutil.Process]:
    """Training processes: children of this process's fork server."""
    found = []
    for child in psutil.Process().children():
        try:
            if "forkserver" in " ".join(child.cmdline()):
                found.extend(child.children())
        except psutil.Error:
            pass
    return found


async def test_a_training_past_the_time_limit_is_killed_and_changes_nothing(
    app, client, trained_model, analyst_headers
):
    app.state.settings.train_timeout_seconds = 0.01
    before = (await client.get("/models", headers=analyst_headers)).json()
    response = await client.post("/train", headers=analyst_headers)
    assert response.status_code == 422 and "TRAIN_TIMEOUT_SECONDS" in response.json()["detail"]
    assert (await client.get("/models", headers=analyst_headers)).json() == before
    await eventually(lambda: _training_children() == [])
    app.state.settings.train_timeout_seconds = 300
    assert (await client.post("/train", params={"n_clusters": 3}, headers=analyst_headers)).status_code == 200


async def _set_lease(database, value: str | None, age_seconds: float = 0) -> None:
    async with database.sessionmaker() as session:
        if await session.get(ServiceState, TRAINING_KEY) is None:
            session.add(ServiceState(key=TRAINING_KEY, value=None))
            await session.commit()
        await session.execute(
            update(ServiceState)
            .where(ServiceState.key == TRAINING_KEY)
            .values(value=value, updated_at=utcnow() - timedelta(seconds=age_seconds))
        )
        await session.commit()


@pytest.mark.postgres
async def test_the_training_lease_is_respected_unless_its_holder_is_gone(app, client, dataset, analyst_headers):
    database = app.state.database
    host = HOST_ID
    finished = await asyncio.create_subprocess_exec("true")
    await finished.wait()
    cases = [
        (f"{host}:{os.getppid()}:live", 0, 409),  # a live process on this host
        (f"{socket.gethostname()}/other-namespace:{finished.pid}:container", 0, 409),  # a neighbour container
        ("elsewhere:4242:remote", 0, 409),  # another host, renewed just now
        ("elsewhere:4242:remote", 3600, 200),  # another host, silent for an hour
        (f"{host}:{finished.pid}:killed", 0, 200),  # a process on this host that no longer exists
    ]
    for value, age, expected in cases:
        await _set_lease(database, value, age)
        response = await client.post("/train", params={"n_clusters": 3}, headers=analyst_headers)
        assert response.status_code == expected, (value, response.text)
        if expected == 409:
            assert "already running" in response.json()["detail"]


# --- another worker process follows the database --------------------------------------------------


@pytest.mark.postgres
async def test_another_store_follows_train_and_activate(app, client, settings, dataset, analyst_headers, tmp_path):
    other_settings = settings.model_copy(update={"model_dir": tmp_path / "other-worker"})
    database = Database(settings.database_url)
    other = ModelStore(settings=other_settings, database=database)
    await other.start()

    def serves(version: str):
        return lambda: other.current is not None and other.current.version == version

    try:
        first = (await client.post("/train", params={"n_clusters": 4}, headers=analyst_headers)).json()
        await eventually(serves(first["model_version"]))
        second = (await client.post("/train", params={"n_clusters": 3}, headers=analyst_headers)).json()
        await eventually(serves(second["model_version"]))
        await client.post(f"/models/{first['model_version']}/activate", headers=analyst_headers)
        await eventually(serves(first["model_version"]))
        assert local_version(other_settings) == first["model_version"]
    finally:
        await other.stop()
        await database.dispose()


@pytest.mark.postgres
async def test_another_store_switches_when_it_syncs_and_not_before(
    app, client, settings, dataset, analyst_headers, tmp_path
):
    """MODEL_SYNC_SECONDS is what bounds how late another worker switches: with an hour between its
    syncs it keeps serving its version after a train or an activate elsewhere, until it syncs."""
    other_settings = settings.model_copy(update={"model_dir": tmp_path / "other-worker", "model_sync_seconds": 3600})
    database = Database(settings.database_url)
    other = ModelStore(settings=other_settings, database=database)
    await other.start()

    def served() -> str | None:
        return other.current.version if other.current is not None else None

    try:
        first = (await client.post("/train", params={"n_clusters": 4}, headers=analyst_headers)).json()
        assert served() is None
        await other.sync()
        assert served() == first["model_version"]
        second = (await client.post("/train", params={"n_clusters": 3}, headers=analyst_headers)).json()
        assert served() == first["model_version"]
        await other.sync()
        assert served() == second["model_version"]
        await client.post(f"/models/{first['model_version']}/activate", headers=analyst_headers)
        assert served() == second["model_version"]
        await other.sync()
        assert served() == first["model_version"] == local_version(other_settings)
    finally:
        await other.stop()
        await database.dispose()


@pytest.mark.postgres
async def test_another_worker_sees_a_logout_once_its_auth_cache_expires_and_not_before(client, make_user, settings):
    """AUTH_CACHE_SECONDS is what bounds how late another worker sees a logout: one that may trust its
    view of a token for an hour still accepts it, one that may not trust it at all rejects it at once.

    (The setting allows at most a second; the hour is set past its validation to make the rule visible.)
    """
    _, headers = await make_user()
    trusting = settings.model_copy(update={"auth_cache_seconds": 3600})
    checking = settings.model_copy(update={"auth_cache_seconds": 0})
    async with running(trusting, 50002) as (_, on_trusting), running(checking, 50003) as (_, on_checking):
        for http in (on_trusting, on_checking):
            assert (await http.get("/auth/me", headers=headers)).status_code == 200
        assert (await client.post("/auth/logout", headers=headers)).status_code == 200
        assert (await on_checking.get("/auth/me", headers=headers)).status_code == 401
        assert (await on_trusting.get("/auth/me", headers=headers)).status_code == 200
