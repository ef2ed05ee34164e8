"""The customer base through HTTP: runs (replace and upsert), changes, a customer, audiences, the rules."""

from __future__ import annotations

import asyncio
import csv
import io
import threading
from typing import Any

import pandas as pd
import pytest

import generate_transactions
from app.core.tables import Role
from generate_dataset import generate

DEADLINE = 120.0


def customers_csv(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode()


def population(rows: int = 400, seed: int = 11) -> pd.DataFrame:
    frame = generate(rows=rows, seed=seed)
    frame["CustomerID"] = [f"C{i:05d}" for i in range(rows)]
    return frame


async def run(client, headers, data: bytes, name: str = "default", filename: str = "customers.csv", **params):
    return await client.post(
        f"/segmentations/{name}/runs", params=params, files={"file": (filename, data, "text/csv")}, headers=headers
    )


async def completed(client, headers, data: bytes, name: str = "default", **params) -> dict[str, Any]:
    answer = await run(client, headers, data, name, **params)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "completed", body
    return body


async def all_pages(client, headers, url: str, limit: int, **params) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    after = None
    while True:
        query = {"limit": limit, **params} | ({"after": after} if after is not None else {})
        page = await client.get(url, params=query, headers=headers)
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["items"]) <= limit
        items += body["items"]
        after = body["next_after"]
        if after is None:
            return items


def read_csv(content: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(content.decode())))


async def test_replace_and_upsert_runs_count_new_unchanged_and_gone(client, analyst_headers, trained_model):
    everyone = population()
    first = await completed(client, analyst_headers, customers_csv(everyone.iloc[:300]))
    assert first["run_id"] == 1 and first["previous_run_id"] is None
    assert (first["n_customers"], first["n_new"], first["n_changed"], first["n_unchanged"], first["n_gone"]) == (
        300,
        300,
        0,
        0,
        0,
    )
    assert first["model_version"] == trained_model["model_version"] and first["mode"] == "replace"

    second = await completed(client, analyst_headers, customers_csv(everyone.iloc[100:400]))
    assert second["previous_run_id"] == first["run_id"]
    # The same model and features: the 200 kept customers keep their segments.
    assert (second["n_new"], second["n_changed"], second["n_unchanged"], second["n_gone"]) == (100, 0, 200, 100)

    gone = (await client.get("/segmentations/default/customers/C00000", headers=analyst_headers)).json()
    assert gone["status"] == "gone" and gone["segment_key"] is None and gone["cluster_id"] is None
    assert gone["since_run_id"] == second["run_id"]

    # Upsert: the 50 gone customers come back as new; nobody else is touched.
    third = await completed(client, analyst_headers, customers_csv(everyone.iloc[:50]), mode="upsert")
    assert (third["n_customers"], third["n_new"], third["n_changed"], third["n_gone"]) == (50, 50, 0, 0)
    kept = (await client.get("/segmentations/default/customers/C00399", headers=analyst_headers)).json()
    assert kept["status"] == "active" and kept["since_run_id"] == second["run_id"]
    back = (await client.get("/segmentations/default/customers/C00001", headers=analyst_headers)).json()
    assert back["status"] == "active" and back["since_run_id"] == third["run_id"]
    assert [h["run_id"] for h in back["history"]] == [third["run_id"], second["run_id"], first["run_id"]]
    assert back["history"][1]["segment_key"] is None  # gone in the second run

    listed = (await client.get("/segmentations/default/runs", headers=analyst_headers)).json()
    assert listed["total"] == 3 and [r["run_id"] for r in listed["runs"]] == [3, 2, 1]
    one = (await client.get("/segmentations/default/runs/2", headers=analyst_headers)).json()
    assert one == second
    assert (await client.get("/segmentations/default/runs/99", headers=analyst_headers)).status_code == 404


async def test_audience_pages_and_csv_hold_the_segment_exactly(client, analyst_headers, trained_model):
    everyone = population(500)
    await completed(client, analyst_headers, customers_csv(everyone))
    scored = await client.post(
        "/predict/batch",
        files={"file": ("c.csv", customers_csv(everyone), "text/csv")},
        headers=analyst_headers,
    )
    labels = [p["cluster"] for p in scored.json()["predictions"]]
    total = 0
    for cluster in range(trained_model["n_clusters"]):
        url = f"/segmentations/default/segments/{cluster}/customers"
        items = await all_pages(client, analyst_headers, url, limit=7)
        ids = [item["customer_id"] for item in items]
        want = sorted(cid for cid, label in zip(everyone["CustomerID"], labels, strict=True) if label == cluster)
        assert ids == want
        assert all(item["since_run_id"] == 1 and 0 <= item["confidence"] <= 1 for item in items)
        as_csv = await client.get(url, headers=analyst_headers | {"Accept": "text/csv"})
        assert as_csv.headers["content-type"].startswith("text/csv")
        rows = read_csv(as_csv.content)
        assert [r["customer_id"] for r in rows] == want
        assert {r["cluster_id"] for r in rows} <= {str(cluster)}
        assert list(rows[0]) == [
            "customer_id",
            "cluster_id",
            "cluster_name",
            "segment_key",
            "confidence",
            "since_run_id",
        ]
        total += len(ids)
    assert total == 500
    missing = await client.get("/segmentations/default/segments/99/customers", headers=analyst_headers)
    assert missing.status_code == 404
    too_many = await client.get(
        "/segmentations/default/segments/0/customers", params={"limit": 1001}, headers=analyst_headers
    )
    assert too_many.status_code == 422
    not_rfm = await client.get(
        "/segmentations/default/segments/0/customers", params={"min_clv": 1}, headers=analyst_headers
    )
    assert not_rfm.status_code == 422


async def test_after_a_retrain_that_keeps_identity_only_moved_customers_change(client, analyst_headers, trained_model):
    everyone = population(600, seed=5)
    data = customers_csv(everyone)
    first = await completed(client, analyst_headers, data)
    retrained = await client.post("/train", params={"n_clusters": 5, "random_state": 7}, headers=analyst_headers)
    assert retrained.status_code == 200, retrained.text
    new_version = retrained.json()["model_version"]
    compared = await client.post(
        "/models/compare",
        params={"from_version": trained_model["model_version"], "to_version": new_version},
        files={"file": ("c.csv", data, "text/csv")},
        headers=analyst_headers,
    )
    moved = round((1 - compared.json()["unchanged_segments"]) * 600)
    assert 0 < moved < 600, compared.json()  # some customers really move, most do not
    second = await completed(client, analyst_headers, data)
    assert second["model_version"] == new_version
    assert second["n_changed"] == moved and second["n_new"] == 0 and second["n_gone"] == 0
    assert second["n_unchanged"] == 600 - moved

    url = f"/segmentations/default/runs/{second['run_id']}/changes"
    page = (await client.get(url, params={"limit": 5}, headers=analyst_headers)).json()
    assert page["run_id"] == second["run_id"] and page["previous_run_id"] == first["run_id"]
    assert sum(page["entered"].values()) == moved == sum(page["left"].values())
    items = await all_pages(client, analyst_headers, url, limit=5)
    assert len(items) == moved
    assert [i["customer_id"] for i in items] == sorted(i["customer_id"] for i in items)
    assert all(i["from_segment_key"] != i["to_segment_key"] and i["change"] == "changed" for i in items)
    as_csv = await client.get(url, headers=analyst_headers | {"Accept": "text/csv"})
    assert [r["customer_id"] for r in read_csv(as_csv.content)] == [i["customer_id"] for i in items]
    if items:
        one = (
            await client.get(f"/segmentations/default/customers/{items[0]['customer_id']}", headers=analyst_headers)
        ).json()
        assert one["segment_key"] == items[0]["to_segment_key"] and one["since_run_id"] == second["run_id"]
        assert one["model_version"] == new_version

    # The version the base references cannot be deleted.
    deleted = await client.delete(
        f"/segmentations/default/models/{trained_model['model_version']}", headers=analyst_headers
    )
    assert deleted.status_code == 409 and "run" in deleted.json()["detail"]


async def test_ids_bytewise_with_slashes_and_keyset_after(client, analyst_headers, trained_model):
    frame = population(6)
    frame["CustomerID"] = ["b/2", "a", "B", "é", "a/b/c", "ab"]
    await completed(client, analyst_headers, customers_csv(frame))
    one = await client.get("/segmentations/default/customers/a/b/c", headers=analyst_headers)
    assert one.status_code == 200 and one.json()["customer_id"] == "a/b/c"
    assert (await client.get("/segmentations/default/customers/zz", headers=analyst_headers)).status_code == 404
    changes = await all_pages(client, analyst_headers, "/segmentations/default/runs/1/changes", limit=2)
    assert [c["customer_id"] for c in changes] == sorted(frame["CustomerID"], key=lambda s: s.encode())
    assert all(c["change"] == "new" and c["from_segment_key"] is None for c in changes)


async def test_bad_runs_are_refused_and_land_nothing(client, analyst_headers, user_headers, trained_model):
    frame = population(20)
    frame.loc[7, "CustomerID"] = frame.loc[3, "CustomerID"]
    duplicate = await run(client, analyst_headers, customers_csv(frame))
    assert duplicate.status_code == 422
    assert "C00003" in duplicate.json()["detail"] and duplicate.json()["errors"]
    no_id = await run(client, analyst_headers, customers_csv(population(5).drop(columns="CustomerID")))
    assert no_id.status_code == 422 and "id" in no_id.json()["detail"]
    bad_row = population(5)
    bad_row.loc[2, "Age"] = 500
    broken = await run(client, analyst_headers, customers_csv(bad_row))
    assert broken.status_code == 422 and broken.json()["errors"][0]["row"] == 3
    source = await client.post("/segmentations/default/runs", json={"source": "crm"}, headers=analyst_headers)
    assert source.status_code == 404 and "source" in source.json()["detail"].lower()
    empty = await client.post("/segmentations/default/runs", json={}, headers=analyst_headers)
    assert empty.status_code == 422
    as_of = await run(client, analyst_headers, customers_csv(population(5)), as_of="2024-01-01")
    assert as_of.status_code == 422
    mode = await run(client, analyst_headers, customers_csv(population(5)), mode="merge")
    assert mode.status_code == 422
    forbidden = await run(client, user_headers, customers_csv(population(5)))
    assert forbidden.status_code == 403
    assert (await client.get("/segmentations/default/runs", headers=user_headers)).status_code == 403
    runs = (await client.get("/segmentations/default/runs", headers=analyst_headers)).json()["runs"]
    assert {r["status"] for r in runs} == {"failed"}  # the ones that got as far as a run
    assert all(r["error"]["detail"] for r in runs)
    assert (await client.get("/segmentations/default/customers/C00000", headers=analyst_headers)).status_code == 404


async def test_a_run_needs_a_model_and_a_custom_id_column(client, analyst_headers, dataset):
    none_yet = await run(client, analyst_headers, customers_csv(population(5)))
    assert none_yet.status_code == 409
    features = [{"name": "tenure", "type": "numeric"}, {"name": "spend", "type": "numeric"}]
    created = await client.post(
        "/segmentations", json={"name": "noid", "kind": "custom", "features": features}, headers=analyst_headers
    )
    assert created.status_code == 201, created.text
    frame = pd.DataFrame({"tenure": range(60), "spend": [i % 7 for i in range(60)]})
    trained = await client.post(
        "/segmentations/noid/train",
        params={"n_clusters": 2},
        files={"file": ("t.csv", customers_csv(frame), "text/csv")},
        headers=analyst_headers,
    )
    assert trained.status_code == 200, trained.text
    refused = await run(client, analyst_headers, customers_csv(frame), name="noid")
    assert refused.status_code == 422 and "id_column" in refused.json()["detail"]


async def test_custom_runs_use_the_id_column_and_deleting_the_segmentation_deletes_its_base(client, analyst_headers):
    features = [{"name": "tenure", "type": "numeric"}, {"name": "plan", "type": "categorical"}]
    body = {"name": "crm", "kind": "custom", "features": features, "id_column": "account"}
    assert (await client.post("/segmentations", json=body, headers=analyst_headers)).status_code == 201
    frame = pd.DataFrame(
        {
            "account": [f"00{i}" for i in range(80)],
            "tenure": [i % 20 for i in range(80)],
            "plan": ["pro" if i % 3 else "free" for i in range(80)],
        }
    )
    trained = await client.post(
        "/segmentations/crm/train",
        params={"n_clusters": 2},
        files={"file": ("t.csv", customers_csv(frame), "text/csv")},
        headers=analyst_headers,
    )
    assert trained.status_code == 200, trained.text
    landed = await completed(client, analyst_headers, customers_csv(frame), name="crm")
    assert landed["n_new"] == 80
    one = (await client.get("/segmentations/crm/customers/001", headers=analyst_headers)).json()
    assert one["customer_id"] == "001" and one["status"] == "active"
    assert (await client.delete("/segmentations/crm", headers=analyst_headers)).status_code == 204
    assert (await client.post("/segmentations", json=body, headers=analyst_headers)).status_code == 201
    assert (await client.get("/segmentations/crm/runs", headers=analyst_headers)).json()["total"] == 0


async def test_one_run_at_a_time_and_wait_false_is_a_job(client, app, analyst_headers, trained_model, monkeypatch):
    from app.customers import scoring

    release = threading.Event()
    scoring_rows = scoring.score_rows

    def held(*args, **kwargs):
        assert release.wait(DEADLINE)
        return scoring_rows(*args, **kwargs)

    monkeypatch.setattr(scoring, "score_rows", held)
    data = customers_csv(population(50))
    started = await run(client, analyst_headers, data, wait="false")
    assert started.status_code == 202, started.text
    body = started.json()
    assert body["status"] == "running" and started.headers["location"].endswith(f"/runs/{body['run_id']}")
    second = await run(client, analyst_headers, data)
    assert second.status_code == 409 and "running" in second.json()["detail"]
    busy = await client.delete("/segmentations/default", headers=analyst_headers)
    assert busy.status_code == 409
    # Predictions are answered and kept while the run is on.
    from tests.conftest import CUSTOMER

    assert (await client.post("/predict", json=CUSTOMER, headers=analyst_headers)).status_code == 200
    release.set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while True:
        state = (await client.get(f"/segmentations/default/runs/{body['run_id']}", headers=analyst_headers)).json()
        if state["status"] != "running":
            break
        assert loop.time() < deadline
        await asyncio.sleep(0.05)
    assert state["status"] == "completed" and state["n_new"] == 50


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any], int | None]] = []

    async def add(self, session, event, data, *, segmentation_id=None, at=None) -> None:
        self.events.append((event, dict(data), segmentation_id))


async def test_a_landing_run_queues_run_completed_and_segment_changed(
    client, app, analyst_headers, trained_model, monkeypatch
):
    from app.customers import service

    sink = RecordingSink()
    app.state.customers.events = sink
    monkeypatch.setattr(service, "CHANGES_PER_MESSAGE", 40)
    landed = await completed(client, analyst_headers, customers_csv(population(100)))
    kinds = [e[0] for e in sink.events]
    assert kinds == ["run.completed", "segment.changed", "segment.changed", "segment.changed"]
    assert sink.events[0][1]["run_id"] == landed["run_id"] and sink.events[0][1]["status"] == "completed"
    parts = [e[1] for e in sink.events[1:]]
    assert [(p["part"], p["parts"], len(p["changes"])) for p in parts] == [(1, 3, 40), (2, 3, 40), (3, 3, 20)]
    assert all(e[2] == 1 for e in sink.events)
    sink.events.clear()
    unchanged = await completed(client, analyst_headers, customers_csv(population(100)))
    assert unchanged["n_unchanged"] == 100
    assert [e[0] for e in sink.events] == ["run.completed"]


async def test_an_rfm_run_as_of_a_day(client, analyst_headers):
    log, _ = generate_transactions.generate(400, 3)
    data = log.to_pandas().to_csv(index=False).encode()
    assert (
        await client.post("/segmentations", json={"name": "shop", "kind": "rfm"}, headers=analyst_headers)
    ).status_code == 201
    trained = await client.post(
        "/segmentations/shop/train",
        params={"n_clusters": 3},
        files={"file": ("o.csv", data, "text/csv")},
        headers=analyst_headers,
    )
    assert trained.status_code == 200, trained.text
    last_day = pd.to_datetime(log.to_pandas()["date"]).max().date()
    landed = await completed(client, analyst_headers, data, name="shop", as_of=str(last_day))
    assert landed["parameters"]["as_of"] == str(last_day)
    assert landed["n_customers"] == trained.json()["n_samples"] or landed["n_customers"] > 0
    page = (await client.get("/segmentations/shop/segments/0/customers", headers=analyst_headers)).json()
    assert page["items"] and {"p_alive", "clv"} <= set(page["items"][0])
    as_csv = await client.get(
        "/segmentations/shop/segments/0/customers", headers=analyst_headers | {"Accept": "text/csv"}
    )
    assert list(read_csv(as_csv.content)[0])[-2:] == ["p_alive", "clv"]
    filtered = await client.get(
        "/segmentations/shop/segments/0/customers", params={"min_p_alive": 0.0}, headers=analyst_headers
    )
    assert filtered.status_code == 200
    alive = [i["p_alive"] for i in filtered.json()["items"]]
    assert all(p is not None and p >= 0 for p in alive)


@pytest.mark.postgres
async def test_runs_and_changes_on_either_database(client, analyst_headers, trained_model, database_url):
    everyone = population(300, seed=9)
    await completed(client, analyst_headers, customers_csv(everyone.iloc[:200]))
    second = await completed(client, analyst_headers, customers_csv(everyone.iloc[50:]))
    assert (second["n_new"], second["n_changed"], second["n_unchanged"], second["n_gone"]) == (100, 0, 150, 50)
    changes = await all_pages(client, analyst_headers, "/segmentations/default/runs/2/changes", limit=30)
    assert len(changes) == 150
    assert [c["customer_id"] for c in changes] == sorted(c["customer_id"] for c in changes)
    assert {c["change"] for c in changes} == {"new", "gone"}
    one = (await client.get("/segmentations/default/customers/C00299", headers=analyst_headers)).json()
    assert one["status"] == "active" and one["history"][0]["run_id"] == 2


async def test_analysts_only_even_self_registered(client, trained_model, make_user):
    _, headers = await make_user(Role.user)
    assert (await client.get("/segmentations/default/customers/x", headers=headers)).status_code == 403
    assert (await client.get("/segmentations/default/runs")).status_code == 401


async def test_predictions_are_answered_and_kept_while_a_run_writes(
    client, analyst_headers, user_headers, trained_model
):
    from tests.conftest import CUSTOMER

    started = await run(client, analyst_headers, customers_csv(population(60_000, seed=3)), wait="false")
    assert started.status_code == 202, started.text
    url = f"/segmentations/default/runs/{started.json()['run_id']}"
    predicted = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while (state := (await client.get(url, headers=analyst_headers)).json())["status"] == "running":
        answer = await client.post("/predict", json=CUSTOMER, headers=user_headers)
        assert answer.status_code == 200, answer.text
        predicted += 1
        assert loop.time() < deadline
    assert state["status"] == "completed" and state["n_new"] == 60_000
    history = (await client.get("/history", params={"limit": 1}, headers=user_headers)).json()
    assert history["total"] == predicted
