"""Segmentation: train, predict (one and many), segments, elbow, charts, history, model versions."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, File, Path, Query, Request, UploadFile
from fastapi.responses import Response, StreamingResponse
from starlette.convertors import StringConvertor, register_url_convertor

from app.deps import AnalystUser, CurrentUser
from app.drift_schema import DriftQuery, DriftReport
from app.errors import InvalidInput
from app.explain_schema import ExplainQuery
from app.routes.bodies import FastRoute, JsonOrFormRoute
from app.routes.jobs import STARTED, Wait, accepted
from app.routes.responses import errors, file_errors
from app.schema import (
    BatchResult,
    BatchUpload,
    ClusterCharts,
    ClusterSummary,
    CustomerFeatures,
    ElbowChart,
    ElbowRange,
    ElbowResult,
    HistoryPage,
    HistoryQuery,
    ModelList,
    ModelVersionDetail,
    ModelVersionPublic,
    PredictionResult,
    TrainResult,
)
from app.services import drift as drift_service
from app.services import segmentation, segmentations
from app.services.models import ModelStore

# Routes are matched in the order they are declared here, at a cost for every route tried:
# the four that carry the traffic come first, the cheapest reads before /predict. They are
# FastRoutes: their declared inputs and answers take the short way (see app.routes.bodies).
# A body without a Content-Type is read as JSON, as clients written against older FastAPI expect.
router = APIRouter(tags=["segmentation"], strict_content_type=False, route_class=FastRoute)

CsvFile = Annotated[UploadFile | None, File(description="A CSV file of customers")]


class ModelVersionConvertor(StringConvertor):
    """A version id in a path: any segment but `compare`, which is POST /models/compare's own (so a GET
    there is a 405 naming POST, not a search for a version called "compare")."""

    regex = r"(?!compare$)[^/]+"


register_url_convertor("model_version", ModelVersionConvertor())


@router.get(
    "/clusters",
    summary="The segments of the active model",
    description="Size, share and average features of every segment, with its name and a description in "
    "words. 409 while no model is trained.",
    response_model=ClusterSummary,
    responses=errors(401, 403, 409),
)
async def clusters(request: Request, _: CurrentUser) -> Response:
    served = request.app.state.models.require()
    # Serialized once per model version: the answer only changes with the version.
    return Response(segmentation.cluster_summary_json(served), media_type="application/json")


@router.get(
    "/elbow",
    summary="Inertia and silhouette for a range of k",
    description="Computed from the training dataset (works before any training) and cached per dataset. "
    "A dataset with unusable rows gets 422 listing them.",
    response_model=ElbowResult,
    responses={**errors(401, 403, 409, 422), **file_errors("The default dataset has unusable rows")},
)
async def elbow(request: Request, _: CurrentUser, k: Annotated[ElbowRange, Query()]) -> Response:
    if k.k_min > k.k_max:
        raise InvalidInput("k_min must not exceed k_max")
    elbow_cache = request.app.state.elbow
    body = elbow_cache.ready_json(k.k_min, k.k_max) or await elbow_cache.get_json(k.k_min, k.k_max)
    return Response(body, media_type="application/json")


@router.get(
    "/history",
    summary="Prediction history, newest first",
    description="The caller's own; analysts and admins may pass `user_id` to read another user's. Every row "
    "says its `segmentation`; `segmentation=NAME` keeps that segmentation's rows only (unknown: 404).",
    response_model=HistoryPage,
    responses=errors(401, 403, 404, 422),
)
async def history(request: Request, user: CurrentUser, query: Annotated[HistoryQuery, Query()]) -> Response:
    body = await segmentations.history_page(request.app.state, user=user, query=query, segmentation=None)
    return Response(body, media_type="application/json")


async def predict(
    request: Request, user: CurrentUser, customer: CustomerFeatures, options: Annotated[ExplainQuery, Query()]
) -> PredictionResult:
    store = request.app.state.models
    served = store.require()
    data = customer.model_dump()
    explained = segmentations.explained(served, data) if options.explain else None
    if explained is not None:  # the explanation's own segment and confidence
        cluster, name, confidence, explanation = explained
    else:
        (cluster, name, confidence), explanation = served.assign([customer])[0], None
    await segmentations.record_prediction(
        request.app.state,
        user_id=user.id,
        store=store,
        served=served,
        customer=data,
        cluster=cluster,
        name=name,
        confidence=confidence,
    )
    return PredictionResult(
        cluster=cluster,
        cluster_name=name,
        confidence=confidence,
        customer_data=customer,
        model_version=served.version,
        explanation=explanation,  # type: ignore[arg-type]
    )


router.add_api_route(
    "/predict",
    endpoint=predict,
    methods=["POST"],
    summary="Which segment is this customer in?",
    description="Assigns one customer to a segment of the active model and records it in the caller's history. "
    "With `explain=true` the answer adds `explanation`: the runner-up segment and each feature's share of the "
    "margin, in one sentence too.",
    responses=errors(401, 403, 409, 422),
)


@router.post(
    "/train",
    summary="Train a new model version (analyst)",
    description=(
        "Trains on `data/customers.csv`, or on the CSV sent as multipart `file`. `n_clusters` absent: k is "
        "chosen by silhouette over 2..10. The new version becomes active at once in every worker. "
        "A bad CSV gets 422 naming columns and rows and never changes the active model. A training that "
        "runs past TRAIN_TIMEOUT_SECONDS is stopped and gets 422 saying so; the active model is kept. "
        "`wait=false`: 202 at once with a training job (GET /jobs/{job_id}) that ends with this result or error."
    ),
    response_model=TrainResult,
    responses={
        **STARTED,
        **errors(401, 403, 409, 413, 422),
        **file_errors("A bad CSV (`errors` names columns and rows), or a training that ran past TRAIN_TIMEOUT_SECONDS"),
    },
    form_limits={"max_files": 1, "max_fields": 20},
)
async def train(
    request: Request,
    analyst: AnalystUser,
    n_clusters: Annotated[int | None, Query(ge=2, le=20, description="Segments; absent = chosen automatically")] = None,
    random_state: Annotated[int, Query(ge=0, le=2**32 - 1)] = 42,
    wait: Wait = True,
    file: CsvFile = None,
) -> Any:
    return await answer_training(
        request,
        request.app.state.models,
        file=file,
        n_clusters=n_clusters,
        random_state=random_state,
        as_of=None,
        wait=wait,
        by=analyst.username,
        result_model=TrainResult,
    )


async def answer_training(
    request: Request,
    store: ModelStore,
    *,
    file: UploadFile | None,
    n_clusters: int | None,
    random_state: int,
    as_of: date | None,
    wait: bool,
    by: str,
    result_model: type[TrainResult],
) -> Any:
    """The answer of a training (either door): its result, or with `wait=false` a 202 and the job."""
    if file is None and _is_multipart(request):
        raise InvalidInput("The multipart body has no `file` part: send the CSV as `file`")
    state = request.app.state
    if not wait:
        job = await state.jobs.submit(
            store,
            file=file,
            n_clusters=n_clusters,
            random_state=random_state,
            as_of=as_of,
            by=by,
            result_model=result_model,
        )
        return accepted(job)
    served = await segmentations.train(
        state, store, file=file, n_clusters=n_clusters, random_state=random_state, by=by, as_of=as_of
    )
    return result_model(**segmentations.train_result(store, served))


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


def _wants_csv(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "text/csv" in accept and "application/json" not in accept.split(",")[0]


ExplainFlag = Annotated[bool, Query(description="Add each row's `top_feature` and `margin` (also as CSV columns)")]


async def predict_batch(
    request: Request, user: CurrentUser, batch: Annotated[BatchUpload, File()], explain: ExplainFlag = False
) -> Response:
    return await answer_batch(request, user.id, request.app.state.models, batch.file, batch.customers, explain=explain)


async def answer_batch(
    request: Request,
    user_id: int,
    store: ModelStore,
    file: UploadFile | None,
    customers: list[Any] | None,
    *,
    as_of: date | None = None,
    explain: bool = False,
) -> Response:
    """The answer of a batch (either door): JSON, or CSV when the client asks for text/csv."""
    as_csv = _wants_csv(request)
    state = request.app.state
    served, scored = await segmentations.score_batch(
        state, store, file=file, customers=customers, as_csv=as_csv, as_of=as_of, explain=explain
    )
    await segmentations.record_batch(state, user_id=user_id, store=store, served=served, scored=scored)
    if as_csv:
        return StreamingResponse(
            scored.csv_chunks(),
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="predictions.csv"'},
        )
    # Serialised in one pass: a BatchResult object per row costs more than the scoring itself.
    return StreamingResponse(scored.json_chunks(), media_type="application/json")


router.add_api_route(
    "/predict/batch",
    endpoint=predict_batch,
    methods=["POST"],
    summary="Score many customers at once",
    description=(
        "JSON `{customers: [...]}` (up to 10,000) or a multipart CSV `file` (up to the upload cap). Results "
        "are in input order. With `Accept: text/csv` the answer is a CSV of the input columns plus "
        "`cluster, cluster_name, confidence` and an `error` column for rows that break a rule."
    ),
    route_class_override=JsonOrFormRoute,
    response_model=BatchResult,
    responses={
        **errors(401, 403, 409, 413, 422),
        **file_errors("A CSV with unusable rows (ask for text/csv to get them marked per row)"),
        200: {"content": {"text/csv": {"schema": {"type": "string"}}}},
    },
    form_limits={"max_files": 1, "max_fields": 20},
)


@router.get(
    "/charts/clusters",
    summary="Segment charts as PNG data URIs",
    description="A pie of segment shares, a bar chart of average features and a size chart, each a "
    "`data:image/png;base64,...` URI ready for an `<img src>`. 409 while no model is trained.",
    responses=errors(401, 403, 409),
)
async def cluster_charts(request: Request, _: CurrentUser) -> ClusterCharts:
    served = request.app.state.models.require()
    return ClusterCharts(
        charts=await served.charts(),
        total_customers=served.metadata["total_customers"],
        n_clusters=served.metadata["n_clusters"],
    )


@router.get(
    "/charts/elbow",
    summary="The elbow chart as a PNG data URI",
    description="Inertia and silhouette against k over the training dataset, as a "
    "`data:image/png;base64,...` URI. 409 when there is no dataset.",
    responses=errors(401, 403, 409),
)
async def elbow_chart(request: Request, _: CurrentUser) -> ElbowChart:
    chart, optimal_k = await request.app.state.elbow.chart()
    return ElbowChart(chart=chart, optimal_k=optimal_k)


@router.get(
    "/models",
    summary="Model versions, newest first (analyst)",
    description="Every trained version with its quality figures; `active` marks the one being served.",
    responses=errors(401, 403),
)
async def list_models(request: Request, _: AnalystUser) -> ModelList:
    versions, active = await request.app.state.models.list_versions()
    return ModelList(models=[ModelVersionPublic(**v) for v in versions], active_version=active)


@router.get(
    "/models/{version:model_version}",
    summary="One model version (analyst)",
    description="A version's segments, how k was chosen, its features and library versions.",
    responses=errors(401, 403, 404, 422),
)
async def get_model(
    version: Annotated[str, Path(max_length=64)], request: Request, _: AnalystUser
) -> ModelVersionDetail:
    return ModelVersionDetail(**await request.app.state.models.get_version(version))


@router.post(
    "/models/{version}/activate",
    summary="Make a version the active one (analyst)",
    description="Rollback or roll forward; every worker switches within about a second.",
    responses=errors(401, 403, 404, 422),
)
async def activate_model(
    version: Annotated[str, Path(max_length=64)], request: Request, _: AnalystUser
) -> ModelVersionPublic:
    served = await request.app.state.models.activate(version)
    return ModelVersionPublic(**(await request.app.state.models.get_version(served.version)))


@router.get(
    "/drift",
    summary="Has the population moved since training? (analyst)",
    description="PSI per clustering feature and for the segment mix, between the version's training bins and "
    "what it scored through /predict and /predict/batch (both doors, every worker) since `since`. "
    "`insufficient_data` below 500 rows; 409 for a version trained before drift bins were kept.",
    responses=errors(401, 403, 404, 409, 422),
)
async def drift(request: Request, _: AnalystUser, query: Annotated[DriftQuery, Query()]) -> DriftReport:
    state = request.app.state
    return DriftReport(
        **await drift_service.report(state.drift, state.models, version=query.version, since=query.since)
    )
