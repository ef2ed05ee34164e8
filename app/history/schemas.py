"""Prediction history: the query of a page, its items, and the page."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from app.core.schemas import CUSTOMER_EXAMPLE, MAX_PAGE_SIZE, VERSION_EXAMPLE, NotNull, omittable


class HistoryQuery(BaseModel):
    """The query of GET /history: whose history, and which page of it."""

    model_config = ConfigDict(frozen=True)

    user_id: int | None = Field(
        None, gt=0, le=2**31 - 1, description="Another user's history (analysts and admins); absent: your own"
    )
    skip: int = Field(0, ge=0, le=2**31 - 1, description="Rows to skip (with `before_id`: counted from that row)")
    limit: int = Field(50, ge=1, le=MAX_PAGE_SIZE, description=f"Rows to return, at most {MAX_PAGE_SIZE}")
    before_id: int | None = Field(
        None,
        gt=0,
        le=2**31 - 1,
        description=(
            "Only rows older than this one (a history item's `id`, usually the last page's `next_before_id`): "
            "a page as fast deep in a long history as at its start, and not shifted by new predictions. "
            "`skip` then counts from that row. An id that is not in this history is a 404."
        ),
    )
    segmentation: Annotated[str | None, NotNull] = Field(
        None,
        min_length=1,
        max_length=40,
        description="Only the predictions made with this segmentation",
        json_schema_extra=omittable,
    )


HISTORY_EXAMPLE: dict[str, JsonValue] = {
    "id": 31,
    "customer_data": CUSTOMER_EXAMPLE,
    "cluster": 4,
    "cluster_name": "High income, high spending",
    "confidence": 0.62,
    "model_version": VERSION_EXAMPLE,
    "created_at": "2025-01-31T09:30:00Z",
    "segmentation": "default",
}


class HistoryItem(BaseModel):
    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [HISTORY_EXAMPLE]})

    id: int
    customer_data: dict[str, Any]
    cluster: int
    cluster_name: str
    confidence: float
    model_version: str | None
    created_at: datetime
    segmentation: str = "default"


class HistoryPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"history": [HISTORY_EXAMPLE], "total": 1, "skip": 0, "limit": 50, "next_before_id": None}]
        }
    )

    history: list[HistoryItem]
    total: int
    skip: int
    limit: int
    next_before_id: int | None = Field(
        None, description="The `before_id` that reads the next (older) page; null on the last page"
    )
