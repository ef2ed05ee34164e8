"""The version routes of a segmentation: its versions, rollback, segment names, and drift.

The only implementation: the seed's paths (`/models...`, `PUT /clusters/{cluster_id}`, `/drift`) serve the
same handlers for `default` (app.segmentations.legacy).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response

from app.auth.dependencies import AnalystUser
from app.core.responses import errors
from app.core.routing import FastRoute
from app.versions import drift as drift_service
from app.versions import identity
from app.versions.activation import Actor
from app.versions.dependencies import NAMED, SegmentationStore
from app.versions.drift_schemas import DriftQuery, DriftReport
from app.versions.identity_schemas import SegmentRename
from app.versions.schemas import (
    ModelPage,
    ModelPageQuery,
    ModelVersionPublic,
    NamedModelVersionDetail,
    NamedSegmentStats,
)

router = APIRouter(prefix="/segmentations", tags=["segmentations"], strict_content_type=False, route_class=FastRoute)

Version = Annotated[str, Path(max_length=64)]
ClusterId = Annotated[int, Path(ge=0, le=2**31 - 1, description="The segment's cluster_id in the active version")]
VersionQuery = Annotated[str, Query(min_length=1, max_length=64)]


@router.get(
    "/{name}/models",
    summary="A segmentation's versions, newest first (analyst)",
    description="A page of versions (`skip`, `limit`) with `total` and the active version; `active` marks the "
    "one being served.",
    responses=errors(401, 403, 404, 422),
    openapi_extra=NAMED,
)
async def list_models(_: AnalystUser, store: SegmentationStore, page: Annotated[ModelPageQuery, Query()]) -> ModelPage:
    versions, active, total = await store.page_versions(skip=page.skip, limit=page.limit)
    return ModelPage(
        models=[ModelVersionPublic(**v) for v in versions],
        active_version=active,
        total=total,
        skip=page.skip,
        limit=page.limit,
    )


@router.get(
    "/{name}/models/{version}",
    summary="One version (analyst)",
    description="A version's segments, how k was chosen, its features, library versions and the missing shares "
    "of its training data.",
    responses=errors(401, 403, 404, 422),
    openapi_extra=NAMED,
)
async def get_model(_: AnalystUser, store: SegmentationStore, version: Version) -> NamedModelVersionDetail:
    return NamedModelVersionDetail(**await store.get_version(version))


@router.post(
    "/{name}/models/{version}/activate",
    summary="Make a version the active one (analyst)",
    description="Rollback or roll forward; every worker switches within about a second.",
    responses=errors(401, 403, 404, 409, 422),
    openapi_extra=NAMED,
)
async def activate_model(analyst: AnalystUser, store: SegmentationStore, version: Version) -> ModelVersionPublic:
    served = await store.activate(version, by=Actor.user(analyst))
    return ModelVersionPublic(**(await store.get_version(served.version)))


@router.delete(
    "/{name}/models/{version}",
    status_code=204,
    summary="Delete a version that is not the active one (analyst)",
    description="The active version cannot be deleted (409): activate another one first.",
    responses=errors(401, 403, 404, 409, 422),
    openapi_extra=NAMED,
)
async def delete_model(_: AnalystUser, store: SegmentationStore, version: Version) -> Response:
    await store.delete_version(version)
    return Response(status_code=204)


@router.get(
    "/{name}/drift",
    summary="Has the population moved since training? (analyst)",
    description="PSI per clustering feature and for the segment mix, between the version's training bins and "
    "what it scored through predict and predict/batch (both doors, every worker) since `since`. "
    "`insufficient_data` below 500 rows; 409 for a version trained before drift bins were kept.",
    responses=errors(401, 403, 404, 409, 422),
    openapi_extra=NAMED,
)
async def drift(
    request: Request, _: AnalystUser, store: SegmentationStore, query: Annotated[DriftQuery, Query()]
) -> DriftReport:
    return DriftReport(
        **await drift_service.report(request.app.state.drift, store, version=query.version, since=query.since)
    )


RENAME_DESCRIPTION = (
    "Sets an analyst's `cluster_name` and/or `description` on a segment of the active version; a field left "
    "out stays as it is, null restores the generated one. A name another segment of the model has: 409. "
    "Later versions carry the name to the matched segment; a rollback shows each version's own names. "
    "Predictions answer with the new name at once here, within MODEL_SYNC_SECONDS in every worker."
)


@router.put(
    "/{name}/segments/{cluster_id}",
    summary="Name a segment of a segmentation's active version (analyst)",
    description=RENAME_DESCRIPTION,
    responses=errors(401, 403, 404, 409, 422),
    openapi_extra=NAMED,
)
async def rename_segment(
    _: AnalystUser, store: SegmentationStore, cluster_id: ClusterId, body: SegmentRename
) -> NamedSegmentStats:
    changes: dict[str, Any] = {
        field: getattr(body, field) for field in ("cluster_name", "description") if field in body.model_fields_set
    }
    served = await identity.rename_segment(store, cluster_id, **changes)
    return NamedSegmentStats(**served.segment_details()[cluster_id])
