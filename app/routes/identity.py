"""Segment identity: an analyst's names for segments, and two versions compared on one file.

Two doors into app.services.identity: `/clusters/{cluster_id}` and `/models/compare` for
`default`, and `/segmentations/{name}/segments/{cluster_id}` and `/segmentations/{name}/compare`
for any segmentation.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request

from app.deps import AnalystUser
from app.errors import InvalidInput
from app.identity_schema import SegmentRename, VersionComparison
from app.routes.ml import CsvFile, _is_multipart
from app.routes.responses import errors, file_errors
from app.schema import SegmentStats
from app.segmentation_schema import NamedSegmentStats
from app.services import identity
from app.services.models import ModelStore, ServedModel

router = APIRouter(tags=["segmentation"], strict_content_type=False)

ClusterId = Annotated[int, Path(ge=0, le=2**31 - 1, description="The segment's cluster_id in the active version")]
Name = Annotated[str, Path(description="The segmentation's name (`default` is the seed's)")]
VersionQuery = Annotated[str, Query(min_length=1, max_length=64)]

RENAME_DESCRIPTION = (
    "Sets an analyst's `cluster_name` and/or `description` on a segment of the active version; a field left "
    "out stays as it is, null restores the generated one. A name another segment of the model has: 409. "
    "Later versions carry the name to the matched segment; a rollback shows each version's own names. "
    "Predictions answer with the new name at once here, within MODEL_SYNC_SECONDS in every worker."
)
COMPARE_DESCRIPTION = (
    "Scores one CSV `file` (kind customer without one: the default dataset) with both versions. "
    "`matrix[i][j]` counts customers in segment i of `from_version` and j of `to_version`; `unchanged` is "
    "the share that kept its cluster_id, `unchanged_segments` the share that kept its segment_key (the figure "
    "that stays meaningful when k changes). Unknown version: 404; a CSV with unusable rows: 422 naming them."
)


async def _segmentation(request: Request, name: Name) -> ModelStore:
    return await request.app.state.segmentations.get(name)


# A dependency: an unknown segmentation is a 404 before the query is checked.
Segmentation = Annotated[ModelStore, Depends(_segmentation)]


async def _rename(store: ModelStore, cluster_id: int, body: SegmentRename) -> ServedModel:
    given = body.model_fields_set
    changes: dict[str, Any] = {
        field: getattr(body, field) for field in ("cluster_name", "description") if field in given
    }
    return await identity.rename_segment(store, cluster_id, **changes)


async def _compare(
    request: Request, store: ModelStore, from_version: str, to_version: str, file: Any
) -> VersionComparison:
    if file is None and _is_multipart(request):
        raise InvalidInput("The multipart body has no `file` part: send the CSV as `file`")
    answer = await identity.compare(
        request.app.state, store, from_version=from_version, to_version=to_version, file=file
    )
    return VersionComparison(**answer)


@router.put(
    "/clusters/{cluster_id}",
    summary="Name a segment of the active model (analyst)",
    description=RENAME_DESCRIPTION,
    responses=errors(401, 403, 404, 409, 422),
)
async def rename_cluster(request: Request, _: AnalystUser, cluster_id: ClusterId, body: SegmentRename) -> SegmentStats:
    served = await _rename(request.app.state.models, cluster_id, body)
    return SegmentStats(**served.segments[cluster_id])


@router.post(
    "/models/compare",
    summary="Compare two model versions on one file (analyst)",
    description=COMPARE_DESCRIPTION,
    responses={**errors(401, 403, 404, 409, 413, 422), **file_errors("A CSV with unusable rows")},
    form_limits={"max_files": 1, "max_fields": 20},
)
async def compare_models(
    request: Request,
    _: AnalystUser,
    from_version: VersionQuery,
    to_version: VersionQuery,
    file: CsvFile = None,
) -> VersionComparison:
    return await _compare(request, request.app.state.models, from_version, to_version, file)


@router.put(
    "/segmentations/{name}/segments/{cluster_id}",
    tags=["segmentations"],
    summary="Name a segment of a segmentation's active version (analyst)",
    description=RENAME_DESCRIPTION,
    responses=errors(401, 403, 404, 409, 422),
)
async def rename_segment(
    request: Request, _: AnalystUser, name: Name, cluster_id: ClusterId, body: SegmentRename
) -> NamedSegmentStats:
    store = await request.app.state.segmentations.get(name)
    served = await _rename(store, cluster_id, body)
    return NamedSegmentStats(**served.segment_details()[cluster_id])


@router.post(
    "/segmentations/{name}/compare",
    tags=["segmentations"],
    summary="Compare two versions of a segmentation on one file (analyst)",
    description=COMPARE_DESCRIPTION,
    responses={**errors(401, 403, 404, 409, 413, 422), **file_errors("A CSV with unusable rows")},
    form_limits={"max_files": 1, "max_fields": 20},
)
async def compare_segmentation_versions(
    request: Request,
    _: AnalystUser,
    store: Segmentation,
    from_version: VersionQuery,
    to_version: VersionQuery,
    file: CsvFile = None,
) -> VersionComparison:
    return await _compare(request, store, from_version, to_version, file)
