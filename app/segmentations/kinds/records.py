"""The `customer` body of a declared schema (kinds custom and rfm), checked by Pydantic."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, NotRequired

from pydantic import BeforeValidator, ConfigDict, Field, StringConstraints, TypeAdapter
from typing_extensions import TypedDict

if TYPE_CHECKING:
    from app.ml.schema import FeatureSchema


def _category(value: Any) -> Any:
    # A level may come as a number in JSON (region 7); it is compared as text, as in a CSV.
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    return value


def declared_customer_adapter(schema: FeatureSchema, title: str) -> TypeAdapter[dict[str, Any]]:
    """The `customer` body of a declared schema: each feature required, typed and bounded.

    A TypedDict keyed by the features' own names (any column name works), so a checked
    customer is a plain dict, with nothing to convert before it is scored or stored.
    """
    fields: dict[str, Any] = {}
    for feature in schema.features:
        if feature.type == "numeric":
            fields[feature.name] = Annotated[
                float, Field(strict=True, allow_inf_nan=False, ge=feature.min, le=feature.max)
            ]
        else:
            fields[feature.name] = Annotated[str, BeforeValidator(_category), StringConstraints(max_length=200)]
    if schema.id_column and schema.id_column not in fields:
        fields[schema.id_column] = NotRequired[Annotated[str | None, BeforeValidator(_category)]]
    # The functional form, as feature names need not be identifiers (built at run time, so typed loosely).
    make_typed_dict: Any = TypedDict
    customer: Any = make_typed_dict(title, fields)
    customer.__pydantic_config__ = ConfigDict(extra="ignore")
    return TypeAdapter(customer)
