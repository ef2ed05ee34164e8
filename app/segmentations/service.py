"""What the routes ask of one segmentation: train it, score customers with it, describe its segments.

Both doors call these: the seed's routes (`/train`, `/predict`, ...), which act on `default`,
and `/segmentations/{name}/...`, which act on the segmentation named. What differs between
kinds is the kind's own (app.segmentations.kinds): these functions never ask which kind it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from app.auth.service import Caller
from app.core.errors import Conflict, Forbidden, InvalidInput
from app.core.tables import Role
from app.history import predictions as prediction_service
from app.history.schemas import HistoryQuery
from app.history.storage.history import segmentation_page
from app.ml.matching import identity_fields
from app.ml.preprocess import DataValidationError
from app.ml.value import DEFAULT_HORIZON_DAYS
from app.segmentations import csv_answers
from app.segmentations import scoring as segmentation
from app.segmentations.as_of import as_of_date
from app.segmentations.kinds.registry import kind_of
from app.sources.reading import open_source
from app.versions import identity
from app.versions.observed import BatchObserver
from app.versions.served import ServedModel, data_uri
from app.versions.store import ModelStore

if TYPE_CHECKING:
    from app.core.config import Settings
    from app.core.database import Database
    from app.core.events import EventSink
    from app.core.metrics import Metrics
    from app.history.storage.history import HistoryRepository
    from app.segmentations.elbow import ElbowCache
    from app.segmentations.registry import SegmentationRegistry
    from app.versions.drift import DriftCounter
from app.versions.training import TrainingRequest


def customer_adapter(store: ModelStore) -> TypeAdapter[Any]:
    """How this segmentation's `customer` body is checked (its kind's record model, made once per segmentation)."""
    adapter = store.body_adapter
    if adapter is None:
        adapter = store.body_adapter = kind_of(store.segmentation).record_model(store.segmentation)
    return adapter


def customer_json_schema(store: ModelStore) -> dict[str, Any]:
    return customer_adapter(store).json_schema(by_alias=True)


def _invalid(exc: ValidationError, *where: Any) -> RequestValidationError:
    return RequestValidationError(
        [{**e, "loc": ("body", *where, *e["loc"])} for e in exc.errors(include_url=False, include_context=False)]
    )


def validate_customers(store: ModelStore, customers: Sequence[Any], *where: str) -> list[Any]:
    """Each customer checked against the segmentation's schema; any breach is FastAPI's 422 naming it."""
    adapter = customer_adapter(store)
    if len(customers) == 1 and where == ("customer",):
        try:
            return [adapter.validate_python(customers[0])]
        except ValidationError as exc:
            raise _invalid(exc, *where) from None
    valid: list[Any] = []
    errors: list[Any] = []
    for i, customer in enumerate(customers):
        try:
            valid.append(adapter.validate_python(customer))
        except ValidationError as exc:
            errors.extend(_invalid(exc, *where, i).errors())
    if errors:
        raise RequestValidationError(errors)
    return valid


# --- training -----------------------------------------------------------------------------------


async def train(
    services: Services,
    store: ModelStore,
    *,
    upload: IO[bytes] | None,
    n_clusters: int | None,
    random_state: int,
    by: str,
    as_of: date | None = None,
) -> ServedModel:
    """Train a new version of `store`'s segmentation on the upload (or, for a kind with one, the default
    dataset; kind rfm: a transaction log, aggregated as of `as_of`)."""
    check_training_request(services, store, has_file=upload is not None, as_of=as_of)
    return await kind_of(store.segmentation).train(
        store,
        upload,
        settings=services.settings,
        n_clusters=n_clusters,
        random_state=random_state,
        by=by,
        as_of=as_of,
    )


def check_training_request(services: Services, store: ModelStore, *, has_file: bool, as_of: date | None) -> None:
    """What a training request must satisfy before any data is read (a job checks it before its 202)."""
    kind = kind_of(store.segmentation)
    check_as_of(store, as_of)
    if has_file:
        return
    if not kind.default_dataset:
        raise InvalidInput(f"A segmentation of kind {kind.name} trains on {kind.training_file}: send it as `file`")
    if not Path(services.settings.data_path).is_file():
        raise Conflict(segmentation.NO_DATASET.format(path=services.settings.data_path))


def check_as_of(store: ModelStore, as_of: date | None) -> None:
    if as_of is not None and not kind_of(store.segmentation).takes_as_of:
        raise InvalidInput("`as_of` is for segmentations of kind rfm")


@dataclass(frozen=True)
class Services:
    """What the segmentation calls work with: built once as the app starts (app.main's lifespan)."""

    settings: Settings
    database: Database
    segmentations: SegmentationRegistry
    elbow: ElbowCache
    drift: DriftCounter
    history: HistoryRepository
    metrics: Metrics
    events: EventSink | None = None
    """Where domains queue the events they tell subscribers about (None: nobody listens)."""


def services_of(request: Request) -> Services:
    """The app's Services, for a route handler."""
    return request.app.state.services


@dataclass(frozen=True)
class SegmentationTrainer:
    """What a training job (app.jobs.service) runs: the checks and the training of a `wait=true` request."""

    services: Services

    def check(self, store: ModelStore, request: TrainingRequest, *, has_file: bool) -> None:
        has_data = has_file or request.source is not None
        check_training_request(self.services, store, has_file=has_data, as_of=request.as_of)

    async def train(self, store: ModelStore, upload: IO[bytes] | None, request: TrainingRequest) -> dict[str, Any]:
        if upload is None and request.source is not None:
            # The source is read now (in the job, for wait=false) into the CSV an upload would be.
            async with open_source(self.services.database, self.services.settings, request.source) as data:
                return await self._train(store, data.file, request)
        return await self._train(store, upload, request)

    async def _train(self, store: ModelStore, upload: IO[bytes] | None, request: TrainingRequest) -> dict[str, Any]:
        served = await train(
            self.services,
            store,
            upload=upload,
            n_clusters=request.n_clusters,
            random_state=request.random_state,
            by=request.by,
            as_of=request.as_of,
        )
        return train_result(store, served)


def train_result(store: ModelStore, served: ServedModel) -> dict[str, Any]:
    meta = served.metadata
    return {
        "message": f"Model trained with {meta['n_clusters']} segments",
        "n_clusters": meta["n_clusters"],
        "silhouette_score": meta.get("silhouette_score"),
        "inertia": meta["inertia"],
        "model_version": served.version,
        "n_samples": meta["n_samples"],
        "duration_seconds": meta.get("duration_seconds", 0.0),
        "cluster_sizes": {str(s["cluster_id"]): s["size"] for s in served.segments},
        "segmentation": store.segmentation.name,
        "skipped_rows": int(meta.get("skipped_rows", 0)),
        "missing_shares": meta.get("missing_shares", {}),
        **identity_fields(meta),
    } | kind_of(store.segmentation).train_facts(served)


# --- scoring ------------------------------------------------------------------------------------


async def record_prediction(
    services: Services,
    *,
    user_id: int,
    store: ModelStore,
    served: ServedModel,
    customer: dict[str, Any],
    cluster: int,
    name: str,
    confidence: float,
) -> None:
    """Count one prediction and keep it in the caller's history (returns once it is committed)."""
    info = store.segmentation
    services.metrics.count_predictions(served.names, cluster, "single", info.name)
    services.drift.count_one(served, info.id, customer, cluster)
    await services.history.add(
        prediction_service.history_row(
            user_id=user_id,
            customer=customer,
            cluster=cluster,
            cluster_name=name,
            confidence=confidence,
            model_version=served.version,
            segmentation_id=info.id,
            segmentation=info.name,
        )
    )


def explained(served: ServedModel, record: dict[str, Any]) -> tuple[int, str, float, dict[str, Any]] | None:
    """(cluster, cluster_name, confidence, explanation) of one checked record, or None when it breaks a
    rule. The segment and confidence are the explanation's own, so `confidence` is exactly
    1 - distance / runner_up.distance."""
    explanation = served.model.explain_one(record)
    if explanation is None:
        return None
    cluster = explanation.cluster
    return cluster, served.names[cluster], explanation.confidence, served.model.explainer.describe(explanation, record)


async def predict(
    services: Services,
    *,
    user_id: int,
    store: ModelStore,
    customer: Any,
    transactions: Sequence[Any] | None = None,
    as_of: str | None = None,
    explain: bool = False,
    checked: bool = False,
    horizon_days: int = DEFAULT_HORIZON_DAYS,
) -> dict[str, Any]:
    """One customer (raw JSON of the segmentation's schema; kind rfm: or their transactions) → the answer
    of POST .../predict. `checked`: the customer already checked against the schema (the seed's door)."""
    kind = kind_of(store.segmentation)
    if transactions is not None and not kind.takes_transactions:
        raise InvalidInput("`transactions` are for segmentations of kind rfm: send the customer as `customer`")
    if customer is not None and not checked:
        (customer,) = validate_customers(store, [customer], "customer")
    served = store.require()
    assigned = kind.assign(
        served, customer, transactions=transactions, as_of=as_of_date(as_of), horizon_days=horizon_days
    )
    data, cluster, name, confidence = assigned.data, assigned.cluster, assigned.cluster_name, assigned.confidence
    explanation = None
    if explain and assigned.explained_record is not None:
        scored = explained(served, dict(assigned.explained_record))
        if scored is not None:
            cluster, name, confidence, explanation = scored
    await record_prediction(
        services,
        user_id=user_id,
        store=store,
        served=served,
        customer=data,
        cluster=cluster,
        name=name,
        confidence=confidence,
    )
    return {
        "cluster": cluster,
        "cluster_name": name,
        "confidence": confidence,
        "customer_data": data,
        "model_version": served.version,
        "segmentation": store.segmentation.name,
        "warnings": assigned.warnings,
        "explanation": explanation,
        **assigned.answer,
    }


async def score_batch(
    services: Services,
    store: ModelStore,
    *,
    upload: IO[bytes] | None,
    customers: list[Any] | None,
    as_csv: bool,
    as_of: date | None = None,
    explain: bool = False,
    horizon_days: int = DEFAULT_HORIZON_DAYS,
) -> tuple[ServedModel, csv_answers.ScoredBatch]:
    """Score a CSV upload (kind rfm: a transaction log, aggregated as of `as_of`) or a JSON list of
    customers, each checked against the segmentation's schema; with `explain`, each row also gets its
    top feature and margin."""
    kind = kind_of(store.segmentation)
    check_as_of(store, as_of)
    if upload is not None:
        served = store.require()
        observer = BatchObserver(served, explain=explain, count=services.drift.enabled)
        scored = await kind.score_upload(
            served, upload, store=store, as_csv=as_csv, as_of=as_of, observer=observer, horizon_days=horizon_days
        )
    elif customers is not None:
        limit = services.settings.max_batch_rows
        if len(customers) > limit:
            raise InvalidInput(f"At most {limit} customers per request (MAX_BATCH_ROWS)")
        checked = validate_customers(store, customers, "customers")
        served = store.require()
        observer = BatchObserver(served, explain=explain, count=services.drift.enabled)
        scored = await run_in_threadpool(
            lambda: kind.score_rows(served, checked, as_csv=as_csv, observer=observer, horizon_days=horizon_days)
        )
    else:
        raise InvalidInput("Send `{customers: [...]}` as application/json, or a CSV `file` as multipart/form-data")
    if scored.n_failed and not as_csv:
        first = scored.problems[0] if scored.problems else {}
        raise DataValidationError(
            f"{scored.n_failed} of {scored.n_rows} rows break a rule (first: row {first.get('row')}: "
            f"{first.get('reason')}); ask for text/csv to get every row marked",
            scored.problems,
            scored.n_failed,
        )
    return served, scored


async def record_batch(
    services: Services, *, user_id: int, store: ModelStore, served: ServedModel, scored: csv_answers.ScoredBatch
) -> None:
    await prediction_service.record_batch(
        sessionmaker=services.database.sessionmaker,
        user_id=user_id,
        model_version=served.version,
        labels=scored.labels,
        n_failed=scored.n_failed,
        segmentation_id=store.segmentation.id,
    )
    services.metrics.count_predictions(served.names, scored.labels, "batch", store.segmentation.name)
    observer = scored.observer
    if observer is not None and observer.counts is not None and observer.sums is not None:
        services.drift.add_batch(served, store.segmentation.id, observer.counts, observer.sums, observer.n_counted)


# --- history ------------------------------------------------------------------------------------


async def history_page(services: Services, *, user: Caller, query: HistoryQuery, store: ModelStore | None) -> bytes:
    """A page of history as JSON: the caller's, or (analysts and admins) `query.user_id`'s; of one
    segmentation when one is given (by the route or by `query.segmentation`), else of them all."""
    target = user.id
    if query.user_id is not None and query.user_id != user.id:
        if user.role not in (Role.analyst.value, Role.admin.value):
            raise Forbidden("Only analysts and admins may read another user's history")
        target = query.user_id
    if store is None and query.segmentation is not None:
        store = await services.segmentations.get(query.segmentation)
    if store is None:
        return await services.history.page(
            user_id=target, skip=query.skip, limit=query.limit, before_id=query.before_id
        )
    return await segmentation_page(
        services.database,
        user_id=target,
        segmentation_id=store.segmentation.id,
        skip=query.skip,
        limit=query.limit,
        before_id=query.before_id,
    )


# --- describing ---------------------------------------------------------------------------------


def clusters_json(store: ModelStore, served: ServedModel) -> bytes:
    """GET .../clusters as JSON, built once per version."""
    from app.segmentations.results import NamedClusterSummary

    def build() -> BaseModel:
        return NamedClusterSummary(
            total_customers=served.metadata["total_customers"],
            n_clusters=served.metadata["n_clusters"],
            model_version=served.version,
            segmentation=store.segmentation.name,
            clusters=served.segment_details(),  # type: ignore[arg-type]
        )

    # Kinds other than customer have no avg_* fields: they are left out rather than null.
    return served.response_json("named-clusters", build, exclude_none=True)


async def elbow(services: Services, store: ModelStore, k_min: int, k_max: int) -> dict[str, Any]:
    """The elbow figures: of the default dataset (a kind that has one), else of the active version's training sample."""
    if kind_of(store.segmentation).default_dataset:
        return await services.elbow.get(k_min, k_max)
    served = store.require()
    selection = served.metadata.get("k_selection") or {}
    if selection.get("method") != "silhouette":
        raise Conflict(
            "The active version was trained with a fixed n_clusters, so no range of k was compared: "
            "train without n_clusters to get the elbow figures"
        )
    ks = [k for k in selection["k_range"] if k_min <= k <= k_max]
    if not ks:
        raise InvalidInput(f"The active version compared k = {selection['k_range'][0]}..{selection['k_range'][-1]}")
    picked = [selection["k_range"].index(k) for k in ks]
    scores = [selection["silhouette_scores"][i] for i in picked]
    ranked = [s if s is not None else -1.0 for s in scores]
    return {
        "optimal_k": ks[int(np.argmax(ranked))],
        "k_range": ks,
        "inertias": [selection["inertias"][i] for i in picked],
        "silhouette_scores": [s if s is not None else 0.0 for s in scores],
        "method": "silhouette",
    }


async def elbow_json(services: Services, store: ModelStore, k_min: int, k_max: int) -> bytes:
    """GET .../elbow as JSON; of a default dataset, the cached answer when it is ready."""
    if kind_of(store.segmentation).default_dataset:
        elbow_cache = services.elbow
        return elbow_cache.ready_json(k_min, k_max) or await elbow_cache.get_json(k_min, k_max)
    from app.segmentations.results import ElbowResult

    return ElbowResult(**await elbow(services, store, k_min, k_max)).model_dump_json().encode()


async def elbow_chart(services: Services, store: ModelStore) -> tuple[str, int]:
    """The elbow chart as a PNG data URI and the k it marks: of the default dataset (kind customer),
    else of the active version's choice of k, drawn once per version."""
    if kind_of(store.segmentation).default_dataset:
        return await services.elbow.chart()
    served = store.require()
    figures = await elbow(services, store, 2, 15)

    def draw() -> str:
        from app.charts import render_elbow_chart

        return data_uri(render_elbow_chart(figures))

    return await served.drawn("elbow", draw), int(figures["optimal_k"])


async def compare_versions(
    services: Services, store: ModelStore, *, from_version: str, to_version: str, upload: IO[bytes] | None
) -> dict[str, Any]:
    """Score one file (a kind with a default dataset, without one: that dataset) with two versions: the
    answer of POST .../compare. Unknown versions are a 404 before the file is read."""
    from_model = await store.version_model(from_version)
    to_model = await store.version_model(to_version)
    kind = kind_of(store.segmentation)
    if upload is None and not kind.default_dataset:
        raise InvalidInput(f"A segmentation of kind {kind.name} compares versions on a CSV: send it as `file`")
    data = await kind.comparison_data(store, upload, settings=services.settings)
    comparison = await run_in_threadpool(identity.score_both, from_model, to_model, data)
    return comparison.result()
