"""Admin routes: users with activity, self-protection, last-admin guard, statistics."""

from __future__ import annotations

import asyncio

import pytest

from app.core.tables import Role
from tests.conftest import CUSTOMER, PASSWORD


@pytest.mark.postgres
async def test_admin_user_list_carries_activity_and_totals(client, make_user, admin_headers):
    user, headers = await make_user(Role.user)
    await client.post("/profiles/", json={"name": "p", **CUSTOMER}, headers=headers)
    response = await client.get("/admin/users", headers=admin_headers)
    assert response.status_code == 200
    body = response.json()
    assert body["total"] == 2 and body["total_profiles"] == 1 and body["total_predictions"] == 0
    row = next(u for u in body["users"] if u["id"] == user["id"])
    assert row["total_profiles"] == 1 and row["total_predictions"] == 0
    one = await client.get(f"/admin/users/{user['id']}", headers=admin_headers)
    assert one.status_code == 200 and one.json()["total_profiles"] == 1
    assert (await client.get("/admin/users/99999", headers=admin_headers)).status_code == 404


async def test_admin_cannot_change_own_role_delete_or_deactivate_self(client, make_user):
    admin, headers = await make_user(Role.admin)
    await make_user(Role.admin)  # not the last admin: the self rule alone applies
    assert (
        await client.put(f"/admin/users/{admin['id']}/role", json={"role": "user"}, headers=headers)
    ).status_code == 403
    assert (await client.delete(f"/admin/users/{admin['id']}", headers=headers)).status_code == 403
    assert (await client.put(f"/admin/users/{admin['id']}/toggle-active", headers=headers)).status_code == 403
    assert (await client.get("/auth/me", headers=headers)).json()["role"] == "admin"


@pytest.mark.postgres
async def test_last_active_admin_is_never_demoted_deactivated_or_deleted(client, make_user):
    first, first_headers = await make_user(Role.admin)
    second, second_headers = await make_user(Role.admin)
    # Two admins: the second may demote the first.
    assert (
        await client.put(f"/admin/users/{first['id']}/role", json={"role": "analyst"}, headers=second_headers)
    ).status_code == 200
    # Now the second is the last admin; a deactivated admin does not count as active.
    third, third_headers = await make_user(Role.admin)
    assert (await client.put(f"/admin/users/{third['id']}/toggle-active", headers=second_headers)).status_code == 200
    # The only other admin is inactive, so the second cannot leave through any route.
    assert (await client.delete("/users/me", headers=second_headers)).status_code == 409


async def test_toggle_active_blocks_and_restores_access(client, make_user, admin_headers):
    user, headers = await make_user(Role.user)
    off = await client.put(f"/admin/users/{user['id']}/toggle-active", headers=admin_headers)
    assert off.status_code == 200 and off.json()["is_active"] is False
    assert (await client.get("/auth/me", headers=headers)).status_code == 403
    on = await client.put(f"/admin/users/{user['id']}/toggle-active", headers=admin_headers)
    assert on.json()["is_active"] is True
    assert (await client.get("/auth/me", headers=headers)).status_code == 200


async def test_admin_role_and_delete_doors_share_the_rules(client, make_user, admin_headers):
    user, headers = await make_user(Role.user)
    response = await client.put(f"/admin/users/{user['id']}/role", json={"role": "analyst"}, headers=admin_headers)
    assert response.status_code == 200 and response.json()["role"] == "analyst"
    assert (await client.delete(f"/admin/users/{user['id']}", headers=admin_headers)).status_code == 200
    assert (
        await client.post("/auth/login", data={"username": user["username"], "password": PASSWORD})
    ).status_code == 401


@pytest.mark.postgres
async def test_stats_count_users_roles_and_predictions(client, make_user, admin_headers, trained_model):
    user, headers = await make_user(Role.user)
    off, _ = await make_user(Role.user)
    await client.put(f"/admin/users/{off['id']}/toggle-active", headers=admin_headers)
    for _ in range(3):
        assert (await client.post("/predict", json=CUSTOMER, headers=headers)).status_code == 200
    stats = (await client.get("/admin/stats", headers=admin_headers)).json()
    # admin, the analyst who trained, the user and the inactive user
    assert stats["total_users"] == 4 and stats["active_users"] == 3 and stats["inactive_users"] == 1
    assert stats["users_by_role"] == {"user": 2, "analyst": 1, "admin": 1}
    assert stats["total_predictions"] == 3
    assert sum(stats["predictions_by_cluster"].values()) == 3
    assert stats["model"]["version"] == trained_model["model_version"]


@pytest.mark.postgres
async def test_history_counts_follow_predictions_and_deleted_accounts(client, make_user, admin_headers, trained_model):
    """Totals in history pages and the admin list stay exact as rows come and accounts go."""
    kept, kept_headers = await make_user(Role.user)
    leaving, leaving_headers = await make_user(Role.user)
    for headers, n in ((kept_headers, 4), (leaving_headers, 3)):
        answers = await asyncio.gather(*(client.post("/predict", json=CUSTOMER, headers=headers) for _ in range(n)))
        assert [a.status_code for a in answers] == [200] * n
    assert (await client.get("/history?limit=1", headers=kept_headers)).json()["total"] == 4
    listing = (await client.get("/admin/users", headers=admin_headers)).json()
    assert listing["total_predictions"] == 7
    assert {u["id"]: u["total_predictions"] for u in listing["users"]}[leaving["id"]] == 3

    assert (await client.delete(f"/admin/users/{leaving['id']}", headers=admin_headers)).status_code in (200, 204)
    listing = (await client.get("/admin/users", headers=admin_headers)).json()
    assert listing["total_predictions"] == 4
    assert {u["id"]: u["total_predictions"] for u in listing["users"]}[kept["id"]] == 4
    # A new account starts from nothing, even where the database reuses the deleted one's id.
    newcomer, newcomer_headers = await make_user(Role.user)
    assert (await client.get("/history", headers=newcomer_headers)).json()["total"] == 0
    assert (await client.post("/predict", json=CUSTOMER, headers=newcomer_headers)).status_code == 200
    page = (await client.get("/history", headers=newcomer_headers)).json()
    assert page["total"] == 1 and len(page["history"]) == 1
    assert (await client.get(f"/admin/users/{newcomer['id']}", headers=admin_headers)).json()["total_predictions"] == 1
