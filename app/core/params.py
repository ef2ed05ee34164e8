"""Declarations shared by the routes that take a file or answer in CSV."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import File, Request, UploadFile

CsvFile = Annotated[UploadFile | None, File(description="A CSV file of customers")]
FORM_LIMITS: Any = {"max_files": 1, "max_fields": 20}
"""A file route's form: one file, a few fields."""
CSV_ANSWER: dict[int | str, dict[str, Any]] = {200: {"content": {"text/csv": {"schema": {"type": "string"}}}}}


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


def wants_csv(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "text/csv" in accept and "application/json" not in accept.split(",")[0]
