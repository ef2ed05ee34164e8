"""The segmentation routes through HTTP: health, train, predict, segments, elbow, charts, history, versions."""

from __future__ import annotations

import asyncio
import base64
import io

import pandas as pd
import pytest

from app.core.tables import Role
from tests.conftest import CUSTOMER


def _png(uri: str) -> bytes:
    assert uri.startswith("data:image/png;base64,")
    data = base64.b64decode(uri.split(",", 1)[1])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return data


async def test_health_before_and_after_training(client, dataset, analyst_headers):
    body = (await client.get("/")).json()
    assert body["status"] == "healthy" and body["message"] == "Customer Segmentation API is running"
    assert body["model_loaded"] is False and body["model_version"] is None and body["version"]
    trained = (await client.post("/train", headers=analyst_headers)).json()
    body = (await client.get("/")).json()
    assert body["model_loaded"] is True and body["model_version"] == trained["model_version"]


async def test_ml_routes_say_train_first_without_a_model(client, user_headers):
    for method, path in [("GET", "/clusters"), ("GET", "/charts/clusters")]:
        response = await client.request(method, path, headers=user_headers)
        assert response.status_code == 409 and "train" in response.json()["detail"].lower()
    response = await client.post("/predict", json=CUSTOMER, headers=user_headers)
    assert response.status_code == 409 and "train" in response.json()["detail"].lower()
    response = await client.post("/predict/batch", json={"customers": [CUSTOMER]}, headers=user_headers)
    assert response.status_code == 409


async def test_train_with_fixed_k_reports_the_contract_fields(client, dataset, analyst_headers):
    response = await client.post("/train", params={"n_clusters": 4, "random_state": 3}, headers=analyst_headers)
    assert response.status_code == 200, response.text
    body = response.json()
    for key in (
        "message",
        "n_clusters",
        "silhouette_score",
        "inertia",
        "model_version",
        "n_samples",
        "duration_seconds",
        "cluster_sizes",
    ):
        assert key in body
    assert body["n_clusters"] == 4 and body["n_samples"] == 800
    assert sum(body["cluster_sizes"].values()) == 800 and len(body["cluster_sizes"]) == 4
    assert -1 <= body["silhouette_score"] <= 1


async def test_train_auto_k_finds_the_generated_segments(client, dataset, analyst_headers):
    body = (await client.post("/train", headers=analyst_headers)).json()
    assert body["n_clusters"] == 5


@pytest.mark.parametrize("params", [{"n_clusters": 1}, {"n_clusters": 21}, {"n_clusters": "x"}, {"random_state": -1}])
async def test_train_query_rules(client, dataset, analyst_headers, params):
    assert (await client.post("/train", params=params, headers=analyst_headers)).status_code == 422


async def test_train_without_dataset_is_409(client, analyst_headers):
    response = await client.post("/train", headers=analyst_headers)
    assert response.status_code == 409 and "generate_dataset" in response.json()["detail"]


@pytest.mark.postgres
async def test_predict_names_a_segment_and_records_history(client, trained_model, make_user):
    _, headers = await make_user(Role.user)
    response = await client.post("/predict", json={**CUSTOMER, "sex": "female"}, headers=headers)
    assert response.status_code == 200
    body = response.json()
    assert 0 <= body["cluster"] < trained_model["n_clusters"]
    assert 0.0 <= body["confidence"] <= 1.0
    assert body["customer_data"]["sex"] == "Female"
    assert body["model_version"] == trained_model["model_version"]
    clusters = (await client.get("/clusters", headers=headers)).json()["clusters"]
    assert body["cluster_name"] == next(c["cluster_name"] for c in clusters if c["cluster_id"] == body["cluster"])
    history = (await client.get("/history", headers=headers)).json()
    assert history["total"] == 1
    item = history["history"][0]
    assert item["cluster"] == body["cluster"] and item["customer_data"]["sex"] == "Female"
    assert item["model_version"] == trained_model["model_version"] and item["confidence"] == body["confidence"]


@pytest.mark.postgres
async def test_history_is_newest_first_paged_and_private(client, trained_model, make_user):
    user, headers = await make_user(Role.user)
    _, other = await make_user(Role.user)
    _, analyst = await make_user(Role.analyst)
    for age in (20, 30, 40):
        await client.post("/predict", json={**CUSTOMER, "age": age}, headers=headers)
    page = (await client.get("/history", params={"limit": 2}, headers=headers)).json()
    assert [h["customer_data"]["age"] for h in page["history"]] == [40, 30]
    assert page["total"] == 3 and page["skip"] == 0 and page["limit"] == 2
    assert (await client.get("/history", headers=other)).json()["total"] == 0
    assert (await client.get("/history", params={"user_id": user["id"]}, headers=other)).status_code == 403
    theirs = await client.get("/history", params={"user_id": user["id"]}, headers=analyst)
    assert theirs.status_code == 200 and theirs.json()["total"] == 3
    assert (await client.get("/history", params={"limit": 201}, headers=headers)).status_code == 422


async def test_clusters_describe_every_segment(client, trained_model, user_headers):
    body = (await client.get("/clusters", headers=user_headers)).json()
    assert body["n_clusters"] == 5 and body["total_customers"] == 800
    assert body["model_version"] == trained_model["model_version"]
    names = [c["cluster_name"] for c in body["clusters"]]
    assert len(set(names)) == len(names) == 5
    assert sum(c["size"] for c in body["clusters"]) == 800
    assert abs(sum(c["percentage"] for c in body["clusters"]) - 100) < 0.5
    for c in body["clusters"]:
        assert c["description"] and 18 <= c["avg_age"] <= 100 and 1 <= c["avg_spending_score"] <= 100


async def test_elbow_works_before_training_and_checks_its_range(client, dataset, user_headers):
    response = await client.get("/elbow", params={"k_min": 2, "k_max": 8}, headers=user_headers)
    assert response.status_code == 200
    body = response.json()
    assert body["k_range"] == list(range(2, 9))
    assert len(body["inertias"]) == len(body["silhouette_scores"]) == 7
    assert body["inertias"] == sorted(body["inertias"], reverse=True)
    assert body["optimal_k"] in body["k_range"] and body["method"]
    for params in ({"k_max": 16}, {"k_min": 1}, {"k_min": 6, "k_max": 3}):
        assert (await client.get("/elbow", params=params, headers=user_headers)).status_code == 422


async def test_elbow_without_dataset_is_409(client, user_headers):
    assert (await client.get("/elbow", headers=user_headers)).status_code == 409


async def test_charts_are_png_data_uris(client, trained_model, user_headers):
    body = (await client.get("/charts/clusters", headers=user_headers)).json()
    assert set(body["charts"]) == {"pie_chart", "bar_chart", "size_chart"}
    for uri in body["charts"].values():
        _png(uri)
    assert body["n_clusters"] == 5 and body["total_customers"] == 800
    elbow = (await client.get("/charts/elbow", headers=user_headers)).json()
    _png(elbow["chart"])
    assert 2 <= elbow["optimal_k"] <= 10


async def test_batch_json_equals_single_predictions_in_order(client, trained_model, user_headers):
    customers = [{**CUSTOMER, "age": 18 + i * 7, "spending_score": 5 + i * 9} for i in range(10)]
    batch = await client.post("/predict/batch", json={"customers": customers}, headers=user_headers)
    assert batch.status_code == 200
    body = batch.json()
    assert body["model_version"] == trained_model["model_version"] and len(body["predictions"]) == 10
    for customer, item in zip(customers, body["predictions"], strict=True):
        single = (await client.post("/predict", json=customer, headers=user_headers)).json()
        assert (item["cluster"], item["cluster_name"]) == (single["cluster"], single["cluster_name"])
        assert item["confidence"] == pytest.approx(single["confidence"])


async def test_batch_csv_in_and_out_marks_bad_rows(client, trained_model, user_headers):
    frame = pd.DataFrame(
        [
            {
                "CustomerID": 1,
                "Sex": "Male",
                "Age": 25,
                "Annual_Income": 30.0,
                "Spending_Score": 80,
                "Purchase_Frequency": 50,
            },
            {
                "CustomerID": 2,
                "Sex": "Female",
                "Age": 150,
                "Annual_Income": 30.0,
                "Spending_Score": 80,
                "Purchase_Frequency": 50,
            },
            {
                "CustomerID": 3,
                "Sex": "Other",
                "Age": 60,
                "Annual_Income": 120.0,
                "Spending_Score": 20,
                "Purchase_Frequency": 5,
            },
        ]
    )
    files = {"file": ("customers.csv", frame.to_csv(index=False).encode(), "text/csv")}
    response = await client.post("/predict/batch", files=files, headers={**user_headers, "Accept": "text/csv"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    out = pd.read_csv(io.StringIO(response.text))
    assert list(out["CustomerID"]) == [1, 2, 3]
    assert {"cluster", "cluster_name", "confidence", "error"} <= set(out.columns)
    assert pd.isna(out.loc[1, "cluster"]) and "age" in out.loc[1, "error"].lower()
    assert pd.isna(out.loc[0, "error"]) and pd.isna(out.loc[2, "error"])
    single = (
        await client.post(
            "/predict",
            json={"sex": "Male", "age": 25, "annual_income": 30.0, "spending_score": 80, "purchase_frequency": 50},
            headers=user_headers,
        )
    ).json()
    assert int(out.loc[0, "cluster"]) == single["cluster"]


async def test_batch_rules(client, trained_model, user_headers):
    assert (await client.post("/predict/batch", json={"customers": []}, headers=user_headers)).status_code == 422
    too_many = {"customers": [CUSTOMER] * 10_001}
    assert (await client.post("/predict/batch", json=too_many, headers=user_headers)).status_code == 422
    bad = await client.post(
        "/predict/batch", json={"customers": [CUSTOMER, {**CUSTOMER, "age": 5}]}, headers=user_headers
    )
    assert bad.status_code == 422
    assert [e["loc"] for e in bad.json()["errors"]] == [["body", "customers", 1, "age"]]
    assert bad.json()["detail"].startswith("customers.1.age: ")


@pytest.mark.postgres
async def test_batch_rows_are_counted_in_stats_not_history(client, trained_model, user_headers, admin_headers):
    await client.post("/predict/batch", json={"customers": [CUSTOMER] * 25}, headers=user_headers)
    assert (await client.get("/history", headers=user_headers)).json()["total"] == 0
    stats = (await client.get("/admin/stats", headers=admin_headers)).json()
    assert stats["total_predictions"] == 25 and sum(stats["predictions_by_cluster"].values()) == 25


@pytest.mark.postgres
async def test_versions_list_and_rollback(client, trained_model, analyst_headers, user_headers):
    second = (await client.post("/train", params={"n_clusters": 3}, headers=analyst_headers)).json()
    listing = (await client.get("/models", headers=analyst_headers)).json()
    assert listing["active_version"] == second["model_version"]
    assert [m["version"] for m in listing["models"]] == [second["model_version"], trained_model["model_version"]]
    assert [m["active"] for m in listing["models"]] == [True, False]
    first = listing["models"][1]
    assert first["n_clusters"] == 5 and first["created_by"] and first["n_samples"] == 800
    rollback = await client.post(f"/models/{trained_model['model_version']}/activate", headers=analyst_headers)
    assert rollback.status_code == 200 and rollback.json()["active"] is True
    predicted = (await client.post("/predict", json=CUSTOMER, headers=user_headers)).json()
    assert predicted["model_version"] == trained_model["model_version"]
    assert (await client.get("/clusters", headers=user_headers)).json()["n_clusters"] == 5
    detail = await client.get(f"/models/{second['model_version']}", headers=analyst_headers)
    assert detail.status_code == 200 and len(detail.json()["clusters"]) == 3
    assert (await client.post("/models/nope/activate", headers=analyst_headers)).status_code == 404
    assert (await client.get("/models/nope", headers=analyst_headers)).status_code == 404


@pytest.mark.postgres
async def test_a_second_training_while_one_runs_is_409(client, dataset, analyst_headers):
    first, second = await asyncio.gather(
        client.post("/train", headers=analyst_headers),
        client.post("/train", headers=analyst_headers),
    )
    assert sorted([first.status_code, second.status_code]) == [200, 409]
