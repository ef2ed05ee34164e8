"""The attacker's view: the OWASP API Security Top 10 (2023), item by item, against this service.

Every test talks HTTP to the app as a hostile client would. Sections follow the OWASP list;
resource limits are covered in depth in test_limits.py, faults in test_faults.py, and
schema-driven fuzzing of every operation in test_fuzz.py.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import os
import threading
import time

import httpx
import pytest
from asgi_lifespan import LifespanManager
from jose import jwt
from sqlalchemy import select

from app.core.config import Settings
from app.core.security import _hashing_pool
from app.core.tables import LoginFailure, Role
from app.main import create_app
from tests.conftest import CUSTOMER, PASSWORD, TEST_SECRET, login_headers

PROFILE = {"name": "Target customer", **CUSTOMER}


def _b64(data: dict | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _claims(user_id: int, **overrides) -> dict:
    now = int(time.time())
    claims = {"sub": str(user_id), "jti": f"forged{now}{user_id}", "iat": now, "exp": now + 600, "ver": 0}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _token(headers: dict[str, str]) -> str:
    return headers["Authorization"].split(" ", 1)[1]


def _assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert "Traceback" not in response.text


# =====================================================================================
# API1:2023 Broken Object Level Authorization
# Objects are reached by id; another user's object must be indistinguishable from none.
# =====================================================================================


async def test_api1_another_users_profile_is_404_like_a_missing_one(client, make_user):
    _, owner = await make_user(Role.user)
    _, intruder = await make_user(Role.user)
    profile = (await client.post("/profiles/", json=PROFILE, headers=owner)).json()
    missing = await client.get("/profiles/2147483647", headers=intruder)
    for method, body in (("GET", None), ("PUT", {"name": "pwned"}), ("DELETE", None)):
        response = await client.request(method, f"/profiles/{profile['id']}", json=body, headers=intruder)
        assert response.status_code == 404
        assert response.json() == missing.json(), "the answer must not reveal that the id exists"
    unchanged = (await client.get(f"/profiles/{profile['id']}", headers=owner)).json()
    assert unchanged["name"] == PROFILE["name"]


@pytest.mark.postgres
async def test_api1_profile_lists_never_leak_other_users_rows(client, make_user):
    _, owner = await make_user(Role.user)
    _, intruder = await make_user(Role.user)
    for i in range(3):
        await client.post("/profiles/", json={**PROFILE, "name": f"secret {i}"}, headers=owner)
    for params in ({}, {"skip": 0, "limit": 200}, {"user_id": 1}):
        listed = await client.get("/profiles/", params=params, headers=intruder)
        assert listed.status_code == 200 and listed.json() == []


async def test_api1_history_of_another_user_is_refused_to_plain_users(client, make_user):
    victim, _ = await make_user(Role.user)
    _, intruder = await make_user(Role.user)
    response = await client.get("/history", params={"user_id": victim["id"]}, headers=intruder)
    assert response.status_code == 403


async def test_api1_ids_that_are_not_ids_are_rejected_not_500(client, user_headers):
    for bad in ("0", "-1", "abc", "1e3", "99999999999999999999", "1;DROP TABLE users", "%00"):
        response = await client.get(f"/profiles/{bad}", headers=user_headers)
        assert response.status_code in (404, 422), (bad, response.status_code)


# =====================================================================================
# API2:2023 Broken Authentication
# Tokens: only HS256 signed with our key, unexpired, unrevoked, for a live user whose
# password has not changed since. Logins: one message for every failure, throttled.
# =====================================================================================

FORGERIES = {
    "alg none": lambda uid: f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims(uid))}.",
    "alg None with a signature": lambda uid: f"{_b64({'alg': 'None', 'typ': 'JWT'})}.{_b64(_claims(uid))}.c2ln",
    "another key": lambda uid: jwt.encode(_claims(uid), "some-other-deployments-secret-key-000000", "HS256"),
    "our key but HS512": lambda uid: jwt.encode(_claims(uid), TEST_SECRET, "HS512"),
    "expired": lambda uid: jwt.encode(
        _claims(uid, iat=int(time.time()) - 7200, exp=int(time.time()) - 3600), TEST_SECRET, "HS256"
    ),
    "no exp": lambda uid: jwt.encode(_claims(uid, exp=None), TEST_SECRET, "HS256"),
    "no jti": lambda uid: jwt.encode(_claims(uid, jti=None), TEST_SECRET, "HS256"),
    "sub not a number": lambda uid: jwt.encode(_claims(uid, sub="admin"), TEST_SECRET, "HS256"),
    "sub of nobody": lambda uid: jwt.encode(_claims(2**31 - 1), TEST_SECRET, "HS256"),
    "ver from the future": lambda uid: jwt.encode(_claims(uid, ver=99), TEST_SECRET, "HS256"),
}
GARBAGE = [
    "",
    "garbage",
    "a.b.c",
    "....",
    "eyJ.eyJ.",
    "Bearer",
    "x" * 20_000,
    "é.é.é",
    "null",
    _b64({"alg": "HS256"}) + "." + _b64(b"not json") + ".sig",
]


@pytest.mark.parametrize("forgery", list(FORGERIES))
async def test_api2_forged_tokens_are_401(client, make_user, forgery):
    user, _ = await make_user(Role.admin)
    _assert_401(await client.get("/auth/me", headers=_bearer(FORGERIES[forgery](user["id"]))))


async def test_api2_garbage_tokens_and_schemes_are_401(client, user_headers):
    for token in GARBAGE:
        _assert_401(await client.get("/auth/me", headers={"Authorization": f"Bearer {token}".encode()}))
    for header in (
        f"Basic {_b64(b'admin:admin123')}",
        _token(user_headers),
        f"Token {_token(user_headers)}",
        f"Bearer{_token(user_headers)}",
    ):
        _assert_401(await client.get("/auth/me", headers={"Authorization": header}))


async def test_api2_a_tampered_payload_breaks_the_signature(client, make_user):
    user, headers = await make_user(Role.user)
    admin, _ = await make_user(Role.admin)
    header, payload, signature = _token(headers).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    for change in ({"sub": str(admin["id"])}, {"exp": claims["exp"] + 86400}, {"ver": claims.get("ver", 0) + 1}):
        forged = f"{header}.{_b64({**claims, **change})}.{signature}"
        _assert_401(await client.get("/auth/me", headers=_bearer(forged)))
    assert (await client.get("/auth/me", headers=headers)).json()["id"] == user["id"]


@pytest.mark.postgres
async def test_api2_a_revoked_token_is_401_everywhere(client, user_headers):
    assert (await client.post("/auth/logout", headers=user_headers)).status_code == 200
    for method, path in (
        ("GET", "/auth/me"),
        ("GET", "/profiles/"),
        ("POST", "/auth/logout"),
        ("GET", "/users/me/profile"),
    ):
        _assert_401(await client.request(method, path, headers=user_headers))


async def test_api2_tokens_issued_before_a_password_change_are_401(client, make_user):
    user, headers = await make_user(Role.user)
    other_session = await login_headers(client, user["username"])
    changed = await client.put(
        "/users/me", json={"password": "brand-new-pass-1", "current_password": PASSWORD}, headers=headers
    )
    assert changed.status_code == 200
    _assert_401(await client.get("/auth/me", headers=headers))
    _assert_401(await client.get("/auth/me", headers=other_session))


async def test_api2_the_token_of_a_deleted_user_is_401(client, make_user, admin_headers):
    user, headers = await make_user(Role.user)
    assert (await client.delete(f"/admin/users/{user['id']}", headers=admin_headers)).status_code == 200
    _assert_401(await client.get("/auth/me", headers=headers))
    # A new account that happens to take the same name does not revive the old token.
    await client.post(
        "/auth/register",
        json={"email": "again@example.com", "username": user["username"], "password": "another-pass-1"},
    )
    _assert_401(await client.get("/auth/me", headers=headers))


async def test_api2_the_token_of_a_deactivated_user_is_403(client, make_user, admin_headers):
    user, headers = await make_user(Role.user)
    assert (await client.put(f"/admin/users/{user['id']}/toggle-active", headers=admin_headers)).status_code == 200
    for path in ("/auth/me", "/profiles/", "/history"):
        response = await client.get(path, headers=headers)
        assert response.status_code == 403 and "inactive" in response.json()["detail"].lower()


async def test_api2_login_failures_do_not_reveal_which_accounts_exist(client, make_user):
    user, _ = await make_user(Role.user)
    responses = [
        await client.post("/auth/login", data={"username": user["username"], "password": "wrong-password"}),
        await client.post("/auth/login", data={"username": "no-such-user", "password": "wrong-password"}),
        await client.post("/auth/login", data={"username": user["email"], "password": "wrong-password"}),
        await client.post("/auth/login", json={"username": "ghost@example.com", "password": "wrong-password"}),
    ]
    assert {r.status_code for r in responses} == {401}
    assert len({r.text for r in responses}) == 1


@pytest.mark.parametrize("password", ["p" * 128, "é" * 100, "long-" * 20 + "tail"])
async def test_api2_long_passwords_count_in_full(client, password):
    """bcrypt reads 72 bytes; a 128-character password must neither crash nor be cut short."""
    body = {"email": "long@example.com", "username": "longpass", "password": password}
    assert (await client.post("/auth/register", json=body)).status_code == 201
    assert (await client.post("/auth/login", data={"username": "longpass", "password": password})).status_code == 200
    changed_at_the_end = password[:-1] + ("x" if password[-1] != "x" else "y")
    wrong = await client.post("/auth/login", data={"username": "longpass", "password": changed_at_the_end})
    assert wrong.status_code == 401
    unknown = await client.post("/auth/login", data={"username": "nobody-here", "password": password})
    assert unknown.status_code == 401


THROTTLE = {"login_max_failures_per_user": 3, "login_max_failures_per_ip": 50, "login_window_seconds": 60}


async def _fail(client, username: str, n: int = 1) -> list[int]:
    return [
        (await client.post("/auth/login", data={"username": username, "password": "wrong-password"})).status_code
        for _ in range(n)
    ]


@pytest.mark.parametrize("settings_overrides", [THROTTLE], ids=["user-limit-3"])
async def test_api2_repeated_failures_for_one_username_get_429_with_retry_after(client, make_user):
    user, _ = await make_user(Role.user)
    assert await _fail(client, user["username"], 3) == [401, 401, 401]
    blocked = await client.post("/auth/login", data={"username": user["username"], "password": PASSWORD})
    assert blocked.status_code == 429, "even the right password waits until the window ends"
    assert 1 <= int(blocked.headers["retry-after"]) <= 60
    assert "try again" in blocked.json()["detail"].lower()
    # The email is the same account: it does not open a second budget of guesses.
    by_email = await client.post("/auth/login", data={"username": user["email"], "password": "wrong-password"})
    assert by_email.status_code == 429
    # Other accounts are not locked out by an attack on this one.
    other, _ = await make_user(Role.user)
    assert (
        await client.post("/auth/login", data={"username": other["username"], "password": PASSWORD})
    ).status_code == 200


@pytest.mark.parametrize("settings_overrides", [THROTTLE], ids=["user-limit-3"])
async def test_api2_alternating_username_and_email_shares_one_budget(client, make_user):
    user, _ = await make_user(Role.user)
    for login in (user["username"], user["email"].upper(), user["username"]):
        await _fail(client, login)
    blocked = await client.post("/auth/login", data={"username": user["email"], "password": PASSWORD})
    assert blocked.status_code == 429


@pytest.mark.parametrize("settings_overrides", [THROTTLE], ids=["user-limit-3"])
async def test_api2_a_successful_login_resets_the_username_count(client, make_user):
    user, _ = await make_user(Role.user)
    assert await _fail(client, user["username"], 2) == [401, 401]
    await login_headers(client, user["username"])
    assert await _fail(client, user["username"], 3) == [401, 401, 401]
    assert await _fail(client, user["username"]) == [429]


@pytest.mark.parametrize(
    "settings_overrides",
    [{"login_max_failures_per_user": 100, "login_max_failures_per_ip": 4, "login_window_seconds": 60}],
    ids=["ip-limit-4"],
)
async def test_api2_one_address_spraying_many_usernames_gets_429(client, app, make_user):
    user, _ = await make_user(Role.user)
    for i in range(4):
        assert await _fail(client, f"sprayed-{i}") == [401]
    blocked = await client.post("/auth/login", data={"username": user["username"], "password": PASSWORD})
    assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) >= 1
    # A forged X-Forwarded-For does not buy a new address.
    spoofed = await client.post(
        "/auth/login",
        data={"username": user["username"], "password": PASSWORD},
        headers={"X-Forwarded-For": "203.0.113.9", "X-Real-IP": "203.0.113.9"},
    )
    assert spoofed.status_code == 429
    # The legitimate user on another address is not locked out.
    transport = httpx.ASGITransport(app=app, client=("198.51.100.7", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as elsewhere:
        assert (
            await elsewhere.post("/auth/login", data={"username": user["username"], "password": PASSWORD})
        ).status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize("settings_overrides", [{**THROTTLE, "login_window_seconds": 1}], ids=["window-1s"])
async def test_api2_the_throttle_window_expires(client, make_user):
    user, _ = await make_user(Role.user)
    await _fail(client, user["username"], 3)
    blocked = await client.post("/auth/login", data={"username": user["username"], "password": PASSWORD})
    assert blocked.status_code == 429 and blocked.headers["retry-after"] == "1"
    await asyncio.sleep(1.3)
    assert (
        await client.post("/auth/login", data={"username": user["username"], "password": PASSWORD})
    ).status_code == 200


@pytest.mark.postgres
@pytest.mark.parametrize("settings_overrides", [THROTTLE], ids=["user-limit-3"])
async def test_api2_the_throttle_is_shared_by_every_worker(client, make_user, settings: Settings):
    """Failures counted by one worker process block the next attempt at another (state is in the database)."""
    user, _ = await make_user(Role.user)
    second = create_app(settings)
    async with LifespanManager(second):
        transport = httpx.ASGITransport(app=second, client=("127.0.0.1", 50001))
        async with httpx.AsyncClient(transport=transport, base_url="http://worker2") as other_worker:
            assert await _fail(client, user["username"], 2) == [401, 401]
            assert await _fail(other_worker, user["username"]) == [401]
            assert await _fail(client, user["username"]) == [429]
            assert await _fail(other_worker, user["username"]) == [429]


@pytest.mark.parametrize(
    "settings_overrides",
    [{"login_max_failures_per_user": 5, "login_max_failures_per_ip": 50, "login_window_seconds": 60}],
    ids=["user-limit-5"],
)
@pytest.mark.postgres
async def test_api2_a_burst_of_parallel_guesses_is_still_throttled(client, make_user):
    user, _ = await make_user(Role.user)
    codes = await asyncio.gather(
        *(client.post("/auth/login", data={"username": user["username"], "password": f"guess-{i}"}) for i in range(12))
    )
    codes = [r.status_code for r in codes]
    assert set(codes) <= {401, 429} and codes.count(429) >= 1, codes
    assert (
        await client.post("/auth/login", data={"username": user["username"], "password": PASSWORD})
    ).status_code == 429


@pytest.mark.parametrize(
    "settings_overrides",
    [{"login_max_failures_per_user": 100, "login_max_failures_per_ip": 2, "login_window_seconds": 60}],
    ids=["ip-limit-2"],
)
async def test_api2_refused_attempts_do_not_keep_an_address_blocked(client, app, make_user):
    """Logins still hashing hold the address's budget; the 429s they cause are no guesses and count for nothing.

    Counted, every retry while refused would keep the address blocked for the whole window
    after the logins in flight succeed, as an office behind one address would see at 9 a.m.
    """
    first, _ = await make_user(Role.user)
    second, _ = await make_user(Role.user)
    third, _ = await make_user(Role.user)
    hashing_busy = threading.Event()
    hashing_pool = _hashing_pool()
    blockers = [hashing_pool.submit(hashing_busy.wait, 30) for _ in range(os.cpu_count() or 1)]
    try:
        in_flight = [
            asyncio.create_task(client.post("/auth/login", data={"username": user["username"], "password": PASSWORD}))
            for user in (first, second)
        ]
        async with app.state.database.sessionmaker() as session:
            for _ in range(500):  # until both have been counted and wait for the hashing threads
                counted = (
                    await session.execute(select(LoginFailure.failures).where(LoginFailure.key == "ip:127.0.0.1"))
                ).scalar_one_or_none()
                if counted == 2:
                    break
                await asyncio.sleep(0.01)
            assert counted == 2
        for _ in range(3):
            refused = await client.post("/auth/login", data={"username": third["username"], "password": PASSWORD})
            assert refused.status_code == 429
    finally:
        hashing_busy.set()
        for blocker in blockers:
            blocker.result(timeout=30)
    assert [(await task).status_code for task in in_flight] == [200, 200]
    assert (
        await client.post("/auth/login", data={"username": third["username"], "password": PASSWORD})
    ).status_code == 200


# =====================================================================================
# API3:2023 Broken Object Property Level Authorization
# Mass assignment: role, is_active, id, user_id (and the password hash, token version,
# timestamps) can never be written through a body; responses never expose secrets.
# =====================================================================================

PRIVILEGED = {
    "role": "admin",
    "is_active": False,
    "id": 424242,
    "user_id": 1,
    "token_version": 7,
    "hashed_password": "$2b$04$" + "x" * 53,
    "created_at": "2000-01-01T00:00:00Z",
}


async def test_api3_register_cannot_set_privileged_properties(client):
    body = {"email": "mallory@example.com", "username": "mallory", "password": "mallory-pass-1", **PRIVILEGED}
    created = await client.post("/auth/register", json=body)
    assert created.status_code == 201
    user = created.json()
    assert user["role"] == "user" and user["is_active"] is True and user["id"] != PRIVILEGED["id"]
    assert not user["created_at"].startswith("2000")
    # The injected hash did not replace the password either.
    headers = await login_headers(client, "mallory", "mallory-pass-1")
    assert (await client.get("/auth/me", headers=headers)).json()["role"] == "user"


async def test_api3_users_me_cannot_set_privileged_properties(client, make_user):
    user, headers = await make_user(Role.user)
    response = await client.put("/users/me", json={**PRIVILEGED, "full_name": "Still Me"}, headers=headers)
    assert response.status_code == 200
    me = (await client.get("/auth/me", headers=headers)).json()
    assert (me["role"], me["is_active"], me["id"], me["full_name"]) == ("user", True, user["id"], "Still Me")
    # token_version was not bumped (the token still works) and the password is unchanged.
    assert (await client.get("/auth/me", headers=headers)).status_code == 200
    await login_headers(client, user["username"], PASSWORD)


async def test_api3_an_analyst_cannot_promote_themselves_through_users_me(client, make_user):
    _, headers = await make_user(Role.analyst)
    await client.put("/users/me", json={"role": "admin"}, headers=headers)
    assert (await client.get("/admin/stats", headers=headers)).status_code == 403


async def test_api3_profile_bodies_cannot_set_owner_id_or_timestamps(client, make_user):
    owner, headers = await make_user(Role.user)
    victim, victim_headers = await make_user(Role.user)
    created = await client.post(
        "/profiles/",
        json={**PROFILE, **PRIVILEGED, "user_id": victim["id"], "cluster": 3, "cluster_name": "VIP"},
        headers=headers,
    )
    assert created.status_code == 201
    profile = created.json()
    assert profile["user_id"] == owner["id"] and profile["id"] != PRIVILEGED["id"]
    assert profile["cluster"] is None and profile["cluster_name"] is None
    assert not profile["created_at"].startswith("2000")
    updated = await client.put(
        f"/profiles/{profile['id']}", json={"user_id": victim["id"], "id": 1, "notes": "moved?"}, headers=headers
    )
    assert updated.status_code == 200
    assert updated.json()["user_id"] == owner["id"] and updated.json()["id"] == profile["id"]
    assert (await client.get("/profiles/", headers=victim_headers)).json() == []


async def test_api3_admin_role_and_toggle_bodies_change_only_what_they_name(client, make_user, admin_headers):
    user, _ = await make_user(Role.user)
    response = await client.put(
        f"/admin/users/{user['id']}/role",
        json={"role": "analyst", "is_active": False, "username": "renamed", "id": 1},
        headers=admin_headers,
    )
    assert response.status_code == 200
    body = response.json()
    assert (body["role"], body["is_active"], body["username"], body["id"]) == (
        "analyst",
        True,
        user["username"],
        user["id"],
    )


async def test_api3_no_response_ever_carries_a_password_hash_or_token_version(client, make_user, admin_headers):
    user, headers = await make_user(Role.user)
    login = await client.post("/auth/login", data={"username": user["username"], "password": PASSWORD})
    responses = [
        login,
        await client.get("/auth/me", headers=headers),
        await client.get("/users/me/profile", headers=headers),
        await client.put("/users/me", json={"full_name": "x"}, headers=headers),
        await client.get("/users/", headers=admin_headers),
        await client.get(f"/users/{user['id']}", headers=admin_headers),
        await client.get("/admin/users", headers=admin_headers),
        await client.get(f"/admin/users/{user['id']}", headers=admin_headers),
    ]
    for response in responses:
        assert response.status_code == 200
        for secret in ("hashed_password", "$2b$", "token_version", PASSWORD):
            assert secret not in response.text, (response.url, secret)


# =====================================================================================
# API4:2023 Unrestricted Resource Consumption
# Every knob that scales work has a cap, and going over it is a 4xx that says why.
# (The full set, including uploads and the training time limit, is in test_limits.py.)
# =====================================================================================


@pytest.mark.parametrize(
    "path,params",
    [
        ("/history", {"limit": 10_000}),
        ("/profiles/", {"limit": 201}),
        ("/elbow", {"k_max": 16}),
        ("/elbow", {"k_min": 2, "k_max": 10**9}),
    ],
)
async def test_api4_page_sizes_and_k_ranges_are_capped(client, user_headers, path, params):
    response = await client.get(path, params=params, headers=user_headers)
    assert response.status_code == 422
    name = response.json()["errors"][0]["loc"][-1]
    assert name in params and response.json()["detail"].startswith(f"{name}: ")


@pytest.mark.parametrize("settings_overrides", [{"max_json_body_mb": 0.01}], ids=["json-10kb"])
async def test_api4_an_oversized_json_body_is_413_before_it_is_read(client, user_headers):
    huge = {**PROFILE, "notes": "x" * 20_000}
    response = await client.post("/profiles/", json=huge, headers=user_headers)
    assert response.status_code == 413 and "too large" in response.json()["detail"].lower()


async def test_api4_deeply_nested_json_is_rejected_not_crashing(client, user_headers):
    body = "[" * 50_000 + "]" * 50_000
    response = await client.post(
        "/predict/batch", content=body, headers={**user_headers, "Content-Type": "application/json"}
    )
    assert response.status_code in (409, 422)
    assert "Traceback" not in response.text


# =====================================================================================
# API5:2023 Broken Function Level Authorization
# The role gates on every route are exercised in test_gates.py; here, the escalation paths.
# =====================================================================================


async def test_api5_plain_users_cannot_reach_admin_or_analyst_functions(client, make_user):
    victim, _ = await make_user(Role.user)
    _, user = await make_user(Role.user)
    attempts = [
        ("PUT", f"/admin/users/{victim['id']}/role", {"role": "admin"}),
        ("PUT", f"/users/{victim['id']}/role", {"role": "admin"}),
        ("PUT", f"/admin/users/{victim['id']}/toggle-active", None),
        ("DELETE", f"/users/{victim['id']}", None),
        ("GET", "/admin/stats", None),
        ("POST", "/train", None),
        ("POST", "/models/v1/activate", None),
    ]
    for method, path, body in attempts:
        response = await client.request(method, path, json=body, headers=user)
        assert response.status_code == 403, (method, path, response.status_code)


async def test_api5_an_analyst_cannot_manage_users(client, make_user):
    victim, _ = await make_user(Role.user)
    analyst, headers = await make_user(Role.analyst)
    for method, path, body in (
        ("PUT", f"/users/{analyst['id']}/role", {"role": "admin"}),
        ("DELETE", f"/admin/users/{victim['id']}", None),
        ("GET", "/users/", None),
    ):
        assert (await client.request(method, path, json=body, headers=headers)).status_code == 403


async def test_api5_admins_cannot_act_on_themselves(client, make_user):
    admin, headers = await make_user(Role.admin)
    await make_user(Role.admin)  # not the last admin, so only the self-rule applies
    for method, path, body in (
        ("PUT", f"/admin/users/{admin['id']}/role", {"role": "user"}),
        ("PUT", f"/users/{admin['id']}/role", {"role": "user"}),
        ("PUT", f"/admin/users/{admin['id']}/toggle-active", None),
        ("DELETE", f"/admin/users/{admin['id']}", None),
    ):
        assert (await client.request(method, path, json=body, headers=headers)).status_code == 403
    assert (await client.get("/auth/me", headers=headers)).json()["role"] == "admin"


async def test_api5_a_demoted_admin_loses_admin_functions_at_once(client, make_user, admin_headers):
    other, headers = await make_user(Role.admin)
    assert (await client.get("/admin/stats", headers=headers)).status_code == 200
    assert (
        await client.put(f"/admin/users/{other['id']}/role", json={"role": "user"}, headers=admin_headers)
    ).status_code == 200
    assert (await client.get("/admin/stats", headers=headers)).status_code == 403


async def test_api5_unsupported_methods_are_405_not_a_way_around_the_gate(client, user_headers):
    for method, path in (
        ("PATCH", "/users/me"),
        ("PATCH", "/admin/users/1/role"),
        ("PUT", "/admin/stats"),
        ("DELETE", "/models/v1"),
    ):
        response = await client.request(method, path, headers=user_headers)
        assert response.status_code == 405, (method, path)


# =====================================================================================
# API6:2023 Unrestricted Access to Sensitive Business Flows
# The flows that matter here: replacing the served model, and removing the last admin.
# (Login brute force, the other flow worth automating for an attacker, is under API2.)
# =====================================================================================


@pytest.mark.postgres
async def test_api6_two_trainings_at_once_do_not_both_run(client, dataset, analyst_headers):
    first, second = await asyncio.gather(
        client.post("/train", params={"n_clusters": 3}, headers=analyst_headers),
        client.post("/train", params={"n_clusters": 4}, headers=analyst_headers),
    )
    assert sorted([first.status_code, second.status_code]) == [200, 409]


async def test_api6_activating_an_unknown_version_leaves_the_served_model(client, trained_model, analyst_headers):
    for version in ("does-not-exist", "../" * 5 + "etc/passwd", "x" * 64):
        response = await client.post(f"/models/{version}/activate", headers=analyst_headers)
        assert response.status_code in (404, 422)
    assert (await client.get("/")).json()["model_version"] == trained_model["model_version"]


@pytest.mark.postgres
async def test_api6_the_last_admin_cannot_be_removed_by_any_door(client, make_user):
    admin, headers = await make_user(Role.admin)
    assert (await client.delete("/users/me", headers=headers)).status_code == 409
    assert (await client.get("/auth/me", headers=headers)).json()["role"] == "admin"


# =====================================================================================
# API7:2023 Server Side Request Forgery
# The service fetches nothing a client names: no URL or server path parameter exists,
# and path-like values are only ever looked up as database keys.
# =====================================================================================


async def test_api7_no_operation_takes_a_url_or_server_path(client):
    spec = (await client.get("/openapi.json")).json()
    suspicious = ("url", "uri", "path", "file_path", "data_path", "href", "callback", "webhook")
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                assert parameter["name"].lower() not in suspicious, (path, parameter["name"])
                assert parameter.get("schema", {}).get("format") not in ("uri", "url"), (path, parameter["name"])


async def test_api7_path_and_url_values_are_never_fetched_or_opened(client, analyst_headers):
    # Without a dataset the service says it has none: the injected locations were not read.
    response = await client.post(
        "/train", params={"data_path": "/etc/passwd", "url": "http://169.254.169.254/"}, headers=analyst_headers
    )
    assert response.status_code == 409 and "root:" not in response.text
    for version in ("..%2F..%2Fetc%2Fpasswd", "file:%2F%2F%2Fetc%2Fpasswd", "http:%2F%2F169.254.169.254"):
        response = await client.get(f"/models/{version}", headers=analyst_headers)
        assert response.status_code == 404 and "root:" not in response.text


# =====================================================================================
# API8:2023 Security Misconfiguration
# Hardening headers, no caching of anything personal, CORS only for configured origins,
# and errors that never show internals.
# =====================================================================================


async def test_api8_hardening_headers_on_every_kind_of_response(client, user_headers):
    responses = [
        await client.get("/"),
        await client.get("/auth/me"),
        await client.get("/auth/me", headers=user_headers),
        await client.get("/no-such-route"),
        await client.post("/profiles/", json={}, headers=user_headers),
    ]
    for response in responses:
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"


async def test_api8_authenticated_and_token_responses_are_not_stored(client, make_user):
    user, headers = await make_user(Role.user)
    for response in (
        await client.get("/auth/me", headers=headers),
        await client.get("/profiles/", headers=headers),
        await client.get("/auth/me", headers={"Authorization": "Bearer expired-or-bad"}),
        await client.post("/auth/login", data={"username": user["username"], "password": PASSWORD}),
        await client.post("/auth/login", json={"username": user["username"], "password": PASSWORD}),
    ):
        assert "no-store" in response.headers["cache-control"], response.url


ALLOWED_ORIGIN = "http://localhost:5173"


async def test_api8_cors_preflight_from_an_allowed_origin(client):
    response = await client.options(
        "/predict",
        headers={
            "Origin": ALLOWED_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert response.headers["access-control-allow-credentials"] == "true"
    assert "authorization" in response.headers["access-control-allow-headers"].lower()


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "http://localhost:5173.evil.example",
        "null",
        "https://localhost:5173",
        "http://localhost:51730",
    ],
)
async def test_api8_cors_preflight_and_requests_from_other_origins_get_no_grant(client, user_headers, origin):
    preflight = await client.options("/auth/me", headers={"Origin": origin, "Access-Control-Request-Method": "GET"})
    assert preflight.status_code >= 400
    assert "access-control-allow-origin" not in preflight.headers
    # Without a matching Access-Control-Allow-Origin the browser hides the answer from the page.
    actual = await client.get("/auth/me", headers={**user_headers, "Origin": origin})
    assert "access-control-allow-origin" not in actual.headers


@pytest.mark.parametrize("origins", ["*", "http://localhost:5173,*", "https://*.example.com"])
def test_api8_a_wildcard_cors_origin_is_refused_at_startup(tmp_path, origins):
    with pytest.raises(ValueError, match="CORS_ORIGINS"):
        Settings(_env_file=None, secret_key=TEST_SECRET, secret_key_file=tmp_path / "k", cors_origins=origins)


async def test_api8_errors_are_json_without_internals(client, user_headers):
    probes = [
        await client.post(
            "/profiles/", content=b'{"name": ', headers={**user_headers, "Content-Type": "application/json"}
        ),
        await client.post(
            "/profiles/", content=b"\xff\xfe\x00garbage", headers={**user_headers, "Content-Type": "application/json"}
        ),
        await client.post(
            "/predict/batch",
            content=b"--x\r\nbroken",
            headers={**user_headers, "Content-Type": "multipart/form-data; boundary=x"},
        ),
        await client.get("/history", params={"limit": "'; DROP TABLE users; --"}, headers=user_headers),
        await client.get("/no/such/route"),
    ]
    for response in probes:
        assert 400 <= response.status_code < 500, (response.request.url, response.status_code)
        assert response.headers["content-type"].startswith("application/json")
        assert "detail" in response.json()
        for leak in ("Traceback", 'File "', "/app/", "site-packages", "sqlalchemy", "SELECT "):
            assert leak not in response.text, (response.request.url, leak)


# =====================================================================================
# API9:2023 Improper Inventory Management
# Every operation the app serves is documented, and everything but the public three
# demands a token; nothing undocumented hides behind it.
# =====================================================================================

PUBLIC_OPERATIONS = {("GET", "/"), ("POST", "/auth/register"), ("POST", "/auth/login")}


async def test_api9_every_documented_operation_but_the_public_ones_needs_a_token(client):
    spec = (await client.get("/openapi.json")).json()
    checked = 0
    for path, operations in spec["paths"].items():
        concrete = path.replace("{user_id}", "1").replace("{profile_id}", "1").replace("{version}", "v1")
        for method in operations:
            if (method.upper(), path) in PUBLIC_OPERATIONS:
                continue
            response = await client.request(method.upper(), concrete)
            assert response.status_code == 401, (method, path, response.status_code)
            checked += 1
    assert checked >= 25


async def test_api9_the_app_serves_no_undocumented_api_routes(app):
    from fastapi.routing import APIRoute

    spec = app.openapi()
    documented = {(m, p) for p, ops in spec["paths"].items() for m in ops}
    for route in app.routes:
        if isinstance(route, APIRoute) and route.include_in_schema:
            for method in route.methods:
                assert (method.lower(), route.path_format) in documented
    served = [route for route in app.routes if isinstance(route, APIRoute) and route.include_in_schema]
    assert len(served) >= 30  # every router's routes are the app's own, all of them checked above
    hidden = {route.path for route in app.routes if isinstance(route, APIRoute) and not route.include_in_schema}
    assert hidden <= {"/docs", "/docs/oauth2-redirect", "/redoc", "/metrics"}, hidden


# =====================================================================================
# API10:2023 Unsafe Consumption of APIs
# What the service takes in from elsewhere (CSV files from other systems) is validated,
# and what it hands on (CSV for spreadsheets) cannot carry formulas.
# =====================================================================================

HOSTILE_CSVS = {
    "binary": b"\x00\x01\x02\xff\xfe" * 200,
    "utf-16": "Sex,Age,Annual_Income,Spending_Score,Purchase_Frequency\nMale,30,50,50,10\n".encode("utf-16"),
    "no header": b"",
    "only a header": b"Sex,Age,Annual_Income,Spending_Score,Purchase_Frequency\n",
    "wrong columns": b"a,b,c\n1,2,3\n",
    "ragged": b"Sex,Age,Annual_Income,Spending_Score,Purchase_Frequency\nMale,30\nFemale,1,2,3,4,5,6,7\n",
    "huge field": b"Sex,Age,Annual_Income,Spending_Score,Purchase_Frequency\nMale," + b"9" * 200_000 + b",1,1,1\n",
    "unbalanced quote": b'Sex,Age,Annual_Income,Spending_Score,Purchase_Frequency\n"Male,30,50,50,10\n',
}


@pytest.mark.parametrize("kind", list(HOSTILE_CSVS))
async def test_api10_hostile_training_csvs_are_422_and_keep_the_model(client, trained_model, analyst_headers, kind):
    response = await client.post(
        "/train", files={"file": ("data.csv", HOSTILE_CSVS[kind], "text/csv")}, headers=analyst_headers
    )
    assert response.status_code == 422, (kind, response.status_code, response.text[:300])
    assert "Traceback" not in response.text
    assert (await client.get("/")).json()["model_version"] == trained_model["model_version"]


FORMULAS = ['=HYPERLINK("http://evil.example","x")', "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A2)", "\t=1+1", "\r=1+1"]


async def test_api10_batch_csv_output_cannot_carry_spreadsheet_formulas(client, trained_model, user_headers):
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["Name", "Sex", "Age", "Annual_Income", "Spending_Score", "Purchase_Frequency"])
    for formula in FORMULAS:
        writer.writerow([formula, "Male", 30, 50, 50, 10])
    writer.writerow(["=1+1", "=1+1", 30, 50, 50, 10])  # a bad row: its echoed values are neutralised too
    response = await client.post(
        "/predict/batch",
        files={"file": ("in.csv", rows.getvalue().encode(), "text/csv")},
        headers={**user_headers, "Accept": "text/csv"},
    )
    assert response.status_code == 200, response.text
    cells = [cell for row in csv.reader(io.StringIO(response.text)) for cell in row]
    dangerous = [c for c in cells if c[:1] in ("=", "+", "@", "\t", "\r") or (c[:1] == "-" and not _is_number(c))]
    assert dangerous == [], dangerous


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
