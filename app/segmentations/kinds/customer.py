"""Kind `customer`: the seed's customer features (age, annual income, spending score, purchase frequency).

It alone has a default dataset (DATA_PATH): a training, a comparison and the elbow without a file use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import IO, Any, ClassVar

import pandas as pd
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool

from app.core.config import Settings
from app.core.errors import InvalidInput
from app.ml.preprocess import FEATURES, resolve_columns
from app.ml.schema import FeatureSchema
from app.ml.value import DEFAULT_HORIZON_DAYS
from app.segmentations import scoring as segmentation
from app.segmentations.csv_answers import ScoredBatch
from app.segmentations.kinds.base import Assigned
from app.segmentations.kinds.customer_record import CustomerFeatures
from app.versions.observed import BatchObserver
from app.versions.store import ModelStore, SegmentationInfo, ServedModel

_CUSTOMER_ADAPTER: TypeAdapter[Any] = TypeAdapter(CustomerFeatures)


class CustomerKind:
    name: ClassVar[str] = "customer"
    description: ClassVar[str] = "the customer features: age, annual income, spending score, purchase frequency"
    default_dataset: ClassVar[bool] = True
    takes_as_of: ClassVar[bool] = False
    takes_transactions: ClassVar[bool] = False
    training_file: ClassVar[str] = "a CSV of customers"

    def declare(
        self, *, features: list[dict[str, Any]] | None, id_column: str | None, columns: dict[str, Any] | None
    ) -> dict[str, Any]:
        if columns is not None:
            raise InvalidInput("`columns` maps a transaction log's headers: it is for segmentations of kind rfm")
        if features:
            raise InvalidInput("A segmentation of kind customer has the customer features: leave `features` out")
        if id_column:
            raise InvalidInput("`id_column` is for segmentations of kind custom")
        return {"kind": self.name}

    def schema(self, info: SegmentationInfo) -> FeatureSchema:
        return FeatureSchema.customer()

    def public(self, info: SegmentationInfo) -> dict[str, Any]:
        return {}

    def record_model(self, info: SegmentationInfo) -> TypeAdapter[Any]:
        return _CUSTOMER_ADAPTER

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
        if upload is not None and await run_in_threadpool(segmentation.out_of_core_upload, upload):
            # Parquet, or a CSV too large to parse here: the training process reads it from disk.
            async with segmentation.upload_on_disk(settings, upload) as source:
                return await store.train(source, n_clusters=n_clusters, random_state=random_state, created_by=by)
        features = await segmentation.training_matrix(settings, upload)
        return await store.train(features, n_clusters=n_clusters, random_state=random_state, created_by=by)

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
        cluster, name, confidence = served.assign([customer])[0]
        data = customer.model_dump()
        return Assigned(data, cluster, name, confidence, explained_record=data)

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
        return await segmentation.score_csv(served, upload, as_csv=as_csv, observer=observer)

    def score_rows(
        self,
        served: ServedModel,
        rows: Sequence[Any],
        *,
        as_csv: bool,
        observer: BatchObserver | None,
        horizon_days: int = DEFAULT_HORIZON_DAYS,
    ) -> ScoredBatch:
        return segmentation.score_records(served, rows, as_csv=as_csv, observer=observer)

    async def comparison_data(self, store: ModelStore, upload: IO[bytes] | None, *, settings: Settings) -> Any:
        return await segmentation.training_matrix(settings, upload)

    def batch_columns(self, served: ServedModel, names: Sequence[str]) -> tuple[dict[str, str], set[str]]:
        found = resolve_columns(names)
        return found, {found[name] for name in FEATURES}

    def check_columns(self, columns: Any) -> Any:
        return resolve_columns(columns)

    def score_chunk(self, served: ServedModel, frame: pd.DataFrame) -> segmentation.ChunkScores:
        return segmentation.score_customer_chunk(served, frame)
