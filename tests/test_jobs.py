"""Training as a job through HTTP: POST .../train?wait=false, GET /jobs/{id}, GET /jobs, DELETE /jobs/{id}.

A job ends with the body the synchronous call answers (result or error), can be cancelled by any
worker (the active version stays, the segmentation can train again at once), and a job whose
worker is gone ends as failed, never running forever. A slow training is made deterministic by a
fit whose child process blocks until it is killed (`blocking_fit`).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from app.core.tables import Role, TrainingJob, utcnow
from app.jobs.service import CANCELLED, WORKER_STOPPED
from app.versions import training as model_service
from app.versions.lease import HOST_ID
from tests.test_lifecycle import _training_children, eventually, running
from tests.test_segmentations import as_csv, create, crm_table

pytestmark = pytest.mark.postgres

# Seconds a poll waits for what happens in well under a second on an idle machine.
DEADLINE = 120.0
FINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture
def settings_overrides(tmp_path) -> dict:
    return {"job_heartbeat_seconds": 0.2, "job_stale_seconds": 5, "job_dir": str(tmp_path / "jobs")}


class _BlocksUntilKilled:
    """Unpickled in the training child as a call that sleeps for ten minutes: the fit never ends by itself."""

    def __reduce__(self):
        return (time.sleep, (600,))


@pytest.fixture
def blocking_fit(monkeypatch):
    """Trainings started while this is on stay in their fitting phase, a real child process, until killed."""
    real = model_service.fit_in_subprocess

    async def blocked(data, **kwargs):
        return await real(_BlocksUntilKilled(), **kwargs)

    monkeypatch.setattr(model_service, "fit_in_subprocess", blocked)
    yield
    monkeypatch.undo()


async def start(client, headers, path="/train", **kwargs):
    params = {**kwargs.pop("params", {}), "wait": "false"}
    response = await client.post(path, params=params, headers=headers, **kwargs)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['job_id']}"
    assert job["state"] in ("queued", "running")
    return job


async def poll(client, headers, job_id, until) -> dict:
    """GET /jobs/{id} until `until(job)` holds (a generous deadline: only a job that never gets there fails)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        response = await client.get(f"/jobs/{job_id}", headers=headers)
        assert response.status_code == 200, response.text
        job = response.json()
        if until(job):
            return job
        assert time.monotonic() < deadline, f"job still {job['state']} ({job['progress']['phase']}): {job}"
        await asyncio.sleep(0.05)


async def finished(client, headers, job_id) -> dict:
    return await poll(client, headers, job_id, lambda job: job["state"] in FINAL)


async def fitting(client, headers, job_id) -> dict:
    job = await poll(client, headers, job_id, lambda job: job["progress"]["phase"] == "fitting")
    await eventually(lambda: _training_children() != [], DEADLINE)
    return job


async def active_version(client, headers, name="default") -> str | None:
    return (await client.get(f"/segmentations/{name}/models", headers=headers)).json()["active_version"]


# --- a job ends as the synchronous call does ----------------------------------------------------


async def test_a_job_ends_with_the_result_the_synchronous_call_gives(
    client, dataset, make_user, settings, user_headers
):
    analyst, headers = await make_user(Role.analyst)
    sync = await client.post("/train", params={"n_clusters": 4}, headers=headers)
    assert sync.status_code == 200, sync.text

    job = await start(client, headers, params={"n_clusters": 4})
    assert job["segmentation"] == "default" and job["created_by"] == analyst["username"]
    assert job["parameters"]["n_clusters"] == 4 and job["parameters"]["file"] is None
    done = await finished(client, headers, job["job_id"])

    assert done["state"] == "succeeded", done
    assert done["error"] is None and done["error_status"] is None and done["finished_at"] is not None
    result, expected = done["result"], sync.json()
    assert set(result) == set(expected)
    for key in ("n_clusters", "n_samples", "cluster_sizes", "inertia", "silhouette_score"):
        assert result[key] == expected[key], key
    assert result["model_version"] != expected["model_version"]
    assert await active_version(client, headers) == result["model_version"]
    phases = [p["phase"] for p in done["progress"]["phases"]]
    assert phases[:2] == ["receiving", "queued"] and phases[-3:] == ["fitting", "recording", "succeeded"]
    assert "reading" in phases
    assert (await client.get(f"/jobs/{job['job_id']}", headers=user_headers)).status_code == 403


async def test_a_job_with_an_upload_through_the_segmentation_door(client, analyst_headers, settings):
    assert (await create(client, analyst_headers)).status_code == 201
    upload = as_csv(crm_table())
    sync = await client.post(
        "/segmentations/crm/train",
        params={"random_state": 1, "n_clusters": 3},
        files={"file": ("crm.csv", upload, "text/csv")},
        headers=analyst_headers,
    )
    assert sync.status_code == 200, sync.text

    job = await start(
        client,
        analyst_headers,
        "/segmentations/crm/train",
        params={"random_state": 1, "n_clusters": 3},
        files={"file": ("crm.csv", upload, "text/csv")},
    )
    assert job["parameters"]["file"] == "crm.csv" and job["parameters"]["bytes"] == len(upload)
    done = await finished(client, analyst_headers, job["job_id"])

    assert done["state"] == "succeeded", done
    result, expected = done["result"], sync.json()
    assert set(result) == set(expected) and result["segmentation"] == "crm"
    for key in ("n_clusters", "n_samples", "cluster_sizes", "skipped_rows", "missing_shares"):
        assert result[key] == expected[key], key
    assert await active_version(client, analyst_headers, "crm") == result["model_version"]
    assert list(settings.job_directory.iterdir()) == []  # the job's copy of the upload is gone with it

    listed = (await client.get("/jobs", params={"segmentation": "crm"}, headers=analyst_headers)).json()
    assert [j["job_id"] for j in listed["jobs"]] == [job["job_id"]] and listed["total"] == 1
    assert (await client.get("/jobs", params={"segmentation": "default"}, headers=analyst_headers)).json()["jobs"] == []
    assert (await client.get("/jobs", params={"state": "failed"}, headers=analyst_headers)).json()["total"] == 0
    assert (await client.get("/jobs", params={"segmentation": "nope"}, headers=analyst_headers)).status_code == 404


async def test_progress_tells_the_share_of_the_upload_read(client, dataset, analyst_headers, monkeypatch):
    """While the reader is held halfway through the upload, the job shows phase reading and that share."""
    from app.segmentations import scoring as segmentation_module

    upload = dataset.read_bytes()
    halfway, release = threading.Event(), threading.Event()
    real = segmentation_module.load_training_matrix

    def held_halfway(fh):
        fh.read(len(upload) // 2)
        halfway.set()
        release.wait(DEADLINE)
        fh.seek(0)
        return real(fh)

    monkeypatch.setattr(segmentation_module, "load_training_matrix", held_halfway)
    job = await start(client, analyst_headers, params={"n_clusters": 3}, files={"file": ("c.csv", upload, "text/csv")})
    await eventually(halfway.is_set, DEADLINE)
    try:
        reading = await poll(client, analyst_headers, job["job_id"], lambda j: j["progress"]["fraction"] is not None)
    finally:
        release.set()
    assert reading["state"] == "running" and reading["progress"]["phase"] == "reading"
    assert 0.4 <= reading["progress"]["fraction"] < 1
    done = await finished(client, analyst_headers, job["job_id"])
    assert done["state"] == "succeeded" and done["progress"]["fraction"] == 1.0


async def test_a_bad_csv_ends_the_job_failed_with_the_synchronous_error_body(client, trained_model, analyst_headers):
    bad = {"file": ("x.csv", b"\x00\x01binary", "text/csv")}
    sync = await client.post("/train", files=bad, headers=analyst_headers)
    assert sync.status_code == 422 and sync.json()["errors"], sync.text

    job = await start(client, analyst_headers, files=bad)
    done = await finished(client, analyst_headers, job["job_id"])

    assert done["state"] == "failed" and done["result"] is None
    assert done["error"] == sync.json() and done["error_status"] == 422
    assert await active_version(client, analyst_headers) == trained_model["model_version"]

    assert (await create(client, analyst_headers)).status_code == 201
    missing = {"file": ("crm.csv", as_csv(crm_table().drop(columns=["plan"])), "text/csv")}
    sync = await client.post("/segmentations/crm/train", files=missing, headers=analyst_headers)
    assert sync.status_code == 422, sync.text
    job = await start(client, analyst_headers, "/segmentations/crm/train", files=missing)
    done = await finished(client, analyst_headers, job["job_id"])
    assert (done["state"], done["error"], done["error_status"]) == ("failed", sync.json(), 422)


async def test_what_can_be_checked_is_checked_before_the_202(client, dataset, analyst_headers, user_headers):
    assert (await client.post("/train", params={"wait": "false"}, headers=user_headers)).status_code == 403
    unknown = await client.post("/segmentations/nope/train", params={"wait": "false"}, headers=analyst_headers)
    assert unknown.status_code == 404
    bad_query = await client.post("/train", params={"wait": "false", "n_clusters": 1}, headers=analyst_headers)
    assert bad_query.status_code == 422 and bad_query.json()["detail"].startswith("n_clusters: ")
    assert [e["loc"] for e in bad_query.json()["errors"]] == [["query", "n_clusters"]]
    as_of = await client.post(
        "/segmentations/default/train", params={"wait": "false", "as_of": "2024-01-01"}, headers=analyst_headers
    )
    assert as_of.status_code == 422 and "rfm" in as_of.json()["detail"]
    assert (await create(client, analyst_headers)).status_code == 201
    no_file = await client.post("/segmentations/crm/train", params={"wait": "false"}, headers=analyst_headers)
    assert no_file.status_code == 422 and "`file`" in no_file.json()["detail"]
    dataset.unlink()
    no_dataset = await client.post("/train", params={"wait": "false"}, headers=analyst_headers)
    assert no_dataset.status_code == 409 and "No training dataset" in no_dataset.json()["detail"]
    assert (await client.get("/jobs", headers=analyst_headers)).json()["total"] == 0


# --- cancelling ---------------------------------------------------------------------------------


async def test_cancel_a_running_job_keeps_the_active_version_and_frees_the_training(
    client, trained_model, analyst_headers, blocking_fit, monkeypatch
):
    job = await start(client, analyst_headers, params={"n_clusters": 3})
    await fitting(client, analyst_headers, job["job_id"])
    busy = await client.post("/train", params={"n_clusters": 3}, headers=analyst_headers)
    assert busy.status_code == 409 and "already running" in busy.json()["detail"]
    busy_job = await client.post("/train", params={"n_clusters": 3, "wait": "false"}, headers=analyst_headers)
    assert busy_job.status_code == 409

    cancelled = await client.delete(f"/jobs/{job['job_id']}", headers=analyst_headers)

    assert cancelled.status_code == 200, cancelled.text
    body = cancelled.json()
    assert body["state"] == "cancelled" and body["cancel_requested"] is True
    assert body["error"] == {"detail": CANCELLED} and body["result"] is None
    await eventually(lambda: _training_children() == [], DEADLINE)  # the child process was killed
    assert await active_version(client, analyst_headers) == trained_model["model_version"]
    assert len((await client.get("/models", headers=analyst_headers)).json()["models"]) == 1
    again = await client.delete(f"/jobs/{job['job_id']}", headers=analyst_headers)
    assert again.status_code == 409 and "cancelled" in again.json()["detail"]

    monkeypatch.undo()
    retrained = await client.post("/train", params={"n_clusters": 3}, headers=analyst_headers)
    assert retrained.status_code == 200, retrained.text  # the training lease is free again


async def test_cancel_answers_404_unknown_409_finished_403_plain_user(client, dataset, analyst_headers, user_headers):
    assert (await client.get("/jobs/nope", headers=analyst_headers)).status_code == 404
    assert (await client.delete("/jobs/nope", headers=analyst_headers)).status_code == 404
    job = await start(client, analyst_headers, params={"n_clusters": 3})
    assert (await client.delete(f"/jobs/{job['job_id']}", headers=user_headers)).status_code == 403
    assert (await client.get("/jobs", headers=user_headers)).status_code == 403
    done = await finished(client, analyst_headers, job["job_id"])
    assert done["state"] == "succeeded"
    late = await client.delete(f"/jobs/{job['job_id']}", headers=analyst_headers)
    assert late.status_code == 409 and "succeeded" in late.json()["detail"]


async def test_another_worker_cancels_a_job_it_does_not_run(
    client, trained_model, analyst_headers, settings, tmp_path, blocking_fit, monkeypatch
):
    job = await start(client, analyst_headers, params={"n_clusters": 3})
    await fitting(client, analyst_headers, job["job_id"])
    other_settings = settings.model_copy(update={"model_dir": tmp_path / "other-worker"})
    async with running(other_settings, 50003) as (_other_app, other):
        cancelled = await other.delete(f"/jobs/{job['job_id']}", headers=analyst_headers)
        assert cancelled.status_code in (200, 202), cancelled.text
        done = await finished(other, analyst_headers, job["job_id"])
    assert done["state"] == "cancelled", done
    await eventually(lambda: _training_children() == [], DEADLINE)
    assert await active_version(client, analyst_headers) == trained_model["model_version"]
    monkeypatch.undo()
    assert (await client.post("/train", params={"n_clusters": 3}, headers=analyst_headers)).status_code == 200


# --- a worker that stops --------------------------------------------------------------------------


async def _left_running(app, job_id: str, worker: str, heartbeat_age: float = 0) -> None:
    """A job row as a worker that died mid-training leaves it."""
    now = utcnow()
    async with app.state.database.sessionmaker() as session:
        session.add(
            TrainingJob(
                id=job_id,
                segmentation_id=1,
                segmentation="default",
                state="running",
                phase="fitting",
                phases=[{"phase": "fitting", "at": now.isoformat()}],
                parameters={},
                cancel_requested=False,
                created_by="someone",
                created_at=now,
                started_at=now,
                worker=worker,
                heartbeat_at=now - timedelta(seconds=heartbeat_age),
            )
        )
        await session.commit()


async def _state(app, job_id: str) -> str:
    async with app.state.database.sessionmaker() as session:
        return (await session.execute(select(TrainingJob.state).where(TrainingJob.id == job_id))).scalar_one()


async def test_a_job_whose_worker_is_gone_is_failed_never_running_forever(app, client, analyst_headers):
    ended = await asyncio.create_subprocess_exec("true")
    await ended.wait()
    await _left_running(app, "dead-here", f"{HOST_ID}:{ended.pid}:0a0a0a0a")
    await _left_running(app, "silent-elsewhere", "elsewhere:4242:0b0b0b0b", heartbeat_age=3600)
    await _left_running(app, "alive-elsewhere", "elsewhere:4242:0c0c0c0c")
    await _left_running(app, "alive-here", f"{HOST_ID}:{os.getppid()}:0d0d0d0d")

    for job_id in ("dead-here", "silent-elsewhere"):
        job = (await client.get(f"/jobs/{job_id}", headers=analyst_headers)).json()
        assert (job["state"], job["error"]) == ("failed", {"detail": WORKER_STOPPED}), job
    for job_id in ("alive-elsewhere", "alive-here"):
        assert (await client.get(f"/jobs/{job_id}", headers=analyst_headers)).json()["state"] == "running"
    listed = (await client.get("/jobs", params={"state": "running"}, headers=analyst_headers)).json()
    assert sorted(j["job_id"] for j in listed["jobs"]) == ["alive-elsewhere", "alive-here"]
    finished_job = await client.delete("/jobs/dead-here", headers=analyst_headers)
    assert finished_job.status_code == 409


async def test_a_starting_worker_fails_the_jobs_of_dead_workers(app, settings, tmp_path):
    ended = await asyncio.create_subprocess_exec("true")
    await ended.wait()
    await _left_running(app, "before-restart", f"{HOST_ID}:{ended.pid}:0e0e0e0e")
    await _left_running(app, "long-silent", "elsewhere:4242:0f0f0f0f", heartbeat_age=3600)
    other_settings = settings.model_copy(update={"model_dir": tmp_path / "restarted"})
    async with running(other_settings, 50004):
        assert await _state(app, "before-restart") == "failed"  # by the sweep at startup, before any GET
        assert await _state(app, "long-silent") == "failed"


async def test_a_worker_that_stops_fails_its_jobs_and_frees_the_training(
    app, client, trained_model, analyst_headers, settings, tmp_path, blocking_fit, monkeypatch
):
    other_settings = settings.model_copy(update={"model_dir": tmp_path / "stopping-worker"})
    async with running(other_settings, 50005) as (_other_app, other):
        job = await start(other, analyst_headers, params={"n_clusters": 3})
        await fitting(other, analyst_headers, job["job_id"])
    done = (await client.get(f"/jobs/{job['job_id']}", headers=analyst_headers)).json()
    assert (done["state"], done["error"]) == ("failed", {"detail": WORKER_STOPPED}), done
    await eventually(lambda: _training_children() == [], DEADLINE)
    assert await active_version(client, analyst_headers) == trained_model["model_version"]
    monkeypatch.undo()
    assert (await client.post("/train", params={"n_clusters": 3}, headers=analyst_headers)).status_code == 200
