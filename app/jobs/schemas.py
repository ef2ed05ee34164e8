"""Training job schemas: a job as GET /jobs/{id} shows it, a page of jobs, the list's query, and the
202 (with its `wait` query) that a training started as a job answers."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Query, Response
from pydantic import BaseModel, ConfigDict, Field

from app.core.schemas import NotNull, omittable

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]

JOB_EXAMPLE: dict[str, Any] = {
    "job_id": "3f9c2a7d1b6e4058",
    "state": "running",
    "segmentation": "default",
    "created_at": "2026-12-08T10:00:00Z",
    "created_by": "analyst1",
    "started_at": "2026-12-08T10:00:00Z",
    "finished_at": None,
    "progress": {
        "phase": "reading",
        "fraction": 0.42,
        "phases": [
            {"phase": "receiving", "at": "2026-12-08T10:00:00Z"},
            {"phase": "reading", "at": "2026-12-08T10:00:01Z"},
        ],
    },
    "parameters": {"n_clusters": None, "random_state": 42, "as_of": None, "file": "customers.csv", "bytes": 52428800},
    "cancel_requested": False,
    "result": None,
    "error": None,
    "error_status": None,
    "worker": "api-1:4242:9b1f03aa",
    "heartbeat_at": "2026-12-08T10:00:02Z",
}


class JobPhase(BaseModel):
    phase: str
    at: datetime


class JobProgress(BaseModel):
    phase: str = Field(
        description="queued, receiving, reading, fitting, recording, then the final state "
        "(succeeded, failed, cancelled)"
    )
    fraction: float | None = Field(
        description="0..1 within the phase when it can be told (reading: bytes of the upload read); else null"
    )
    phases: list[JobPhase] = Field(description="When each phase began, in order")


class TrainingJob(BaseModel):
    """A training started with `wait=false`."""

    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE]})

    job_id: str
    state: JobState
    segmentation: str
    created_at: datetime
    created_by: str | None
    started_at: datetime | None
    finished_at: datetime | None
    progress: JobProgress
    parameters: dict[str, Any] = Field(
        description="The request's `n_clusters`, `random_state`, `as_of`, and the upload's `file` name and `bytes`"
    )
    cancel_requested: bool = Field(description="A DELETE asked for it; the worker running it stops it within seconds")
    result: dict[str, Any] | None = Field(
        description="Succeeded: the body the same training with `wait=true` answers (the train result)"
    )
    error: dict[str, Any] | None = Field(
        description="Failed: the error body the same training with `wait=true` answers (`detail`, and `errors` "
        "for problems in the file); cancelled: `detail` says by whom"
    )
    error_status: int | None = Field(description="Failed: the HTTP status the same training with `wait=true` answers")
    worker: str | None = Field(description="The worker running it (`host:pid:token`)")
    heartbeat_at: datetime | None = Field(description="When that worker last said it was alive")


class JobPageQuery(BaseModel):
    model_config = ConfigDict(frozen=True)

    skip: int = Field(0, ge=0, le=2**31 - 1)
    limit: int = Field(50, ge=1, le=200)
    segmentation: Annotated[str | None, NotNull] = Field(
        None,
        min_length=1,
        max_length=40,
        description="Only this segmentation's jobs (unknown: 404)",
        json_schema_extra=omittable,
    )
    state: Annotated[JobState | None, NotNull] = Field(
        None, description="Only the jobs in this state", json_schema_extra=omittable
    )


class JobPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"jobs": [JOB_EXAMPLE], "total": 1, "skip": 0, "limit": 50}]}
    )

    jobs: list[TrainingJob]
    total: int
    skip: int
    limit: int


STARTED: dict[int | str, dict[str, Any]] = {
    202: {"model": TrainingJob, "description": "`wait=false`: the training job, started (see Location)"}
}


Wait = Annotated[
    bool,
    Query(
        description="false: answer 202 at once with a training job to follow at GET /jobs/{job_id} (its "
        "Location), for trainings longer than a proxy waits; true: answer when the training is done"
    ),
]


def accepted(job: dict[str, Any]) -> Response:
    """The 202 of a training started as a job: the job, and where to follow it."""
    return Response(
        TrainingJob(**job).model_dump_json(),
        status_code=202,
        media_type="application/json",
        headers={"Location": f"/jobs/{job['job_id']}"},
    )
