"""A run killed with kill -9 half-way: the previous customer base stays, and the run shows failed."""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from generate_dataset import generate
from tests.test_multiprocess import ANALYST, DEADLINE, Server, login, prepare, wait_for

pytestmark = pytest.mark.slow


def customers(rows: int, seed: int) -> bytes:
    frame = generate(rows=rows, seed=seed)
    frame["CustomerID"] = [f"K{i:07d}" for i in range(rows)]
    return frame.to_csv(index=False).encode()


def audience_size(client: httpx.Client, n_clusters: int) -> int:
    total = 0
    for cluster in range(n_clusters):
        answer = client.get(f"/segmentations/default/segments/{cluster}/customers", headers={"Accept": "text/csv"})
        assert answer.status_code == 200, answer.text
        total += answer.text.count("\n") - 1
    return total


def test_a_run_killed_mid_way_leaves_the_previous_base_and_is_failed_at_restart(tmp_path):
    env = prepare(tmp_path)
    small = customers(2000, 1)
    server = Server(tmp_path, env, "first").wait_ready()
    try:
        with server.client(login(server, ANALYST)) as api:
            trained = api.post("/train", params={"n_clusters": 4})
            assert trained.status_code == 200, trained.text
            first = api.post("/segmentations/default/runs", files={"file": ("c.csv", small, "text/csv")})
            assert first.status_code == 200 and first.json()["status"] == "completed", first.text
            big = customers(300_000, 2)
            started = api.post(
                "/segmentations/default/runs", params={"wait": "false"}, files={"file": ("c.csv", big, "text/csv")}
            )
            assert started.status_code == 202, started.text
            run_id = started.json()["run_id"]

            def scored() -> bool:
                state = api.get(f"/segmentations/default/runs/{run_id}").json()
                assert state["status"] == "running", state  # still mid-way when it is killed
                return state["n_customers"] is not None

            wait_for(scored, interval=0.02)  # scored and being written: now the process dies
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=DEADLINE)
    finally:
        server.stop()

    again = Server(tmp_path, env, "second").wait_ready()
    try:
        with again.client(login(again, ANALYST)) as api:
            killed = api.get(f"/segmentations/default/runs/{run_id}").json()
            assert killed["status"] == "failed" and "stopped" in killed["error"]["detail"]
            runs = api.get("/segmentations/default/runs").json()["runs"]
            assert [(r["run_id"], r["status"]) for r in runs] == [(run_id, "failed"), (1, "completed")]
            one = api.get("/segmentations/default/customers/K0000001").json()
            assert one["status"] == "active" and one["since_run_id"] == 1
            assert api.get("/segmentations/default/customers/K0100000").status_code == 404
            assert audience_size(api, 4) == 2000
            third = api.post("/segmentations/default/runs", files={"file": ("c.csv", small, "text/csv")})
            assert third.status_code == 200, third.text
            body = third.json()
            assert body["previous_run_id"] == 1 and (body["n_unchanged"], body["n_new"]) == (2000, 0)
    finally:
        again.stop()
