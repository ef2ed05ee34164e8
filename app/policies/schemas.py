"""Bodies and answers of `.../policy` (the contract's "Data sources and retraining policies")."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints

from app.core.schemas import MAX_PAGE_SIZE, NotNull, omittable


class GateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_unchanged: float = Field(0.8, ge=0, le=1, description="compare's unchanged_segments must reach this")
    max_silhouette_drop: float = Field(0.05, ge=0, le=2, description="the silhouette may fall by at most this")
    min_segment_share: float = Field(0.01, ge=0, le=1, description="the candidate's smallest segment's share")


class PolicyBody(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"source": "crm", "schedule": "0 3 1 * *", "on_drift": "significant", "then_run": True}]
        },
    )

    source: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=40)]
    schedule: Annotated[str | None, NotNull] = Field(
        None, max_length=120, description="A five-field cron expression in UTC", json_schema_extra=omittable
    )
    on_drift: Annotated[Literal["moderate", "significant"] | None, NotNull] = Field(
        None, description="Fire when the drift status moves into this", json_schema_extra=omittable
    )
    gate: GateBody = Field(default_factory=GateBody)
    on_pass: Literal["activate", "hold"] = "activate"
    then_run: bool = Field(True, description="After an activation, a run on the same source")


POLICY_EXAMPLE: dict[str, JsonValue] = {
    "segmentation": "default",
    "source": "crm",
    "schedule": "0 3 1 * *",
    "on_drift": "significant",
    "gate": {"min_unchanged": 0.8, "max_silhouette_drop": 0.05, "min_segment_share": 0.01},
    "on_pass": "activate",
    "then_run": True,
    "updated_at": "2026-12-07T09:30:00Z",
    "next_fire_at": "2027-01-01T03:00:00Z",
    "last_fired_at": None,
    "last_outcome": None,
}
EVENT_EXAMPLE: dict[str, JsonValue] = {
    "at": "2027-01-01T03:00:02Z",
    "trigger": "schedule",
    "model_version": "20270101-030002-a1b2c3",
    "outcome": "held",
    "reasons": ["unchanged 0.712 is below min_unchanged 0.8"],
    "figures": {
        "unchanged": 0.712,
        "silhouette_active": 0.41,
        "silhouette_candidate": 0.43,
        "smallest_segment_share": 0.09,
    },
    "job_id": "9f2c4e1a7b3d5f60",
}


class Policy(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [POLICY_EXAMPLE]})

    segmentation: str
    source: str
    schedule: str | None
    on_drift: str | None
    gate: GateBody
    on_pass: str
    then_run: bool
    updated_at: datetime
    next_fire_at: datetime | None = Field(description="When the schedule fires next (null: no schedule)")
    last_fired_at: datetime | None
    last_outcome: str | None


class Figures(BaseModel):
    unchanged: float | None = None
    silhouette_active: float | None = None
    silhouette_candidate: float | None = None
    smallest_segment_share: float | None = None


class PolicyEventPublic(BaseModel):
    at: datetime
    trigger: Literal["schedule", "drift", "manual"]
    model_version: str | None
    outcome: Literal["activated", "held", "failed"]
    reasons: list[str]
    figures: Figures
    job_id: str | None = None


class PolicyEventPage(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"events": [EVENT_EXAMPLE], "total": 1}]})

    events: list[PolicyEventPublic]
    total: int


class EventPageQuery(BaseModel):
    model_config = ConfigDict(frozen=True)

    skip: int = Field(0, ge=0, le=2**31 - 1)
    limit: int = Field(50, ge=1, le=MAX_PAGE_SIZE)


class FireResult(BaseModel):
    """A policy fire's job result."""

    outcome: Literal["activated", "held", "failed"]
    model_version: str | None
    reasons: list[str]
    figures: Figures
