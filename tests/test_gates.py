"""Every route's gate: 401 without a token, 403 for a role below the one it needs."""

from __future__ import annotations

import pytest

from app.core.tables import Role

# (method, path, least role); paths name ids no row has, which a gate must refuse before looking anything up.
ROUTES = [
    ("GET", "/auth/me", Role.user),
    ("POST", "/auth/logout", Role.user),
    ("POST", "/train", Role.analyst),
    ("POST", "/predict", Role.user),
    ("POST", "/predict/batch", Role.user),
    ("GET", "/clusters", Role.user),
    ("GET", "/elbow", Role.user),
    ("GET", "/charts/clusters", Role.user),
    ("GET", "/charts/elbow", Role.user),
    ("GET", "/history", Role.user),
    ("GET", "/models", Role.analyst),
    ("GET", "/models/v1", Role.analyst),
    ("POST", "/models/v1/activate", Role.analyst),
    ("GET", "/users/me/profile", Role.user),
    ("PUT", "/users/me", Role.user),
    ("DELETE", "/users/me", Role.user),
    ("GET", "/users/", Role.admin),
    ("GET", "/users/999999", Role.admin),
    ("PUT", "/users/999999/role", Role.admin),
    ("DELETE", "/users/999999", Role.admin),
    ("POST", "/profiles/", Role.user),
    ("GET", "/profiles/", Role.user),
    ("GET", "/profiles/999999", Role.user),
    ("PUT", "/profiles/999999", Role.user),
    ("DELETE", "/profiles/999999", Role.user),
    ("GET", "/admin/users", Role.admin),
    ("GET", "/admin/users/999999", Role.admin),
    ("PUT", "/admin/users/999999/role", Role.admin),
    ("DELETE", "/admin/users/999999", Role.admin),
    ("PUT", "/admin/users/999999/toggle-active", Role.admin),
    ("GET", "/admin/stats", Role.admin),
]
RANK = {Role.user: 0, Role.analyst: 1, Role.admin: 2}


@pytest.mark.parametrize("method,path,least", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
async def test_without_token_is_401(client, method, path, least):
    response = await client.request(method, path)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "method,path,least",
    [r for r in ROUTES if r[2] != Role.user],
    ids=[f"{m} {p}" for m, p, least in ROUTES if least != Role.user],
)
async def test_roles_below_the_gate_get_403(client, make_user, method, path, least):
    for role in Role:
        if RANK[role] < RANK[least]:
            _, headers = await make_user(role)
            response = await client.request(method, path, headers=headers, json={})
            assert response.status_code == 403, (role, response.text)


@pytest.mark.parametrize("method,path,least", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
async def test_the_least_role_passes_the_gate(client, make_user, method, path, least):
    _, headers = await make_user(least)
    response = await client.request(method, path, headers=headers, json={})
    assert response.status_code not in (401, 403), response.text
    assert response.status_code < 500
