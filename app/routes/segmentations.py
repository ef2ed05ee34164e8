"""Named segmentations: create, list, edit, delete, and every segmentation route under /segmentations/{name}.

The routes under `/segmentations/{name}/...` are the second door into what the seed's routes
(`/train`, `/predict`, ...) do for `default`: both call app.services.segmentations.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, File, Path, Query, Request, Response
from pydantic import BeforeValidator

from app.deps import AnalystUser, CurrentUser
from app.drift_schema import DriftQuery, DriftReport
from app.errors import InvalidInput
from app.explain_schema import ExplainQuery
from app.routes.bodies import FastRoute, JsonOrFormRoute
from app.routes.jobs import STARTED, Wait
from app.routes.ml import CsvFile, ExplainFlag, answer_batch, answer_training
from app.routes.responses import errors, file_errors
from app.schema import (
    BatchResult,
    ClusterCharts,
    ElbowChart,
    ElbowRange,
    ElbowResult,
    HistoryPage,
    HistoryQuery,
    ModelVersionPublic,
)
from app.segmentation_schema import (
    ModelPage,
    ModelPageQuery,
    NamedBatchUpload,
    NamedClusterSummary,
    NamedModelVersionDetail,
    NamedPredictBody,
    NamedPredictionResult,
    NamedTrainResult,
    SegmentationCreate,
    SegmentationDetail,
    SegmentationList,
    SegmentationPublic,
    SegmentationUpdate,
)
from app.services import drift as drift_service
from app.services import rfm as rfm_service
from app.services import segmentations
from app.services.models import ModelStore
from app.services.registry import feature_schema

router = APIRouter(prefix="/segmentations", tags=["segmentations"], strict_content_type=False, route_class=FastRoute)

Name = Annotated[str, Path(description="The segmentation's name (`default` is the seed's)")]
Version = Annotated[str, Path(max_length=64)]
AsOf = Annotated[
    date | None,
    BeforeValidator(rfm_service.as_of_value),
    Query(
        description="Kind rfm: the day RFM is computed as of, YYYY-MM-DD or YYYYMMDD (default the day after "
        "the log's last date); rows dated later are left out and counted",
    ),
]


def _public(store: ModelStore) -> dict[str, Any]:
    info = store.segmentation
    schema = feature_schema(info)
    current = store.current
    return {
        "name": info.name,
        "kind": info.kind,
        "description": info.description,
        "features": [
            {"name": f.name, "type": f.type, "transform": f.transform, "min": f.min, "max": f.max}
            for f in schema.features
        ],
        "id_column": schema.id_column,
        "columns": info.feature_schema.get("columns") if info.kind == "rfm" else None,
        "active_version": current.version if current is not None else None,
        "n_clusters": current.metadata.get("n_clusters") if current is not None else None,
        "created_at": info.created_at,
        "created_by": info.created_by,
    }


def _detail(store: ModelStore) -> SegmentationDetail:
    return SegmentationDetail(**_public(store), customer_schema=segmentations.customer_json_schema(store))


async def _store(request: Request, name: str) -> ModelStore:
    return await request.app.state.segmentations.get(name)


@router.get(
    "",
    summary="Every segmentation",
    description="Each with its kind, declared features and the version it serves; `default` first.",
    responses=errors(401, 403),
)
async def list_segmentations(request: Request, _: CurrentUser) -> SegmentationList:
    stores = request.app.state.segmentations.stores()
    return SegmentationList(segmentations=[SegmentationPublic(**_public(store)) for store in stores])


@router.post(
    "",
    status_code=201,
    summary="Create a segmentation (analyst)",
    description="Kind `customer` segments the customer features; kind `custom` the columns declared in "
    "`features`; kind `rfm` recency, frequency and monetary value from a transaction log whose headers "
    "`columns` maps. At most MAX_SEGMENTATIONS exist at once.",
    responses=errors(401, 403, 409, 422),
)
async def create_segmentation(request: Request, analyst: AnalystUser, body: SegmentationCreate) -> SegmentationDetail:
    store = await request.app.state.segmentations.create(
        name=body.name,
        kind=body.kind,
        description=body.description,
        features=[f.model_dump(exclude_none=True) for f in body.features] if body.features else None,
        id_column=body.id_column,
        columns=body.columns,
        created_by=analyst.username,
    )
    return _detail(store)


@router.get(
    "/{name}",
    summary="One segmentation, with the JSON schema of its customers",
    description="`customer_schema` is the JSON schema of the `customer` body its predict takes. Unknown: 404.",
    responses=errors(401, 403, 404, 422),
)
async def get_segmentation(request: Request, _: CurrentUser, name: Name) -> SegmentationDetail:
    return _detail(await _store(request, name))


@router.patch(
    "/{name}",
    summary="Edit a segmentation's description (analyst)",
    description="Only the description changes; a null one clears it.",
    responses=errors(401, 403, 404, 422),
)
async def edit_segmentation(
    request: Request, _: AnalystUser, name: Name, body: SegmentationUpdate
) -> SegmentationDetail:
    return _detail(await request.app.state.segmentations.describe(name, body.description))


@router.delete(
    "/{name}",
    status_code=204,
    summary="Delete a segmentation with all its versions (analyst)",
    description="Its history rows stay, tied to it. `default` cannot be deleted (409).",
    responses=errors(401, 403, 404, 409, 422),
)
async def delete_segmentation(request: Request, _: AnalystUser, name: Name) -> Response:
    await request.app.state.segmentations.delete(name)
    return Response(status_code=204)


@router.post(
    "/{name}/train",
    summary="Train a new version of a segmentation (analyst)",
    description="On the CSV sent as multipart `file` (kind customer: none means the default dataset). "
    "Training uploads may be up to MAX_TRAIN_UPLOAD_MB. The new version becomes active in every worker. "
    "`wait=false`: 202 at once with a training job (GET /jobs/{job_id}) that ends with this result or error.",
    response_model=NamedTrainResult,
    responses={
        **STARTED,
        **errors(401, 403, 404, 409, 413, 422),
        **file_errors("A CSV missing declared columns, or with bad rows"),
    },
    form_limits={"max_files": 1, "max_fields": 20},
)
async def train_segmentation(
    request: Request,
    analyst: AnalystUser,
    name: Name,
    n_clusters: Annotated[int | None, Query(ge=2, le=20, description="Segments; absent = chosen automatically")] = None,
    random_state: Annotated[int, Query(ge=0, le=2**32 - 1)] = 42,
    as_of: AsOf = None,
    wait: Wait = True,
    file: CsvFile = None,
) -> Any:
    return await answer_training(
        request,
        await _store(request, name),
        file=file,
        n_clusters=n_clusters,
        random_state=random_state,
        as_of=as_of,
        wait=wait,
        by=analyst.username,
        result_model=NamedTrainResult,
    )


@router.post(
    "/{name}/predict",
    summary="Which segment of this segmentation is the customer in?",
    description="`customer` holds the segmentation's features (its `customer_schema`). An unseen category is "
    "accepted and named in `warnings`. Kept in the caller's history. `explain=true` adds `explanation`.",
    responses=errors(401, 403, 404, 409, 422),
)
async def predict(
    request: Request,
    user: CurrentUser,
    name: Name,
    body: NamedPredictBody,
    options: Annotated[ExplainQuery, Query()],
) -> NamedPredictionResult:
    store = await _store(request, name)
    answer = await segmentations.predict(
        request.app.state,
        user_id=user.id,
        store=store,
        customer=body.customer,
        transactions=body.transactions,
        as_of=body.as_of,
        explain=options.explain,
    )
    return NamedPredictionResult(**answer)


async def predict_batch(
    request: Request,
    user: CurrentUser,
    name: Name,
    batch: Annotated[NamedBatchUpload, File()],
    explain: ExplainFlag = False,
    as_of: AsOf = None,
) -> Response:
    store = await _store(request, name)
    customers: list[Any] | None = batch.customers
    if customers is not None and store.segmentation.kind == "customer":
        customers = segmentations.validate_customers(store, customers, "customers")
    return await answer_batch(request, user.id, store, batch.file, customers, as_of=as_of, explain=explain)


router.add_api_route(
    "/{name}/predict/batch",
    endpoint=predict_batch,
    methods=["POST"],
    summary="Score many customers with this segmentation",
    description="As POST /predict/batch: JSON `{customers: [...]}` or a CSV `file`; a CSV back with "
    "`Accept: text/csv` (input columns, the id column included, plus the results).",
    route_class_override=JsonOrFormRoute,
    response_model=BatchResult,
    responses={
        **errors(401, 403, 404, 409, 413, 422),
        **file_errors("A CSV missing declared columns, or with unusable rows (ask for text/csv to get them marked)"),
        200: {"content": {"text/csv": {"schema": {"type": "string"}}}},
    },
    form_limits={"max_files": 1, "max_fields": 20},
)


@router.get(
    "/{name}/clusters",
    summary="The segments of a segmentation's active version",
    description="Size, share, name and description of every segment, `means` per feature in its own units (categorical: the share of each level); kind customer keeps its `avg_*` fields. 409 before training.",
    response_model=NamedClusterSummary,
    responses=errors(401, 403, 404, 409, 422),
)
async def clusters(request: Request, _: CurrentUser, name: Name) -> Response:
    store = await _store(request, name)
    return Response(segmentations.clusters_json(store, store.require()), media_type="application/json")


@router.get(
    "/{name}/elbow",
    summary="Inertia and silhouette for a range of k",
    description="Kind customer: of the default dataset. Other kinds: of the active version's training "
    "sample (409 before the first training, or when it was trained with a fixed n_clusters).",
    responses={**errors(401, 403, 404, 409, 422), **file_errors("The default dataset has unusable rows")},
)
async def elbow(request: Request, _: CurrentUser, name: Name, k: Annotated[ElbowRange, Query()]) -> ElbowResult:
    if k.k_min > k.k_max:
        raise InvalidInput("k_min must not exceed k_max")
    store = await _store(request, name)
    return ElbowResult(**await segmentations.elbow(request.app.state, store, k.k_min, k.k_max))


@router.get(
    "/{name}/charts/clusters",
    summary="Segment charts as PNG data URIs",
    description="As GET /charts/clusters, for this segmentation's active version.",
    responses=errors(401, 403, 404, 409, 422),
)
async def cluster_charts(request: Request, _: CurrentUser, name: Name) -> ClusterCharts:
    served = (await _store(request, name)).require()
    return ClusterCharts(
        charts=await served.charts(),
        total_customers=served.metadata["total_customers"],
        n_clusters=served.metadata["n_clusters"],
    )


@router.get(
    "/{name}/charts/elbow",
    summary="The elbow chart as a PNG data URI",
    description="The figures of GET .../elbow drawn as a `data:image/png;base64,...` URI.",
    responses=errors(401, 403, 404, 409, 422),
)
async def elbow_chart(request: Request, _: CurrentUser, name: Name) -> ElbowChart:
    chart, optimal_k = await segmentations.elbow_chart(request.app.state, await _store(request, name))
    return ElbowChart(chart=chart, optimal_k=optimal_k)


@router.get(
    "/{name}/history",
    summary="Prediction history made with this segmentation, newest first",
    description="As GET /history, only this segmentation's rows (a deleted one of the same name keeps its own).",
    response_model=HistoryPage,
    responses=errors(401, 403, 404, 422),
)
async def history(request: Request, user: CurrentUser, name: Name, query: Annotated[HistoryQuery, Query()]) -> Response:
    body = await segmentations.history_page(request.app.state, user=user, query=query, segmentation=name)
    return Response(body, media_type="application/json")


@router.get(
    "/{name}/models",
    summary="A segmentation's versions, newest first (analyst)",
    description="A page of versions (`skip`, `limit`) with `total` and the active version.",
    responses=errors(401, 403, 404, 422),
)
async def list_models(
    request: Request, _: AnalystUser, name: Name, page: Annotated[ModelPageQuery, Query()]
) -> ModelPage:
    store = await _store(request, name)
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
    description="A version's segments, how k was chosen, its features and the missing shares of its training data.",
    responses=errors(401, 403, 404, 422),
)
async def get_model(request: Request, _: AnalystUser, name: Name, version: Version) -> NamedModelVersionDetail:
    store = await _store(request, name)
    return NamedModelVersionDetail(**await store.get_version(version))


@router.post(
    "/{name}/models/{version}/activate",
    summary="Make a version the active one (analyst)",
    description="Rollback or roll forward; every worker switches within about a second.",
    responses=errors(401, 403, 404, 409, 422),
)
async def activate_model(request: Request, _: AnalystUser, name: Name, version: Version) -> ModelVersionPublic:
    store = await _store(request, name)
    served = await store.activate(version)
    return ModelVersionPublic(**(await store.get_version(served.version)))


@router.delete(
    "/{name}/models/{version}",
    status_code=204,
    summary="Delete a version that is not the active one (analyst)",
    description="The active version cannot be deleted (409): activate another one first.",
    responses=errors(401, 403, 404, 409, 422),
)
async def delete_model(request: Request, _: AnalystUser, name: Name, version: Version) -> Response:
    await (await _store(request, name)).delete_version(version)
    return Response(status_code=204)


@router.get(
    "/{name}/drift",
    summary="Has the population moved since training? (analyst)",
    description="As GET /drift, for this segmentation: PSI per feature and for the segment mix since `since`.",
    responses=errors(401, 403, 404, 409, 422),
)
async def drift(request: Request, _: AnalystUser, name: Name, query: Annotated[DriftQuery, Query()]) -> DriftReport:
    store = await _store(request, name)
    state = request.app.state
    return DriftReport(**await drift_service.report(state.drift, store, version=query.version, since=query.since))
