"""The caller's own account and the admin's /users door."""

from __future__ import annotations

import pytest

from app.core.tables import Role
from tests.conftest import CUSTOMER, PASSWORD, login_headers


async def test_my_profile_counts_predictions_and_profiles(client, user_headers):
    await client.post("/profiles/", json={"name": "p1", **CUSTOMER}, headers=user_headers)
    response = await client.get("/users/me/profile", headers=user_headers)
    assert response.status_code == 200
    body = response.json()
    assert body["total_saved_profiles"] == 1 and body["total_predictions"] == 0
    assert "hashed_password" not in body


async def test_update_me_changes_names(client, make_user):
    user, headers = await make_user(Role.user)
    response = await client.put("/users/me", json={"full_name": "New Name", "username": "renamed"}, headers=headers)
    assert response.status_code == 200
    assert response.json()["full_name"] == "New Name" and response.json()["username"] == "renamed"
    assert (await client.get("/auth/me", headers=headers)).json()["username"] == "renamed"


async def test_update_me_cannot_set_role_or_is_active(client, make_user):
    _, headers = await make_user(Role.user)
    response = await client.put("/users/me", json={"role": "admin", "is_active": False, "id": 1}, headers=headers)
    assert response.status_code == 200
    me = (await client.get("/auth/me", headers=headers)).json()
    assert me["role"] == "user" and me["is_active"] is True


@pytest.mark.postgres
async def test_update_me_to_a_taken_username_or_email_is_409(client, make_user):
    first, _ = await make_user(Role.user)
    _, headers = await make_user(Role.user)
    assert (await client.put("/users/me", json={"username": first["username"]}, headers=headers)).status_code == 409
    assert (await client.put("/users/me", json={"email": first["email"]}, headers=headers)).status_code == 409


async def test_password_change_needs_current_password(client, make_user):
    _, headers = await make_user(Role.user)
    missing = await client.put("/users/me", json={"password": "another-pass-1"}, headers=headers)
    assert missing.status_code == 422
    wrong = await client.put(
        "/users/me", json={"password": "another-pass-1", "current_password": "nope-nope"}, headers=headers
    )
    assert wrong.status_code == 401
    assert (await client.get("/auth/me", headers=headers)).status_code == 200


@pytest.mark.postgres
async def test_password_change_ends_older_tokens(client, make_user):
    user, headers = await make_user(Role.user)
    other = await login_headers(client, user["username"])
    response = await client.put(
        "/users/me", json={"password": "another-pass-1", "current_password": PASSWORD}, headers=headers
    )
    assert response.status_code == 200
    assert (await client.get("/auth/me", headers=headers)).status_code == 401
    assert (await client.get("/auth/me", headers=other)).status_code == 401
    old = await client.post("/auth/login", data={"username": user["username"], "password": PASSWORD})
    assert old.status_code == 401
    fresh = await login_headers(client, user["username"], "another-pass-1")
    assert (await client.get("/auth/me", headers=fresh)).status_code == 200


@pytest.mark.parametrize(
    "body", [{"username": "a"}, {"email": "nope"}, {"password": "short", "current_password": "x"}, {"username": None}]
)
async def test_update_me_field_rules(client, user_headers, body):
    assert (await client.put("/users/me", json=body, headers=user_headers)).status_code == 422


@pytest.mark.postgres
async def test_delete_me_removes_account_profiles_and_history(client, make_user, admin_headers):
    user, headers = await make_user(Role.user)
    await client.post("/profiles/", json={"name": "p", **CUSTOMER}, headers=headers)
    response = await client.delete("/users/me", headers=headers)
    assert response.status_code == 200
    assert (await client.get("/auth/me", headers=headers)).status_code == 401
    assert (await client.get(f"/users/{user['id']}", headers=admin_headers)).status_code == 404
    stats = (await client.get("/admin/stats", headers=admin_headers)).json()
    assert stats["total_profiles"] == 0


async def test_last_admin_cannot_delete_themselves(client, make_user):
    _, headers = await make_user(Role.admin)
    assert (await client.delete("/users/me", headers=headers)).status_code == 409
    assert (await client.get("/auth/me", headers=headers)).status_code == 200


async def test_an_admin_who_is_not_the_last_can_delete_their_account(client, make_user):
    _, first = await make_user(Role.admin)
    await make_user(Role.admin)
    assert (await client.delete("/users/me", headers=first)).status_code == 200


@pytest.mark.postgres
async def test_admin_lists_and_reads_users_with_paging(client, make_user, admin_headers):
    for _ in range(3):
        await make_user(Role.user)
    page = await client.get("/users/", params={"skip": 1, "limit": 2}, headers=admin_headers)
    assert page.status_code == 200
    body = page.json()
    assert body["total"] == 4 and len(body["users"]) == 2
    assert all("hashed_password" not in u for u in body["users"])
    one = await client.get(f"/users/{body['users'][0]['id']}", headers=admin_headers)
    assert one.status_code == 200 and one.json()["id"] == body["users"][0]["id"]
    assert (await client.get("/users/99999", headers=admin_headers)).status_code == 404


@pytest.mark.parametrize("params", [{"limit": 201}, {"limit": 0}, {"skip": -1}, {"limit": "x"}])
async def test_paging_bounds(client, admin_headers, params):
    assert (await client.get("/users/", params=params, headers=admin_headers)).status_code == 422


async def test_role_change_takes_effect_at_once(client, make_user, admin_headers):
    user, headers = await make_user(Role.user)
    assert (await client.get("/models", headers=headers)).status_code == 403
    response = await client.put(f"/users/{user['id']}/role", json={"role": "analyst"}, headers=admin_headers)
    assert response.status_code == 200 and response.json()["role"] == "analyst"
    assert (await client.get("/models", headers=headers)).status_code == 200
    await client.put(f"/users/{user['id']}/role", json={"role": "user"}, headers=admin_headers)
    assert (await client.get("/models", headers=headers)).status_code == 403


async def test_role_body_rules(client, make_user, admin_headers):
    user, _ = await make_user(Role.user)
    assert (
        await client.put(f"/users/{user['id']}/role", json={"role": "root"}, headers=admin_headers)
    ).status_code == 422
    assert (await client.put("/users/99999/role", json={"role": "user"}, headers=admin_headers)).status_code == 404


@pytest.mark.postgres
async def test_admin_deletes_user_and_their_token_stops_working(client, make_user, admin_headers):
    user, headers = await make_user(Role.user)
    assert (await client.delete(f"/users/{user['id']}", headers=admin_headers)).status_code == 200
    assert (await client.get("/auth/me", headers=headers)).status_code == 401
    assert (await client.delete(f"/users/{user['id']}", headers=admin_headers)).status_code == 404
