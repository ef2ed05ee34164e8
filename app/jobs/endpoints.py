"""Training jobs: the trainings started with `POST .../train?wait=false`, read and cancelled by any worker."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from app.auth.dependencies import AnalystUser
from app.core.responses import errors
from app.core.routing import FastRoute
from app.jobs.schemas import JobPage, JobPageQuery, TrainingJob

router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=FastRoute)

JobId = Annotated[str, Path(max_length=64, description="The job id the 202 of POST .../train?wait=false gave")]


@router.get(
    "",
    summary="Training jobs, newest first (analyst)",
    description="A page of jobs (`skip`, `limit`) with `total`; `segmentation` and `state` keep only those. "
    "A job whose worker stopped shows as failed.",
    responses=errors(401, 403, 404, 422),
)
async def list_jobs(request: Request, _: AnalystUser, query: Annotated[JobPageQuery, Query()]) -> JobPage:
    segmentation_id = None
    if query.segmentation is not None:
        segmentation_id = (await request.app.state.segmentations.get(query.segmentation)).segmentation.id
    jobs, total = await request.app.state.jobs.page(
        skip=query.skip, limit=query.limit, segmentation_id=segmentation_id, state=query.state
    )
    return JobPage(jobs=[TrainingJob(**job) for job in jobs], total=total, skip=query.skip, limit=query.limit)


@router.get(
    "/{job_id}",
    summary="One training job (analyst)",
    description="Its state (queued, running, succeeded, failed, cancelled), progress (the phase, when each "
    "began, and while reading the upload the share read), and the train result or the error body the "
    "same training with `wait=true` would have answered.",
    responses=errors(401, 403, 404, 422),
)
async def get_job(request: Request, _: AnalystUser, job_id: JobId) -> TrainingJob:
    return TrainingJob(**await request.app.state.jobs.get(job_id))


@router.delete(
    "/{job_id}",
    summary="Cancel a queued or running training job (analyst)",
    description="The training is stopped (its child process killed), nothing is recorded and the active "
    "version stays; the segmentation can train again at once. 200 with the job `cancelled`; 202 with "
    "`cancel_requested` when the worker running it has not stopped it within a few seconds. A finished "
    "job (or one recording its version when the cancel came) is a 409.",
    response_model=TrainingJob,
    responses={**errors(401, 403, 404, 409, 422), 202: {"model": TrainingJob, "description": "Cancel asked"}},
)
async def cancel_job(request: Request, analyst: AnalystUser, job_id: JobId) -> Response:
    job = TrainingJob(**await request.app.state.jobs.cancel(job_id, by=analyst.username))
    status = 200 if job.state == "cancelled" else 202
    return Response(job.model_dump_json(), status_code=status, media_type="application/json")
