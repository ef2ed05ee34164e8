"""Domain errors raised by services; handlers registered once in app.main render them as JSON.

Every error's `detail` is one human-readable string, as clients render it as text. Problems in
an uploaded file add a top-level `errors` list (see `app.preprocess.DataValidationError`).
"""

from __future__ import annotations

from typing import Any


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
