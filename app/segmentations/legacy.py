"""The seed's paths (`/train`, `/predict`, `/clusters`, `/models`, ...): doors into `default`.

Each is the handler of /segmentations/{name}/... itself, served where the path names no segmentation, so
`SegmentationStore` is `default`. Three doors adapt what the contract gives them differently: `/predict`
takes the customer features as the whole body, `/history` reads across segmentations, and `/models`
lists every version unpaged.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.convertors import StringConvertor, register_url_convertor

from app.auth.dependencies import AnalystUser, CurrentUser
from app.core.params import CSV_ANSWER, FORM_LIMITS
from app.core.responses import errors, file_errors
from app.core.routing import FastRoute, JsonOrFormRoute
from app.history.schemas import HistoryPage, HistoryQuery
from app.jobs.schemas import STARTED
from app.segmentations import endpoints
from app.segmentations import service as segmentations
from app.segmentations.explain_schemas import ExplainQuery
from app.segmentations.kinds.customer_record import CustomerFeatures
from app.segmentations.results import BatchResult, ClusterSummary, ElbowResult, NamedTrainResult, PredictionResult
from app.versions import endpoints as versions
from app.versions.dependencies import SegmentationStore
from app.versions.schemas import ModelList, ModelVersionPublic

router = APIRouter(tags=["segmentation"], strict_content_type=False, route_class=FastRoute)


class ModelVersionConvertor(StringConvertor):
    """A version id in a path: any segment but `compare`, which is POST /models/compare's own (so a GET
    there is a 405 naming POST, not a search for a version called "compare")."""

    regex = r"(?!compare$)[^/]+"


register_url_convertor("model_version", ModelVersionConvertor())

# Matched in this order, at a cost for every route tried: the cheapest reads and /predict first.
router.add_api_route(
    "/clusters",
    endpoints.clusters,
    methods=["GET"],
    summary="The segments of the active model",
    description="Size, share and average features of every segment, with its name and a description in "
    "words. 409 while no model is trained.",
    response_model=ClusterSummary,
    responses=errors(401, 403, 409),
)
router.add_api_route(
    "/elbow",
    endpoints.elbow,
    methods=["GET"],
    summary="Inertia and silhouette for a range of k",
    description="Computed from the training dataset (works before any training) and cached per dataset. "
    "A dataset with unusable rows gets 422 listing them.",
    response_model=ElbowResult,
    responses={**errors(401, 403, 409, 422), **file_errors("The default dataset has unusable rows")},
)


@router.get(
    "/history",
    summary="Prediction history, newest first",
    description="The caller's own; analysts and admins may pass `user_id` to read another user's. Every row "
    "says its `segmentation`; `segmentation=NAME` keeps that segmentation's rows only (unknown: 404).",
    response_model=HistoryPage,
    responses=errors(401, 403, 404, 422),
)
async def history(request: Request, user: CurrentUser, query: Annotated[HistoryQuery, Query()]) -> Response:
    body = await segmentations.history_page(segmentations.services_of(request), user=user, query=query, store=None)
    return Response(body, media_type="application/json")


@router.post(
    "/predict",
    summary="Which segment is this customer in?",
    description="Assigns one customer to a segment of the active model and records it in the caller's history. "
    "With `explain=true` the answer adds `explanation`: the runner-up segment and each feature's share of the "
    "margin, in one sentence too.",
    responses=errors(401, 403, 409, 422),
)
async def predict(
    request: Request,
    user: CurrentUser,
    store: SegmentationStore,
    customer: CustomerFeatures,
    options: Annotated[ExplainQuery, Query()],
) -> PredictionResult:
    answer = await segmentations.predict(
        segmentations.services_of(request),
        user_id=user.id,
        store=store,
        customer=customer,
        explain=options.explain,
        checked=True,
    )
    return PredictionResult(**(answer | {"customer_data": customer}))


router.add_api_route(
    "/train",
    endpoints.train,
    methods=["POST"],
    route_class_override=JsonOrFormRoute,
    summary="Train a new model version (analyst)",
    description=(
        "Trains on `data/customers.csv`, on the CSV sent as multipart `file`, or on the data source named by "
        'JSON `{"source": NAME}` (GET /sources; unknown: 404). `n_clusters` absent: k is '
        "chosen by silhouette over 2..10. The new version becomes active at once in every worker. "
        "A bad CSV gets 422 naming columns and rows and never changes the active model. A training that "
        "runs past TRAIN_TIMEOUT_SECONDS is stopped and gets 422 saying so; the active model is kept. "
        "`wait=false`: 202 at once with a training job (GET /jobs/{job_id}) that ends with this result or error."
    ),
    response_model=NamedTrainResult,
    responses={
        **STARTED,
        **errors(401, 403, 404, 409, 413, 422),
        **file_errors("A bad CSV (`errors` names columns and rows), or a training that ran past TRAIN_TIMEOUT_SECONDS"),
    },
    form_limits=FORM_LIMITS,
)
router.add_api_route(
    "/predict/batch",
    endpoints.predict_batch,
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
        **CSV_ANSWER,
    },
    form_limits=FORM_LIMITS,
)
router.add_api_route(
    "/charts/clusters",
    endpoints.cluster_charts,
    methods=["GET"],
    summary="Segment charts as PNG data URIs",
    description="A pie of segment shares, a bar chart of average features and a size chart, each a "
    "`data:image/png;base64,...` URI ready for an `<img src>`. 409 while no model is trained.",
    responses=errors(401, 403, 409),
)
router.add_api_route(
    "/charts/elbow",
    endpoints.elbow_chart,
    methods=["GET"],
    summary="The elbow chart as a PNG data URI",
    description="Inertia and silhouette against k over the training dataset, as a "
    "`data:image/png;base64,...` URI. 409 when there is no dataset.",
    responses=errors(401, 403, 409),
)


@router.get(
    "/models",
    summary="Model versions, newest first (analyst)",
    description="Every trained version with its quality figures; `active` marks the one being served.",
    responses=errors(401, 403),
)
async def list_models(_: AnalystUser, store: SegmentationStore) -> ModelList:
    versions_, active = await store.list_versions()
    return ModelList(models=[ModelVersionPublic(**v) for v in versions_], active_version=active)


router.add_api_route(
    "/models/{version:model_version}",
    versions.get_model,
    methods=["GET"],
    summary="One model version (analyst)",
    description="A version's segments, how k was chosen, its features and library versions.",
    responses=errors(401, 403, 404, 422),
)
router.add_api_route(
    "/models/{version}/activate",
    versions.activate_model,
    methods=["POST"],
    summary="Make a version the active one (analyst)",
    description="Rollback or roll forward; every worker switches within about a second.",
    responses=errors(401, 403, 404, 422),
)
router.add_api_route(
    "/models/compare",
    endpoints.compare,
    methods=["POST"],
    summary="Compare two model versions on one file (analyst)",
    description=endpoints.COMPARE_DESCRIPTION,
    responses={**errors(401, 403, 404, 409, 413, 422), **file_errors("A CSV with unusable rows")},
    form_limits=FORM_LIMITS,
)
router.add_api_route(
    "/clusters/{cluster_id}",
    versions.rename_segment,
    methods=["PUT"],
    summary="Name a segment of the active model (analyst)",
    description=versions.RENAME_DESCRIPTION,
    responses=errors(401, 403, 404, 409, 422),
)
router.add_api_route(
    "/drift",
    versions.drift,
    methods=["GET"],
    summary="Has the population moved since training? (analyst)",
    description="PSI per clustering feature and for the segment mix, between the version's training bins and "
    "what it scored through /predict and /predict/batch (both doors, every worker) since `since`. "
    "`insufficient_data` below 500 rows; 409 for a version trained before drift bins were kept.",
    responses=errors(401, 403, 404, 409, 422),
)
