"""Schemas of explanations: the `explain` query flag and the `explanation` of a prediction."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.ml.value import DEFAULT_HORIZON_DAYS, MAX_HORIZON_DAYS


class ExplainQuery(BaseModel):
    """`?explain=true`: add why the customer is in its segment (nothing is computed without it)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    explain: bool = Field(False, description="Add `explanation` (one customer) or `top_feature`, `margin` (batch)")


class PredictQuery(ExplainQuery):
    """The queries of one customer's predict: `explain`, and (kind rfm) the value fields' horizon."""

    horizon_days: int = Field(
        DEFAULT_HORIZON_DAYS,
        ge=1,
        le=MAX_HORIZON_DAYS,
        description="Kind rfm: the days ahead that expected_purchases and clv are counted over",
    )


class RunnerUp(BaseModel):
    cluster: int
    cluster_name: str
    distance: float = Field(description="Distance to the second-nearest centroid, in the scaled space")


class Contribution(BaseModel):
    feature: str
    value: Any = Field(description="The feature's value as sent")
    share: float = Field(
        description="The feature's part of runner_up.distance² - distance² (the shares sum to 1; "
        "a negative share pulls toward the runner-up)"
    )


class Explanation(BaseModel):
    """Why a customer is in its segment rather than the runner-up's, feature by feature."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "distance": 0.41,
                    "runner_up": {"cluster": 2, "cluster_name": "Average income, average spending", "distance": 1.37},
                    "contributions": [
                        {"feature": "spending_score", "value": 82, "share": 0.71},
                        {"feature": "annual_income", "value": 85.0, "share": 0.22},
                        {"feature": "purchase_frequency", "value": 40, "share": 0.05},
                        {"feature": "age", "value": 29, "share": 0.02},
                    ],
                    "summary": "In 'High income, high spending' rather than 'Average income, average spending' "
                    "mainly because of spending_score (71%) and annual_income (22%).",
                }
            ]
        }
    )

    distance: float = Field(description="Distance to the segment's centroid, in the scaled space")
    runner_up: RunnerUp
    contributions: list[Contribution] = Field(description="One per clustering feature, largest share first")
    summary: str = Field(description="One sentence naming the deciding features")


def _absent(value: Any) -> bool:
    return value is None


ExplanationField = Field(
    None, exclude_if=_absent, description="Only with `explain=true`: why this segment and not the runner-up"
)
