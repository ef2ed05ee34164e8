"""OpenAPI declarations of the error responses a route can give, in the shapes app.main renders."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    """Every error but a 422: `detail` is one human-readable string."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"detail": "Profile not found"}]})

    detail: str


class FieldError(BaseModel):
    type: str
    loc: list[str | int]
    msg: str


class InvalidRequestBody(BaseModel):
    """422: FastAPI's list for a declared field rule, one string for a rule across fields."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"detail": [{"type": "less_than_equal", "loc": ["body", "age"], "msg": "Input should be <= 100"}]},
                {"detail": "k_min must not exceed k_max"},
            ]
        }
    )

    detail: list[FieldError] | str


class FileProblem(BaseModel):
    row: int | None = Field(description="1-based data row (the header is not a row); null for the whole file")
    line: int | None = Field(description="The file's line (the header is line 1); null for the whole file")
    column: str | None
    reason: str


class FileProblemBody(BaseModel):
    """422 for data that cannot be used: `detail` one sentence, `errors` up to ten problems.

    A field rule of the request itself (a query value) is FastAPI's list in `detail`, without `errors`.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "detail": "2 of 40 rows have invalid values (first: row 3 age: out of range 18..100: 7)",
                    "errors": [
                        {"row": 3, "line": 4, "column": "age", "reason": "out of range 18..100: 7"},
                        {"row": 9, "line": 10, "column": "spending_score", "reason": "empty value"},
                    ],
                }
            ]
        }
    )

    detail: list[FieldError] | str
    errors: list[FileProblem] = []


_DESCRIPTIONS = {
    401: "Missing, invalid, expired or revoked token",
    403: "Authenticated but not allowed, or inactive",
    404: "Not found",
    405: "Method not allowed at this path; see Allow",
    409: "Conflict with the current state",
    413: "Request body too large",
    422: "A field rule broken (`detail` lists the fields) or a rule across fields (`detail` says which)",
    429: "Too many requests; see Retry-After",
    503: "Temporarily unavailable; see Retry-After",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {
        code: {"model": InvalidRequestBody if code == 422 else ErrorBody, "description": _DESCRIPTIONS[code]}
        for code in codes
    }


def file_errors(description: str) -> dict[int | str, dict[str, Any]]:
    """The 422 of a route that reads customer data from a file: the file-problem body."""
    return {422: {"model": FileProblemBody, "description": f"{description}; or a field rule broken"}}
