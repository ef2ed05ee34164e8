"""Segmentation: train, predict (one and many), segments, elbow, charts, history, model versions."""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import APIRouter, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.database import Role
from app.deps import AnalystUser, CurrentUser
from app.errors import Forbidden, InvalidInput
from app.preprocess import DataValidationError
from app.routes.responses import ErrorBody, errors, is_json, validation_error
from app.schema import (
    BatchRequest,
    BatchResult,
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
from app.services import predictions as prediction_service
from app.services import segmentation

# Routes are matched in the order they are declared here, at a cost for every route tried:
# the four that carry the traffic come first, the cheapest reads before /predict.
router = APIRouter(tags=["segmentation"])
QueryModel = TypeVar("QueryModel", bound=BaseModel)

CSV_FILE_BODY = {
    "multipart/form-data": {
        "schema": {
            "type": "object",
            "properties": {"file": {"type": "string", "format": "binary", "description": "A CSV file"}},
        }
    }
}


async def _csv_upload(request: Request) -> UploadFile | None:
    """The `file` part of a multipart body, spooled to a temporary file; None when there is none.

    The body streams into the file as it arrives; BodySizeLimit stops it with 413 at the cap.
    """
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return None
    try:
        form = await request.form(max_files=1, max_fields=20)
    except (StarletteHTTPException, ValueError) as exc:  # a malformed multipart body
        reason = getattr(exc, "detail", None) or str(exc)
        raise InvalidInput(f"Could not read the multipart body: {reason}") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise InvalidInput(
            "The multipart body has no `file` part", [{"loc": ["body", "file"], "msg": "a CSV file is required"}]
        )
    return upload


def _component_schema(model: type[BaseModel]) -> dict:
    """The JSON schema of a body read by hand, its nested models referring to the OpenAPI components."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)  # CustomerFeatures is a component already: POST /predict takes it
    return schema


def _query_parameters(model: type[BaseModel]) -> list[dict]:
    """The OpenAPI parameters of a query read by hand, as FastAPI writes them for declared ones."""
    schema = model.model_json_schema()
    required = set(schema.get("required", ()))
    parameters = []
    for name, field in schema["properties"].items():
        parameter = {"name": name, "in": "query", "required": name in required, "schema": field}
        if "description" in field:
            parameter["description"] = field["description"]
        parameters.append(parameter)
    return parameters


_QUERY_DEFAULTS: dict[type[BaseModel], BaseModel] = {}


def _read_query(model: type[QueryModel], request: Request) -> QueryModel:
    """The query string validated by `model`; a 422 like FastAPI's for declared parameters.

    Declared query parameters cost about 10 µs a request in FastAPI's dependency solver, a
    sixth of a small request; one Pydantic validation of the already parsed query does it
    in about 2 µs, with the same rules, messages and locations. An empty query is the
    model's defaults, validated once.
    """
    if not request.scope.get("query_string"):
        defaults = _QUERY_DEFAULTS.get(model)
        if defaults is None:
            defaults = _QUERY_DEFAULTS[model] = model()
        return defaults  # type: ignore[return-value]
    try:
        return model.model_validate(dict(request.query_params))
    except ValidationError as exc:
        raise validation_error(exc, "query") from None


BodyModel = TypeVar("BodyModel", bound=BaseModel)


async def _read_json_body(model: type[BodyModel], request: Request) -> BodyModel:
    """The JSON body parsed and validated by `model` in one step; a 422 like FastAPI's for declared bodies.

    As FastAPI does, a body is read as JSON when its Content-Type says JSON or is missing.
    """
    content_type = request.headers.get("content-type")
    if content_type and not is_json(content_type):
        raise RequestValidationError(
            [
                {
                    "type": "model_attributes_type",
                    "loc": ("body",),
                    "input": None,
                    "msg": "The body must be a JSON object sent as application/json",
                }
            ]
        )
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise validation_error(exc, "body") from None


def _data_error(exc: DataValidationError) -> InvalidInput:
    return InvalidInput(exc.message, exc.problems)


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
    description="Computed from the training dataset (works before any training) and cached per dataset.",
    response_model=ElbowResult,
    responses=errors(401, 403, 409, 422),
    openapi_extra={"parameters": _query_parameters(ElbowRange)},
)
async def elbow(request: Request, _: CurrentUser) -> Response:
    k = _read_query(ElbowRange, request)
    if k.k_min > k.k_max:
        raise InvalidInput("k_min must not exceed k_max", [{"loc": ["query", "k_min"], "msg": "greater than k_max"}])
    elbow_cache = request.app.state.elbow
    body = elbow_cache.ready_json(k.k_min, k.k_max) or await elbow_cache.get_json(k.k_min, k.k_max)
    return Response(body, media_type="application/json")


@router.get(
    "/history",
    summary="Prediction history, newest first",
    description="The caller's own; analysts and admins may pass `user_id` to read another user's.",
    response_model=HistoryPage,
    responses=errors(401, 403, 422),
    openapi_extra={"parameters": _query_parameters(HistoryQuery)},
)
async def history(request: Request, user: CurrentUser) -> Response:
    query = _read_query(HistoryQuery, request)
    target = user.id
    if query.user_id is not None and query.user_id != user.id:
        if user.role not in (Role.analyst.value, Role.admin.value):
            raise Forbidden("Only analysts and admins may read another user's history")
        target = query.user_id
    body = await request.app.state.history_reader.page(
        user_id=target, skip=query.skip, limit=query.limit, before_id=query.before_id
    )
    return Response(body, media_type="application/json")


@router.post(
    "/predict",
    summary="Which segment is this customer in?",
    description="Assigns one customer to a segment of the active model and records it in the caller's history.",
    response_model=PredictionResult,
    responses=errors(401, 403, 409, 422),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CustomerFeatures"}}},
        }
    },
)
async def predict(request: Request, user: CurrentUser) -> Response:
    # The body is read and validated in one Pydantic step, and the answer serialized in one:
    # FastAPI's declared body and response model cost about a tenth of this request.
    customer = await _read_json_body(CustomerFeatures, request)
    served = request.app.state.models.require()
    cluster, name, confidence = served.assign([customer])[0]
    request.app.state.metrics.count_predictions(served.names, cluster, "single")
    data = customer.model_dump()
    await request.app.state.history_writer.add(
        prediction_service.history_row(
            user_id=user.id,
            customer=data,
            cluster=cluster,
            cluster_name=name,
            confidence=confidence,
            model_version=served.version,
        )
    )
    answer = PredictionResult(
        cluster=cluster, cluster_name=name, confidence=confidence, customer_data=customer, model_version=served.version
    )
    return Response(answer.model_dump_json(), media_type="application/json")


@router.post(
    "/train",
    summary="Train a new model version (analyst)",
    description=(
        "Trains on `data/customers.csv`, or on the CSV sent as multipart `file`. `n_clusters` absent: k is "
        "chosen by silhouette over 2..10. The new version becomes active at once in every worker. "
        "A bad CSV gets 422 naming columns and rows and never changes the active model. A training that "
        "runs past TRAIN_TIMEOUT_SECONDS is stopped and gets 422 saying so; the active model is kept."
    ),
    openapi_extra={"requestBody": {"required": False, "content": CSV_FILE_BODY}},
    responses={
        **errors(401, 403, 409, 413, 422),
        422: {
            "model": ErrorBody,
            "description": "A bad CSV (`detail` names columns and rows), a field rule broken, or a training that "
            "ran past TRAIN_TIMEOUT_SECONDS",
        },
    },
)
async def train(
    request: Request,
    analyst: AnalystUser,
    n_clusters: Annotated[int | None, Query(ge=2, le=20, description="Segments; absent = chosen automatically")] = None,
    random_state: Annotated[int, Query(ge=0, le=2**32 - 1)] = 42,
) -> TrainResult:
    upload = await _csv_upload(request)
    try:
        features = await segmentation.training_matrix(request.app.state.settings, upload)
    except DataValidationError as exc:
        raise _data_error(exc) from None
    finally:
        if upload is not None:
            await upload.close()
    store = request.app.state.models
    try:
        served = await store.train(
            features, n_clusters=n_clusters, random_state=random_state, created_by=analyst.username
        )
    except DataValidationError as exc:
        raise _data_error(exc) from None
    meta = served.metadata
    return TrainResult(
        message=f"Model trained with {meta['n_clusters']} segments",
        n_clusters=meta["n_clusters"],
        silhouette_score=meta.get("silhouette_score"),
        inertia=meta["inertia"],
        model_version=served.version,
        n_samples=meta["n_samples"],
        duration_seconds=meta.get("duration_seconds", 0.0),
        cluster_sizes={str(s["cluster_id"]): s["size"] for s in served.segments},
    )


def _wants_csv(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "text/csv" in accept and "application/json" not in accept.split(",")[0]


@router.post(
    "/predict/batch",
    summary="Score many customers at once",
    description=(
        "JSON `{customers: [...]}` (up to 10,000) or a multipart CSV `file` (up to the upload cap). Results "
        "are in input order. With `Accept: text/csv` the answer is a CSV of the input columns plus "
        "`cluster, cluster_name, confidence` and an `error` column for rows that break a rule."
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _component_schema(BatchRequest)}, **CSV_FILE_BODY},
        }
    },
    responses={
        **errors(401, 403, 409, 413, 422),
        200: {"content": {"application/json": {}, "text/csv": {"schema": {"type": "string"}}}},
    },
)
async def predict_batch(request: Request, user: CurrentUser) -> BatchResult:
    as_csv = _wants_csv(request)
    # The body is read first, so an over-cap upload is a 413 whatever else is wrong.
    upload = await _csv_upload(request)
    if upload is None:
        body = await _read_json_body(BatchRequest, request)
        limit = request.app.state.settings.max_batch_rows
        if len(body.customers) > limit:
            raise InvalidInput(
                f"At most {limit} customers per request (MAX_BATCH_ROWS)",
                [{"loc": ["body", "customers"], "msg": f"more than {limit} items"}],
            )
        served = request.app.state.models.require()
        scored = await run_in_threadpool(lambda: segmentation.score_records(served, body.customers, as_csv=as_csv))
    else:
        try:
            served = request.app.state.models.require()
            scored = await segmentation.score_csv(served, upload, as_csv=as_csv)
        except DataValidationError as exc:
            raise _data_error(exc) from None
        finally:
            await upload.close()
    if scored.n_failed and not as_csv:
        raise InvalidInput(
            f"{scored.n_failed} rows break a rule; ask for text/csv to get them marked per row", scored.problems
        )
    await prediction_service.record_batch(
        sessionmaker=request.app.state.database.sessionmaker,
        user_id=user.id,
        model_version=served.version,
        labels=scored.labels,
        n_failed=scored.n_failed,
    )
    request.app.state.metrics.count_predictions(served.names, scored.labels, "batch")
    if as_csv:
        return StreamingResponse(
            scored.csv_chunks(),
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="predictions.csv"'},
        )
    # Serialised in one pass: a BatchResult object per row costs more than the scoring itself.
    return StreamingResponse(scored.json_chunks(), media_type="application/json")


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
    "/models/{version}",
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
    responses=errors(401, 403, 404),
)
async def activate_model(
    version: Annotated[str, Path(max_length=64)], request: Request, _: AnalystUser
) -> ModelVersionPublic:
    served = await request.app.state.models.activate(version)
    return ModelVersionPublic(**(await request.app.state.models.get_version(served.version)))
