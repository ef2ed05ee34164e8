"""The errors of the ML core: bad data or a bad declaration, as ``ValueError`` subclasses.

They know nothing of HTTP; the web app maps every :class:`MLError` to a 422 with one handler
(`app.core.errors.ml_error_body`), the command-line tools print ``str(error)``.
"""

from __future__ import annotations

from typing import Any

MAX_LISTED_PROBLEMS = 10


class MLError(ValueError):
    """Input the ML core cannot use; ``str(error)`` is one human-readable sentence."""

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class DataValidationError(MLError):
    """Customer data that cannot be used, with what is wrong and where.

    ``message`` is one human-readable sentence (also ``str(error)``).
    ``problems`` lists at most ten findings, each a dict with ``row`` (1-based
    data row, header excluded; ``None`` for file-level problems), ``line``
    (``row + 1``, the row number a spreadsheet shows), ``column`` (canonical
    feature name or ``None``) and ``reason``. ``offending_rows`` counts every
    row with at least one problem, including those not listed.
    """

    def __init__(self, message: str, problems: list[dict[str, Any]] | None = None, offending_rows: int = 0):
        super().__init__(message)
        self.problems: list[dict[str, Any]] = list(problems or [])[:MAX_LISTED_PROBLEMS]
        self.offending_rows = offending_rows

    def to_dict(self) -> dict[str, Any]:
        return {"message": self.message, "problems": self.problems, "offending_rows": self.offending_rows}


class SchemaError(MLError):
    """A feature declaration that cannot be used; the message is one sentence naming the problem."""


__all__ = ["MAX_LISTED_PROBLEMS", "DataValidationError", "MLError", "SchemaError"]
