"""Domain errors raised by services; handlers registered once in app.main render them as JSON.

Every error's `detail` is one human-readable string, as clients render it as text. The ML
core's own errors (`app.ml.errors.MLError`: bad data, a bad declaration) are all a 422; problems
in an uploaded file add a top-level `errors` list (see `app.ml.errors.DataValidationError`).
"""

from __future__ import annotations

from typing import Any

from app.ml.errors import DataValidationError, MLError

ML_ERROR_STATUS = 422
"""Every error of the ML core is input the service cannot use."""


class AppError(Exception):
    status_code = 400
    headers: dict[str, str] | None = None

    def __init__(self, message: str, *, status_code: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        if headers is not None:
            self.headers = headers

    def body(self) -> dict[str, Any]:
        """The JSON body of the response: `detail`, a string, and what a subclass adds beside it."""
        return {"detail": self.message}


class NotFound(AppError):
    status_code = 404

    def __init__(self, what: str):
        super().__init__(f"{what[:1].upper()}{what[1:]} not found")


class Conflict(AppError):
    status_code = 409


class Forbidden(AppError):
    status_code = 403


class Unauthorized(AppError):
    status_code = 401
    headers = {"WWW-Authenticate": "Bearer"}


class TooManyRequests(AppError):
    status_code = 429

    def __init__(self, message: str, retry_after: int):
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after)))})
        self.retry_after = retry_after


class PayloadTooLarge(AppError):
    status_code = 413


class InvalidInput(AppError):
    """A request that breaks a rule across fields, which no single declared field rule can express."""

    status_code = 422


class ServiceUnavailable(AppError):
    status_code = 503

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message, headers={"Retry-After": str(retry_after)})


def ml_error_body(exc: MLError) -> dict[str, Any]:
    """The JSON body of an ML error: `detail` the sentence; for bad data, `errors` every listed problem
    with all four keys (null where unknown)."""
    body: dict[str, Any] = {"detail": exc.message}
    if isinstance(exc, DataValidationError):
        keys = ("row", "line", "column", "reason")
        body["errors"] = [{key: problem.get(key) for key in keys} for problem in exc.problems]
    return body
