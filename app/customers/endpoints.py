"""The customer base routes under /segmentations/{name}: runs, their changes, a customer, an audience."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, File, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BeforeValidator

from app.auth.dependencies import AnalystUser
from app.core.errors import InvalidInput
from app.core.params import CSV_ANSWER, FORM_LIMITS, is_multipart, wants_csv
from app.core.responses import errors, file_errors
from app.core.routing import FastRoute, JsonOrFormRoute
from app.customers.schemas import (
    Audience,
    AudienceQuery,
    ChangePage,
    CustomerMembershipPublic,
    KeysetQuery,
    Run,
    RunList,
    RunMode,
    RunPageQuery,
    RunUpload,
)
from app.customers.service import CustomerBase, RunRequest
from app.segmentations.as_of import as_of_value
from app.sources.reading import open_source
from app.versions.dependencies import NAMED, SegmentationStore

router = APIRouter(prefix="/segmentations", tags=["customers"], strict_content_type=False, route_class=FastRoute)

RunId = Annotated[int, Path(ge=1, le=2**31 - 1, description="The run's id")]
ClusterId = Annotated[int, Path(ge=0, le=2**31 - 1, description="The segment's cluster_id in the active version")]
CustomerId = Annotated[str, Path(min_length=1, max_length=200, description="The customer's id (may hold `/`)")]
Mode = Annotated[RunMode, Query(description="replace: customers absent from the run are `gone`; upsert: they stay")]
AsOf = Annotated[
    date | None,
    BeforeValidator(as_of_value),
    Query(description="Kind rfm: the day RFM is computed as of (default the day after the log's last date)"),
]
Wait = Annotated[
    bool,
    Query(
        description="false: answer 202 at once with the run (`status: running`) to follow at its Location; "
        "true: answer when it has landed (or failed)"
    ),
]
STARTED_RUN: dict[int | str, dict[str, Any]] = {
    202: {"model": Run, "description": "`wait=false`: the run, started (follow it at its Location)"}
}


def customer_base(request: Request) -> CustomerBase:
    return request.app.state.customers


def _csv(chunks: Any, filename: str) -> StreamingResponse:
    return StreamingResponse(
        chunks, media_type="text/csv", headers={"Content-Disposition": f'attachment; filename="{filename}"'}
    )


async def start_run(
    request: Request,
    analyst: AnalystUser,
    store: SegmentationStore,
    body: Annotated[RunUpload, File()],
    mode: Mode = "replace",
    wait: Wait = True,
    as_of: AsOf = None,
) -> Response:
    if body.file is None and body.source is None and is_multipart(request):
        raise InvalidInput("The multipart body has no `file` part: send the customers as `file`")
    base = customer_base(request)
    if body.source is not None:
        if body.file is not None:
            raise InvalidInput("Send a `file` or name a `source`, not both")
        base.check(store, has_file=True, as_of=as_of)
        # The source is read once into a file the run then owns, as an upload would be (app.sources.reading).
        async with open_source(request.app.state.database, request.app.state.settings, body.source) as data:
            run = await base.submit(
                store,
                upload=data.file,
                request=RunRequest(mode=mode, as_of=as_of, by=analyst.username, filename=f"source {body.source}"),
            )
    else:
        if body.file is None:
            base.check(store, has_file=False, as_of=as_of)
        assert body.file is not None
        run = await base.submit(
            store,
            upload=body.file.file,
            request=RunRequest(mode=mode, as_of=as_of, by=analyst.username, filename=body.file.filename),
        )
    location = f"/segmentations/{store.segmentation.name}/runs/{run.row.id}"
    if not wait:
        return Response(
            Run(**await base.run(store, run.row.id)).model_dump_json(),
            status_code=202,
            media_type="application/json",
            headers={"Location": location},
        )
    answer = Run(**await base.wait(run))
    return Response(answer.model_dump_json(), media_type="application/json", headers={"Location": location})


router.add_api_route(
    "/{name}/runs",
    endpoint=start_run,
    methods=["POST"],
    summary="Score every customer of a file into the customer base (analyst)",
    description="A multipart `file` (CSV or Parquet, as a batch of the segmentation's kind; kind rfm: a "
    'transaction log, aggregated as of `as_of`) or JSON `{"source": NAME}`. Ids: the `id_column` (custom), '
    "`CustomerID` or `customer_id` (customer), `customer_id` (rfm); they must be unique (422 naming the first "
    "repeated one). The run scores with the version active when it starts and lands whole or not at all; "
    "`mode=replace` marks customers absent from it `gone`, `upsert` keeps them. One run per segmentation at a "
    "time (409). `wait=false`: 202 at once with the run to follow at GET .../runs/{run_id}.",
    route_class_override=JsonOrFormRoute,
    response_model=Run,
    responses={
        **STARTED_RUN,
        **errors(401, 403, 404, 409, 413, 422),
        **file_errors("A file missing its id column, with repeated ids, or with rows that break a rule"),
    },
    form_limits=FORM_LIMITS,
    openapi_extra=NAMED,
)


@router.get(
    "/{name}/runs",
    summary="A segmentation's runs, newest first (analyst)",
    description="Each with its counts: n_customers = n_new + n_changed + n_unchanged; n_gone apart.",
    responses=errors(401, 403, 404, 422),
    openapi_extra=NAMED,
)
async def list_runs(
    request: Request, _: AnalystUser, store: SegmentationStore, page: Annotated[RunPageQuery, Query()]
) -> RunList:
    runs, total = await customer_base(request).runs(store, skip=page.skip, limit=page.limit)
    return RunList(runs=[Run(**run) for run in runs], total=total, skip=page.skip, limit=page.limit)


@router.get(
    "/{name}/runs/{run_id}",
    summary="One run (analyst)",
    description="Its status (running, completed or failed; a run whose worker stopped shows as failed) and counts.",
    responses=errors(401, 403, 404, 422),
    openapi_extra=NAMED,
)
async def get_run(request: Request, _: AnalystUser, store: SegmentationStore, run_id: RunId) -> Run:
    return Run(**await customer_base(request).run(store, run_id))


@router.get(
    "/{name}/runs/{run_id}/changes",
    summary="The customers a run made new, moved, or found gone (analyst)",
    description="By customer id (bytewise), keyset-paged with `after` and `limit`; `entered` and `left` count "
    "customers per segment_key. `from_cluster_id`/`to_cluster_id` are in the two runs' versions. With "
    "`Accept: text/csv` every change is streamed.",
    response_model=ChangePage,
    responses={**errors(401, 403, 404, 422), **CSV_ANSWER},
    openapi_extra=NAMED,
)
async def run_changes(
    request: Request, _: AnalystUser, store: SegmentationStore, run_id: RunId, page: Annotated[KeysetQuery, Query()]
) -> Response:
    base = customer_base(request)
    if wants_csv(request):
        return _csv(await base.changes_csv(store, run_id), f"run-{run_id}-changes.csv")
    body = await base.changes(store, run_id, after=page.after, limit=page.limit)
    return Response(ChangePage(**body).model_dump_json(), media_type="application/json")


@router.get(
    "/{name}/customers/{customer_id:path}",
    summary="One customer's segment and its history (analyst)",
    description="Its current membership (`gone` when a replace run left it out), `cluster_id` and "
    "`cluster_name` read in the active version (null for a retired segment), and its changes, newest first. "
    "Unknown: 404.",
    responses=errors(401, 403, 404, 422),
    openapi_extra=NAMED,
)
async def get_customer(
    request: Request, _: AnalystUser, store: SegmentationStore, customer_id: CustomerId
) -> CustomerMembershipPublic:
    return CustomerMembershipPublic(**await customer_base(request).customer(store, customer_id))


@router.get(
    "/{name}/segments/{cluster_id}/customers",
    summary="A segment's audience: the customers now in it (analyst)",
    description="The segment of the active version with that cluster_id, found by its segment_key in the base; "
    "keyset-paged by customer id. Kind rfm also filters by `min_p_alive`, `max_p_alive` and `min_clv`. With "
    "`Accept: text/csv` the whole audience is streamed.",
    response_model=Audience,
    responses={**errors(401, 403, 404, 409, 422), **CSV_ANSWER},
    openapi_extra=NAMED,
)
async def audience(
    request: Request,
    _: AnalystUser,
    store: SegmentationStore,
    cluster_id: ClusterId,
    query: Annotated[AudienceQuery, Query()],
) -> Response:
    base = customer_base(request)
    if wants_csv(request):
        return _csv(await base.audience_csv(store, cluster_id, query), f"segment-{cluster_id}-customers.csv")
    body = await base.audience(store, cluster_id, query)
    return Response(Audience(**body).model_dump_json(), media_type="application/json")
