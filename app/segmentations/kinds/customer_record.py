"""The record of kind `customer` (the seed's five features) as an API schema."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from app.core.schemas import CUSTOMER_EXAMPLE, WholeNumber
from app.ml.preprocess import FEATURE_RANGES, SEX_VALUES


def _canonical_sex(value: Any) -> Any:
    # Case-insensitive in, canonical out; anything that is not a known word fails the Literal below.
    if isinstance(value, str):
        for canonical in SEX_VALUES:
            if value.strip().lower() == canonical.lower():
                return canonical
    return value


def _bounds(feature: str) -> dict[str, float]:
    low, high = FEATURE_RANGES[feature]
    return {"ge": low, "le": high}


Sex = Annotated[Literal["Male", "Female", "Other"], BeforeValidator(_canonical_sex)]


Age = Annotated[int, Field(strict=True, description="Years", **_bounds("age")), WholeNumber]


AnnualIncome = Annotated[
    float,
    Field(
        strict=True, allow_inf_nan=False, description="Thousands per year (65.5 = 65,500)", **_bounds("annual_income")
    ),
]


SpendingScore = Annotated[
    int, Field(strict=True, description="Spending behaviour score", **_bounds("spending_score")), WholeNumber
]


PurchaseFrequency = Annotated[
    int, Field(strict=True, description="Purchases per year", **_bounds("purchase_frequency")), WholeNumber
]


class CustomerFeatures(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [CUSTOMER_EXAMPLE]})

    sex: Sex
    age: Age
    annual_income: AnnualIncome
    spending_score: SpendingScore
    purchase_frequency: PurchaseFrequency
