"""Pieces every domain's schemas share: field rules, page size, examples, and the health answer."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, JsonValue
from pydantic_core import PydanticCustomError


def _whole_number(value: Any) -> Any:
    # JSON has one number type and JSON Schema counts 79.0 as an integer; 79.5, "79" and true stay errors.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


WholeNumber = BeforeValidator(_whole_number)


def _not_null(value: Any) -> Any:
    if value is None:
        raise PydanticCustomError("not_null", "May be left out, but not sent as null")
    return value


NotNull = BeforeValidator(_not_null)
"""For a field that may be left out but never sent as null (its default None means "left out")."""


def omittable(schema: dict[str, Any]) -> None:
    """The schema of a NotNull field: its own type without the null its Python default needs."""
    schema.pop("default", None)
    variants = schema.pop("anyOf", None)
    if variants is not None:
        kept = [variant for variant in variants if variant.get("type") != "null"]
        if len(kept) == 1:
            schema.update(kept[0])
        else:
            schema["anyOf"] = kept


MAX_PAGE_SIZE = 200


VERSION_EXAMPLE = "20250131-093000-a1b2c3"


PNG_EXAMPLE = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAA..."


CUSTOMER_EXAMPLE: dict[str, JsonValue] = {
    "sex": "Female",
    "age": 29,
    "annual_income": 85.0,
    "spending_score": 82,
    "purchase_frequency": 40,
}


class Health(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "healthy",
                    "message": "Customer Segmentation API is running",
                    "version": "1.0.0",
                    "model_loaded": True,
                    "model_version": VERSION_EXAMPLE,
                }
            ]
        }
    )

    status: Literal["healthy"] = "healthy"
    message: str = "Customer Segmentation API is running"
    version: str
    model_loaded: bool
    model_version: str | None
