"""The retraining policy routes: `/segmentations/{name}/policy`, its trigger and its events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from app.auth.dependencies import AnalystUser
from app.core.responses import errors
from app.core.routing import FastRoute
from app.jobs.schemas import STARTED, accepted
from app.policies.schemas import EventPageQuery, Policy, PolicyBody, PolicyEventPage, PolicyEventPublic
from app.policies.service import PolicyService
from app.versions.dependencies import NAMED, SegmentationStore

router = APIRouter(prefix="/segmentations", tags=["policies"], strict_content_type=False, route_class=FastRoute)


def policies(request: Request) -> PolicyService:
    return request.app.state.policies


@router.put(
    "/{name}/policy",
    summary="Set the segmentation's retraining policy (analyst)",
    description="`source` (a data source, GET /sources), `schedule` (a five-field cron in UTC) and/or `on_drift` "
    "(`moderate` or `significant`: fires when the drift status moves into it, then not again for "
    "DRIFT_RETRAIN_COOLDOWN_HOURS), `gate` {min_unchanged, max_silhouette_drop, min_segment_share}, `on_pass` "
    "(`activate` or `hold`) and `then_run` (a run of the customer base on the source after an activation).",
    responses=errors(401, 403, 404, 422),
    openapi_extra=NAMED,
)
async def put_policy(request: Request, analyst: AnalystUser, store: SegmentationStore, body: PolicyBody) -> Policy:
    return Policy(**await policies(request).put(store, body, by=analyst.username))


@router.get(
    "/{name}/policy",
    summary="The segmentation's retraining policy, its next fire and last outcome (analyst)",
    description="404 when the segmentation has no policy.",
    responses=errors(401, 403, 404),
    openapi_extra=NAMED,
)
async def get_policy(request: Request, _: AnalystUser, store: SegmentationStore) -> Policy:
    return Policy(**await policies(request).get(store))


@router.delete(
    "/{name}/policy",
    status_code=204,
    summary="Remove the segmentation's retraining policy (analyst)",
    description="Its schedule and drift trigger stop; its past events stay until the segmentation is deleted.",
    responses=errors(401, 403, 404),
    openapi_extra=NAMED,
)
async def delete_policy(request: Request, _: AnalystUser, store: SegmentationStore) -> Response:
    await policies(request).delete(store)
    return Response(status_code=204)


@router.post(
    "/{name}/policy/trigger",
    status_code=202,
    summary="Fire the retraining policy now (analyst)",
    description="202 with the job that trains the candidate, judges it and activates or holds it (GET /jobs/{id}); "
    "a trigger while a training of the segmentation runs is recorded as `failed` with the reason.",
    responses={**STARTED, **errors(401, 403, 404)},
    openapi_extra=NAMED,
)
async def trigger_policy(request: Request, analyst: AnalystUser, store: SegmentationStore) -> Response:
    return accepted(await policies(request).trigger(store, by=analyst.username))


@router.get(
    "/{name}/policy/events",
    summary="Every trigger of the policy and its outcome, newest first (analyst)",
    description="Paged by `skip` and `limit`: `{at, trigger (schedule, drift or manual), model_version, outcome "
    "(activated, held or failed), reasons, figures}`.",
    responses=errors(401, 403, 404, 422),
    openapi_extra=NAMED,
)
async def policy_events(
    request: Request, _: AnalystUser, store: SegmentationStore, page: Annotated[EventPageQuery, Query()]
) -> PolicyEventPage:
    events, total = await policies(request).events_page(store, skip=page.skip, limit=page.limit)
    return PolicyEventPage(events=[PolicyEventPublic(**event) for event in events], total=total)
