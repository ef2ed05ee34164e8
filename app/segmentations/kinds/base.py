"""What a segmentation kind declares: the one protocol every kind implements.

The services never ask which kind a segmentation is; they ask its kind (``kind_of(info)``) to do
the part that differs: check a declaration, read a training upload, check a `customer` body, turn
one customer or a batch into scored rows, and add its own facts to the train result. A new kind is
one module with a class of this shape plus one line in ``registry.KINDS``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import IO, TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import TypeAdapter

from app.ml.value import DEFAULT_HORIZON_DAYS

if TYPE_CHECKING:
    import pandas as pd

    from app.core.config import Settings
    from app.ml.schema import FeatureSchema
    from app.segmentations.csv_answers import ScoredBatch
    from app.segmentations.scoring import ChunkScores
    from app.versions.observed import BatchObserver
    from app.versions.store import ModelStore, SegmentationInfo, ServedModel


@dataclass
class Assigned:
    """One customer's answer before it is kept: what is stored as `customer_data`, its segment, and
    the record the explanation is computed on."""

    data: dict[str, Any]
    cluster: int
    cluster_name: str
    confidence: float
    warnings: list[str] = field(default_factory=list)
    explained_record: Mapping[str, Any] | None = None
    answer: dict[str, Any] = field(default_factory=dict)
    """The kind's own fields of the answer (kind rfm: p_alive, expected_purchases, expected_order_value, clv)."""


class Kind(Protocol):
    """A segmentation kind. Class attributes say what its requests may carry; methods do its part."""

    name: ClassVar[str]
    description: ClassVar[str]
    default_dataset: ClassVar[bool]
    """Trains (and compares, and draws its elbow) on DATA_PATH when no file is sent."""
    takes_as_of: ClassVar[bool]
    """Its training, batches and predict take `as_of` (a transaction log's day of reckoning)."""
    takes_transactions: ClassVar[bool]
    """Its predict also takes one customer's `transactions`."""
    training_file: ClassVar[str]
    """What it trains on, in words ("a transaction log")."""

    def declare(
        self, *, features: list[dict[str, Any]] | None, id_column: str | None, columns: dict[str, Any] | None
    ) -> dict[str, Any]:
        """What the `segmentations` row keeps for a new segmentation of this kind (422 on a bad declaration)."""
        ...

    def schema(self, info: SegmentationInfo) -> FeatureSchema:
        """The clustering features of a segmentation of this kind."""
        ...

    def public(self, info: SegmentationInfo) -> dict[str, Any]:
        """Extra fields of the segmentation's public description (kind rfm: its log's `columns`)."""
        ...

    def record_model(self, info: SegmentationInfo) -> TypeAdapter[Any]:
        """How the `customer` body of its predict (and each row of a JSON batch) is checked."""
        ...

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
        """A new version trained on the upload (or the default dataset, where the kind has one)."""
        ...

    def train_facts(self, served: ServedModel) -> dict[str, Any]:
        """The kind's own fields of the train result."""
        ...

    def assign(
        self,
        served: ServedModel,
        customer: Any,
        *,
        transactions: Sequence[Any] | None,
        as_of: date | None,
        horizon_days: int = DEFAULT_HORIZON_DAYS,
    ) -> Assigned:
        """One checked customer (or, where the kind takes them, their transactions) → its segment."""
        ...

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
        """A batch file scored (in a worker thread), rows in input order."""
        ...

    def score_rows(
        self,
        served: ServedModel,
        rows: Sequence[Any],
        *,
        as_csv: bool,
        observer: BatchObserver | None,
        horizon_days: int = DEFAULT_HORIZON_DAYS,
    ) -> ScoredBatch:
        """Checked JSON rows scored (blocking)."""
        ...

    async def comparison_data(self, store: ModelStore, upload: IO[bytes] | None, *, settings: Settings) -> Any:
        """The customers two versions are compared on: the upload, or the default dataset."""
        ...

    def batch_columns(self, served: ServedModel, names: Sequence[str]) -> tuple[dict[str, str], set[str]]:
        """Of a batch file's columns `names`: {feature: column} it reads, and which of those are numbers
        (a required column missing: the DataValidationError /predict/batch gives)."""
        ...

    def check_columns(self, columns: Any) -> Any:
        """A batch CSV's header checked before its rows are read (what is missing named at once)."""
        ...

    def score_chunk(self, served: ServedModel, frame: pd.DataFrame) -> ChunkScores:
        """One chunk of a batch file scored: (valid, labels, confidence, errors, values)."""
        ...
