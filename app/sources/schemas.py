"""Schemas of data sources: the declaration a client sends, a source as it is shown, a preview."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints

SourceName = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9_-]{2,40}$"),
    Field(description="2-40 characters of a-z, 0-9, `_` and `-`", examples=["crm"]),
]
PREVIEW_ROWS = 20

FILE_EXAMPLE: dict[str, JsonValue] = {"name": "exports", "kind": "file", "path": "exports/customers-*.csv"}
SQL_EXAMPLE: dict[str, JsonValue] = {
    "name": "crm",
    "kind": "sql",
    "url": "postgresql+asyncpg://reader:secret@db.example.com:5432/crm",
    "query": "SELECT customer_id, age, annual_income, spending_score, purchase_frequency FROM customers",
}


class SourceCreate(BaseModel):
    """A file source (`kind: file` and `path`) or a SQL source (`kind: sql`, `url` and `query`)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [FILE_EXAMPLE, SQL_EXAMPLE]})

    name: SourceName
    kind: Literal["file", "sql"]
    path: Annotated[str, StringConstraints(max_length=500)] | None = Field(
        None,
        description="kind file: a CSV or Parquet file, or a glob of them (`exports/*.parquet`), relative to "
        "SOURCE_ROOT, without `..`",
    )
    url: Annotated[str, StringConstraints(max_length=2000)] | None = Field(
        None,
        description="kind sql: `postgresql+asyncpg://user:password@host:5432/db` (or `postgresql+psycopg://`), "
        "no `?options`; or `sqlite:///file.db` relative to SOURCE_ROOT. The password is stored encrypted and "
        "never shown back",
    )
    query: Annotated[str, StringConstraints(max_length=20_000)] | None = Field(
        None, description="kind sql: one SELECT (or WITH ... SELECT), run in a read-only transaction"
    )


class SourcePublic(BaseModel):
    """A source as every answer shows it: a SQL source's password as `***`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "crm",
                    "kind": "sql",
                    "path": None,
                    "url": "postgresql+asyncpg://reader:***@db.example.com:5432/crm",
                    "query": SQL_EXAMPLE["query"],
                    "created_by": "admin",
                    "created_at": "2026-12-10T09:00:00Z",
                }
            ]
        }
    )

    name: str
    kind: Literal["file", "sql"]
    path: str | None
    url: str | None = Field(description="The URL with its password, if any, as `***`")
    query: str | None
    created_by: str | None
    created_at: datetime


class SourceList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"sources": SourcePublic.model_json_schema()["examples"]}]}
    )

    sources: list[SourcePublic]


class SourcePreview(BaseModel):
    """The first rows of a source, as it reads now."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "columns": ["customer_id", "age", "annual_income"],
                    "rows": [["00001", 34, 61.5], ["00002", 51, 88.0]],
                }
            ]
        }
    )

    columns: list[str]
    rows: list[list[JsonValue]] = Field(description=f"At most {PREVIEW_ROWS} rows, each in `columns` order")
