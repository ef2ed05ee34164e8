"""`as_of`: the day a transaction log is reckoned as of, as a query value or in a predict body."""

from __future__ import annotations

from datetime import date
from typing import Any

from app.core.errors import InvalidInput
from app.ml import rfm


def as_of_value(value: Any) -> Any:
    """An `as_of` query value for its declared date type: YYYYMMDD and a time part accepted too; a value
    that is no date is left for the date type to refuse with FastAPI's 422."""
    if isinstance(value, str):
        try:
            return rfm.parse_as_of(value)
        except ValueError:
            return value
    return value


def as_of_date(value: str | None) -> date | None:
    """The `as_of` query value as a date; a 422 naming the format otherwise."""
    try:
        return rfm.parse_as_of(value)
    except ValueError:
        raise InvalidInput(f"as_of {value!r} is not a date: give YYYY-MM-DD or YYYYMMDD") from None
