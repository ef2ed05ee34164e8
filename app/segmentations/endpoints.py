"""The segmentation routes: create, list, edit, delete, and every route under /segmentations/{name}.

These handlers are the only implementation. The seed's paths (`/train`, `/predict`, `/clusters`, ...)
serve the same handlers for `default` (app.segmentations.legacy): a handler finds its segmentation
through the `SegmentationStore` dependency, which reads the name from the path.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, File, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BeforeValidator

from app.auth.dependencies import AnalystUser, CurrentUser
from app.core.errors import InvalidInput
from app.core.params import CSV_ANSWER, FORM_LIMITS, CsvFile, is_multipart, wants_csv
from app.core.responses import errors, file_errors
from app.core.routing import FastRoute, JsonOrFormRoute
from app.history.schemas import HistoryPage, HistoryQuery
from app.jobs.schemas import STARTED, Wait, accepted
from app.ml.value import DEFAULT_HORIZON_DAYS, MAX_HORIZON_DAYS
from app.segmentations import service as segmentations
from app.segmentations.as_of import as_of_value
from app.segmentations.explain_schemas import PredictQuery
from app.segmentations.kinds.registry import feature_schema, kind_of
from app.segmentations.results import (
    BatchResult,
    ClusterCharts,
    ElbowChart,
    ElbowResult,
    NamedClusterSummary,
    NamedPredictionResult,
    NamedTrainResult,
)
from app.segmentations.schemas import (
    ElbowRange,
    NamedBatchUpload,
    NamedPredictBody,
    SegmentationCreate,
    SegmentationDetail,
    SegmentationList,
    SegmentationPublic,
    SegmentationUpdate,
    TrainingUpload,
)
from app.sources.service import SourceCatalog
from app.versions.activation import Actor, acting_as
from app.versions.dependencies import NAMED, SegmentationStore
from app.versions.identity_schemas import VersionComparison
from app.versions.store import ModelStore
from app.versions.training import TrainingRequest

# A body without a Content-Type is read as JSON, as clients written against older FastAPI expect.
router = APIRouter(prefix="/segmentations", tags=["segmentations"], strict_content_type=False, route_class=FastRoute)

ExplainFlag = Annotated[bool, Query(description="Add each row's `top_feature` and `margin` (also as CSV columns)")]
NClusters = Annotated[int | None, Query(ge=2, le=20, description="Segments; absent = chosen automatically")]
RandomState = Annotated[int, Query(ge=0, le=2**32 - 1)]
AsOf = Annotated[
    date | None,
    BeforeValidator(as_of_value),
    Query(
        description="Kind rfm: the day RFM is computed as of, YYYY-MM-DD or YYYYMMDD (default the day after "
        "the log's last date); rows dated later are left out and counted",
    ),
]
Name = Annotated[str, Path(description="The segmentation's name (`default` is the seed's)")]
HorizonDays = Annotated[
    int,
    Query(
        ge=1,
        le=MAX_HORIZON_DAYS,
        description="Kind rfm: the days ahead that expected_purchases and clv are counted over",
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
        "columns": None,
        "active_version": current.version if current is not None else None,
        "n_clusters": current.metadata.get("n_clusters") if current is not None else None,
        "created_at": info.created_at,
        "created_by": info.created_by,
    } | kind_of(info).public(info)


def _detail(store: ModelStore) -> SegmentationDetail:
    return SegmentationDetail(**_public(store), customer_schema=segmentations.customer_json_schema(store))


# --- the segmentations themselves -------------------------------------------------------------


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
    responses=errors(401, 403, 404),
    openapi_extra=NAMED,
)
async def get_segmentation(_: CurrentUser, store: SegmentationStore) -> SegmentationDetail:
    return _detail(store)


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


# --- training ---------------------------------------------------------------------------------


async def train(
    request: Request,
    analyst: AnalystUser,
    store: SegmentationStore,
    body: Annotated[TrainingUpload, File()],
    n_clusters: NClusters = None,
    random_state: RandomState = 42,
    as_of: AsOf = None,
    wait: Wait = True,
) -> Any:
    file = body.file
    if file is None and body.source is None and is_multipart(request):
        raise InvalidInput("The multipart body has no `file` part: send the CSV as `file`")
    if body.source is not None:
        if file is not None:
            raise InvalidInput("Send a `file` or name a `source`, not both")
        await SourceCatalog(database=request.app.state.database, settings=request.app.state.settings).require(
            body.source
        )
    upload = file.file if file is not None else None
    asked = TrainingRequest(
        n_clusters=n_clusters, random_state=random_state, as_of=as_of, by=analyst.username, source=body.source
    )
    # The version it makes active names the analyst (model.activated); a job's task inherits this.
    with acting_as(Actor.user(analyst)):
        if not wait:
            job = await request.app.state.jobs.submit(
                store,
                upload=upload,
                filename=file.filename if file is not None else None,
                request=asked,
                result_model=NamedTrainResult,
            )
            return accepted(job)
        trainer = segmentations.SegmentationTrainer(segmentations.services_of(request))
        return NamedTrainResult(**await trainer.train(store, upload, asked))


TRAIN_DESCRIPTION = (
    "On the CSV sent as multipart `file` (kind customer: none means the default dataset, "
    "`data/customers.csv`; `n_clusters` absent: k chosen by silhouette over 2..10). Training uploads may be "
    'up to MAX_TRAIN_UPLOAD_MB. JSON `{"source": NAME}` trains on a data source (GET /sources), read when the '
    "training starts, within the same limits (unknown: 404). The new version becomes active in every worker. "
    "A bad file gets 422 naming columns and rows and never changes the active version; a training past "
    "TRAIN_TIMEOUT_SECONDS is stopped (422). `wait=false`: 202 at once with a training job (GET /jobs/{job_id}) "
    "that ends with this result or error."
)
router.add_api_route(
    "/{name}/train",
    endpoint=train,
    methods=["POST"],
    summary="Train a new version of a segmentation (analyst)",
    description=TRAIN_DESCRIPTION,
    route_class_override=JsonOrFormRoute,
    response_model=NamedTrainResult,
    responses={
        **STARTED,
        **errors(401, 403, 404, 409, 413, 422),
        **file_errors("A CSV missing declared columns, or with bad rows"),
    },
    form_limits=FORM_LIMITS,
    openapi_extra=NAMED,
)

# --- scoring ----------------------------------------------------------------------------------


@router.post(
    "/{name}/predict",
    summary="Which segment of this segmentation is the customer in?",
    description="`customer` holds the segmentation's features (its `customer_schema`). An unseen category is "
    "accepted and named in `warnings`. Kept in the caller's history. `explain=true` adds `explanation`.",
    responses=errors(401, 403, 404, 409, 422),
    openapi_extra=NAMED,
)
async def predict(
    request: Request,
    user: CurrentUser,
    store: SegmentationStore,
    body: NamedPredictBody,
    options: Annotated[PredictQuery, Query()],
) -> NamedPredictionResult:
    answer = await segmentations.predict(
        segmentations.services_of(request),
        user_id=user.id,
        store=store,
        customer=body.customer,
        transactions=body.transactions,
        as_of=body.as_of,
        explain=options.explain,
        horizon_days=options.horizon_days,
    )
    return NamedPredictionResult(**answer)


async def predict_batch(
    request: Request,
    user: CurrentUser,
    store: SegmentationStore,
    batch: Annotated[NamedBatchUpload, File()],
    explain: ExplainFlag = False,
    as_of: AsOf = None,
    horizon_days: HorizonDays = DEFAULT_HORIZON_DAYS,
) -> Response:
    as_csv = wants_csv(request)
    services = segmentations.services_of(request)
    served, scored = await segmentations.score_batch(
        services,
        store,
        upload=batch.file.file if batch.file is not None else None,
        customers=batch.customers,
        as_csv=as_csv,
        as_of=as_of,
        explain=explain,
        horizon_days=horizon_days,
    )
    await segmentations.record_batch(services, user_id=user.id, store=store, served=served, scored=scored)
    if as_csv:
        return StreamingResponse(
            scored.csv_chunks(),
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="predictions.csv"'},
        )
    # Serialised in one pass: a BatchResult object per row costs more than the scoring itself.
    return StreamingResponse(scored.json_chunks(), media_type="application/json")


BATCH_DESCRIPTION = (
    "JSON `{customers: [...]}` (up to MAX_BATCH_ROWS, each as the segmentation's schema declares) or a multipart "
    "CSV `file` (kind rfm: a transaction log). Results are in input order. With `Accept: text/csv` the answer is "
    "a CSV of the input columns (the id column included) plus `cluster, cluster_name, confidence` and an `error` "
    "column for rows that break a rule."
)
router.add_api_route(
    "/{name}/predict/batch",
    endpoint=predict_batch,
    methods=["POST"],
    summary="Score many customers with this segmentation",
    description=BATCH_DESCRIPTION,
    route_class_override=JsonOrFormRoute,
    response_model=BatchResult,
    responses={
        **errors(401, 403, 404, 409, 413, 422),
        **file_errors("A CSV missing declared columns, or with unusable rows (ask for text/csv to get them marked)"),
        **CSV_ANSWER,
    },
    form_limits=FORM_LIMITS,
    openapi_extra=NAMED,
)


# --- describing -------------------------------------------------------------------------------


@router.get(
    "/{name}/clusters",
    summary="The segments of a segmentation's active version",
    description="Size, share, name and description of every segment, `means` per feature in its own units "
    "(categorical: the share of each level), `segment_key` and `generated_name`; kind customer keeps its "
    "`avg_*` fields. 409 before training.",
    response_model=NamedClusterSummary,
    responses=errors(401, 403, 404, 409),
    openapi_extra=NAMED,
)
async def clusters(_: CurrentUser, store: SegmentationStore) -> Response:
    # Serialized once per version: the answer only changes with the version.
    return Response(segmentations.clusters_json(store, store.require()), media_type="application/json")


@router.get(
    "/{name}/elbow",
    summary="Inertia and silhouette for a range of k",
    description="Kind customer: of the default dataset (works before any training; cached per dataset; a "
    "dataset with unusable rows gets 422 listing them). Other kinds: of the active version's training "
    "sample (409 before the first training, or when it was trained with a fixed n_clusters).",
    response_model=ElbowResult,
    responses={**errors(401, 403, 404, 409, 422), **file_errors("The default dataset has unusable rows")},
    openapi_extra=NAMED,
)
async def elbow(
    request: Request, _: CurrentUser, store: SegmentationStore, k: Annotated[ElbowRange, Query()]
) -> Response:
    if k.k_min > k.k_max:
        raise InvalidInput("k_min must not exceed k_max")
    body = await segmentations.elbow_json(segmentations.services_of(request), store, k.k_min, k.k_max)
    return Response(body, media_type="application/json")


@router.get(
    "/{name}/charts/clusters",
    summary="Segment charts as PNG data URIs",
    description="A pie of segment shares, a bar chart of average features and a size chart, each a "
    "`data:image/png;base64,...` URI ready for an `<img src>`. 409 while no version is trained.",
    responses=errors(401, 403, 404, 409),
    openapi_extra=NAMED,
)
async def cluster_charts(_: CurrentUser, store: SegmentationStore) -> ClusterCharts:
    served = store.require()
    return ClusterCharts(
        charts=await served.charts(),
        total_customers=served.metadata["total_customers"],
        n_clusters=served.metadata["n_clusters"],
    )


@router.get(
    "/{name}/charts/elbow",
    summary="The elbow chart as a PNG data URI",
    description="The figures of GET .../elbow drawn as a `data:image/png;base64,...` URI.",
    responses=errors(401, 403, 404, 409),
    openapi_extra=NAMED,
)
async def elbow_chart(request: Request, _: CurrentUser, store: SegmentationStore) -> ElbowChart:
    chart, optimal_k = await segmentations.elbow_chart(segmentations.services_of(request), store)
    return ElbowChart(chart=chart, optimal_k=optimal_k)


@router.get(
    "/{name}/history",
    summary="Prediction history made with this segmentation, newest first",
    description="As GET /history, only this segmentation's rows (a deleted one of the same name keeps its own).",
    response_model=HistoryPage,
    responses=errors(401, 403, 404, 422),
    openapi_extra=NAMED,
)
async def history(
    request: Request, user: CurrentUser, store: SegmentationStore, query: Annotated[HistoryQuery, Query()]
) -> Response:
    body = await segmentations.history_page(segmentations.services_of(request), user=user, query=query, store=store)
    return Response(body, media_type="application/json")


VersionQuery = Annotated[str, Query(min_length=1, max_length=64)]

COMPARE_DESCRIPTION = (
    "Scores one CSV `file` (kind customer without one: the default dataset; kind rfm: a transaction log) with "
    "both versions. `matrix[i][j]` counts customers in segment i of `from_version` and j of `to_version`; "
    "`unchanged` is the share that kept its cluster_id, `unchanged_segments` the share that kept its segment_key "
    "(the figure that stays meaningful when k changes). Unknown version: 404; a CSV with unusable rows: 422 "
    "naming them."
)


@router.post(
    "/{name}/compare",
    summary="Compare two versions of a segmentation on one file (analyst)",
    description=COMPARE_DESCRIPTION,
    responses={**errors(401, 403, 404, 409, 413, 422), **file_errors("A CSV with unusable rows")},
    form_limits=FORM_LIMITS,
    openapi_extra=NAMED,
)
async def compare(
    request: Request,
    _: AnalystUser,
    store: SegmentationStore,
    from_version: VersionQuery,
    to_version: VersionQuery,
    file: CsvFile = None,
) -> VersionComparison:
    if file is None and is_multipart(request):
        raise InvalidInput("The multipart body has no `file` part: send the CSV as `file`")
    answer = await segmentations.compare_versions(
        segmentations.services_of(request),
        store,
        from_version=from_version,
        to_version=to_version,
        upload=file.file if file is not None else None,
    )
    return VersionComparison(**answer)
