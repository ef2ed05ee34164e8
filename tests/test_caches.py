"""The in-process caches are bounded and keep plain values, never ORM objects."""

from __future__ import annotations

import dataclasses

import pytest

from app.auth.service import AuthCache, Caller
from app.core.tables import Base, Role
from app.segmentations.elbow import ElbowCache


async def test_the_auth_cache_keeps_plain_callers_within_its_bound_and_every_token_still_works(app, client, make_user):
    app.state.auth_cache = cache = AuthCache(ttl=app.state.settings.auth_cache_seconds, max_entries=3)
    users = [await make_user(Role.user) for _ in range(5)]
    for _ in range(2):
        for user, headers in users:
            response = await client.get("/auth/me", headers=headers)
            assert response.status_code == 200, response.text
            assert response.json()["username"] == user["username"]
            assert "hashed_password" not in response.text
    for table in (cache._entries, cache._claims, cache._passed):
        assert 0 < len(table) <= 3
    kept = [entry[1] for entry in cache._entries.values()] + [entry.caller for entry in cache._passed.values()]
    for caller in kept:
        assert isinstance(caller, Caller) and not isinstance(caller, Base)
        assert "hashed_password" not in {field.name for field in dataclasses.fields(caller)}
        with pytest.raises(dataclasses.FrozenInstanceError):
            caller.role = Role.admin.value  # type: ignore[misc]


async def test_a_role_change_reaches_a_cached_caller_at_once(client, make_user, admin_headers):
    user, headers = await make_user(Role.user)
    assert (await client.get("/models", headers=headers)).status_code == 403
    promoted = await client.put(f"/users/{user['id']}/role", json={"role": "analyst"}, headers=admin_headers)
    assert promoted.status_code == 200, promoted.text
    # The same token passed the check as a `user` a moment ago: the new role applies at once,
    # not when the cached caller expires.
    assert (await client.get("/models", headers=headers)).status_code == 200
    demoted = await client.put(f"/users/{user['id']}/role", json={"role": "user"}, headers=admin_headers)
    assert demoted.status_code == 200, demoted.text
    assert (await client.get("/models", headers=headers)).status_code == 403


async def test_the_elbow_cache_keeps_at_most_its_bound_and_answers_evicted_ranges_the_same(settings, dataset):
    cache = ElbowCache(settings, max_entries=2)
    ranges = [(2, 4), (2, 5), (3, 6)]
    first = {k: await cache.get_json(*k) for k in ranges}
    assert len(cache._entries) == 2
    assert not cache._locks  # nothing is left behind once a computation is done
    for k in ranges:
        assert await cache.get_json(*k) == first[k]
    assert len(cache._entries) == 2
