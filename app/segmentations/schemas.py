"""Schemas of named segmentations: declarations, listings, and the bodies and queries of their routes
(results.py holds what they answer)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import UploadFile
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    model_validator,
)

from app.core.schemas import CUSTOMER_EXAMPLE, VERSION_EXAMPLE
from app.segmentations.kinds.customer_record import CustomerFeatures
from app.segmentations.kinds.registry import KindName

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


class NamedBatchUpload(BaseModel):
    """POST /segmentations/{name}/predict/batch: customers as a JSON object, or a CSV file in a multipart form."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"customers": [CUSTOMER_EXAMPLE]}]})

    customers: Annotated[list[dict[str, JsonValue]], Field(min_length=1, max_length=MAX_BATCH_ROWS)] | None = Field(
        None, description="JSON only: the customers to score, each as the segmentation's schema declares"
    )
    file: UploadFile | None = Field(None, description="Multipart only: a CSV file of customers")


MAX_BATCH_ROWS = 10_000


class BatchUpload(BaseModel):
    """POST /predict/batch: customers as a JSON object, or a CSV file in a multipart form."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"customers": [CUSTOMER_EXAMPLE]}]})

    customers: Annotated[list[CustomerFeatures], Field(min_length=1, max_length=MAX_BATCH_ROWS)] | None = Field(
        None, description="JSON only: the customers to score"
    )
    file: UploadFile | None = Field(None, description="Multipart only: a CSV file of customers")


class ElbowRange(BaseModel):
    """The query of GET /elbow: the range of k to report on."""

    model_config = ConfigDict(frozen=True)

    k_min: int = Field(2, ge=2, le=15)
    k_max: int = Field(10, ge=2, le=15)


class TrainingUpload(BaseModel):
    """POST .../train: a CSV (or Parquet) file in a multipart form, or JSON `{"source": NAME}`; neither: the
    default dataset (kind customer)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"source": "crm"}]})

    source: Annotated[str, StringConstraints(min_length=1, max_length=40)] | None = Field(
        None, description="The data source to train on (GET /sources), in place of a file; unknown: 404"
    )
    file: UploadFile | None = Field(None, description="Multipart only: the training file")
