"""Named segmentations through HTTP: the registry's rules, kind `custom` end to end, and `default` by both doors."""

from __future__ import annotations

import csv
import io
import os

import numpy as np
import pandas as pd
import pytest

from app.core.tables import Role
from tests.conftest import CUSTOMER

# Every case runs on SQLite, and on PostgreSQL too when TEST_DATABASE_URL is set.
pytestmark = pytest.mark.postgres

CRM_FEATURES = [
    {"name": "tenure_months", "type": "numeric", "min": 0, "max": 600},
    {"name": "basket", "type": "numeric", "transform": "none"},
    {"name": "visits", "type": "numeric"},
    {"name": "plan", "type": "categorical"},
    {"name": "region", "type": "categorical"},
]


def crm_table(rows: int = 600, seed: int = 3) -> pd.DataFrame:
    """Three planted groups of customers over numeric and categorical columns, with a few blanks."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 3, rows)
    tenure = np.array([6.0, 60.0, 140.0])[group] + rng.normal(0, 4, rows)
    basket = np.array([20.0, 80.0, 45.0])[group] + rng.normal(0, 5, rows)
    visits = rng.poisson(np.array([2, 12, 30])[group]).astype(float)
    plans = np.array(["free", "pro", "team"])[group]
    regions = rng.choice(["north", "south", "east", "west"], rows)
    frame = pd.DataFrame(
        {
            "customer_id": [f"C{i:05d}" for i in range(rows)],
            "Tenure_Months": np.clip(tenure, 0, None).round(1),
            "basket": basket.round(2),
            "visits": visits,
            "plan": plans,
            "region": regions,
            "ignored": "x",
        }
    )
    frame.loc[5, "basket"] = np.nan
    frame.loc[7, "region"] = None
    return frame


def as_csv(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode()


async def create(client, headers, name="crm", **body):
    payload = {"name": name, "kind": "custom", "features": CRM_FEATURES, "id_column": "customer_id", **body}
    return await client.post("/segmentations", json=payload, headers=headers)


@pytest.fixture
async def crm(client, analyst_headers) -> dict:
    created = await create(client, analyst_headers)
    assert created.status_code == 201, created.text
    trained = await client.post(
        "/segmentations/crm/train",
        params={"random_state": 1},
        files={"file": ("crm.csv", as_csv(crm_table()), "text/csv")},
        headers=analyst_headers,
    )
    assert trained.status_code == 200, trained.text
    return trained.json()


CRM_CUSTOMER = {"tenure_months": 61.0, "basket": 79.0, "visits": 11, "plan": "pro", "region": "south"}


# --- the registry -------------------------------------------------------------------------------


async def test_default_is_always_there_with_the_customer_schema(client, user_headers):
    listed = (await client.get("/segmentations", headers=user_headers)).json()["segmentations"]
    assert [s["name"] for s in listed] == ["default"]
    default = (await client.get("/segmentations/default", headers=user_headers)).json()
    assert default["kind"] == "customer" and default["active_version"] is None
    assert [f["name"] for f in default["features"]] == ["age", "annual_income", "spending_score", "purchase_frequency"]
    properties = default["customer_schema"]["properties"]
    assert {"sex", "age", "annual_income", "spending_score", "purchase_frequency"} <= set(properties)
    assert (await client.get("/segmentations/nope", headers=user_headers)).status_code == 404


async def test_create_list_edit_and_delete(client, analyst_headers, user_headers):
    created = await create(client, analyst_headers, description="For the CRM team")
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["kind"] == "custom" and body["id_column"] == "customer_id" and body["active_version"] is None
    assert [f["name"] for f in body["features"]] == [f["name"] for f in CRM_FEATURES]
    schema = body["customer_schema"]
    assert schema["properties"]["tenure_months"]["type"] == "number"
    assert schema["properties"]["tenure_months"]["maximum"] == 600
    assert schema["properties"]["plan"]["type"] == "string"
    assert set(schema["required"]) == {f["name"] for f in CRM_FEATURES}

    assert (await create(client, analyst_headers)).status_code == 409
    names = [s["name"] for s in (await client.get("/segmentations", headers=user_headers)).json()["segmentations"]]
    assert names == ["default", "crm"]

    edited = await client.patch("/segmentations/crm", json={"description": "Ads"}, headers=analyst_headers)
    assert edited.status_code == 200 and edited.json()["description"] == "Ads"
    assert (await client.get("/segmentations/crm", headers=user_headers)).json()["description"] == "Ads"

    assert (await client.delete("/segmentations/crm", headers=analyst_headers)).status_code == 204
    assert (await client.get("/segmentations/crm", headers=user_headers)).status_code == 404
    assert (await client.delete("/segmentations/default", headers=analyst_headers)).status_code == 409
    assert (await create(client, analyst_headers)).status_code == 201  # the name is free again


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"name": "X"}, "name"),
        ({"name": "a"}, "name"),
        ({"features": None}, "features"),
        ({"features": []}, "features"),
        ({"kind": "rfm"}, "rfm"),
        ({"kind": "customer"}, "features"),
        ({"features": [{"name": "a", "type": "numeric"}, {"name": "A", "type": "numeric"}]}, "a"),
        ({"features": [{"name": "a", "type": "text"}]}, "type"),
        ({"features": [{"name": "a", "type": "numeric", "min": 5, "max": 1}]}, "a"),
        ({"features": [{"name": "plan", "type": "categorical", "transform": "log"}]}, "plan"),
        ({"features": [{"name": f"f{i}", "type": "numeric"} for i in range(51)]}, "features"),
    ],
)
async def test_bad_declarations_are_422_naming_the_problem(client, analyst_headers, body, says):
    response = await create(client, analyst_headers, **body)
    assert response.status_code == 422, response.text
    assert says in str(response.json()["detail"])


async def test_only_analysts_create_train_and_delete(client, user_headers, analyst_headers):
    assert (await create(client, user_headers)).status_code == 403
    assert (await create(client, analyst_headers)).status_code == 201
    assert (await client.delete("/segmentations/crm", headers=user_headers)).status_code == 403
    assert (await client.post("/segmentations/crm/train", headers=user_headers)).status_code == 403
    assert (
        await client.patch("/segmentations/crm", json={"description": "x"}, headers=user_headers)
    ).status_code == 403


@pytest.mark.parametrize("settings_overrides", [{"max_segmentations": 2}])
async def test_at_most_max_segmentations(client, analyst_headers):
    assert (await create(client, analyst_headers, name="one")).status_code == 201
    refused = await create(client, analyst_headers, name="two")
    assert refused.status_code == 409 and "MAX_SEGMENTATIONS" in refused.json()["detail"]
    assert (await client.delete("/segmentations/one", headers=analyst_headers)).status_code == 204
    assert (await create(client, analyst_headers, name="two")).status_code == 201


# --- kind custom end to end ---------------------------------------------------------------------


async def test_train_a_custom_segmentation_and_read_its_segments(client, crm, user_headers):
    assert crm["segmentation"] == "crm" and crm["n_samples"] == 600
    assert crm["missing_shares"]["basket"] == pytest.approx(1 / 600, abs=1e-5)
    assert crm["missing_shares"]["region"] == pytest.approx(1 / 600, abs=1e-5)
    assert crm["missing_shares"]["visits"] == 0
    clusters = (await client.get("/segmentations/crm/clusters", headers=user_headers)).json()
    assert clusters["segmentation"] == "crm" and clusters["model_version"] == crm["model_version"]
    segments = clusters["clusters"]
    assert sum(s["size"] for s in segments) == 600
    names = [s["cluster_name"] for s in segments]
    assert len(set(names)) == len(names)
    for segment in segments:
        assert "avg_age" not in segment
        assert set(segment["means"]) == {f["name"] for f in CRM_FEATURES}
        assert isinstance(segment["means"]["tenure_months"], float)
        assert sum(segment["means"]["plan"].values()) == pytest.approx(1.0, abs=1e-6)
        assert segment["generated_name"] and segment["segment_key"]
    # The planted groups differ by tenure: some segment is far from the population on it.
    tenures = sorted(s["means"]["tenure_months"] for s in segments)
    assert tenures[0] < 30 and tenures[-1] > 100
    listed = (await client.get("/segmentations/crm", headers=user_headers)).json()
    assert listed["active_version"] == crm["model_version"] and listed["n_clusters"] == crm["n_clusters"]


async def test_a_training_csv_missing_declared_columns_is_422_naming_them(client, analyst_headers):
    assert (await create(client, analyst_headers)).status_code == 201
    frame = crm_table().drop(columns=["plan", "visits"])
    response = await client.post(
        "/segmentations/crm/train", files={"file": ("crm.csv", as_csv(frame), "text/csv")}, headers=analyst_headers
    )
    assert response.status_code == 422
    assert "plan" in response.json()["detail"] and "visits" in response.json()["detail"]
    assert isinstance(response.json()["errors"], list)
    no_file = await client.post("/segmentations/crm/train", headers=analyst_headers)
    assert no_file.status_code == 422 and "file" in no_file.json()["detail"]


async def test_a_mistyped_training_column_is_422_naming_rows(client, analyst_headers):
    assert (await create(client, analyst_headers)).status_code == 201
    frame = crm_table()
    frame["visits"] = frame["visits"].astype(object)
    frame.loc[10, "visits"] = "lots"
    response = await client.post(
        "/segmentations/crm/train", files={"file": ("crm.csv", as_csv(frame), "text/csv")}, headers=analyst_headers
    )
    assert response.status_code == 422
    problem = response.json()["errors"][0]
    assert problem["row"] == 11 and problem["line"] == 12 and problem["column"] == "visits"


async def test_predict_with_a_custom_segmentation(client, crm, user_headers):
    response = await client.post("/segmentations/crm/predict", json={"customer": CRM_CUSTOMER}, headers=user_headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["segmentation"] == "crm" and body["model_version"] == crm["model_version"]
    assert body["warnings"] == [] and 0 <= body["confidence"] <= 1
    assert body["customer_data"]["plan"] == "pro"

    unseen = await client.post(
        "/segmentations/crm/predict", json={"customer": {**CRM_CUSTOMER, "plan": "gold"}}, headers=user_headers
    )
    assert unseen.status_code == 200 and any("gold" in w for w in unseen.json()["warnings"])

    missing = {k: v for k, v in CRM_CUSTOMER.items() if k != "visits"}
    refused = await client.post("/segmentations/crm/predict", json={"customer": missing}, headers=user_headers)
    assert refused.status_code == 422 and refused.json()["errors"][0]["loc"] == ["body", "customer", "visits"]
    assert refused.json()["detail"] == "customer.visits: Field required"
    for bad in ({"visits": "many"}, {"tenure_months": 900}, {"basket": None}):
        refused = await client.post(
            "/segmentations/crm/predict", json={"customer": {**CRM_CUSTOMER, **bad}}, headers=user_headers
        )
        assert refused.status_code == 422, bad
        assert refused.json()["errors"][0]["loc"][-1] == next(iter(bad))
        assert refused.json()["detail"].startswith(f"customer.{next(iter(bad))}: ")


async def test_batch_scoring_echoes_the_id_column(client, crm, user_headers):
    frame = crm_table(rows=40, seed=9).drop(columns=["ignored"])
    frame.loc[3, "visits"] = np.nan  # imputed
    frame["customer_id"] = [f"00{i}" for i in range(40)]  # ids that look like numbers stay text
    csv_bytes = frame.to_csv(index=False).encode()
    answer = await client.post(
        "/segmentations/crm/predict/batch",
        files={"file": ("in.csv", csv_bytes, "text/csv")},
        headers={**user_headers, "Accept": "text/csv"},
    )
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(answer.text)))
    assert [r["customer_id"] for r in rows] == [f"00{i}" for i in range(40)]
    assert all(r["cluster"] != "" and r["error"] == "" for r in rows)

    as_json = await client.post(
        "/segmentations/crm/predict/batch", files={"file": ("in.csv", csv_bytes, "text/csv")}, headers=user_headers
    )
    assert as_json.status_code == 200
    predictions = as_json.json()["predictions"]
    assert [str(p["cluster"]) for p in predictions] == [r["cluster"] for r in rows]

    one = await client.post("/segmentations/crm/predict", json={"customer": CRM_CUSTOMER}, headers=user_headers)
    listed = await client.post(
        "/segmentations/crm/predict/batch", json={"customers": [CRM_CUSTOMER, CRM_CUSTOMER]}, headers=user_headers
    )
    assert listed.status_code == 200
    assert [p["cluster"] for p in listed.json()["predictions"]] == [one.json()["cluster"]] * 2
    bad = await client.post(
        "/segmentations/crm/predict/batch",
        json={"customers": [CRM_CUSTOMER, {**CRM_CUSTOMER, "visits": "x"}]},
        headers=user_headers,
    )
    assert bad.status_code == 422 and bad.json()["errors"][0]["loc"] == ["body", "customers", 1, "visits"]
    assert bad.json()["detail"].startswith("customers.1.visits: ")


async def test_versions_are_paged_rolled_back_and_deleted(client, crm, analyst_headers, user_headers):
    second = await client.post(
        "/segmentations/crm/train",
        params={"n_clusters": 4},
        files={"file": ("crm.csv", as_csv(crm_table(seed=4)), "text/csv")},
        headers=analyst_headers,
    )
    assert second.status_code == 200
    first, latest = crm["model_version"], second.json()["model_version"]
    page = (await client.get("/segmentations/crm/models", params={"limit": 1}, headers=analyst_headers)).json()
    assert page["total"] == 2 and [m["version"] for m in page["models"]] == [latest]
    assert page["active_version"] == latest
    # Versions of one segmentation are not reachable through another.
    assert (await client.get(f"/segmentations/default/models/{first}", headers=analyst_headers)).status_code == 404
    assert (await client.get(f"/models/{first}", headers=analyst_headers)).status_code == 404

    rolled = await client.post(f"/segmentations/crm/models/{first}/activate", headers=analyst_headers)
    assert rolled.status_code == 200 and rolled.json()["active"] is True
    clusters = (await client.get("/segmentations/crm/clusters", headers=user_headers)).json()
    assert clusters["model_version"] == first
    assert (await client.delete(f"/segmentations/crm/models/{first}", headers=analyst_headers)).status_code == 409
    assert (await client.delete(f"/segmentations/crm/models/{latest}", headers=analyst_headers)).status_code == 204
    page = (await client.get("/segmentations/crm/models", headers=analyst_headers)).json()
    assert [m["version"] for m in page["models"]] == [first]


async def test_segmentations_have_their_own_history_and_stats(client, crm, trained_model, make_user, admin_headers):
    _, headers = await make_user(Role.user)
    await client.post("/predict", json=CUSTOMER, headers=headers)
    await client.post("/segmentations/crm/predict", json={"customer": CRM_CUSTOMER}, headers=headers)
    await client.post("/segmentations/crm/predict", json={"customer": CRM_CUSTOMER}, headers=headers)

    everything = (await client.get("/history", headers=headers)).json()
    assert [h["segmentation"] for h in everything["history"]] == ["crm", "crm", "default"]
    only_crm = (await client.get("/history", params={"segmentation": "crm"}, headers=headers)).json()
    assert only_crm["total"] == 2 and {h["segmentation"] for h in only_crm["history"]} == {"crm"}
    named = (await client.get("/segmentations/crm/history", params={"limit": 1}, headers=headers)).json()
    assert named["total"] == 2 and len(named["history"]) == 1 and named["next_before_id"] is not None
    older = await client.get(
        "/segmentations/crm/history", params={"before_id": named["next_before_id"]}, headers=headers
    )
    assert [h["id"] for h in older.json()["history"]] == [only_crm["history"][1]["id"]]
    default_only = (await client.get("/segmentations/default/history", headers=headers)).json()
    assert default_only["total"] == 1
    assert (await client.get("/history", params={"segmentation": "nope"}, headers=headers)).status_code == 404

    stats = (await client.get("/admin/stats", headers=admin_headers)).json()
    by_name = {s["name"]: s for s in stats["segmentations"]}
    assert by_name["crm"]["predictions"] == 2 and by_name["crm"]["kind"] == "custom"
    assert by_name["crm"]["active_version"] == crm["model_version"]
    assert by_name["default"]["predictions"] == 1
    assert sum(stats["predictions_by_cluster"].values()) == 1  # the default segmentation's


async def test_a_deleted_segmentation_keeps_its_history_and_a_new_one_does_not_inherit_it(
    client, crm, analyst_headers, user_headers
):
    await client.post("/segmentations/crm/predict", json={"customer": CRM_CUSTOMER}, headers=user_headers)
    assert (await client.delete("/segmentations/crm", headers=analyst_headers)).status_code == 204
    history = (await client.get("/history", headers=user_headers)).json()
    assert [h["segmentation"] for h in history["history"]] == ["crm"]
    assert (await create(client, analyst_headers)).status_code == 201
    fresh = (await client.get("/segmentations/crm/history", headers=user_headers)).json()
    assert fresh["total"] == 0
    assert (await client.get("/segmentations/crm/clusters", headers=user_headers)).status_code == 409


# --- default through both doors ------------------------------------------------------------------


async def test_default_answers_the_same_through_both_doors(client, trained_model, user_headers, analyst_headers):
    seed = (await client.post("/predict", json=CUSTOMER, headers=user_headers)).json()
    named = await client.post("/segmentations/default/predict", json={"customer": CUSTOMER}, headers=user_headers)
    assert named.status_code == 200
    body = named.json()
    assert {k: body[k] for k in seed} == seed and body["segmentation"] == "default" and body["warnings"] == []
    bad = await client.post(
        "/segmentations/default/predict", json={"customer": {**CUSTOMER, "age": 12}}, headers=user_headers
    )
    assert bad.status_code == 422 and bad.json()["errors"][0]["loc"] == ["body", "customer", "age"]
    assert bad.json()["detail"] == "customer.age: Input should be greater than or equal to 18"

    seed_clusters = (await client.get("/clusters", headers=user_headers)).json()
    named_clusters = (await client.get("/segmentations/default/clusters", headers=user_headers)).json()
    for old, new in zip(seed_clusters["clusters"], named_clusters["clusters"], strict=True):
        assert {k: new[k] for k in old} == old
        assert new["means"]["age"] == pytest.approx(old["avg_age"], abs=0.01)
    seed_models = (await client.get("/models", headers=analyst_headers)).json()
    named_models = (await client.get("/segmentations/default/models", headers=analyst_headers)).json()
    assert named_models["models"] == seed_models["models"] and named_models["total"] == 1
    elbow = await client.get("/segmentations/default/elbow", params={"k_max": 6}, headers=user_headers)
    assert elbow.json() == (await client.get("/elbow", params={"k_max": 6}, headers=user_headers)).json()
    batch = await client.post(
        "/segmentations/default/predict/batch", json={"customers": [CUSTOMER]}, headers=user_headers
    )
    assert batch.json()["predictions"][0]["cluster"] == seed["cluster"]


async def test_charts_of_a_custom_segmentation(client, crm, user_headers):
    charts = (await client.get("/segmentations/crm/charts/clusters", headers=user_headers)).json()
    assert set(charts["charts"]) == {"pie_chart", "bar_chart", "size_chart"}
    assert all(uri.startswith("data:image/png;base64,") for uri in charts["charts"].values())
    elbow = await client.get("/segmentations/crm/elbow", headers=user_headers)
    assert elbow.status_code == 200 and elbow.json()["optimal_k"] == crm["n_clusters"]
    chart = await client.get("/segmentations/crm/charts/elbow", headers=user_headers)
    assert chart.status_code == 200 and chart.json()["chart"].startswith("data:image/png;base64,")


@pytest.mark.parametrize("settings_overrides", [{"max_upload_mb": 0.01}])
async def test_training_uploads_have_their_own_cap(client, analyst_headers):
    assert (await create(client, analyst_headers)).status_code == 201
    big = as_csv(crm_table(rows=600))  # ~25 KB: over MAX_UPLOAD_MB, under MAX_TRAIN_UPLOAD_MB
    assert len(big) > 0.01 * 1024 * 1024
    trained = await client.post(
        "/segmentations/crm/train", files={"file": ("crm.csv", big, "text/csv")}, headers=analyst_headers
    )
    assert trained.status_code == 200, trained.text


# --- across workers -----------------------------------------------------------------------------


async def test_another_worker_follows_created_trained_and_deleted_segmentations(
    app, client, crm, settings, analyst_headers, tmp_path
):
    """A second server on the same database: it finds a segmentation made elsewhere, follows its active
    version (train, rollback) and lets go of it when it is deleted."""
    from tests.test_lifecycle import eventually, running

    other_settings = settings.model_copy(update={"model_dir": tmp_path / "other-worker"})
    async with running(other_settings, 50002) as (other_app, _http):
        registry = other_app.state.segmentations

        def serves(version: str | None):
            def check() -> bool:
                store = registry._stores.get("crm")
                current = store.current.version if store is not None and store.current is not None else None
                return current == version

            return check

        await eventually(serves(crm["model_version"]))
        second = await client.post(
            "/segmentations/crm/train",
            params={"n_clusters": 3},
            files={"file": ("crm.csv", as_csv(crm_table(seed=5)), "text/csv")},
            headers=analyst_headers,
        )
        await eventually(serves(second.json()["model_version"]))
        await client.post(f"/segmentations/crm/models/{crm['model_version']}/activate", headers=analyst_headers)
        await eventually(serves(crm["model_version"]))
        await client.delete("/segmentations/crm", headers=analyst_headers)
        await eventually(lambda: "crm" not in registry._stores)


async def test_one_training_at_a_time_per_segmentation(app, client, crm, dataset, analyst_headers):
    """Another process holding crm's training lease makes crm's training wait its turn (409), not default's."""
    from sqlalchemy import update

    from app.core.tables import ServiceState, utcnow
    from app.versions.lease import HOST_ID

    store = await app.state.segmentations.get("crm")
    held = f"{HOST_ID}:{os.getppid()}:live"
    async with app.state.database.sessionmaker() as session:
        await session.execute(
            update(ServiceState).where(ServiceState.key == store.lease.key).values(value=held, updated_at=utcnow())
        )
        await session.commit()
    busy = await client.post(
        "/segmentations/crm/train",
        files={"file": ("crm.csv", as_csv(crm_table()), "text/csv")},
        headers=analyst_headers,
    )
    assert busy.status_code == 409 and "already running" in busy.json()["detail"]
    assert (await client.post("/train", params={"n_clusters": 3}, headers=analyst_headers)).status_code == 200
