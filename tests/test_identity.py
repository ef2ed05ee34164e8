"""Segment identity across versions through HTTP: matching on retrain, analyst names, comparisons."""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pandas as pd
import pytest
from asgi_lifespan import LifespanManager

from app.core.tables import Role
from app.main import create_app
from app.ml.matching import resolve_names
from tests.conftest import CUSTOMER
from tests.test_segmentations import as_csv, create, crm_table

# Every case runs on SQLite, and on PostgreSQL too when TEST_DATABASE_URL is set.
pytestmark = pytest.mark.postgres


def dataset_csv(dataset, fraction: float = 1.0, seed: int = 0) -> bytes:
    frame = pd.read_csv(dataset)
    if fraction < 1.0:
        frame = frame.sample(frac=fraction, random_state=seed)
    return frame.to_csv(index=False).encode()


async def train(client, headers, path="/train", csv: bytes | None = None, **params) -> dict:
    files = {"file": ("customers.csv", csv, "text/csv")} if csv is not None else None
    response = await client.post(path, params=params, files=files, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


async def batch_ids(client, headers, csv: bytes, path="/predict/batch") -> np.ndarray:
    response = await client.post(path, files={"file": ("customers.csv", csv, "text/csv")}, headers=headers)
    assert response.status_code == 200, response.text
    return np.array([p["cluster"] for p in response.json()["predictions"]])


async def compare(client, headers, older: str, newer: str, csv: bytes | None = None, path="/models/compare"):
    files = {"file": ("customers.csv", csv, "text/csv")} if csv is not None else None
    return await client.post(path, params={"from_version": older, "to_version": newer}, files=files, headers=headers)


async def clusters(client, headers, path="/segmentations/default/clusters") -> list[dict]:
    response = await client.get(path, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["clusters"]


# --- matching -----------------------------------------------------------------------------------


async def test_first_version_has_nothing_to_match(trained_model):
    assert trained_model["previous_version"] is None
    assert trained_model["retired_cluster_ids"] == []
    assert [m["cluster_id"] for m in trained_model["matching"]] == list(range(5))
    assert all(m["previous_cluster_id"] is None and m["shift"] is None for m in trained_model["matching"])


async def test_retrain_on_a_resample_keeps_the_ids(client, dataset, trained_model, analyst_headers, user_headers):
    full = dataset_csv(dataset)
    before = await batch_ids(client, user_headers, full)
    keys_before = {c["cluster_id"]: c["segment_key"] for c in await clusters(client, user_headers)}

    result = await train(client, analyst_headers, csv=dataset_csv(dataset, 0.9, seed=1), n_clusters=5, random_state=7)
    assert result["previous_version"] == trained_model["model_version"]
    assert [m["cluster_id"] for m in result["matching"]] == list(range(5))
    assert [m["previous_cluster_id"] for m in result["matching"]] == list(range(5))
    assert all(0 <= m["shift"] < 1.0 for m in result["matching"])
    assert result["retired_cluster_ids"] == []

    after = await batch_ids(client, user_headers, full)
    kept = float(np.mean(before == after))
    assert kept >= 0.95
    keys_after = {c["cluster_id"]: c["segment_key"] for c in await clusters(client, user_headers)}
    assert keys_after == keys_before

    compared = await compare(client, analyst_headers, trained_model["model_version"], result["model_version"], full)
    assert compared.status_code == 200, compared.text
    body = compared.json()
    assert body["n_customers"] == len(before)
    assert sum(map(sum, body["matrix"])) == body["n_customers"]
    assert body["unchanged"] == pytest.approx(kept, abs=1e-12)
    # Every segment kept its key with its id: the two shares are one.
    assert body["unchanged_segments"] == pytest.approx(kept, abs=1e-12)
    assert [s["size"] for s in body["from_segments"]] == np.bincount(before, minlength=5).tolist()
    assert [s["size"] for s in body["to_segments"]] == np.bincount(after, minlength=5).tolist()

    detail = await client.get(f"/models/{result['model_version']}", headers=analyst_headers)
    assert detail.status_code == 200
    assert detail.json()["previous_version"] == trained_model["model_version"]
    assert detail.json()["matching"] == result["matching"]


async def test_one_more_segment_keeps_the_matched_ids(client, dataset, trained_model, analyst_headers, user_headers):
    full = dataset_csv(dataset)
    before = await batch_ids(client, user_headers, full)
    result = await train(client, analyst_headers, csv=dataset_csv(dataset, 0.9, seed=2), n_clusters=6, random_state=8)
    matched = [m["previous_cluster_id"] for m in result["matching"] if m["previous_cluster_id"] is not None]
    assert sorted(matched) == list(range(5))
    new = [m for m in result["matching"] if m["previous_cluster_id"] is None]
    assert [m["cluster_id"] for m in new] == [5] and new[0]["shift"] is None
    after = await batch_ids(client, user_headers, full)
    among_matched = np.isin(before, matched)
    assert float(np.mean(before[among_matched] == after[among_matched])) >= 0.80
    assert [c["cluster_id"] for c in await clusters(client, user_headers)] == list(range(6))


async def test_one_segment_fewer_keeps_ids_below_k(client, dataset, trained_model, analyst_headers, user_headers):
    full = dataset_csv(dataset)
    before = await batch_ids(client, user_headers, full)
    keys_before = [c["segment_key"] for c in await clusters(client, user_headers)]
    result = await train(client, analyst_headers, csv=dataset_csv(dataset, 0.9, seed=3), n_clusters=4, random_state=9)
    assert [m["cluster_id"] for m in result["matching"]] == list(range(4))
    assert len(result["retired_cluster_ids"]) == 1
    retired = result["retired_cluster_ids"][0]
    # Old id 4 is beyond the new k: unless it is the one retired, it takes the free lower id.
    moved = {m["previous_cluster_id"]: m["cluster_id"] for m in result["matching"]}
    if retired != 4:
        assert moved[4] == retired
    after_segments = await clusters(client, user_headers)
    assert [c["cluster_id"] for c in after_segments] == list(range(4))
    # Every matched segment keeps its key, wherever its id went, and most customers follow it.
    for previous, now in moved.items():
        assert after_segments[now]["segment_key"] == keys_before[previous]
    after = await batch_ids(client, user_headers, full)
    keys_after = [c["segment_key"] for c in after_segments]
    among_matched = np.isin(before, list(moved))
    same_segment = np.array([keys_before[a] == keys_after[b] for a, b in zip(before, after, strict=True)])
    assert float(same_segment[among_matched].mean()) >= 0.80
    stayed = [p for p, now in moved.items() if p == now]
    assert float(np.mean(before[np.isin(before, stayed)] == after[np.isin(before, stayed)])) >= 0.80

    compared = await compare(client, analyst_headers, trained_model["model_version"], result["model_version"], full)
    assert compared.status_code == 200, compared.text
    body = compared.json()
    matrix = np.array(body["matrix"])
    n = body["n_customers"]
    assert matrix.shape == (5, 4) and n == len(before)
    assert [s["segment_key"] for s in body["from_segments"]] == keys_before
    assert [s["segment_key"] for s in body["to_segments"]] == keys_after
    kept_key = sum(matrix[i, j] for i in range(5) for j in range(4) if keys_before[i] == keys_after[j])
    assert body["unchanged_segments"] == pytest.approx(kept_key / n, abs=1e-12)
    assert body["unchanged_segments"] == pytest.approx(float(same_segment.mean()), abs=1e-12)
    assert body["unchanged"] == pytest.approx(float(np.mean(before == after)), abs=1e-12)
    # Ids 0..3 keep their keys but the retired one, which old segment 4 took over: the shares differ by
    # the customers of old 4 that followed it there, less those of the retired segment that stayed on its id.
    difference = (matrix[4, retired] - matrix[retired, retired]) / n if retired != 4 else 0.0
    assert body["unchanged_segments"] - body["unchanged"] == pytest.approx(difference, abs=1e-12)


async def test_same_data_random_state_and_active_version_give_the_same_ids(
    client, dataset, trained_model, analyst_headers
):
    resample = dataset_csv(dataset, 0.9, seed=4)
    first = await train(client, analyst_headers, csv=resample, n_clusters=5, random_state=11)
    activated = await client.post(f"/models/{trained_model['model_version']}/activate", headers=analyst_headers)
    assert activated.status_code == 200
    second = await train(client, analyst_headers, csv=resample, n_clusters=5, random_state=11)
    assert second["matching"] == first["matching"]
    assert second["cluster_sizes"] == first["cluster_sizes"]


async def test_a_custom_segmentation_is_matched_over_its_declared_features(client, analyst_headers, user_headers):
    assert (await create(client, analyst_headers)).status_code == 201
    table = crm_table(rows=900, seed=5)
    first = await train(client, analyst_headers, "/segmentations/crm/train", as_csv(table), n_clusters=3)
    resample = table.sample(frac=0.9, random_state=2)
    second = await train(
        client, analyst_headers, "/segmentations/crm/train", as_csv(resample), n_clusters=3, random_state=5
    )
    assert second["previous_version"] == first["model_version"]
    assert [m["previous_cluster_id"] for m in second["matching"]] == [0, 1, 2]
    compared = await compare(
        client,
        analyst_headers,
        first["model_version"],
        second["model_version"],
        as_csv(table),
        path="/segmentations/crm/compare",
    )
    assert compared.status_code == 200, compared.text
    body = compared.json()
    assert body["n_customers"] == len(table)
    assert body["unchanged"] >= 0.95
    assert sum(map(sum, body["matrix"])) == len(table)
    without_file = await compare(
        client, analyst_headers, first["model_version"], second["model_version"], path="/segmentations/crm/compare"
    )
    assert without_file.status_code == 422
    assert isinstance(without_file.json()["detail"], str)


# --- analyst names ------------------------------------------------------------------------------


async def test_rename_a_segment(client, trained_model, analyst_headers, user_headers, make_user):
    renamed = await client.put(
        "/clusters/1", json={"cluster_name": "Key accounts", "description": "Marketing's best"}, headers=analyst_headers
    )
    assert renamed.status_code == 200, renamed.text
    body = renamed.json()
    assert body["cluster_id"] == 1 and body["cluster_name"] == "Key accounts"
    assert body["description"] == "Marketing's best"
    assert "avg_income" in body

    named = (await clusters(client, user_headers))[1]
    assert named["cluster_name"] == "Key accounts"
    assert named["generated_name"] != "Key accounts"
    default_door = (await client.get("/clusters", headers=user_headers)).json()["clusters"][1]
    assert default_door["cluster_name"] == "Key accounts"

    # A name another segment has: 409, whatever its case and spacing.
    taken = await client.put("/clusters/2", json={"cluster_name": "  key ACCOUNTS "}, headers=analyst_headers)
    assert taken.status_code == 409
    assert isinstance(taken.json()["detail"], str)
    generated_of_zero = (await clusters(client, user_headers))[0]["cluster_name"]
    taken = await client.put(
        "/segmentations/default/segments/2", json={"cluster_name": generated_of_zero}, headers=analyst_headers
    )
    assert taken.status_code == 409

    assert (await client.put("/clusters/5", json={"cluster_name": "x"}, headers=analyst_headers)).status_code == 404
    unknown = await client.put("/segmentations/nope/segments/0", json={"cluster_name": "x"}, headers=analyst_headers)
    assert unknown.status_code == 404
    forbidden = await client.put("/clusters/1", json={"cluster_name": "Mine"}, headers=user_headers)
    assert forbidden.status_code == 403
    assert (await client.put("/clusters/1", json={"cluster_name": ""}, headers=analyst_headers)).status_code == 422
    assert (await client.put("/clusters/1", json={"colour": "red"}, headers=analyst_headers)).status_code == 422

    # Only the description: the name stays; then null restores the generated name.
    described = await client.put(
        "/segmentations/default/segments/1", json={"description": "Still the best"}, headers=analyst_headers
    )
    assert described.status_code == 200
    assert described.json()["cluster_name"] == "Key accounts"
    assert described.json()["description"] == "Still the best"
    assert described.json()["segment_key"] == named["segment_key"]
    restored = await client.put(
        "/segmentations/default/segments/1", json={"cluster_name": None, "description": None}, headers=analyst_headers
    )
    assert restored.status_code == 200
    assert restored.json()["cluster_name"] == named["generated_name"]
    assert restored.json()["description"] != "Still the best"


async def test_predictions_use_the_new_name(client, trained_model, analyst_headers, user_headers):
    predicted = await client.post("/predict", json=CUSTOMER, headers=user_headers)
    cluster = predicted.json()["cluster"]
    renamed = await client.put(f"/clusters/{cluster}", json={"cluster_name": "Key accounts"}, headers=analyst_headers)
    assert renamed.status_code == 200
    again = await client.post("/predict", json=CUSTOMER, headers=user_headers)
    assert again.json()["cluster"] == cluster and again.json()["cluster_name"] == "Key accounts"
    named = await client.post("/segmentations/default/predict", json={"customer": CUSTOMER}, headers=user_headers)
    assert named.json()["cluster_name"] == "Key accounts"
    batch = await client.post("/predict/batch", json={"customers": [CUSTOMER]}, headers=user_headers)
    assert batch.json()["predictions"][0]["cluster_name"] == "Key accounts"


async def test_names_follow_matched_segments_and_rollback_shows_each_versions_own(
    client, dataset, trained_model, analyst_headers, user_headers
):
    first = trained_model["model_version"]
    assert (await client.put("/clusters/3", json={"cluster_name": "Key accounts"}, headers=analyst_headers)).is_success
    key = (await clusters(client, user_headers))[3]["segment_key"]
    second = await train(client, analyst_headers, csv=dataset_csv(dataset, 0.9, seed=5), n_clusters=5, random_state=3)
    carried = (await clusters(client, user_headers))[3]
    assert carried["cluster_name"] == "Key accounts"
    assert carried["segment_key"] == key
    assert carried["generated_name"] != "Key accounts"

    assert (await client.put("/clusters/3", json={"cluster_name": "Top accounts"}, headers=analyst_headers)).is_success
    rolled_back = await client.post(f"/models/{first}/activate", headers=analyst_headers)
    assert rolled_back.status_code == 200
    assert (await clusters(client, user_headers))[3]["cluster_name"] == "Key accounts"
    detail = await client.get(f"/segmentations/default/models/{second['model_version']}", headers=analyst_headers)
    assert detail.json()["clusters"][3]["cluster_name"] == "Top accounts"
    assert (await client.post(f"/models/{second['model_version']}/activate", headers=analyst_headers)).is_success
    assert (await clusters(client, user_headers))[3]["cluster_name"] == "Top accounts"


async def test_another_worker_serves_the_new_name(client, settings, trained_model, analyst_headers, user_headers):
    other = create_app(settings)
    async with LifespanManager(other, startup_timeout=60, shutdown_timeout=30):
        transport = httpx.ASGITransport(app=other, client=("127.0.0.1", 50001))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as second:
            renamed = await client.put("/clusters/0", json={"cluster_name": "Key accounts"}, headers=analyst_headers)
            assert renamed.status_code == 200
            for _ in range(100):
                names = [
                    c["cluster_name"] for c in (await second.get("/clusters", headers=user_headers)).json()["clusters"]
                ]
                if names[0] == "Key accounts":
                    break
                await asyncio.sleep(0.05)
            assert names[0] == "Key accounts"
            # Two workers renaming at once: neither rename is lost.
            first, other_rename = await asyncio.gather(
                client.put("/clusters/1", json={"cluster_name": "Churn risk"}, headers=analyst_headers),
                second.put("/clusters/2", json={"cluster_name": "Newcomers"}, headers=analyst_headers),
            )
            assert first.status_code == 200 and other_rename.status_code == 200
            for _ in range(100):
                names = [c["cluster_name"] for c in await clusters(client, user_headers)]
                if names[:3] == ["Key accounts", "Churn risk", "Newcomers"]:
                    break
                await asyncio.sleep(0.05)
            assert names[:3] == ["Key accounts", "Churn risk", "Newcomers"]


def test_a_generated_name_that_clashes_with_a_carried_one_gets_a_further_word():
    segments = [
        {
            "cluster_id": 0,
            "cluster_name": "a",
            "description": "d0",
            "generated_name": "Low income",
            "analyst_name": "Big",
        },
        {"cluster_id": 1, "cluster_name": "b", "description": "d1", "generated_name": "Big"},
    ]
    resolved = resolve_names(segments)
    assert [s["cluster_name"] for s in resolved] == ["Big", "Big (other)"]
    assert [s["description"] for s in resolved] == ["d0", "d1"]


# --- comparing ----------------------------------------------------------------------------------


async def test_compare_on_the_default_dataset_and_its_errors(
    client, dataset, trained_model, analyst_headers, user_headers
):
    version = trained_model["model_version"]
    same = await compare(client, analyst_headers, version, version)
    assert same.status_code == 200, same.text
    body = same.json()
    assert body["n_customers"] == 800 and body["unchanged"] == 1.0 and body["unchanged_segments"] == 1.0
    assert np.array(body["matrix"]).trace() == 800
    assert [s["segment_key"] for s in body["from_segments"]] == [s["segment_key"] for s in body["to_segments"]]

    assert (await compare(client, analyst_headers, version, "20000101-000000-000000")).status_code == 404
    named = await compare(client, analyst_headers, "nope", version, path="/segmentations/default/compare")
    assert named.status_code == 404
    assert (await compare(client, user_headers, version, version)).status_code == 403
    assert (await client.get("/models/compare", headers=analyst_headers)).status_code in (404, 405)

    bad = await compare(client, analyst_headers, version, version, b"age,annual_income\n30,abc\n")
    assert bad.status_code == 422
    assert isinstance(bad.json()["detail"], str) and bad.json()["errors"]
    broken = pd.read_csv(io.BytesIO(dataset_csv(dataset))).head(20)
    broken.loc[3, "Age"] = 500
    bad = await compare(client, analyst_headers, version, version, broken.to_csv(index=False).encode())
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["row"] == 4


async def test_compare_needs_an_analyst(client, dataset, trained_model, make_user):
    _, headers = await make_user(Role.admin)
    version = trained_model["model_version"]
    assert (await compare(client, headers, version, version)).status_code == 200
    assert (await client.post("/models/compare", params={"from_version": version})).status_code == 401
