"""GET /history is written straight from the rows: it must say exactly what HistoryPage would."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import delete, select

from app.core.tables import PredictionHistory, Role
from app.history.pages import page_json
from app.history.schemas import HistoryItem, HistoryPage
from app.history.storage import EngineHistoryRepository
from tests.conftest import CUSTOMER

pytestmark = pytest.mark.postgres


def _pydantic(rows: list[dict], total: int, skip: int, limit: int, next_before_id: int | None = None) -> dict:
    page = HistoryPage(
        history=[HistoryItem(**r) for r in rows], total=total, skip=skip, limit=limit, next_before_id=next_before_id
    )
    return json.loads(page.model_dump_json())


def test_page_json_matches_the_schema_serialization():
    customer = {"sex": "Female", "age": 29, "annual_income": 85.5, "spending_score": 82, "purchase_frequency": 40}
    rows = [
        {
            "id": 7,
            "customer_data": customer,
            "cluster": 3,
            "cluster_name": 'Young, "big" spenders – ünïcode',
            "confidence": 0.12345678901234568,
            "model_version": None,
            "created_at": datetime(2026, 1, 2, 3, 4, 5, 0, tzinfo=UTC),
            "segmentation": "default",
        },
        {
            "id": 6,
            "customer_data": customer,
            "cluster": 0,
            "cluster_name": "Thrifty",
            "confidence": 1e-07,
            "model_version": "20260101-000000-abcdef",
            "created_at": datetime(2026, 1, 2, 3, 4, 5, 1, tzinfo=UTC),
            "segmentation": "crm-2026",
        },
    ]
    as_stored = [  # what SQLite hands back: JSON text and "YYYY-MM-DD HH:MM:SS.ffffff"
        (
            r["id"],
            json.dumps(r["customer_data"]),
            r["cluster"],
            r["cluster_name"],
            r["confidence"],
            r["model_version"],
            r["created_at"].strftime("%Y-%m-%d %H:%M:%S.%f"),
            r["segmentation"],
        )
        for r in rows
    ]
    as_postgres = [  # what the engine hands back: aware datetimes
        (
            r["id"],
            json.dumps(r["customer_data"]),
            r["cluster"],
            r["cluster_name"],
            r["confidence"],
            r["model_version"],
            r["created_at"],
            r["segmentation"],
        )
        for r in rows
    ]
    expected = _pydantic(rows, total=9, skip=2, limit=2)
    assert json.loads(page_json(as_stored, total=9, skip=2, limit=2)) == expected
    assert json.loads(page_json(as_postgres, total=9, skip=2, limit=2)) == expected
    assert json.loads(page_json(as_stored, total=9, skip=2, limit=2, next_before_id=6)) == _pydantic(
        rows, total=9, skip=2, limit=2, next_before_id=6
    )
    assert json.loads(page_json([], total=0, skip=0, limit=50)) == _pydantic([], 0, 0, 50)


def _remove_database_files(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _exists(path: Path) -> bool:
    return path.exists()


@pytest.mark.parametrize("through", ["default", "engine", "few rows kept"])
async def test_history_answer_equals_the_rows_and_includes_every_answered_prediction(
    app, client, make_user, trained_model, through
):
    if through == "engine":  # what PostgreSQL (and an in-memory SQLite database) always uses
        await app.state.services.history.stop()
        engine_history = EngineHistoryRepository(app.state.database)
        await engine_history.start()
        app.state.services = dataclasses.replace(app.state.services, history=engine_history)
    if through == "few rows kept":  # the kept rows' JSON is dropped again and again
        app.state.services.history.kept.max_items = 3
    user, headers = await make_user(Role.user)
    for age in range(20, 32):
        response = await client.post("/predict", json={**CUSTOMER, "age": age}, headers=headers)
        assert response.status_code == 200
        # A 200 means the row is committed: the next read has it.
        latest = (await client.get("/history", params={"limit": 1}, headers=headers)).json()
        assert latest["total"] == age - 19
        assert latest["history"][0]["customer_data"]["age"] == age
        assert latest["history"][0]["confidence"] == response.json()["confidence"]

    async with app.state.database.sessionmaker() as session:
        rows = (
            (
                await session.execute(
                    select(PredictionHistory)
                    .where(PredictionHistory.user_id == user["id"])
                    .order_by(PredictionHistory.created_at.desc(), PredictionHistory.id.desc())
                )
            )
            .scalars()
            .all()
        )
    for skip, limit in ((0, 50), (3, 4), (11, 5), (40, 10)):
        response = await client.get("/history", params={"skip": skip, "limit": limit}, headers=headers)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        expected = HistoryPage(
            history=[HistoryItem.model_validate(r) for r in rows[skip : skip + limit]],
            total=len(rows),
            skip=skip,
            limit=limit,
            next_before_id=rows[skip + limit - 1].id if skip + limit < len(rows) else None,
        )
        assert response.json() == json.loads(expected.model_dump_json())
    if through == "engine":
        await engine_history.stop()


async def test_analyst_reads_another_users_history(client, make_user, trained_model):
    user, user_headers = await make_user(Role.user)
    _, analyst_headers = await make_user(Role.analyst)
    await client.post("/predict", json=CUSTOMER, headers=user_headers)
    response = await client.get("/history", params={"user_id": user["id"]}, headers=analyst_headers)
    assert response.status_code == 200
    assert response.json()["total"] == 1
    assert (await client.get("/history", headers=analyst_headers)).json()["total"] == 0


async def test_with_the_database_file_removed_predictions_and_history_are_503(
    client, make_user, trained_model, settings
):
    if not settings.is_sqlite:
        pytest.skip("a database file is SQLite's")
    _, headers = await make_user(Role.user)
    assert (await client.post("/predict", json=CUSTOMER, headers=headers)).status_code == 200
    assert (await client.get("/history", headers=headers)).status_code == 200
    path = Path(settings.database_url.split("///", 1)[1])
    _remove_database_files(path)
    # Neither may answer from (or write into) the removed file; the token check is still cached.
    predicted = await client.post("/predict", json=CUSTOMER, headers=headers)
    assert predicted.status_code == 503, predicted.text
    history = await client.get("/history", headers=headers)
    assert history.status_code == 503, history.text
    assert not _exists(path)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_predictions_are_stored_exactly_as_a_core_insert_stores_them(app, client, make_user, trained_model):
    """The SQLite history writer binds the rows itself: the stored bytes must not differ."""
    import sqlite3

    user, headers = await make_user(Role.user)
    assert (await client.post("/predict", json=CUSTOMER, headers=headers)).status_code == 200
    async with app.state.database.sessionmaker() as session:
        written = (
            await session.execute(select(PredictionHistory).where(PredictionHistory.user_id == user["id"]))
        ).scalar_one()
        await session.execute(
            PredictionHistory.__table__.insert(),
            [
                {
                    column: getattr(written, column)
                    for column in (
                        "user_id",
                        "customer_data",
                        "cluster",
                        "cluster_name",
                        "confidence",
                        "model_version",
                        "created_at",
                    )
                }
            ],
        )
        await session.commit()
    with sqlite3.connect(app.state.database.engine.url.database) as raw:
        stored = raw.execute(
            "SELECT user_id, customer_data, typeof(customer_data), cluster, cluster_name, confidence, "
            "typeof(confidence), model_version, created_at, typeof(created_at) "
            "FROM prediction_history WHERE user_id = ? ORDER BY id",
            (user["id"],),
        ).fetchall()
    assert len(stored) == 2 and stored[0] == stored[1]
    assert len(stored[0][8]) == 26  # "YYYY-MM-DD HH:MM:SS.ffffff", what the history page reads


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_kept_row_is_never_sent_for_a_new_row_that_got_its_id(app, client, make_user, trained_model):
    user, headers = await make_user(Role.user)
    for age in (30, 31):
        assert (await client.post("/predict", json={**CUSTOMER, "age": age}, headers=headers)).status_code == 200
    newest = (await client.get("/history", headers=headers)).json()["history"][0]  # both rows kept now
    assert newest["customer_data"]["age"] == 31
    async with app.state.database.sessionmaker() as session:
        await session.execute(delete(PredictionHistory).where(PredictionHistory.id == newest["id"]))
        await session.commit()
    assert (await client.get("/history", headers=headers)).json()["total"] == 1  # gone at once
    # SQLite gives the next row the largest id plus one: the deleted row's id again.
    assert (await client.post("/predict", json={**CUSTOMER, "age": 45}, headers=headers)).status_code == 200
    page = (await client.get("/history", headers=headers)).json()
    assert page["total"] == 2 and page["history"][0]["id"] == newest["id"]
    assert page["history"][0]["customer_data"]["age"] == 45
    assert page["history"][0]["created_at"] != newest["created_at"]
