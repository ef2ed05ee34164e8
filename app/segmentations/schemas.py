"""Schemas of named segmentations: declarations, listings, and the bodies and answers of their routes."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import UploadFile
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    model_validator,
)

from app.schema import (
    CUSTOMER_EXAMPLE,
    MAX_BATCH_ROWS,
    MODEL_VERSION_EXAMPLE,
    SEGMENT_EXAMPLE,
    VERSION_EXAMPLE,
    ModelVersionPublic,
    SegmentAssignment,
    TrainResult,
)
from app.segmentations.explain_schemas import Explanation, ExplanationField
from app.segmentations.kinds.registry import KindName
from app.versions.identity_schemas import SegmentMatch

if TYPE_CHECKING:
    pass

MAX_TRANSACTIONS = 10_000
"""Transactions one predict of kind rfm may carry."""

SegmentationName = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9_-]{2,40}$"),
    Field(description="2-40 characters of a-z, 0-9, `_` and `-`", examples=["crm"]),
]
Description = Annotated[str, StringConstraints(max_length=1000)]
FEATURES_EXAMPLE: list[JsonValue] = [
    {"name": "tenure_months", "type": "numeric", "transform": "auto", "min": 0},
    {"name": "plan", "type": "categorical"},
    {"name": "region", "type": "categorical"},
]


class FeatureDeclaration(BaseModel):
    """One declared column of a `custom` segmentation."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
    type: Literal["numeric", "categorical"]
    transform: Literal["none", "log", "auto"] | None = Field(
        None, description="numeric only: `auto` (the default) takes log1p of a skewed non-negative column"
    )
    min: float | None = Field(
        None, strict=True, allow_inf_nan=False, description="numeric only: lowest value predict accepts"
    )
    max: float | None = Field(
        None, strict=True, allow_inf_nan=False, description="numeric only: highest value predict accepts"
    )


class SegmentationCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "crm",
                    "kind": "custom",
                    "description": "Segments for the CRM team",
                    "features": FEATURES_EXAMPLE,
                    "id_column": "customer_id",
                }
            ]
        },
    )

    name: SegmentationName
    kind: KindName
    description: Description | None = None
    features: Annotated[list[FeatureDeclaration], Field(min_length=1, max_length=50)] | None = Field(
        None, description="kind custom: the columns to segment on, 1 to 50"
    )
    id_column: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)] | None = Field(
        None, description="kind custom: the customer id column, echoed back in batch CSVs"
    )
    columns: dict[str, str] | None = Field(
        None,
        description="kind rfm: the log's headers for customer_id, date, amount (or quantity and price), "
        "order_id (optional) and a strftime date_format (optional); matched case-insensitively",
    )


class SegmentationUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"description": "Segments for ads"}]})

    description: Description | None


SEGMENTATION_EXAMPLE: dict[str, JsonValue] = {
    "name": "crm",
    "kind": "custom",
    "description": "Segments for the CRM team",
    "features": FEATURES_EXAMPLE,
    "id_column": "customer_id",
    "active_version": VERSION_EXAMPLE,
    "n_clusters": 5,
    "created_at": "2025-01-31T09:30:00Z",
    "created_by": "analyst1",
}


class SegmentationPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [SEGMENTATION_EXAMPLE]})

    name: str
    kind: str
    description: str | None
    features: list[dict[str, Any]]
    id_column: str | None = None
    columns: dict[str, str] | None = Field(None, description="kind rfm: how the transaction log's headers map")
    active_version: str | None
    n_clusters: int | None
    created_at: datetime | None
    created_by: str | None


class SegmentationDetail(SegmentationPublic):
    customer_schema: dict[str, Any] = Field(description="The JSON schema of the `customer` body of its predict")


class SegmentationList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"segmentations": [SEGMENTATION_EXAMPLE]}]})

    segmentations: list[SegmentationPublic]


class Transaction(BaseModel):
    """One line of a customer's transaction log (kind rfm)."""

    model_config = ConfigDict(extra="forbid")

    date: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=40)] | int = Field(
        description="ISO 8601 (with or without a time) or YYYYMMDD", examples=["2025-03-01"]
    )
    amount: float = Field(allow_inf_nan=False, description="The line's amount; a return is negative")
    order_id: Annotated[str, StringConstraints(max_length=100)] | int | None = None


class NamedPredictBody(BaseModel):
    """POST /segmentations/{name}/predict: one customer, as that segmentation's schema declares it
    (kind rfm: their RFM values, or their transactions)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"customer": CUSTOMER_EXAMPLE},
                {"transactions": [{"date": "2025-03-01", "amount": 42.5, "order_id": "A-1001"}], "as_of": "2025-04-01"},
            ]
        }
    )

    # Any JSON value: the segmentation's own schema checks each one next.
    customer: dict[str, Any] | None = Field(
        None, description="The segmentation's features (GET /segmentations/{name} shows their schema)"
    )
    transactions: Annotated[list[Transaction], Field(min_length=1, max_length=MAX_TRANSACTIONS)] | None = Field(
        None, description="Kind rfm only: one customer's transactions, instead of `customer`"
    )
    as_of: Annotated[str, StringConstraints(strip_whitespace=True, max_length=40)] | None = Field(
        None, description="Kind rfm, with `transactions`: the day RFM is computed as of (default today, UTC)"
    )

    @model_validator(mode="after")
    def _one_customer(self) -> NamedPredictBody:
        if (self.customer is None) == (self.transactions is None):
            raise ValueError("send the customer as `customer` (or, kind rfm, as `transactions`), exactly one of them")
        if self.as_of is not None and self.transactions is None:
            raise ValueError("`as_of` goes with `transactions`")
        return self


class NamedPredictionResult(SegmentAssignment):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "cluster": 4,
                    "cluster_name": "High income, high spending",
                    "confidence": 0.62,
                    "customer_data": CUSTOMER_EXAMPLE,
                    "model_version": VERSION_EXAMPLE,
                    "segmentation": "default",
                    "warnings": [],
                }
            ]
        }
    )

    customer_data: dict[str, Any]
    model_version: str
    segmentation: str
    warnings: list[str] = []
    explanation: Explanation | None = ExplanationField


class NamedBatchUpload(BaseModel):
    """POST /segmentations/{name}/predict/batch: customers as a JSON object, or a CSV file in a multipart form."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"customers": [CUSTOMER_EXAMPLE]}]})

    customers: Annotated[list[dict[str, JsonValue]], Field(min_length=1, max_length=MAX_BATCH_ROWS)] | None = Field(
        None, description="JSON only: the customers to score, each as the segmentation's schema declares"
    )
    file: UploadFile | None = Field(None, description="Multipart only: a CSV file of customers")


class NamedTrainResult(TrainResult):
    segmentation: str
    skipped_rows: int = 0
    missing_shares: dict[str, float] = {}
    n_transactions: int | None = Field(None, description="Kind rfm: the log's rows (n_samples counts customers)")
    skipped_customers: int | None = Field(None, description="Kind rfm: customers without a counted purchase")
    rows_after_as_of: int | None = Field(None, description="Kind rfm: rows dated after as_of, left out")
    as_of: str | None = Field(None, description="Kind rfm: the day RFM was computed as of")
    columns: dict[str, str] | None = Field(None, description="Kind rfm: the headers the log's fields were read from")


NAMED_SEGMENT_EXAMPLE: dict[str, JsonValue] = {
    **SEGMENT_EXAMPLE,
    "means": {"age": 37.2, "annual_income": 118.4, "spending_score": 80.1, "purchase_frequency": 41.3},
    "segment_key": "s-3fa2c1",
    "generated_name": "High income, high spending",
}


class NamedSegmentStats(BaseModel):
    """A segment of any kind; kind `customer` also carries its `avg_*` fields."""

    model_config = ConfigDict(json_schema_extra={"examples": [NAMED_SEGMENT_EXAMPLE]})

    cluster_id: int
    cluster_name: str
    size: int
    percentage: float
    description: str
    means: dict[str, float | dict[str, float]] = Field(
        description="Each feature's mean in its own units (categorical: the share of each level)"
    )
    segment_key: str
    generated_name: str
    avg_age: float | None = None
    avg_income: float | None = None
    avg_spending_score: float | None = None
    avg_purchase_frequency: float | None = None
    revenue_share: float | None = Field(
        None, description="Kind rfm: the segment's share of the training customers' revenue, 0..100"
    )


class NamedClusterSummary(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "total_customers": 800,
                    "n_clusters": 5,
                    "model_version": VERSION_EXAMPLE,
                    "segmentation": "default",
                    "clusters": [NAMED_SEGMENT_EXAMPLE],
                }
            ]
        }
    )

    total_customers: int
    n_clusters: int
    model_version: str
    segmentation: str
    clusters: list[NamedSegmentStats]


class NamedModelVersionDetail(ModelVersionPublic):
    clusters: list[dict[str, Any]] = []
    k_selection: dict[str, Any] | None = None
    features: list[str] = []
    trained_at: str | None = None
    library_versions: dict[str, str] = {}
    missing_shares: dict[str, float] = {}
    algorithm: str | None = Field(
        None, description="kmeans, minibatch_kmeans, or streamed_kmeans (trained out of core from a file)"
    )
    out_of_core: dict[str, Any] | None = Field(
        None, description="For a version trained out of core: the file's format, the sample k was chosen on, the passes"
    )
    previous_version: str | None = Field(
        None, description="The version this one was matched to (the active one when it was trained); null if none"
    )
    matching: list[SegmentMatch] = []
    retired_cluster_ids: list[int] = Field(
        [], description="Ids of the previous version's segments that no segment of this version continues"
    )


class ModelPageQuery(BaseModel):
    model_config = ConfigDict(frozen=True)

    skip: int = Field(0, ge=0, le=2**31 - 1)
    limit: int = Field(50, ge=1, le=200)


class ModelPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "models": [MODEL_VERSION_EXAMPLE],
                    "active_version": VERSION_EXAMPLE,
                    "total": 1,
                    "skip": 0,
                    "limit": 50,
                }
            ]
        }
    )

    models: list[ModelVersionPublic]
    active_version: str | None
    total: int
    skip: int
    limit: int
