"""Domain errors raised by services; one handler renders them as JSON."""

from __future__ import annotations


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
    """A request that is well-formed JSON but breaks a rule the schema cannot express."""

    status_code = 422

    def __init__(self, message: str, problems: list | None = None):
        super().__init__(message)
        self.problems = problems or []


class ServiceUnavailable(AppError):
    status_code = 503

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message, headers={"Retry-After": str(retry_after)})
