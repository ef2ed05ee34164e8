"""Retraining policies through the API: a trigger trains a candidate on the policy's source, the gate
decides, and the outcome is an event; schedules fire once across workers and restarts.

The scheduler's clock is the time written in a file (a test configuration's setting), so no test
waits for real minutes: it moves the clock and polls, with a generous deadline, for what follows.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from asgi_lifespan import LifespanManager

from app.core.tables import Role
from app.main import create_app
from generate_dataset import generate
from tests.conftest import make_settings
from tests.test_drift import resample, score_csv, training_frame

DEADLINE_SECONDS = 240.0


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "sources"
    folder.mkdir()
    return folder


@pytest.fixture
def clock(tmp_path: Path) -> Path:
    path = tmp_path / "clock"
    path.write_text("2026-01-15T12:00:00+00:00")
    return path


@pytest.fixture
def settings_overrides(root: Path, clock: Path) -> dict:
    return {
        "source_root": root,
        "testing": True,
        "test_scheduler_clock_file": clock,
        "policy_tick_seconds": 0.2,
        "webhook_allow_private": True,
        "drift_flush_seconds": 0.2,
        "drift_bucket_seconds": 1,
        "drift_check_minutes": 0.005,  # 0.3 s of the real clock: the drift checker's interval
    }


def write_customers(root: Path, *, planted: float = 0.0, seed: int = 7) -> None:
    """The CRM export the policy reads; `planted`: that share of customers moved into a new, far segment."""
    frame = generate(rows=800, seed=seed)
    if planted:
        rng = np.random.default_rng(seed)
        rows = rng.choice(len(frame), size=int(planted * len(frame)), replace=False)
        frame.loc[rows, "Age"] = 68
        frame.loc[rows, "Annual_Income"] = 135.0
        frame.loc[rows, "Spending_Score"] = 95
        frame.loc[rows, "Purchase_Frequency"] = 3
    frame.to_csv(root / "crm.csv", index=False)


@pytest.fixture
async def crm(client, root, make_user, trained_model) -> dict[str, str]:
    write_customers(root)
    admin = (await make_user(Role.admin))[1]
    created = await client.post("/sources", json={"name": "crm", "kind": "file", "path": "crm.csv"}, headers=admin)
    assert created.status_code == 201, created.text
    return admin


async def finished(client, headers, job_id: str) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_SECONDS
    while loop.time() < deadline:
        job = (await client.get(f"/jobs/{job_id}", headers=headers)).json()
        if job["state"] not in ("queued", "running"):
            return job
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} still running")


async def events(client, headers) -> list[dict]:
    answer = await client.get("/segmentations/default/policy/events", headers=headers)
    assert answer.status_code == 200, answer.text
    return answer.json()["events"]


async def test_a_candidate_as_good_as_production_is_promoted_and_runs(client, analyst_headers, crm):
    put = await client.put(
        "/segmentations/default/policy", json={"source": "crm", "schedule": "0 3 1 * *"}, headers=analyst_headers
    )
    assert put.status_code == 200, put.text
    assert put.json()["next_fire_at"].startswith("2026-02-01T03:00")
    active_before = (await client.get("/models", headers=analyst_headers)).json()["active_version"]

    trigger = await client.post("/segmentations/default/policy/trigger", headers=analyst_headers)
    assert trigger.status_code == 202, trigger.text
    job = await finished(client, analyst_headers, trigger.json()["job_id"])
    assert job["state"] == "succeeded", job
    result = job["result"]
    assert result["outcome"] == "activated" and result["reasons"] == []
    assert result["figures"]["unchanged"] >= 0.8
    assert result["figures"]["smallest_segment_share"] >= 0.01

    models = (await client.get("/models", headers=analyst_headers)).json()
    assert models["active_version"] == result["model_version"] != active_before
    page = (await client.get("/segmentations/default/policy/events", headers=analyst_headers)).json()
    assert page["total"] == 1
    (event,) = page["events"]
    assert event["trigger"] == "manual" and event["outcome"] == "activated"
    assert event["model_version"] == result["model_version"] and event["figures"] == result["figures"]

    # then_run: the customer base was refreshed from the same source, with the promoted version.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_SECONDS
    while loop.time() < deadline:
        runs = (await client.get("/segmentations/default/runs", headers=analyst_headers)).json()
        if runs["total"] and runs["runs"][0]["status"] != "running":
            break
        await asyncio.sleep(0.2)
    run = runs["runs"][0]
    assert run["status"] == "completed" and run["model_version"] == result["model_version"]
    assert run["n_customers"] == 800

    policy = (await client.get("/segmentations/default/policy", headers=analyst_headers)).json()
    assert policy["last_outcome"] == "activated" and policy["source"] == "crm"

    # Operators see it in /admin/stats and as Prometheus metrics.
    stats = (await client.get("/admin/stats", headers=crm)).json()
    (default,) = [s for s in stats["segmentations"] if s["name"] == "default"]
    assert default["policy"]["last_outcome"] == "activated"
    assert default["policy"]["next_fire_at"].startswith("2026-02-01T03:00")
    outcome = 'segmentation_policy_last_outcome{outcome="activated",segmentation="default"} 1.0'
    deadline = loop.time() + DEADLINE_SECONDS
    while True:
        scraped = (await client.get("/metrics")).text
        if outcome in scraped or loop.time() > deadline:
            break
        await asyncio.sleep(0.2)
    assert outcome in scraped
    assert 'segmentation_policy_next_fire_timestamp{segmentation="default"} 1.7699148e+09' in scraped


async def test_a_candidate_with_a_planted_segment_is_held_and_says_why(client, root, analyst_headers, crm):
    hook = await client.post(
        "/webhooks", json={"url": "http://127.0.0.1:9/hook", "events": ["model.held"]}, headers=crm
    )
    assert hook.status_code == 201, hook.text
    assert (
        await client.put("/segmentations/default/policy", json={"source": "crm"}, headers=analyst_headers)
    ).status_code == 200
    active_before = (await client.get("/models", headers=analyst_headers)).json()["active_version"]
    write_customers(root, planted=0.3)

    trigger = await client.post("/segmentations/default/policy/trigger", headers=analyst_headers)
    job = await finished(client, analyst_headers, trigger.json()["job_id"])
    result = job["result"]
    assert result["outcome"] == "held", result
    assert any("unchanged" in reason for reason in result["reasons"])
    assert result["figures"]["unchanged"] < 0.8
    models = (await client.get("/models", headers=analyst_headers)).json()
    assert models["active_version"] == active_before  # production untouched
    assert result["model_version"] in {m["version"] for m in models["models"]}  # the candidate is kept, inactive
    (event,) = await events(client, analyst_headers)
    assert event["outcome"] == "held" and event["reasons"] == result["reasons"]

    deliveries = (await client.get(f"/webhooks/{hook.json()['id']}/deliveries", headers=crm)).json()["deliveries"]
    assert [d["event"] for d in deliveries] == ["model.held"]
    runs = (await client.get("/segmentations/default/runs", headers=analyst_headers)).json()
    assert runs["total"] == 0  # nothing promoted, nothing run


async def test_on_pass_hold_keeps_a_passing_candidate_inactive(client, analyst_headers, crm):
    body = {"source": "crm", "on_pass": "hold", "then_run": False}
    assert (await client.put("/segmentations/default/policy", json=body, headers=analyst_headers)).status_code == 200
    trigger = await client.post("/segmentations/default/policy/trigger", headers=analyst_headers)
    result = (await finished(client, analyst_headers, trigger.json()["job_id"]))["result"]
    assert result["outcome"] == "held" and any("on_pass is hold" in r for r in result["reasons"])


async def test_a_trigger_while_a_training_runs_is_a_failed_event_and_still_202(app, client, analyst_headers, crm):
    assert (
        await client.put("/segmentations/default/policy", json={"source": "crm"}, headers=analyst_headers)
    ).status_code == 200
    active_before = (await client.get("/models", headers=analyst_headers)).json()["active_version"]
    store = await app.state.segmentations.get("default")
    turn = await store.reserve_training()  # what a training of this segmentation, on any worker, holds
    try:
        trigger = await client.post("/segmentations/default/policy/trigger", headers=analyst_headers)
        assert trigger.status_code == 202, trigger.text
        job = await finished(client, analyst_headers, trigger.json()["job_id"])
    finally:
        await store.release_training(turn)
    assert job["state"] == "failed" and "training of this segmentation was running" in job["error"]["detail"], job
    (event,) = await events(client, analyst_headers)
    assert event["outcome"] == "failed" and event["trigger"] == "manual" and event["model_version"] is None
    assert event["reasons"] == ["a training of this segmentation was running when the trigger came"]
    policy = (await client.get("/segmentations/default/policy", headers=analyst_headers)).json()
    assert policy["last_outcome"] == "failed"
    assert (await client.get("/models", headers=analyst_headers)).json()["active_version"] == active_before


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"source": "crm", "schedule": "every monday"}, 422, "cron"),
        ({"source": "crm", "schedule": "0 3 1 * * *"}, 422, "five-field"),
        ({"source": "crm", "on_drift": "stable"}, 422, "on_drift"),
        ({"source": "crm", "gate": {"min_unchanged": 1.5}}, 422, "min_unchanged"),
        ({"source": "nowhere"}, 404, "Source not found"),
    ],
)
async def test_a_bad_policy_is_refused_with_the_reason(client, analyst_headers, crm, body, status, says):
    answer = await client.put("/segmentations/default/policy", json=body, headers=analyst_headers)
    assert answer.status_code == status, answer.text
    assert says in answer.text


async def test_only_analysts_manage_policies(client, user_headers, analyst_headers, crm):
    assert (
        await client.put("/segmentations/default/policy", json={"source": "crm"}, headers=user_headers)
    ).status_code == 403
    assert (await client.get("/segmentations/default/policy", headers=analyst_headers)).status_code == 404
    assert (await client.post("/segmentations/default/policy/trigger", headers=analyst_headers)).status_code == 404
    assert (
        await client.put("/segmentations/default/policy", json={"source": "crm"}, headers=analyst_headers)
    ).status_code == 200
    assert (await client.delete("/segmentations/default/policy", headers=analyst_headers)).status_code == 204
    assert (await client.get("/segmentations/default/policy", headers=analyst_headers)).status_code == 404


async def test_a_schedule_fires_once_across_two_workers_and_once_after_downtime(
    client, settings, clock, analyst_headers, crm
):
    body = {"source": "crm", "schedule": "0 3 1 * *", "then_run": False}
    assert (await client.put("/segmentations/default/policy", json=body, headers=analyst_headers)).status_code == 200
    second = create_app(make_settings(settings.model_dir.parent, settings.database_url, **_overrides(settings)))

    async def wait_for_events(n: int) -> list[dict]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_SECONDS
        while loop.time() < deadline:
            got = await events(client, analyst_headers)
            if len(got) >= n and all(e["outcome"] != "running" for e in got):
                return got
            await asyncio.sleep(0.2)
        raise AssertionError(f"fewer than {n} policy events")

    async with LifespanManager(second, startup_timeout=60, shutdown_timeout=60):
        clock.write_text("2026-02-01T03:00:05+00:00")  # both workers' schedulers see the same due trigger
        fired = await wait_for_events(1)
        await asyncio.sleep(2.0)  # many ticks of both workers later
        assert len(await events(client, analyst_headers)) == 1
    assert fired[0]["trigger"] == "schedule"

    # The service is down through March and April's occurrences: one fire when it is back.
    clock.write_text("2026-04-20T00:00:00+00:00")
    third = create_app(make_settings(settings.model_dir.parent, settings.database_url, **_overrides(settings)))
    async with LifespanManager(third, startup_timeout=60, shutdown_timeout=60):
        got = await wait_for_events(2)
        await asyncio.sleep(2.0)
        assert len(await events(client, analyst_headers)) == 2
    assert [e["trigger"] for e in got] == ["schedule", "schedule"]
    policy = (await client.get("/segmentations/default/policy", headers=analyst_headers)).json()
    assert policy["next_fire_at"].startswith("2026-05-01T03:00")


def _overrides(settings) -> dict:
    return {
        "source_root": settings.source_root,
        "testing": True,
        "test_scheduler_clock_file": settings.test_scheduler_clock_file,
        "policy_tick_seconds": 0.2,
        "data_path": settings.data_path,
        "webhook_allow_private": True,
    }


async def test_drift_of_three_quarters_of_a_standard_deviation_triggers_a_retraining(
    app, client, dataset, analyst_headers, user_headers, crm
):
    body = {"source": "crm", "on_drift": "moderate", "then_run": False}
    assert (await client.put("/segmentations/default/policy", json=body, headers=analyst_headers)).status_code == 200
    await score_csv(client, user_headers, resample(dataset, 2000, seed=1))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_SECONDS
    while (await drift_status(app)) is None or not (await drift_status(app)).endswith("stable"):
        assert loop.time() < deadline, "no drift check saw the stable status"
        await asyncio.sleep(0.2)
    assert await events(client, analyst_headers) == []

    shifted = resample(dataset, 10_000, seed=2)
    income = training_frame(dataset)["annual_income"]
    shifted["annual_income"] = (shifted["annual_income"] + 0.75 * income.std()).round(2)
    await score_csv(client, user_headers, shifted)
    while not (got := await events(client, analyst_headers)):
        assert loop.time() < deadline, "the drift did not trigger the policy"
        await asyncio.sleep(0.2)
    (event,) = got
    assert event["trigger"] == "drift"
    # The candidate was trained on the source's unchanged customers: it passes the default gate.
    assert event["outcome"] == "activated", event


async def drift_status(app) -> str | None:
    from sqlalchemy import select

    from app.core.tables import ServiceState

    async with app.state.database.sessionmaker() as session:
        return (
            await session.execute(select(ServiceState.value).where(ServiceState.key == "drift_status:1"))
        ).scalar_one_or_none()
