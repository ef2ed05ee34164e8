"""Schemas of GET /drift and GET /segmentations/{name}/drift."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DriftStatus = Literal["stable", "moderate", "significant", "insufficient_data"]


class DriftQuery(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    version: str | None = Field(
        None, max_length=64, description="A version of this segmentation; default the active one"
    )
    since: datetime | None = Field(
        None,
        description="Count what was scored from then on (ISO 8601, UTC when no offset); default the version's activation",
    )

    @field_validator("since", mode="before")
    @classmethod
    def _iso_8601(cls, value: object) -> object:
        # Pydantic would also read a bare number as Unix seconds: only a written date is meant here.
        if isinstance(value, str):
            try:
                datetime.fromisoformat(value)
            except ValueError:
                raise ValueError("since must be an ISO 8601 date and time, e.g. 2026-12-01T08:00:00Z") from None
        return value


class FeatureDrift(BaseModel):
    feature: str
    psi: float | None = Field(description="Population stability index against the training bins; null before any row")
    status: DriftStatus
    reference_mean: float | None = Field(description="Training mean in the feature's own units (categorical: null)")
    observed_mean: float | None


class SegmentMixDrift(BaseModel):
    psi: float | None
    status: DriftStatus
    reference: dict[str, float] = Field(description="Training share of each cluster id")
    observed: dict[str, float] = Field(description="Observed share of each cluster id")


class DriftReport(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "segmentation": "default",
                    "model_version": "20261208-101500-a1b2c3",
                    "n_observed": 10000,
                    "status": "significant",
                    "since": "2026-12-08T10:15:00Z",
                    "features": [
                        {
                            "feature": "annual_income",
                            "psi": 0.41,
                            "status": "significant",
                            "reference_mean": 61.2,
                            "observed_mean": 78.9,
                        },
                        {
                            "feature": "age",
                            "psi": 0.002,
                            "status": "stable",
                            "reference_mean": 41.0,
                            "observed_mean": 41.1,
                        },
                    ],
                    "segment_mix": {
                        "psi": 0.12,
                        "status": "moderate",
                        "reference": {"0": 0.3, "1": 0.7},
                        "observed": {"0": 0.22, "1": 0.78},
                    },
                }
            ]
        }
    )

    segmentation: str
    model_version: str
    n_observed: int = Field(description="Rows this version scored (without an error) since `since`, every worker")
    status: DriftStatus = Field(description="The worst of features and segment mix; insufficient_data below 500 rows")
    since: datetime
    features: list[FeatureDrift]
    segment_mix: SegmentMixDrift
