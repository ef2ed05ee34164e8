"""What the routes ask of one segmentation: train it, score customers with it, describe its segments.

Both doors call these: the seed's routes (`/train`, `/predict`, ...), which act on `default`,
and `/segmentations/{name}/...`, which act on the segmentation named. What differs between
kinds (the customer features, or a declared schema) is decided here, from the segmentation.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
from fastapi import UploadFile
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State

from app.database import Role
from app.errors import Conflict, Forbidden, InvalidInput
from app.ml.matching import identity_fields
from app.preprocess import DataValidationError
from app.schema import CustomerFeatures, HistoryQuery
from app.segmentation_schema import declared_customer_adapter
from app.services import predictions as prediction_service
from app.services import rfm as rfm_service
from app.services import segmentation
from app.services.auth import Caller
from app.services.models import ModelStore, ServedModel, data_uri
from app.services.observed import BatchObserver
from app.services.registry import feature_schema
from app.storage.history import segmentation_page

CUSTOMER_KIND = "customer"
RFM_KIND = rfm_service.RFM_KIND


def customer_adapter(store: ModelStore) -> TypeAdapter[Any]:
    """How this segmentation's `customer` body is checked (made once per segmentation): the customer
    features as CustomerFeatures, a declared schema as a plain dict of its features."""
    adapter = store.body_adapter
    if adapter is None:
        info = store.segmentation
        if info.kind == CUSTOMER_KIND:
            adapter = TypeAdapter(CustomerFeatures)
        else:
            adapter = declared_customer_adapter(feature_schema(info), f"Customer_{info.name}")
        store.body_adapter = adapter
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
    state: State,
    store: ModelStore,
    *,
    file: UploadFile | None,
    n_clusters: int | None,
    random_state: int,
    by: str,
    as_of: date | None = None,
) -> ServedModel:
    """Train a new version of `store`'s segmentation on the upload (or, kind customer, the default dataset;
    kind rfm: a transaction log, aggregated as of `as_of`)."""
    info = store.segmentation
    check_training_request(state, store, file=file, as_of=as_of)
    if info.kind == RFM_KIND:
        return await rfm_service.train(
            store, file=file, n_clusters=n_clusters, random_state=random_state, by=by, as_of=as_of
        )
    declared = None if info.kind == CUSTOMER_KIND else feature_schema(info)
    schema = None if declared is None else declared.to_dict()
    if file is not None and await run_in_threadpool(segmentation.out_of_core_upload, file.file):
        # Parquet, or a CSV too large to parse here: the training process reads it from disk.
        async with segmentation.upload_on_disk(state.settings, file) as source:
            return await store.train(
                source, schema=schema, n_clusters=n_clusters, random_state=random_state, created_by=by
            )
    if declared is None:
        features = await segmentation.training_matrix(state.settings, file)
        return await store.train(features, n_clusters=n_clusters, random_state=random_state, created_by=by)
    from app.ml.schema import read_training_frame

    assert file is not None  # checked above

    file.file.seek(0)
    frame = await run_in_threadpool(read_training_frame, file.file, declared)
    return await store.train(frame, schema=schema, n_clusters=n_clusters, random_state=random_state, created_by=by)


def check_training_request(state: State, store: ModelStore, *, file: UploadFile | None, as_of: date | None) -> None:
    """What a training request must satisfy before any data is read (a job checks it before its 202)."""
    kind = store.segmentation.kind
    if as_of is not None and kind != RFM_KIND:
        raise InvalidInput("`as_of` is for segmentations of kind rfm")
    if file is not None:
        return
    if kind == RFM_KIND:
        raise InvalidInput("A segmentation of kind rfm trains on a transaction log: send it as `file`")
    if kind != CUSTOMER_KIND:
        raise InvalidInput(f"A segmentation of kind {kind} trains on an uploaded CSV: send it as `file`")
    if not Path(state.settings.data_path).is_file():
        raise Conflict(segmentation.NO_DATASET.format(path=state.settings.data_path))


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
    } | (rfm_service.train_facts(served) if store.segmentation.kind == RFM_KIND else {})


# --- scoring ------------------------------------------------------------------------------------


async def record_prediction(
    state: State,
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
    state.metrics.count_predictions(served.names, cluster, "single", info.name)
    state.drift.count_one(served, info.id, customer, cluster)
    await state.history_writer.add(
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
    state: State,
    *,
    user_id: int,
    store: ModelStore,
    customer: Any,
    transactions: Sequence[Any] | None = None,
    as_of: str | None = None,
    explain: bool = False,
) -> dict[str, Any]:
    """One customer (raw JSON of the segmentation's schema; kind rfm: or their transactions) → the answer
    of POST .../predict."""
    kind = store.segmentation.kind
    if transactions is not None and kind != RFM_KIND:
        raise InvalidInput("`transactions` are for segmentations of kind rfm: send the customer as `customer`")
    checked: Any = None
    if customer is not None:
        (checked,) = validate_customers(store, [customer], "customer")
    served = store.require()
    warnings: list[str] = []
    if kind == RFM_KIND:
        rows = rfm_service.customer_row(
            served, customer=checked, transactions=transactions, as_of=rfm_service.as_of_date(as_of)
        )
        data: dict[str, Any] = rows
        cluster, name, confidence, warnings = served.assign_declared([rfm_service.clustering_record(rows)])[0]
    elif kind == CUSTOMER_KIND:
        cluster, name, confidence = served.assign([checked])[0]
        data = checked.model_dump()
    else:
        data = checked
        cluster, name, confidence, warnings = served.assign_declared([data])[0]
    explanation = None
    if explain:
        scored = explained(served, rfm_service.clustering_record(data) if kind == RFM_KIND else data)
        if scored is not None:
            cluster, name, confidence, explanation = scored
    await record_prediction(
        state,
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
        "warnings": warnings,
        "explanation": explanation,
    }


async def score_batch(
    state: State,
    store: ModelStore,
    *,
    file: UploadFile | None,
    customers: list[Any] | None,
    as_csv: bool,
    as_of: date | None = None,
    explain: bool = False,
) -> tuple[ServedModel, segmentation.ScoredBatch]:
    """Score a CSV upload or a JSON list of customers (already validated for kind customer); with
    `explain`, each row also gets its top feature and margin. Kind rfm: the CSV is a transaction log
    (aggregated as of `as_of`), the customers their RFM values."""
    kind = store.segmentation.kind
    declared = kind != CUSTOMER_KIND
    if as_of is not None and kind != RFM_KIND:
        raise InvalidInput("`as_of` is for segmentations of kind rfm")
    if file is not None:
        served = store.require()
        observer = BatchObserver(served, explain=explain, count=state.drift.enabled)
        if kind == RFM_KIND:
            file.file.seek(0)
            log, columns = file.file, rfm_service.log_columns(store)
            scored = await run_in_threadpool(
                lambda: rfm_service.score_log(served, log, columns, as_of=as_of, as_csv=as_csv, observer=observer)
            )
        elif declared:
            file.file.seek(0)
            fh = file.file
            scored = await run_in_threadpool(lambda: score_declared_csv(served, fh, as_csv=as_csv, observer=observer))
        else:
            scored = await segmentation.score_csv(served, file, as_csv=as_csv, observer=observer)
    elif customers is not None:
        limit = state.settings.max_batch_rows
        if len(customers) > limit:
            raise InvalidInput(f"At most {limit} customers per request (MAX_BATCH_ROWS)")
        served = store.require()
        observer = BatchObserver(served, explain=explain, count=state.drift.enabled)
        rows = customers
        if kind == RFM_KIND:
            checked = validate_customers(store, rows, "customers")
            scored = await run_in_threadpool(
                lambda: rfm_service.score_rows(served, checked, as_csv=as_csv, observer=observer)
            )
        elif declared:
            checked = validate_customers(store, rows, "customers")
            scored = await run_in_threadpool(
                lambda: score_declared_records(served, checked, as_csv=as_csv, observer=observer)
            )
        else:
            scored = await run_in_threadpool(
                lambda: segmentation.score_records(served, rows, as_csv=as_csv, observer=observer)
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
    state: State, *, user_id: int, store: ModelStore, served: ServedModel, scored: segmentation.ScoredBatch
) -> None:
    await prediction_service.record_batch(
        sessionmaker=state.database.sessionmaker,
        user_id=user_id,
        model_version=served.version,
        labels=scored.labels,
        n_failed=scored.n_failed,
        segmentation_id=store.segmentation.id,
    )
    state.metrics.count_predictions(served.names, scored.labels, "batch", store.segmentation.name)
    observer = scored.observer
    if observer is not None and observer.counts is not None and observer.sums is not None:
        state.drift.add_batch(served, store.segmentation.id, observer.counts, observer.sums, observer.n_counted)


def _record_columns(served: ServedModel, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Checked records as columns: numbers (NaN when missing) and text per declared feature."""
    columns: dict[str, Any] = {}
    for feature in served.model.schema.features:
        cells = [record.get(feature.name) for record in records]
        if feature.numeric:
            columns[feature.name] = np.array([np.nan if v is None else float(v) for v in cells], dtype=np.float64)
        else:
            columns[feature.name] = pd.Series(["" if v is None else str(v).strip() for v in cells], dtype=object)
    return columns


def score_declared_records(
    served: ServedModel, records: list[dict[str, Any]], *, as_csv: bool, observer: BatchObserver | None = None
) -> segmentation.ScoredBatch:
    result = served.model.score_records(records)
    explained = observer.observe(_record_columns(served, records), result.labels) if observer is not None else None
    n = len(records)
    answer = None
    if as_csv:
        frame = pd.DataFrame(records).astype(str)
        csv_answer = segmentation.CsvAnswer(list(frame.columns), served.names, explain=explained is not None)
        csv_answer.add(frame, np.ones(n, dtype=bool), result.labels, result.confidence, [None] * n, explained)
        answer = csv_answer.finish()
    return segmentation.ScoredBatch(
        model=served,
        labels=result.labels,
        confidence=result.confidence,
        n_rows=n,
        csv_answer=answer,
        observer=observer,
    )


def _score_declared_chunk(served: ServedModel, frame: pd.DataFrame) -> segmentation.ChunkScores:
    result = served.model.score_frame(frame)
    values = None
    if result.values is not None:
        scored = result.values[result.valid]
        values = {name: scored[name] for name in served.model.schema.names}
    return result.valid, result.labels, result.confidence, result.errors, values


def score_declared_csv(
    served: ServedModel, fh: IO[bytes], *, as_csv: bool, observer: BatchObserver | None = None
) -> segmentation.ScoredBatch:
    """A batch CSV of a declared schema (the model's score_frame names a missing column), chunk by chunk."""
    return segmentation.score_csv_file(
        served,
        fh,
        as_csv=as_csv,
        score_chunk=_score_declared_chunk,
        check_columns=lambda _columns: None,
        observer=observer,
    )


# --- history ------------------------------------------------------------------------------------


async def history_page(state: State, *, user: Caller, query: HistoryQuery, segmentation: str | None) -> bytes:
    """A page of history as JSON: the caller's, or (analysts and admins) `query.user_id`'s; of one
    segmentation when one is named (by the route or by `query.segmentation`), else of them all."""
    target = user.id
    if query.user_id is not None and query.user_id != user.id:
        if user.role not in (Role.analyst.value, Role.admin.value):
            raise Forbidden("Only analysts and admins may read another user's history")
        target = query.user_id
    name = segmentation if segmentation is not None else query.segmentation
    if name is None:
        return await state.history_reader.page(
            user_id=target, skip=query.skip, limit=query.limit, before_id=query.before_id
        )
    store = await state.segmentations.get(name)
    return await segmentation_page(
        state.database,
        user_id=target,
        segmentation_id=store.segmentation.id,
        skip=query.skip,
        limit=query.limit,
        before_id=query.before_id,
    )


# --- describing ---------------------------------------------------------------------------------


def clusters_json(store: ModelStore, served: ServedModel) -> bytes:
    """GET .../clusters as JSON, built once per version."""
    from app.segmentation_schema import NamedClusterSummary

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


async def elbow(state: State, store: ModelStore, k_min: int, k_max: int) -> dict[str, Any]:
    """The elbow figures: of the default dataset (kind customer), else of the active version's training sample."""
    if store.segmentation.kind == CUSTOMER_KIND:
        return await state.elbow.get(k_min, k_max)
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


async def elbow_chart(state: State, store: ModelStore) -> tuple[str, int]:
    """The elbow chart as a PNG data URI and the k it marks: of the default dataset (kind customer),
    else of the active version's choice of k, drawn once per version."""
    if store.segmentation.kind == CUSTOMER_KIND:
        return await state.elbow.chart()
    served = store.require()
    figures = await elbow(state, store, 2, 15)

    def draw() -> str:
        from app.charts import render_elbow_chart

        return data_uri(render_elbow_chart(figures))

    return await served.drawn("elbow", draw), int(figures["optimal_k"])
