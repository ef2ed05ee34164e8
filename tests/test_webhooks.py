"""Webhooks through HTTP: endpoints, secrets, the SSRF guard, and deliveries to a real local receiver,
each signature checked with the `standardwebhooks` package.

The app may deliver to 127.0.0.1 here (WEBHOOK_ALLOW_PRIVATE=true), except in TestAddressGuard, which
runs with the guard on. Retries wait a tenth of a second (WEBHOOK_RETRY_SCHEDULE). Every wait for a
delivery polls until a generous DEADLINE: a busy machine slows these tests down but cannot fail them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import text, update
from standardwebhooks import Webhook

from app.core.tables import Role
from app.webhooks.tables import WebhookEndpoint
from tests.conftest import create_user_direct, login_headers
from tests.webhook_receiver import Received, Receiver

DEADLINE = 60.0


@pytest.fixture
def settings_overrides() -> dict:
    return {"webhook_allow_private": True, "webhook_retry_schedule": "0.1,0.1", "webhook_poll_seconds": 0.1}


@pytest.fixture
def receiver():
    with Receiver() as running:
        yield running


async def eventually(check: Callable[[], Awaitable[Any]], what: str, deadline: float = DEADLINE) -> Any:
    """Poll `check` until it returns something true; fail after `deadline` seconds saying `what`."""
    started = time.monotonic()
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() - started > deadline:
            raise AssertionError(f"not within {deadline} s: {what}")
        await asyncio.sleep(0.05)


async def subscribe(client, headers, url: str, events=("model.activated",), **extra) -> dict:
    response = await client.post("/webhooks", json={"url": url, "events": list(events), **extra}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


async def deliveries(client, headers, webhook_id: int, **params) -> dict:
    response = await client.get(f"/webhooks/{webhook_id}/deliveries", params=params, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


async def settled(client, headers, webhook_id: int, n: int) -> list[dict]:
    """The endpoint's deliveries once there are `n` and none is pending any more."""

    async def check():
        found = (await deliveries(client, headers, webhook_id, limit=200))["deliveries"]
        return found if len(found) == n and all(d["status"] != "pending" for d in found) else None

    return await eventually(check, f"{n} deliveries of webhook {webhook_id} settled")


def verified(secret: str, request: Received) -> dict:
    """The body, after standardwebhooks has checked its signature with `secret`."""
    headers = {name.lower(): value for name, value in request.headers.items()}
    return Webhook(secret).verify(request.body, headers)


async def activate(client, headers, version: str) -> None:
    response = await client.post(f"/models/{version}/activate", headers=headers)
    assert response.status_code == 200, response.text


# --- endpoints -----------------------------------------------------------------------------------


@pytest.mark.postgres
async def test_create_list_edit_delete(client, admin_headers, receiver):
    created = await subscribe(client, admin_headers, receiver.url(), events=["model.activated", "drift.changed"])
    assert created["secret"].startswith("whsec_")
    assert len(base64.b64decode(created["secret"].removeprefix("whsec_"))) == 24
    assert created["active"] is True and created["events"] == ["model.activated", "drift.changed"]
    webhook_id = created["id"]

    shown = (await client.get(f"/webhooks/{webhook_id}", headers=admin_headers)).json()
    assert "secret" not in shown and shown == {k: v for k, v in created.items() if k != "secret"}
    listed = (await client.get("/webhooks", headers=admin_headers)).json()
    assert listed["total"] == 1 and listed["webhooks"] == [shown]
    assert created["secret"] not in json.dumps(listed)

    patched = await client.patch(
        f"/webhooks/{webhook_id}",
        json={"url": receiver.url("/other"), "events": ["run.completed"], "active": False},
        headers=admin_headers,
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["url"] == receiver.url("/other")
    assert patched.json()["events"] == ["run.completed"] and patched.json()["active"] is False
    assert "secret" not in patched.json()

    bad = await client.patch(f"/webhooks/{webhook_id}", json={"events": ["no.such"]}, headers=admin_headers)
    assert bad.status_code == 422 and "events" in bad.json()["detail"]
    bad = await client.patch(f"/webhooks/{webhook_id}", json={"active": None}, headers=admin_headers)
    assert bad.status_code == 422

    assert (await client.delete(f"/webhooks/{webhook_id}", headers=admin_headers)).status_code == 204
    assert (await client.get(f"/webhooks/{webhook_id}", headers=admin_headers)).status_code == 404
    assert (await client.delete(f"/webhooks/{webhook_id}", headers=admin_headers)).status_code == 404
    assert (await client.get(f"/webhooks/{webhook_id}/deliveries", headers=admin_headers)).status_code == 404


async def test_only_admins_manage_webhooks(client, app, admin_headers, analyst_headers, user_headers, receiver):
    created = await subscribe(client, admin_headers, receiver.url())
    calls = [
        ("POST", "/webhooks", {"url": receiver.url(), "events": ["model.activated"]}),
        ("GET", "/webhooks", None),
        ("GET", f"/webhooks/{created['id']}", None),
        ("PATCH", f"/webhooks/{created['id']}", {"active": False}),
        ("DELETE", f"/webhooks/{created['id']}", None),
        ("POST", f"/webhooks/{created['id']}/rotate-secret", None),
        ("GET", f"/webhooks/{created['id']}/deliveries", None),
        ("POST", f"/webhooks/{created['id']}/deliveries/msg_x/retry", None),
    ]
    for method, path, body in calls:
        for headers in (analyst_headers, user_headers):
            response = await client.request(method, path, json=body, headers=headers)
            assert response.status_code == 403, (method, path, response.text)
        response = await client.request(method, path, json=body)
        assert response.status_code == 401, (method, path)
    assert (await client.get(f"/webhooks/{created['id']}", headers=admin_headers)).json()["active"] is True


@pytest.mark.postgres
async def test_the_secret_is_stored_encrypted(client, app, admin_headers, receiver):
    created = await subscribe(client, admin_headers, receiver.url())
    rotated = (await client.post(f"/webhooks/{created['id']}/rotate-secret", headers=admin_headers)).json()
    async with app.state.database.engine.connect() as conn:
        stored = (await conn.execute(text("SELECT secret, previous_secret FROM webhook_endpoints"))).one()
    for secret in (created["secret"], rotated["secret"]):
        key = secret.removeprefix("whsec_")
        for column in stored:
            assert key not in column and base64.b64decode(key).hex() not in column
    assert rotated["secret"] != created["secret"] and rotated["id"] == created["id"]


class TestAddressGuard:
    @pytest.fixture
    def settings_overrides(self) -> dict:
        return {"webhook_allow_private": False}

    REFUSED = [
        "http://127.0.0.1/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://172.16.5.5:8080/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[::ffff:a00:1]/hook",
        "http://[::1]/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://100.64.0.1/hook",
        "http://0.0.0.0/hook",
        "http://224.0.0.1/hook",
        "http://[fe80::1]/hook",
        "http://[fc00::1]/hook",
        "http://[64:ff9b::7f00:1]/hook",
        "http://localhost:8000/hook",
        "http://LOCALHOST./hook",
        "ftp://example.com/hook",
        "file:///etc/passwd",
        "not a url",
        "http:///hook",
        "http://example.com:99999/",
        "http://xn--a.com/",
    ]

    @pytest.mark.parametrize("url", REFUSED)
    async def test_a_url_that_is_not_global_http_is_refused(self, client, admin_headers, url):
        response = await client.post(
            "/webhooks", json={"url": url, "events": ["model.activated"]}, headers=admin_headers
        )
        assert response.status_code == 422, response.text
        assert response.json()["detail"].startswith("url:")

    async def test_patch_checks_the_url_too(self, client, admin_headers):
        created = await subscribe(client, admin_headers, "http://93.184.215.14/hook")
        response = await client.patch(
            f"/webhooks/{created['id']}", json={"url": "http://127.0.0.1:9/x"}, headers=admin_headers
        )
        assert response.status_code == 422, response.text
        shown = (await client.get(f"/webhooks/{created['id']}", headers=admin_headers)).json()
        assert shown["url"] == "http://93.184.215.14/hook"

    async def test_a_url_refused_at_delivery_fails_the_message(self, app, client, admin_headers, receiver):
        # Subscribed while allowed (a closed network), then the guard is turned on: delivery refuses it.
        app.state.settings.webhook_allow_private = True
        created = await subscribe(client, admin_headers, receiver.url())
        app.state.settings.webhook_allow_private = False
        await queue(app, "model.activated", {"n": 1})
        [failed] = await settled(client, admin_headers, created["id"], 1)
        assert failed["status"] == "failed" and failed["attempts"] == 1
        assert "127.0.0.1" in failed["last_error"] and "loopback" in failed["last_error"]
        assert receiver.received() == []


async def queue(app, event: str, data: dict, segmentation_id: int | None = None) -> None:
    """Queue an event the way a domain does: in a transaction of its own, through app.state.events."""
    async with app.state.database.sessionmaker() as session:
        await app.state.events.add(session, event, data, segmentation_id=segmentation_id)
        await session.commit()


# --- deliveries ----------------------------------------------------------------------------------


@pytest.mark.postgres
async def test_activations_are_delivered_signed_with_previous_version_and_who(
    client, app, dataset, make_user, admin_headers, receiver
):
    analyst, analyst_headers = await make_user(Role.analyst)
    hook = await subscribe(client, admin_headers, receiver.url())
    ignored = await subscribe(client, admin_headers, receiver.url("/runs"), events=["run.completed"])
    first = await client.post("/train", params={"n_clusters": 3}, headers=analyst_headers)
    assert first.status_code == 200, first.text
    second = await client.post("/train", params={"n_clusters": 4, "wait": "false"}, headers=analyst_headers)
    assert second.status_code == 202, second.text
    job = second.json()

    async def job_done():
        body = (await client.get(f"/jobs/{job['job_id']}", headers=analyst_headers)).json()
        return body if body["state"] not in ("queued", "running") else None

    finished = await eventually(job_done, "the training job finished")
    assert finished["state"] == "succeeded", finished
    v1, v2 = first.json()["model_version"], finished["result"]["model_version"]
    await activate(client, analyst_headers, v1)  # a rollback
    await activate(client, analyst_headers, v1)

    shown = await settled(client, admin_headers, hook["id"], 4)
    assert all(d["status"] == "delivered" and d["attempts"] == 1 for d in shown)
    assert all(d["event"] == "model.activated" and d["delivered_at"] for d in shown)
    bodies = [verified(hook["secret"], r) for r in receiver.received("/ok")]
    by = {"type": "user", "id": analyst["id"], "name": analyst["username"]}
    assert [b["data"] for b in bodies] == [
        {"segmentation": "default", "model_version": v1, "previous_version": None, "by": by},
        {"segmentation": "default", "model_version": v2, "previous_version": v1, "by": by},
        {"segmentation": "default", "model_version": v1, "previous_version": v2, "by": by},
        {"segmentation": "default", "model_version": v1, "previous_version": v1, "by": by},
    ]
    assert all(b["type"] == "model.activated" and b["timestamp"] for b in bodies)
    ids = [r.headers["webhook-id"] for r in receiver.received("/ok")]
    assert [d["message_id"] for d in shown] == ids[::-1]  # newest first
    assert receiver.received("/runs") == []
    assert (await deliveries(client, admin_headers, ignored["id"]))["total"] == 0
    page = await deliveries(client, admin_headers, hook["id"], skip=1, limit=2)
    assert page["total"] == 4 and [d["message_id"] for d in page["deliveries"]] == ids[::-1][1:3]


async def test_a_failed_activation_queues_nothing(client, app, trained_model, admin_headers, analyst_headers, receiver):
    hook = await subscribe(client, admin_headers, receiver.url())
    assert (await client.post("/models/no-such/activate", headers=analyst_headers)).status_code == 404
    await activate(client, analyst_headers, trained_model["model_version"])
    [one] = await settled(client, admin_headers, hook["id"], 1)
    assert one["status"] == "delivered"


@pytest.mark.postgres
async def test_after_a_rotation_both_secrets_sign_for_a_day(client, app, admin_headers, receiver):
    hook = await subscribe(client, admin_headers, receiver.url(), events=["run.completed"])
    await queue(app, "run.completed", {"run_id": 1})
    await settled(client, admin_headers, hook["id"], 1)
    rotated = (await client.post(f"/webhooks/{hook['id']}/rotate-secret", headers=admin_headers)).json()
    await queue(app, "run.completed", {"run_id": 2})
    await settled(client, admin_headers, hook["id"], 2)
    before, after = receiver.received()
    assert len(before.headers["webhook-signature"].split()) == 1
    assert len(after.headers["webhook-signature"].split()) == 2
    assert verified(hook["secret"], before)["data"] == {"run_id": 1}
    for secret in (hook["secret"], rotated["secret"]):
        assert verified(secret, after)["data"] == {"run_id": 2}
    with pytest.raises(Exception, match="(?i)signature"):
        verified(rotated["secret"], before)

    # A day later the old secret no longer signs.
    async with app.state.database.sessionmaker() as session:
        await session.execute(update(WebhookEndpoint).values(previous_secret_until=datetime(2000, 1, 1, tzinfo=UTC)))
        await session.commit()
    await queue(app, "run.completed", {"run_id": 3})
    await settled(client, admin_headers, hook["id"], 3)
    latest = receiver.received()[-1]
    assert len(latest.headers["webhook-signature"].split()) == 1
    assert verified(rotated["secret"], latest)["data"] == {"run_id": 3}


@pytest.mark.postgres
async def test_failures_are_retried_on_the_schedule_then_fail(client, app, admin_headers, receiver):
    receiver.answers["/flaky"] = [500, 503, 200]
    receiver.answers["/down"] = 500
    receiver.long_error_body = True
    flaky = await subscribe(client, admin_headers, receiver.url("/flaky"), events=["run.completed"])
    down = await subscribe(client, admin_headers, receiver.url("/down"), events=["run.completed"])
    await queue(app, "run.completed", {"run_id": 7})

    [recovered] = await settled(client, admin_headers, flaky["id"], 1)
    assert recovered["status"] == "delivered" and recovered["attempts"] == 3
    assert recovered["last_status_code"] == 200 and recovered["last_error"] is None
    [failed] = await settled(client, admin_headers, down["id"], 1)
    assert failed["status"] == "failed" and failed["attempts"] == 3  # the first, then one per delay
    assert failed["last_status_code"] == 500 and failed["next_attempt_at"] is None
    assert failed["last_error"].startswith("HTTP 500") and len(failed["last_error"]) <= 300

    attempts = receiver.received("/flaky")
    assert len({r.headers["webhook-id"] for r in attempts}) == 1  # the same message id every time
    assert all(verified(flaky["secret"], r)["data"] == {"run_id": 7} for r in attempts)
    assert len(receiver.received("/down")) == 3

    # A manual retry queues it again with the whole schedule ahead; a pending one cannot be retried.
    receiver.answers["/down"] = [500, 200]
    retry = await client.post(f"/webhooks/{down['id']}/deliveries/{failed['message_id']}/retry", headers=admin_headers)
    assert retry.status_code == 202, retry.text
    assert retry.json()["status"] == "pending"
    [again] = await settled(client, admin_headers, down["id"], 1)
    assert again["status"] == "delivered" and again["attempts"] == 5
    delivered_again = await client.post(
        f"/webhooks/{down['id']}/deliveries/{failed['message_id']}/retry", headers=admin_headers
    )
    assert delivered_again.status_code == 202
    await eventually(lambda: _count(receiver, "/down", 6), "the delivered message sent again")
    unknown = await client.post(f"/webhooks/{down['id']}/deliveries/msg_nope/retry", headers=admin_headers)
    assert unknown.status_code == 404


async def _count(receiver: Receiver, path: str, n: int) -> bool:
    return len(receiver.received(path)) >= n


async def test_a_pending_message_cannot_be_retried(client, app, admin_headers, receiver, settings):
    settings.webhook_retry_schedule = "3600"
    receiver.answers["/down"] = 500
    hook = await subscribe(client, admin_headers, receiver.url("/down"), events=["run.completed"])
    await queue(app, "run.completed", {"run_id": 1})

    async def retried_later():
        found = (await deliveries(client, admin_headers, hook["id"]))["deliveries"]
        return found[0] if found and found[0]["attempts"] == 1 else None

    pending = await eventually(retried_later, "the first attempt")
    assert pending["status"] == "pending" and pending["next_attempt_at"] is not None
    response = await client.post(
        f"/webhooks/{hook['id']}/deliveries/{pending['message_id']}/retry", headers=admin_headers
    )
    assert response.status_code == 409


async def test_redirects_are_not_followed(client, app, admin_headers, receiver, settings):
    settings.webhook_retry_schedule = ""
    hook = await subscribe(client, admin_headers, receiver.url("/redirect"), events=["run.completed"])
    await queue(app, "run.completed", {"run_id": 1})
    [failed] = await settled(client, admin_headers, hook["id"], 1)
    assert failed["status"] == "failed" and failed["last_status_code"] == 302
    assert len(receiver.received("/redirect")) == 1 and receiver.received("/ok") == []


@pytest.mark.postgres
async def test_a_410_disables_the_endpoint_and_fails_its_pending_messages(
    client, app, admin_headers, receiver, settings
):
    settings.webhook_retry_schedule = "3600"
    receiver.answers["/hook"] = [500, 410]
    hook = await subscribe(client, admin_headers, receiver.url("/hook"), events=["run.completed"])
    await queue(app, "run.completed", {"run_id": 1})

    async def waiting():
        found = (await deliveries(client, admin_headers, hook["id"]))["deliveries"]
        return found if found and found[0]["attempts"] == 1 else None

    await eventually(waiting, "the first attempt failed")
    await queue(app, "run.completed", {"run_id": 2})
    found = await settled(client, admin_headers, hook["id"], 2)
    gone, waited = found
    assert gone["last_status_code"] == 410 and gone["status"] == "failed"
    assert waited["status"] == "failed" and waited["last_error"] == "endpoint disabled"
    assert (await client.get(f"/webhooks/{hook['id']}", headers=admin_headers)).json()["active"] is False
    await queue(app, "run.completed", {"run_id": 3})  # no longer subscribed
    assert (await deliveries(client, admin_headers, hook["id"]))["total"] == 2


@pytest.mark.postgres
async def test_deleting_a_segmentation_deletes_its_pending_messages(client, app, admin_headers, receiver, settings):
    settings.webhook_retry_schedule = "3600"
    receiver.answers["/down"] = 500
    hook = await subscribe(client, admin_headers, receiver.url("/down"), events=["run.completed"])
    response = await client.post("/segmentations", json={"name": "crm", "kind": "customer"}, headers=admin_headers)
    assert response.status_code == 201, response.text
    crm = app.state.segmentations.stores()[-1].segmentation
    await queue(app, "run.completed", {"run_id": 1}, segmentation_id=crm.id)
    await queue(app, "run.completed", {"run_id": 2}, segmentation_id=None)
    await eventually(
        lambda: _attempted(client, admin_headers, hook["id"], 2), "both messages tried once and left pending"
    )
    assert (await client.delete("/segmentations/crm", headers=admin_headers)).status_code == 204
    left = (await deliveries(client, admin_headers, hook["id"]))["deliveries"]
    assert len(left) == 1
    async with app.state.database.engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM webhook_messages"))).scalar_one() == 1


async def _attempted(client, headers, webhook_id: int, n: int) -> bool:
    found = (await deliveries(client, headers, webhook_id))["deliveries"]
    return len(found) == n and all(d["attempts"] >= 1 for d in found)


async def test_an_unanswering_endpoint_times_out(client, app, admin_headers, settings):
    import socket

    settings.webhook_retry_schedule = ""
    settings.webhook_timeout_seconds = 0.5
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        hook = await subscribe(client, admin_headers, f"http://127.0.0.1:{port}/", events=["run.completed"])
        await queue(app, "run.completed", {"run_id": 1})
        [failed] = await settled(client, admin_headers, hook["id"], 1)
    assert failed["status"] == "failed" and failed["last_status_code"] is None
    assert "0.5 s" in failed["last_error"]


async def test_another_admin_sees_the_same_webhooks(client, app, admin_headers, receiver):
    hook = await subscribe(client, admin_headers, receiver.url(), description="crm sync")
    other = await create_user_direct(app, role=Role.admin)
    headers = await login_headers(client, other["username"])
    listed = (await client.get("/webhooks", headers=headers)).json()
    assert [w["id"] for w in listed["webhooks"]] == [hook["id"]]
    assert listed["webhooks"][0]["description"] == "crm sync"


@pytest.mark.postgres
async def test_two_workers_sharing_the_queue_send_each_message_once(client, app, settings, admin_headers, receiver):
    from asgi_lifespan import LifespanManager

    from app.main import create_app

    hook = await subscribe(client, admin_headers, receiver.url(), events=["run.completed"])
    other = create_app(settings)
    async with LifespanManager(other, startup_timeout=60, shutdown_timeout=30):
        for run_id in range(60):
            await queue(app if run_id % 2 else other, "run.completed", {"run_id": run_id})
        found = await settled(client, admin_headers, hook["id"], 60)
    assert all(d["status"] == "delivered" and d["attempts"] == 1 for d in found)
    ids = [r.headers["webhook-id"] for r in receiver.received()]
    assert sorted(ids) == sorted(d["message_id"] for d in found)  # each one exactly once
    assert sorted(verified(hook["secret"], r)["data"]["run_id"] for r in receiver.received()) == list(range(60))


async def test_a_named_host_is_reached_at_its_checked_address_with_its_own_host_header(
    client, app, admin_headers, receiver
):
    hook = await subscribe(client, admin_headers, f"http://localhost:{receiver.port}/ok", events=["run.completed"])
    await queue(app, "run.completed", {"run_id": 1})
    [sent] = await settled(client, admin_headers, hook["id"], 1)
    assert sent["status"] == "delivered", sent
    [request] = receiver.received()
    assert {k.lower(): v for k, v in request.headers.items()}["host"] == f"localhost:{receiver.port}"
    assert verified(hook["secret"], request)["data"] == {"run_id": 1}


async def test_a_secret_sealed_under_another_key_fails_its_deliveries(client, app, admin_headers, receiver):
    from app.webhooks.crypto import SecretBox

    hook = await subscribe(client, admin_headers, receiver.url(), events=["run.completed"])
    async with app.state.database.sessionmaker() as session:
        sealed = SecretBox("another-secret-key-of-enough-length-000000").seal("whsec_AAAA")
        await session.execute(update(WebhookEndpoint).values(secret=sealed))
        await session.commit()
    await queue(app, "run.completed", {"run_id": 1})
    [failed] = await settled(client, admin_headers, hook["id"], 1)
    assert failed["status"] == "failed" and "rotate" in failed["last_error"]
    assert receiver.received() == []
