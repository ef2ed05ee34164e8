"""Retraining policies across real processes: two servers on one database each run the scheduler, are
killed (-9) between two occurrences and started again, and each due occurrence fires exactly once; a
server killed while it carries out a fire leaves a failed event for it, written when a worker starts.

The servers are `uvicorn app.main:app` subprocesses (tests/test_multiprocess.py's Server). Their
scheduler reads its clock from a file (TESTING=true, TEST_SCHEDULER_CLOCK_FILE), so the test moves
the clock past an occurrence and polls, with a generous deadline, for the fire that follows. Both
schedulers tick every 10 ms, so their reads of a due policy overlap again and again: a claim that
let both workers through would fire twice here (a 0.2 s tick hides it most of the time).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from generate_dataset import generate
from tests.test_multiprocess import ANALYST, ROOT, Server, _training_child, login, prepare, run, wait_for

pytestmark = pytest.mark.slow

ADMIN = ("admin_mp", "admin-password-1")
DEADLINE = 240.0
# Scheduler ticks every 10 ms: this many seconds after a fire, both workers have looked again many times.
SETTLE_SECONDS = 2.0


def start_pair(home: Path, env: dict[str, str]) -> list[Server]:
    servers = [Server(home, env, f"a{time.monotonic_ns()}"), Server(home, env, f"b{time.monotonic_ns()}")]
    for server in servers:
        server.wait_ready()
    return servers


def kill(servers: list[Server]) -> None:
    for server in servers:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()


def policy_events(http: httpx.Client) -> list[dict]:
    answer = http.get("/segmentations/default/policy/events", params={"limit": 100})
    assert answer.status_code == 200, answer.text
    return answer.json()["events"]


def wait_for_events(http: httpx.Client, n: int) -> list[dict]:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        got = policy_events(http)
        if len(got) >= n:
            return got
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} policy events after {DEADLINE} s: {policy_events(http)}")


def prepare_with_source(home: Path, rows: int, **extra: str) -> dict[str, str]:
    """tests/test_multiprocess.py's accounts and dataset, an admin, a CRM export of `rows` customers
    under SOURCE_ROOT and an active version at k=4: the environment of the servers."""
    env = prepare(home)
    run(env, home, str(ROOT / "create_admin.py"), "--username", ADMIN[0], "--password", ADMIN[1], "--no-test-user")
    sources = home / "sources"
    sources.mkdir()
    generate(rows=rows, seed=7).to_csv(sources / "crm.csv", index=False)
    env = {**env, "SOURCE_ROOT": str(sources), **extra}
    run(env, home, "-m", "app", "train", "--k", "4")
    return env


def test_each_due_occurrence_fires_once_across_two_processes_and_a_kill(tmp_path):
    clock = tmp_path / "clock"
    clock.write_text("2026-01-15T12:00:00+00:00")
    env = prepare_with_source(
        tmp_path, 800, TESTING="true", TEST_SCHEDULER_CLOCK_FILE=str(clock), POLICY_TICK_SECONDS="0.01"
    )

    servers = start_pair(tmp_path, env)
    a, b = servers
    with a.client(login(a, ADMIN)) as admin, b.client(login(b, ANALYST)) as analyst:
        made = admin.post("/sources", json={"name": "crm", "kind": "file", "path": "crm.csv"})
        assert made.status_code == 201, made.text
        body = {"source": "crm", "schedule": "0 3 1 * *", "then_run": False}
        put = analyst.put("/segmentations/default/policy", json=body)
        assert put.status_code == 200, put.text
        assert put.json()["next_fire_at"].startswith("2026-02-01T03:00")

        clock.write_text("2026-02-01T03:00:05+00:00")  # both schedulers see February's occurrence
        first = wait_for_events(analyst, 1)
        time.sleep(SETTLE_SECONDS)
        assert len(policy_events(analyst)) == 1
    assert first[0]["trigger"] == "schedule" and first[0]["outcome"] == "activated", first

    # Both processes die between two occurrences; the service stays down through March and April's.
    kill(servers)
    clock.write_text("2026-04-20T00:00:00+00:00")
    servers = start_pair(tmp_path, env)
    a, b = servers
    try:
        with a.client(login(a, ANALYST)) as on_a, b.client(login(b, ANALYST)) as on_b:
            missed = wait_for_events(on_a, 2)  # the missed occurrences coalesce into one fire at start
            time.sleep(SETTLE_SECONDS)
            assert len(policy_events(on_b)) == 2
            policy = on_b.get("/segmentations/default/policy").json()
            assert policy["next_fire_at"].startswith("2026-05-01T03:00"), policy

            clock.write_text("2026-05-01T03:00:05+00:00")
            third = wait_for_events(on_b, 3)
            time.sleep(SETTLE_SECONDS)
            assert len(policy_events(on_a)) == 3
            jobs = on_a.get("/jobs", params={"limit": 100}).json()
    finally:
        for server in servers:
            server.stop()
    assert [e["trigger"] for e in third] == ["schedule"] * 3
    assert missed[0]["outcome"] == third[0]["outcome"] == "activated", third
    # One training job per fire (the first model was trained by the CLI, not as a job), each finished.
    assert jobs["total"] == 3 and [job["state"] for job in jobs["jobs"]] == ["succeeded"] * 3, jobs


def test_a_fire_killed_mid_way_is_a_failed_event_after_the_restart(tmp_path):
    env = prepare_with_source(tmp_path, 300_000)

    server = Server(tmp_path, env, "fire").wait_ready()
    with server.client(login(server, ADMIN)) as admin:
        assert admin.post("/sources", json={"name": "crm", "kind": "file", "path": "crm.csv"}).status_code == 201
        assert admin.put("/segmentations/default/policy", json={"source": "crm", "then_run": False}).status_code == 200
        active = admin.get("/models").json()["active_version"]
        job_id = admin.post("/segmentations/default/policy/trigger").json()["job_id"]
    parent = psutil.Process(server.process.pid)
    wait_for(lambda: _training_child(parent) is not None or server.process.poll() is not None, interval=0.005)
    assert _training_child(parent) is not None, "the fire finished before it could be killed"
    kill([server])

    server = Server(tmp_path, env, "restarted").wait_ready()
    try:
        with server.client(login(server, ANALYST)) as http:
            job = http.get(f"/jobs/{job_id}").json()
            (event,) = policy_events(http)
            policy = http.get("/segmentations/default/policy").json()
            models = http.get("/models").json()
    finally:
        server.stop()
    assert job["state"] == "failed", job
    assert event["trigger"] == "manual" and event["outcome"] == "failed", event
    assert event["reasons"] == ["the worker carrying out the fire stopped before it finished"]
    assert event["job_id"] == job_id
    assert policy["last_outcome"] == "failed"
    assert models["active_version"] == active  # production untouched
