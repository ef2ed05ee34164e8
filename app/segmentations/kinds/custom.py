"""Kind `custom`: the analyst's own columns, declared as a feature schema (numeric and categorical)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import IO, Any, ClassVar

import numpy as np
import pandas as pd
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool

from app.core.config import Settings
from app.core.errors import InvalidInput
from app.ml.schema import FeatureSchema, SchemaError
from app.ml.value import DEFAULT_HORIZON_DAYS
from app.segmentations import csv_answers
from app.segmentations import scoring as segmentation
from app.segmentations.csv_answers import ScoredBatch
from app.segmentations.kinds.base import Assigned
from app.segmentations.kinds.records import declared_customer_adapter
from app.versions.observed import BatchObserver
from app.versions.store import ModelStore, SegmentationInfo, ServedModel


class CustomKind:
    name: ClassVar[str] = "custom"
    description: ClassVar[str] = "the columns declared in `features`"
    default_dataset: ClassVar[bool] = False
    takes_as_of: ClassVar[bool] = False
    takes_transactions: ClassVar[bool] = False
    training_file: ClassVar[str] = "an uploaded CSV"

    def declare(
        self, *, features: list[dict[str, Any]] | None, id_column: str | None, columns: dict[str, Any] | None
    ) -> dict[str, Any]:
        if columns is not None:
            raise InvalidInput("`columns` maps a transaction log's headers: it is for segmentations of kind rfm")
        if not features:
            raise InvalidInput("A segmentation of kind custom declares its columns in `features` (1 to 50 of them)")
        try:
            return FeatureSchema.declare(features, id_column=id_column).to_dict()
        except SchemaError as exc:
            raise InvalidInput(str(exc)) from None

    def schema(self, info: SegmentationInfo) -> FeatureSchema:
        return FeatureSchema.from_dict(info.feature_schema)

    def public(self, info: SegmentationInfo) -> dict[str, Any]:
        return {}

    def record_model(self, info: SegmentationInfo) -> TypeAdapter[Any]:
        return declared_customer_adapter(self.schema(info), f"Customer_{info.name}")

    async def train(
        self,
        store: ModelStore,
        upload: IO[bytes] | None,
        *,
        settings: Settings,
        n_clusters: int | None,
        random_state: int,
        by: str,
        as_of: date | None,
    ) -> ServedModel:
        from app.ml.frames import read_training_frame

        assert upload is not None  # the service asks for a file first
        declared = self.schema(store.segmentation)
        schema = declared.to_dict()
        if await run_in_threadpool(segmentation.out_of_core_upload, upload):
            # Parquet, or a CSV too large to parse here: the training process reads it from disk.
            async with segmentation.upload_on_disk(settings, upload) as source:
                return await store.train(
                    source, schema=schema, n_clusters=n_clusters, random_state=random_state, created_by=by
                )
        upload.seek(0)
        frame = await run_in_threadpool(read_training_frame, upload, declared)
        return await store.train(frame, schema=schema, n_clusters=n_clusters, random_state=random_state, created_by=by)

    def train_facts(self, served: ServedModel) -> dict[str, Any]:
        return {}

    def assign(
        self,
        served: ServedModel,
        customer: Any,
        *,
        transactions: Sequence[Any] | None,
        as_of: date | None,
        horizon_days: int = DEFAULT_HORIZON_DAYS,
    ) -> Assigned:
        cluster, name, confidence, warnings = served.assign_declared([customer])[0]
        return Assigned(customer, cluster, name, confidence, warnings, explained_record=customer)

    async def score_upload(
        self,
        served: ServedModel,
        upload: IO[bytes],
        *,
        store: ModelStore,
        as_csv: bool,
        as_of: date | None,
        observer: BatchObserver | None,
        horizon_days: int = DEFAULT_HORIZON_DAYS,
    ) -> ScoredBatch:
        upload.seek(0)
        return await run_in_threadpool(lambda: score_declared_csv(served, upload, as_csv=as_csv, observer=observer))

    def score_rows(
        self,
        served: ServedModel,
        rows: Sequence[Any],
        *,
        as_csv: bool,
        observer: BatchObserver | None,
        horizon_days: int = DEFAULT_HORIZON_DAYS,
    ) -> ScoredBatch:
        return score_declared_records(served, list(rows), as_csv=as_csv, observer=observer)

    async def comparison_data(self, store: ModelStore, upload: IO[bytes] | None, *, settings: Settings) -> Any:
        assert upload is not None  # the service asks for a file first
        return await run_in_threadpool(declared_frame, upload, self.schema(store.segmentation))

    def batch_columns(self, served: ServedModel, names: Sequence[str]) -> tuple[dict[str, str], set[str]]:
        from app.ml.frames import match_columns

        schema = served.model.schema_
        found = match_columns(names, schema.names, required=schema.names)
        return found, {found[f.name] for f in schema.features if f.numeric}

    def check_columns(self, columns: Any) -> Any:
        return None  # the model's score_frame names a missing column

    def score_chunk(self, served: ServedModel, frame: pd.DataFrame) -> segmentation.ChunkScores:
        return score_declared_chunk(served, frame)


def declared_frame(upload: IO[bytes], schema: FeatureSchema) -> pd.DataFrame:
    """A CSV of a declared schema as read for training, its columns named as declared."""
    from app.ml.frames import match_columns, read_training_frame

    upload.seek(0)
    frame = read_training_frame(upload, schema)
    found = match_columns(frame.columns, schema.names, required=schema.names)
    return frame.rename(columns={raw: name for name, raw in found.items()})


def _record_columns(served: ServedModel, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Checked records as columns: numbers (NaN when missing) and text per declared feature."""
    columns: dict[str, Any] = {}
    for feature in served.model.schema_.features:
        cells = [record.get(feature.name) for record in records]
        if feature.numeric:
            columns[feature.name] = np.array([np.nan if v is None else float(v) for v in cells], dtype=np.float64)
        else:
            columns[feature.name] = pd.Series(["" if v is None else str(v).strip() for v in cells], dtype=object)
    return columns


def score_declared_records(
    served: ServedModel, records: list[dict[str, Any]], *, as_csv: bool, observer: BatchObserver | None = None
) -> ScoredBatch:
    result = served.model.score_records(records)
    explained = observer.observe(_record_columns(served, records), result.labels) if observer is not None else None
    n = len(records)
    answer = None
    if as_csv:
        frame = pd.DataFrame(records).astype(str)
        csv_answer = csv_answers.CsvAnswer(list(frame.columns), served.names, explain=explained is not None)
        csv_answer.add(frame, np.ones(n, dtype=bool), result.labels, result.confidence, [None] * n, explained)
        answer = csv_answer.finish()
    return ScoredBatch(
        model=served,
        labels=result.labels,
        confidence=result.confidence,
        n_rows=n,
        csv_answer=answer,
        observer=observer,
    )


def score_declared_chunk(served: ServedModel, frame: pd.DataFrame) -> segmentation.ChunkScores:
    result = served.model.score_frame(frame)
    values = None
    if result.values is not None:
        scored = result.values[result.valid]
        values = {name: scored[name] for name in served.model.schema_.names}
    return result.valid, result.labels, result.confidence, result.errors, values


def score_declared_csv(
    served: ServedModel, fh: IO[bytes], *, as_csv: bool, observer: BatchObserver | None = None
) -> ScoredBatch:
    """A batch CSV of a declared schema (the model's score_frame names a missing column), chunk by chunk."""
    return segmentation.score_csv_file(
        served,
        fh,
        as_csv=as_csv,
        score_chunk=score_declared_chunk,
        check_columns=lambda _columns: None,
        observer=observer,
    )
