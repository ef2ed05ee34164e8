"""Saved customer profiles: owner only, another user's is 404, segments filled when a model exists."""

from __future__ import annotations

import pytest

from app.core.tables import Role
from tests.conftest import CUSTOMER

PROFILE = {"name": "Jane at downtown", **CUSTOMER, "notes": "likes email"}


@pytest.mark.postgres
async def test_create_read_update_delete(client, user_headers):
    created = await client.post("/profiles/", json=PROFILE, headers=user_headers)
    assert created.status_code == 201
    body = created.json()
    for key in ("id", "user_id", "created_at", "updated_at"):
        assert key in body
    assert body["cluster"] is None and body["cluster_name"] is None
    assert body["sex"] == "Female" and body["annual_income"] == 85.0
    pid = body["id"]

    assert (await client.get(f"/profiles/{pid}", headers=user_headers)).json()["name"] == PROFILE["name"]
    updated = await client.put(f"/profiles/{pid}", json={"spending_score": 10, "notes": None}, headers=user_headers)
    assert updated.status_code == 200
    assert updated.json()["spending_score"] == 10 and updated.json()["notes"] is None
    assert updated.json()["age"] == CUSTOMER["age"]
    assert (await client.delete(f"/profiles/{pid}", headers=user_headers)).status_code == 200
    assert (await client.get(f"/profiles/{pid}", headers=user_headers)).status_code == 404


async def test_sex_is_case_insensitive_in_and_canonical_out(client, user_headers):
    response = await client.post("/profiles/", json={**PROFILE, "sex": "  fEMALE"}, headers=user_headers)
    assert response.status_code == 201 and response.json()["sex"] == "Female"


@pytest.mark.postgres
async def test_list_is_own_only_newest_first_and_paged(client, make_user):
    _, alice = await make_user(Role.user)
    _, bob = await make_user(Role.user)
    for i in range(3):
        await client.post("/profiles/", json={**PROFILE, "name": f"a{i}"}, headers=alice)
    await client.post("/profiles/", json={**PROFILE, "name": "bob's"}, headers=bob)
    listed = (await client.get("/profiles/", headers=alice)).json()
    assert [p["name"] for p in listed] == ["a2", "a1", "a0"]
    assert [
        p["name"] for p in (await client.get("/profiles/", params={"skip": 1, "limit": 1}, headers=alice)).json()
    ] == ["a1"]
    assert (await client.get("/profiles/", params={"limit": 500}, headers=alice)).status_code == 422


async def test_another_users_profile_is_404_for_every_verb(client, make_user):
    _, alice = await make_user(Role.user)
    _, bob = await make_user(Role.admin)
    pid = (await client.post("/profiles/", json=PROFILE, headers=alice)).json()["id"]
    assert (await client.get(f"/profiles/{pid}", headers=bob)).status_code == 404
    assert (await client.put(f"/profiles/{pid}", json={"age": 40}, headers=bob)).status_code == 404
    assert (await client.delete(f"/profiles/{pid}", headers=bob)).status_code == 404
    assert (await client.get(f"/profiles/{pid}", headers=alice)).json()["age"] == CUSTOMER["age"]


async def test_profile_body_cannot_set_owner_or_id(client, make_user):
    alice, alice_headers = await make_user(Role.user)
    bob, _ = await make_user(Role.user)
    response = await client.post("/profiles/", json={**PROFILE, "user_id": bob["id"], "id": 777}, headers=alice_headers)
    assert response.status_code == 201
    assert response.json()["user_id"] == alice["id"] and response.json()["id"] != 777


@pytest.mark.parametrize("change", [{"age": None}, {"age": 17}, {"name": ""}, {"sex": "robot"}, {"notes": "x" * 2001}])
async def test_update_field_rules(client, user_headers, change):
    pid = (await client.post("/profiles/", json=PROFILE, headers=user_headers)).json()["id"]
    assert (await client.put(f"/profiles/{pid}", json=change, headers=user_headers)).status_code == 422


async def test_profiles_get_their_segment_once_a_model_exists(client, user_headers, trained_model):
    created = await client.post("/profiles/", json=PROFILE, headers=user_headers)
    body = created.json()
    assert isinstance(body["cluster"], int) and body["cluster_name"]
    predicted = await client.post("/predict", json=CUSTOMER, headers=user_headers)
    assert predicted.json()["cluster"] == body["cluster"]
    listed = (await client.get("/profiles/", headers=user_headers)).json()
    assert listed[0]["cluster_name"] == body["cluster_name"]


async def test_unknown_ids_are_404_and_bad_ids_422(client, user_headers):
    assert (await client.get("/profiles/424242", headers=user_headers)).status_code == 404
    assert (await client.get("/profiles/0", headers=user_headers)).status_code == 422
    assert (await client.get("/profiles/abc", headers=user_headers)).status_code == 422
