"""Registration, login (form and JSON), me, logout and token lifetime, through HTTP."""

from __future__ import annotations

import asyncio

import pytest

from app.core.tables import Role
from tests.conftest import PASSWORD, login_headers

NEW_USER = {"email": "ana@example.com", "username": "ana", "full_name": "Ana Lima", "password": "s3cret-pass"}


async def test_register_returns_public_user_with_role_user(client):
    response = await client.post("/auth/register", json=NEW_USER)
    assert response.status_code == 201
    body = response.json()
    assert body["username"] == "ana" and body["email"] == "ana@example.com" and body["role"] == "user"
    assert body["is_active"] is True and body["full_name"] == "Ana Lima"
    assert set(body) == {"id", "email", "username", "full_name", "role", "is_active", "created_at"}
    assert "password" not in response.text and "$2b$" not in response.text


async def test_register_ignores_privileged_fields(client):
    response = await client.post("/auth/register", json={**NEW_USER, "role": "admin", "is_active": False, "id": 999})
    assert response.status_code == 201
    body = response.json()
    assert body["role"] == "user" and body["is_active"] is True and body["id"] != 999


@pytest.mark.postgres
@pytest.mark.parametrize("field,value", [("username", "ana"), ("email", "ANA@example.com")])
async def test_register_duplicate_is_409(client, field, value):
    assert (await client.post("/auth/register", json=NEW_USER)).status_code == 201
    other = {**NEW_USER, "username": "other", "email": "other@example.com", field: value}
    response = await client.post("/auth/register", json=other)
    assert response.status_code == 409
    assert field.lower() in response.json()["detail"].lower()


@pytest.mark.postgres
async def test_sixteen_concurrent_registrations_of_one_name_give_one_201(client):
    async def register(i: int):
        return await client.post(
            "/auth/register", json={**NEW_USER, "username": "racer", "email": f"racer{i}@example.com"}
        )

    responses = await asyncio.gather(*(register(i) for i in range(16)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(201) == 1
    assert codes.count(409) == 15, codes


@pytest.mark.parametrize(
    "patch,field",
    [
        ({"username": "ab"}, "username"),
        ({"username": "x" * 51}, "username"),
        ({"username": "has space"}, "username"),
        ({"username": "émile"}, "username"),
        ({"password": "short"}, "password"),
        ({"password": "p" * 129}, "password"),
        ({"email": "not-an-email"}, "email"),
        ({"email": None}, "email"),
    ],
)
async def test_register_field_rules_give_422_naming_the_field(client, patch, field):
    response = await client.post("/auth/register", json={**NEW_USER, **patch})
    assert response.status_code == 422
    assert response.json()["detail"].startswith(f"{field}: ")
    assert any(field in err["loc"] for err in response.json()["errors"])


async def test_register_missing_field_is_422(client):
    body = {k: v for k, v in NEW_USER.items() if k != "password"}
    response = await client.post("/auth/register", json=body)
    assert response.status_code == 422
    assert response.json()["detail"] == "password: Field required"
    assert [err["loc"] for err in response.json()["errors"]] == [["body", "password"]]


async def test_login_with_form_and_json_and_email(client):
    await client.post("/auth/register", json=NEW_USER)
    form = await client.post("/auth/login", data={"username": "ana", "password": "s3cret-pass"})
    assert form.status_code == 200
    body = form.json()
    assert body["token_type"] == "bearer" and body["expires_in"] > 0 and body["user"]["username"] == "ana"
    as_json = await client.post("/auth/login", json={"username": "ana", "password": "s3cret-pass"})
    assert as_json.status_code == 200
    by_email = await client.post("/auth/login", data={"username": "ANA@example.com", "password": "s3cret-pass"})
    assert by_email.status_code == 200
    me = await client.get("/auth/me", headers={"Authorization": f"Bearer {by_email.json()['access_token']}"})
    assert me.status_code == 200 and me.json()["username"] == "ana"


async def test_login_reads_json_whatever_the_media_type_is_spelled(client):
    await client.post("/auth/register", json=NEW_USER)
    body = b'{"username": "ana", "password": "s3cret-pass"}'
    for content_type in ("Application/JSON; charset=utf-8", "application/vnd.api+json"):
        response = await client.post("/auth/login", content=body, headers={"Content-Type": content_type})
        assert response.status_code == 200, (content_type, response.text)
        assert response.json()["user"]["username"] == "ana"


async def test_wrong_password_and_unknown_user_get_the_same_401(client):
    await client.post("/auth/register", json=NEW_USER)
    wrong = await client.post("/auth/login", data={"username": "ana", "password": "wrong-pass"})
    unknown = await client.post("/auth/login", data={"username": "nobody", "password": "wrong-pass"})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()
    assert wrong.headers["www-authenticate"] == "Bearer"


async def test_login_bad_bodies_are_422(client):
    assert (await client.post("/auth/login", json={"username": "ana"})).status_code == 422
    assert (await client.post("/auth/login", data={"password": "x"})).status_code == 422
    response = await client.post("/auth/login", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 422


async def test_inactive_user_cannot_log_in(client, make_user, admin_headers):
    user, _ = await make_user(Role.user)
    assert (await client.put(f"/admin/users/{user['id']}/toggle-active", headers=admin_headers)).status_code == 200
    response = await client.post("/auth/login", data={"username": user["username"], "password": PASSWORD})
    assert response.status_code == 403


async def test_me_requires_a_token(client):
    response = await client.get("/auth/me")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


async def test_logout_revokes_only_that_token(client, make_user):
    user, headers = await make_user(Role.user)
    other_headers = await login_headers(client, user["username"])
    assert (await client.post("/auth/logout", headers=headers)).status_code == 200
    assert (await client.get("/auth/me", headers=headers)).status_code == 401
    assert (await client.post("/auth/logout", headers=headers)).status_code == 401
    assert (await client.get("/auth/me", headers=other_headers)).status_code == 200


@pytest.mark.postgres
async def test_logout_is_seen_by_another_app_on_the_same_database(client, make_user, settings):
    """A second app instance (another worker) rejects the revoked token within a second."""
    import httpx
    from asgi_lifespan import LifespanManager

    from app.main import create_app

    _, headers = await make_user(Role.user)
    second = create_app(settings)
    async with LifespanManager(second):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=second), base_url="http://w2") as other:
            assert (await other.get("/auth/me", headers=headers)).status_code == 200
            assert (await client.post("/auth/logout", headers=headers)).status_code == 200
            await asyncio.sleep(1.0)
            assert (await other.get("/auth/me", headers=headers)).status_code == 401
