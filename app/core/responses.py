"""OpenAPI declarations of the error responses a route can give, in the shapes app.main renders."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    """Every error but a 422: `detail` is one human-readable string."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"detail": "Profile not found"}]})

    detail: str


class FieldError(BaseModel):
    """A declared field rule broken: FastAPI's error without its `input`, `ctx` or `url`."""

    type: str
    loc: list[str | int] = Field(description="Where the value was: `body`, `query` or `path`, then the field")
    msg: str


class FileProblem(BaseModel):
    """A problem in an uploaded file (or the default dataset)."""

    row: int | None = Field(description="1-based data row (the header is not a row); null for the whole file")
    line: int | None = Field(description="The file's line (the header is line 1); null for the whole file")
    column: str | None
    reason: str


class InvalidRequestBody(BaseModel):
    """422: `detail` one sentence; `errors` the broken field rules, or the problems in an uploaded file.

    A rule across fields (`k_min` over `k_max`) has `detail` alone.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "detail": "annual_income: Input should be less than or equal to 10000; age: Field required",
                    "errors": [
                        {
                            "type": "less_than_equal",
                            "loc": ["body", "annual_income"],
                            "msg": "Input should be less than or equal to 10000",
                        },
                        {"type": "missing", "loc": ["body", "age"], "msg": "Field required"},
                    ],
                },
                {"detail": "k_min must not exceed k_max"},
                {
                    "detail": "2 of 40 rows have invalid values (first: row 3 age: out of range 18..100: 7)",
                    "errors": [
                        {"row": 3, "line": 4, "column": "age", "reason": "out of range 18..100: 7"},
                        {"row": 9, "line": 10, "column": "spending_score", "reason": "empty value"},
                    ],
                },
            ]
        }
    )

    detail: str
    errors: list[FieldError | FileProblem] = Field(
        default_factory=list,
        description="`{type, loc, msg}` per broken field rule, or up to ten `{row, line, column, reason}` file problems",
    )


_DESCRIPTIONS = {
    401: "Missing, invalid, expired or revoked token",
    403: "Authenticated but not allowed, or inactive",
    404: "Not found",
    405: "Method not allowed at this path; see Allow",
    409: "Conflict with the current state",
    413: "Request body too large",
    422: "A field rule broken (`detail` names each field, `errors` lists them) or a rule across fields",
    429: "Too many requests; see Retry-After",
    503: "Temporarily unavailable; see Retry-After",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error responses of a route; every 422 is InvalidRequestBody, every other error ErrorBody."""
    return {
        code: {"model": InvalidRequestBody if code == 422 else ErrorBody, "description": _DESCRIPTIONS[code]}
        for code in codes
    }


def file_errors(description: str) -> dict[int | str, dict[str, Any]]:
    """The 422 of a route that reads customer data from a file: the same body, `errors` then file problems."""
    return {422: {"model": InvalidRequestBody, "description": f"{description}; or a field rule broken"}}
