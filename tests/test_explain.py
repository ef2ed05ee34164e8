"""Explanations through HTTP: `?explain=true` on predict (both doors, every kind) and on batches."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pandas as pd
import pytest

from app.ml.preprocess import FEATURES
from tests.conftest import CUSTOMER
from tests.test_segmentations import CRM_CUSTOMER, as_csv, create, crm_table

pytestmark = pytest.mark.postgres


@pytest.fixture
async def crm_trained(client, analyst_headers) -> dict:
    """The CRM segmentation of tests/test_segmentations.py (numeric and categorical features), trained."""
    assert (await create(client, analyst_headers)).status_code == 201
    trained = await client.post(
        "/segmentations/crm/train",
        params={"random_state": 1},
        files={"file": ("crm.csv", as_csv(crm_table()), "text/csv")},
        headers=analyst_headers,
    )
    assert trained.status_code == 200, trained.text
    return trained.json()


CUSTOMERS = [
    CUSTOMER,
    {"sex": "Male", "age": 61, "annual_income": 22.5, "spending_score": 15, "purchase_frequency": 4},
    {"sex": "Other", "age": 35, "annual_income": 55.0, "spending_score": 50, "purchase_frequency": 20},
    {"sex": "Female", "age": 44, "annual_income": 130.0, "spending_score": 25, "purchase_frequency": 12},
]


def scaled_distances(app, customer: dict) -> np.ndarray:
    """Distances to every centroid in the scaled space, from the served scaler and K-Means directly."""
    model = app.state.models.current.model
    x = np.array([[customer[name] for name in FEATURES]], dtype=np.float64)
    z = model.scaler_.transform(x)[0]
    return np.linalg.norm(model.kmeans_.cluster_centers_ - z, axis=1)


def check_explanation(body: dict, distances: np.ndarray, n_features: int) -> None:
    explanation = body["explanation"]
    order = np.argsort(distances)
    assert body["cluster"] == int(order[0])
    assert explanation["runner_up"]["cluster"] == int(order[1])
    assert explanation["distance"] == pytest.approx(distances[order[0]], rel=1e-9)
    assert explanation["runner_up"]["distance"] == pytest.approx(distances[order[1]], rel=1e-9)
    assert body["confidence"] == pytest.approx(1 - explanation["distance"] / explanation["runner_up"]["distance"])
    shares = [c["share"] for c in explanation["contributions"]]
    assert len(shares) == n_features
    assert abs(math.fsum(shares) - 1.0) <= 1e-9
    assert shares == sorted(shares, reverse=True)
    assert explanation["summary"].endswith(".") and explanation["contributions"][0]["feature"] in explanation["summary"]


async def test_predict_explains_with_the_runner_up_and_shares_summing_to_one(app, client, trained_model, user_headers):
    for customer in CUSTOMERS:
        response = await client.post("/predict", params={"explain": "true"}, json=customer, headers=user_headers)
        assert response.status_code == 200, response.text
        body = response.json()
        check_explanation(body, scaled_distances(app, customer), 4)
        contributions = {c["feature"]: c["value"] for c in body["explanation"]["contributions"]}
        assert contributions == {name: customer[name] for name in FEATURES}  # values as sent, no `sex`
        assert (
            body["explanation"]["runner_up"]["cluster_name"]
            == trained_model_names(app)[body["explanation"]["runner_up"]["cluster"]]
        )


def trained_model_names(app) -> tuple[str, ...]:
    return app.state.models.current.names


async def test_shares_are_the_exact_split_of_the_squared_margin(app, client, trained_model, user_headers):
    customer = CUSTOMERS[2]
    body = (await client.post("/predict?explain=true", json=customer, headers=user_headers)).json()
    model = app.state.models.current.model
    z = model.scaler_.transform(np.array([[customer[n] for n in FEATURES]], dtype=np.float64))[0]
    c1 = model.kmeans_.cluster_centers_[body["cluster"]]
    c2 = model.kmeans_.cluster_centers_[body["explanation"]["runner_up"]["cluster"]]
    parts = (z - c2) ** 2 - (z - c1) ** 2
    expected = dict(zip(FEATURES, parts / parts.sum(), strict=True))
    for contribution in body["explanation"]["contributions"]:
        assert contribution["share"] == pytest.approx(expected[contribution["feature"]], abs=1e-9)


async def test_without_the_flag_there_is_no_explanation(client, trained_model, user_headers):
    plain = await client.post("/predict", json=CUSTOMER, headers=user_headers)
    named = await client.post("/segmentations/default/predict", json={"customer": CUSTOMER}, headers=user_headers)
    off = await client.post("/predict?explain=false", json=CUSTOMER, headers=user_headers)
    for response in (plain, named, off):
        assert response.status_code == 200, response.text
        assert "explanation" not in response.json()
    batch = await client.post("/predict/batch", json={"customers": CUSTOMERS}, headers=user_headers)
    assert all("top_feature" not in row and "margin" not in row for row in batch.json()["predictions"])


async def test_a_repeated_query_answers_as_the_first_and_a_bad_one_says_why(client, trained_model, user_headers):
    # Query strings are validated once and then reused: each answer must still follow its own query.
    for query in ("explain=true", "explain=false", "explain=true", "explain=maybe", "explain=true", "explain=maybe"):
        response = await client.post(f"/predict?{query}", json=CUSTOMER, headers=user_headers)
        if query == "explain=maybe":
            assert response.status_code == 422, response.text
            assert response.json()["errors"][0]["loc"] == ["query", "explain"]
            assert response.json()["detail"].startswith("explain: ")
        else:
            assert response.status_code == 200, response.text
            assert ("explanation" in response.json()) == (query == "explain=true")


async def test_the_named_door_explains_default_too(app, client, trained_model, user_headers):
    response = await client.post(
        "/segmentations/default/predict?explain=true", json={"customer": CUSTOMER}, headers=user_headers
    )
    assert response.status_code == 200, response.text
    check_explanation(response.json(), scaled_distances(app, CUSTOMER), 4)


async def test_a_custom_segmentation_with_categoricals_explains_per_declared_feature(
    app, client, crm_trained, user_headers
):
    customers = [
        CRM_CUSTOMER,
        {"tenure_months": 5.0, "basket": 22.0, "visits": 2, "plan": "free", "region": "north"},
        {"tenure_months": 140.0, "basket": 44.0, "visits": 29, "plan": "gold", "region": "west"},
    ]
    store = await app.state.segmentations.get("crm")
    model = store.current.model
    for customer in customers:
        response = await client.post(
            "/segmentations/crm/predict", params={"explain": True}, json={"customer": customer}, headers=user_headers
        )
        assert response.status_code == 200, response.text
        body = response.json()
        encoded = model.encode(pd.DataFrame([customer]))[0]
        distances = np.linalg.norm(model.kmeans_.cluster_centers_ - encoded, axis=1)
        check_explanation(body, distances, 5)
        values = {c["feature"]: c["value"] for c in body["explanation"]["contributions"]}
        assert values == customer
    # The unseen plan is still named in warnings.
    assert any("gold" in w for w in body["warnings"])


async def test_batch_explain_adds_top_feature_and_margin_in_json_and_csv(app, client, trained_model, user_headers):
    response = await client.post(
        "/predict/batch", params={"explain": "true"}, json={"customers": CUSTOMERS}, headers=user_headers
    )
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    for customer, row in zip(CUSTOMERS, rows, strict=True):
        single = (await client.post("/predict?explain=true", json=customer, headers=user_headers)).json()
        explanation = single["explanation"]
        assert row["cluster"] == single["cluster"]
        assert row["top_feature"] == explanation["contributions"][0]["feature"]
        assert row["margin"] == pytest.approx(explanation["runner_up"]["distance"] - explanation["distance"])

    upload = pd.DataFrame(CUSTOMERS + [{**CUSTOMERS[0], "age": 7}]).to_csv(index=False).encode()
    answer = await client.post(
        "/predict/batch?explain=true",
        files={"file": ("c.csv", upload, "text/csv")},
        headers={**user_headers, "Accept": "text/csv"},
    )
    assert answer.status_code == 200, answer.text
    table = list(csv.DictReader(io.StringIO(answer.text)))
    assert list(table[0])[-6:] == ["cluster", "cluster_name", "confidence", "top_feature", "margin", "error"]
    for row, expected in zip(table, rows, strict=False):
        assert row["top_feature"] == expected["top_feature"]
        assert float(row["margin"]) == pytest.approx(expected["margin"], abs=1e-6)
    assert table[-1]["error"] and table[-1]["top_feature"] == "" and table[-1]["margin"] == ""

    as_json = await client.post(
        "/predict/batch?explain=true",
        files={"file": ("c.csv", upload[: upload.rfind(b"\n", 0, -1) + 1])},
        headers=user_headers,
    )
    assert [r["top_feature"] for r in as_json.json()["predictions"]] == [r["top_feature"] for r in rows]


async def test_batch_explain_on_a_custom_segmentation_by_both_bodies(app, client, crm_trained, user_headers):
    table = crm_table(rows=40, seed=11)
    upload = await client.post(
        "/segmentations/crm/predict/batch?explain=true",
        files={"file": ("crm.csv", as_csv(table), "text/csv")},
        headers={**user_headers, "Accept": "text/csv"},
    )
    assert upload.status_code == 200, upload.text
    rows = list(csv.DictReader(io.StringIO(upload.text)))
    assert len(rows) == 40
    names = {"tenure_months", "basket", "visits", "plan", "region"}
    assert all(row["top_feature"] in names and float(row["margin"]) >= 0 for row in rows)

    customers = [CRM_CUSTOMER, {**CRM_CUSTOMER, "plan": "free", "tenure_months": 4.0}]
    answer = await client.post(
        "/segmentations/crm/predict/batch?explain=true", json={"customers": customers}, headers=user_headers
    )
    assert answer.status_code == 200, answer.text
    for customer, row in zip(customers, answer.json()["predictions"], strict=True):
        single = await client.post(
            "/segmentations/crm/predict?explain=true", json={"customer": customer}, headers=user_headers
        )
        explanation = single.json()["explanation"]
        assert row["top_feature"] == explanation["contributions"][0]["feature"]
        assert row["margin"] == pytest.approx(explanation["runner_up"]["distance"] - explanation["distance"])


def test_shares_on_an_exact_tie_are_equal():
    from app.ml.explain import Explainer
    from app.ml.schema import FeatureSchema
    from app.ml.scoring import CentroidScorer

    scorer = CentroidScorer(np.array([[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [5.0, 5, 5, 5]]))
    explainer = Explainer(scorer, FeatureSchema.customer(), ["a", "b", "c"])
    explanation = explainer.explain_row(np.zeros(4))
    assert [share for _, share in explanation.shares] == [0.25] * 4
    assert explanation.confidence == 0.0 and "Equally close" in explainer.summary(explanation)
