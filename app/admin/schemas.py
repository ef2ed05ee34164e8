"""What the admin overview answers."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.core.schemas import VERSION_EXAMPLE


class AdminStats(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "total_users": 12,
                    "active_users": 11,
                    "inactive_users": 1,
                    "total_predictions": 340,
                    "total_profiles": 25,
                    "users_by_role": {"user": 9, "analyst": 2, "admin": 1},
                    "predictions_by_cluster": {"1": 220, "4": 120},
                    "model": {
                        "version": VERSION_EXAMPLE,
                        "n_clusters": 5,
                        "silhouette_score": 0.4475,
                        "n_samples": 5000,
                        "trained_at": "2025-01-31T09:30:00+00:00",
                        "cluster_names": {"1": "Senior, low income, low spending", "4": "High income, high spending"},
                    },
                }
            ]
        }
    )

    total_users: int
    active_users: int
    inactive_users: int
    total_predictions: int
    total_profiles: int
    users_by_role: dict[str, int]
    predictions_by_cluster: dict[str, int]
    model: dict[str, Any] | None
    segmentations: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Every segmentation: `{name, kind, active_version, predictions, drift_status, policy}` "
        "(policy: null, or its `{source, schedule, next_fire_at, last_outcome, last_fired_at}`)",
    )
