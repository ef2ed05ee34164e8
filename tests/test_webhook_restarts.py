"""Webhook deliveries survive a killed server: messages queued while the receiver is down, the server
killed with SIGKILL, started again with the receiver up, and every message arrives, signed.

The server is `uvicorn app.main:app` in a subprocess, as in tests/test_multiprocess.py. Waits poll
until a generous deadline; nothing here measures how long a step takes.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest
from standardwebhooks import Webhook

from generate_dataset import generate
from tests.test_multiprocess import ROOT, Server, environment, free_port, run, wait_for
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.slow

ADMIN = ("admin_wh", "admin-password-1")
ACTIVATIONS = 12


def _env(home: Path) -> dict[str, str]:
    return {
        **environment(home),
        "WEBHOOK_ALLOW_PRIVATE": "true",
        # Two minutes of retries a second apart: the receiver is down for a few seconds only.
        "WEBHOOK_RETRY_SCHEDULE": ",".join(["1"] * 120),
        "WEBHOOK_POLL_SECONDS": "0.2",
        "WEBHOOK_TIMEOUT_SECONDS": "5",
    }


def _deliveries(client: httpx.Client, webhook_id: int) -> list[dict]:
    response = client.get(f"/webhooks/{webhook_id}/deliveries", params={"limit": 200})
    assert response.status_code == 200, response.text
    return response.json()["deliveries"]


def test_messages_queued_before_a_kill_are_all_delivered_after_the_restart(tmp_path):
    env = _env(tmp_path)
    generate(rows=600, seed=3).to_csv(tmp_path / "customers.csv", index=False)
    run(
        env,
        tmp_path,
        str(ROOT / "create_admin.py"),
        "--username",
        ADMIN[0],
        "--password",
        ADMIN[1],
        "--role",
        "admin",
        "--test-username",
        "user_wh",
        "--test-password",
        "user-password-1",
    )
    port = free_port()  # nothing listens there yet: every attempt is refused
    server = Server(tmp_path, env, "first").wait_ready()
    try:
        token = httpx.post(server.url + "/auth/login", data={"username": ADMIN[0], "password": ADMIN[1]}).json()[
            "access_token"
        ]
        with server.client(token) as api:
            hook = api.post("/webhooks", json={"url": f"http://127.0.0.1:{port}/hook", "events": ["model.activated"]})
            assert hook.status_code == 201, hook.text
            webhook_id, secret = hook.json()["id"], hook.json()["secret"]
            trained = api.post("/train", params={"n_clusters": 3})
            assert trained.status_code == 200, trained.text
            version = trained.json()["model_version"]
            for _ in range(ACTIVATIONS - 1):
                assert api.post(f"/models/{version}/activate").status_code == 200
            wait_for(lambda: sum(d["attempts"] >= 1 for d in _deliveries(api, webhook_id)) == ACTIVATIONS)
            queued = _deliveries(api, webhook_id)
            assert all(d["status"] == "pending" for d in queued), queued
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
    finally:
        server.stop()

    with Receiver(port) as receiver:
        again = Server(tmp_path, env, "second").wait_ready()
        try:
            token = httpx.post(again.url + "/auth/login", data={"username": ADMIN[0], "password": ADMIN[1]}).json()[
                "access_token"
            ]
            with again.client(token) as api:
                wait_for(lambda: all(d["status"] == "delivered" for d in _deliveries(api, webhook_id)))
                delivered = _deliveries(api, webhook_id)
        finally:
            again.stop()
        assert len(delivered) == ACTIVATIONS
        arrived = receiver.received("/hook")
        ids = {r.headers["webhook-id"] for r in arrived}
        assert ids == {d["message_id"] for d in delivered}
        for request in arrived:
            headers = {name.lower(): value for name, value in request.headers.items()}
            body = Webhook(secret).verify(request.body, headers)
            assert body["type"] == "model.activated" and body["data"]["model_version"] == version
