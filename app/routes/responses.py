"""OpenAPI declarations of the error responses a route can give, and the 422 of input read by hand."""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError


class ErrorBody(BaseModel):
    detail: Any


_DESCRIPTIONS = {
    400: "Bad request",
    401: "Missing, invalid, expired or revoked token",
    403: "Authenticated but not allowed, or inactive",
    404: "Not found",
    409: "Conflict with the current state",
    413: "Request body too large",
    422: "The request breaks a field rule; `detail` names the field",
    429: "Too many requests; see Retry-After",
    503: "Temporarily unavailable; see Retry-After",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody, "description": _DESCRIPTIONS[code]} for code in codes}


def validation_error(exc: ValidationError, where: str) -> RequestValidationError:
    """A Pydantic error on input a route read itself, as FastAPI's 422 for a declared `where` ("body", "query")."""
    return RequestValidationError(
        [{**e, "loc": (where, *e["loc"])} for e in exc.errors(include_url=False, include_context=False)]
    )


def is_json(content_type: str) -> bool:
    """Whether a Content-Type says JSON (`application/json` or `application/...+json`, any case), as FastAPI reads it."""
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))
