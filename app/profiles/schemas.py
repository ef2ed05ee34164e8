"""Saved customer profiles: what is sent to create or change one, and what is answered."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.core.schemas import CUSTOMER_EXAMPLE, NotNull, omittable
from app.segmentations.kinds.customer_record import (
    Age,
    AnnualIncome,
    CustomerFeatures,
    PurchaseFrequency,
    Sex,
    SpendingScore,
)

ProfileName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


Notes = Annotated[str, StringConstraints(max_length=2000)]


class ProfileCreate(CustomerFeatures):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"name": "Jane at the downtown store", **CUSTOMER_EXAMPLE, "notes": "Prefers email offers"}]
        }
    )

    name: ProfileName
    notes: Notes | None = None


class ProfileUpdate(BaseModel):
    """Any subset of a profile's fields; those left out keep their value."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"spending_score": 64, "notes": "Moved away"}]})

    # Each may be left out; only `notes` may be null (to clear it).
    name: Annotated[ProfileName | None, NotNull] = Field(None, json_schema_extra=omittable)
    sex: Annotated[Sex | None, NotNull] = Field(None, json_schema_extra=omittable)
    age: Annotated[Age | None, NotNull] = Field(None, json_schema_extra=omittable)
    annual_income: Annotated[AnnualIncome | None, NotNull] = Field(None, json_schema_extra=omittable)
    spending_score: Annotated[SpendingScore | None, NotNull] = Field(None, json_schema_extra=omittable)
    purchase_frequency: Annotated[PurchaseFrequency | None, NotNull] = Field(None, json_schema_extra=omittable)
    notes: Notes | None = None


class ProfilePublic(BaseModel):
    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    "id": 12,
                    "user_id": 7,
                    "name": "Jane at the downtown store",
                    **CUSTOMER_EXAMPLE,
                    "notes": "Prefers email offers",
                    "created_at": "2025-01-31T09:30:00Z",
                    "updated_at": "2025-01-31T09:30:00Z",
                    "cluster": 0,
                    "cluster_name": "Young, high spending, frequent buyers",
                }
            ]
        },
    )

    id: int
    user_id: int
    name: str
    sex: str
    age: int
    annual_income: float
    spending_score: int
    purchase_frequency: int
    notes: str | None
    created_at: datetime
    updated_at: datetime
    cluster: int | None = None
    cluster_name: str | None = None
