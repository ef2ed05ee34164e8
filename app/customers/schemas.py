"""The customer base as the API shows it: runs, changes, a customer, an audience, and their queries."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field

from app.core.schemas import NotNull, omittable

MAX_KEYSET_LIMIT = 1000
HISTORY_LIMIT = 100

RunMode = Literal["replace", "upsert"]
RunStatus = Literal["running", "completed", "failed"]

RUN_EXAMPLE: dict[str, Any] = {
    "run_id": 2,
    "segmentation": "default",
    "model_version": "20261209T101500Z-5f3a",
    "mode": "replace",
    "status": "completed",
    "n_customers": 5000,
    "n_new": 120,
    "n_changed": 310,
    "n_unchanged": 4570,
    "n_gone": 40,
    "started_at": "2026-12-09T10:20:00Z",
    "finished_at": "2026-12-09T10:20:03Z",
    "previous_run_id": 1,
}


class RunUpload(BaseModel):
    """POST .../runs: the customers as a multipart `file`, or JSON naming a data source."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"source": "crm_nightly"}]})

    source: Annotated[str | None, NotNull] = Field(
        None, min_length=1, max_length=100, description="JSON only: a data source's name", json_schema_extra=omittable
    )
    file: UploadFile | None = Field(
        None, description="Multipart only: a CSV or Parquet file of customers (kind rfm: a transaction log)"
    )


class Run(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [RUN_EXAMPLE]})

    run_id: int
    segmentation: str
    model_version: str = Field(description="The version the run scored with (the active one when it started)")
    mode: RunMode
    status: RunStatus
    n_customers: int | None = Field(description="Customers in the run: n_new + n_changed + n_unchanged")
    n_new: int | None
    n_changed: int | None = Field(description="Customers whose segment_key differs from their previous one")
    n_unchanged: int | None
    n_gone: int | None = Field(description="Customers of the base absent from a replace run")
    started_at: datetime
    finished_at: datetime | None
    previous_run_id: int | None = Field(description="The run whose base this one was compared with")
    created_by: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict, description="`as_of`, and the upload's `file` and `bytes`")
    error: dict[str, Any] | None = Field(None, description="Failed: the error body the request would have answered")
    error_status: int | None = None


class RunList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"runs": [RUN_EXAMPLE], "total": 1, "skip": 0, "limit": 50}]}
    )

    runs: list[Run]
    total: int
    skip: int
    limit: int


class RunPageQuery(BaseModel):
    model_config = ConfigDict(frozen=True)

    skip: int = Field(0, ge=0, le=2**31 - 1)
    limit: int = Field(50, ge=1, le=200)


class KeysetQuery(BaseModel):
    model_config = ConfigDict(frozen=True)

    after: Annotated[str | None, NotNull] = Field(
        None,
        max_length=200,
        description="The last customer_id of the previous page (exclusive); absent for the first page",
        json_schema_extra=omittable,
    )
    limit: int = Field(100, ge=1, le=MAX_KEYSET_LIMIT)


class AudienceQuery(KeysetQuery):
    min_p_alive: Annotated[float | None, NotNull] = Field(
        None, ge=0, le=1, description="Kind rfm: only customers at least this likely alive", json_schema_extra=omittable
    )
    max_p_alive: Annotated[float | None, NotNull] = Field(
        None, ge=0, le=1, description="Kind rfm: only customers at most this likely alive", json_schema_extra=omittable
    )
    min_clv: Annotated[float | None, NotNull] = Field(
        None,
        allow_inf_nan=False,
        description="Kind rfm: only customers worth at least this over 90 days",
        json_schema_extra=omittable,
    )


class Change(BaseModel):
    customer_id: str
    change: Literal["new", "changed", "gone"]
    from_cluster_id: int | None = Field(description="In the previous run's version; null for a new customer")
    to_cluster_id: int | None = Field(description="In this run's version; null for a gone customer")
    from_segment_key: str | None
    to_segment_key: str | None


CHANGE_EXAMPLE: dict[str, Any] = {
    "customer_id": "C00042",
    "change": "changed",
    "from_cluster_id": 2,
    "to_cluster_id": 0,
    "from_segment_key": "b81e4c02aa",
    "to_segment_key": "3f2a9c01d4",
}


class ChangePage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "run_id": 2,
                    "previous_run_id": 1,
                    "entered": {"3f2a9c01d4": 12},
                    "left": {"b81e4c02aa": 12},
                    "items": [CHANGE_EXAMPLE],
                    "next_after": "C00042",
                }
            ]
        }
    )

    run_id: int
    previous_run_id: int | None
    entered: dict[str, int] = Field(description="{segment_key: customers that entered it in this run}")
    left: dict[str, int] = Field(description="{segment_key: customers that left it in this run}")
    items: list[Change]
    next_after: str | None = Field(description="Pass as `after` for the next page; null on the last page")


class HistoryEntry(BaseModel):
    run_id: int
    cluster_id: int | None = Field(description="In the active version; null when gone or for a retired segment")
    cluster_name: str | None
    segment_key: str | None = Field(description="Null: the run found the customer gone")


class CustomerMembershipPublic(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "customer_id": "C00042",
                    "status": "active",
                    "cluster_id": 0,
                    "cluster_name": "High income, high spending",
                    "segment_key": "3f2a9c01d4",
                    "confidence": 0.41,
                    "model_version": "20261209T101500Z-5f3a",
                    "since_run_id": 2,
                    "p_alive": None,
                    "clv": None,
                    "history": [
                        {
                            "run_id": 2,
                            "cluster_id": 0,
                            "cluster_name": "High income, high spending",
                            "segment_key": "3f2a9c01d4",
                        },
                        {
                            "run_id": 1,
                            "cluster_id": 2,
                            "cluster_name": "Average income, moderate spending",
                            "segment_key": "b81e4c02aa",
                        },
                    ],
                }
            ]
        }
    )

    customer_id: str
    status: Literal["active", "gone"]
    cluster_id: int | None = Field(description="In the active version; null when gone or for a retired segment")
    cluster_name: str | None
    segment_key: str | None
    confidence: float | None
    model_version: str | None = Field(description="The version that scored the customer last")
    since_run_id: int = Field(description="The run since which the customer has been in this segment (or gone)")
    p_alive: float | None = Field(None, description="Kind rfm: P(alive) as of the run")
    clv: float | None = Field(None, description="Kind rfm: predicted value over 90 days")
    history: list[HistoryEntry] = Field(description=f"The customer's changes, newest first, at most {HISTORY_LIMIT}")


class AudienceMember(BaseModel):
    customer_id: str
    confidence: float | None
    since_run_id: int
    p_alive: float | None = None
    clv: float | None = None


class Audience(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "segmentation": "default",
                    "cluster_id": 0,
                    "cluster_name": "High income, high spending",
                    "segment_key": "3f2a9c01d4",
                    "run_id": 2,
                    "items": [{"customer_id": "C00042", "confidence": 0.41, "since_run_id": 2}],
                    "next_after": "C00042",
                }
            ]
        }
    )

    segmentation: str
    cluster_id: int
    cluster_name: str
    segment_key: str
    run_id: int | None = Field(description="The run whose base this is; null before the first run")
    items: list[AudienceMember]
    next_after: str | None = Field(description="Pass as `after` for the next page; null on the last page")
