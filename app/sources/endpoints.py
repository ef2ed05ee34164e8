"""The /sources routes: admins declare and delete sources, analysts list, read and preview them.

Training from a source is POST .../train with JSON `{"source": NAME}` (app.segmentations.endpoints),
which reads it through app.sources.reading.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response

from app.auth.dependencies import AdminUser, AnalystUser
from app.core.responses import errors
from app.sources.schemas import SourceCreate, SourceList, SourcePreview, SourcePublic
from app.sources.service import SourceCatalog

router = APIRouter(prefix="/sources", tags=["sources"])


async def source_catalog(request: Request) -> SourceCatalog:
    return SourceCatalog(database=request.app.state.database, settings=request.app.state.settings)


Sources = Annotated[SourceCatalog, Depends(source_catalog)]
Name = Annotated[str, Path(description="The source's name", max_length=40)]

READ_ERRORS = (
    "a source that cannot be read now: no file matches, a file outside SOURCE_ROOT, a refused host, "
    "a query that fails or runs past SOURCE_STATEMENT_TIMEOUT_SECONDS"
)


@router.post(
    "",
    status_code=201,
    summary="Declare a data source (admin)",
    description='`{name, kind: "file", path}`: a CSV or Parquet file, or a glob of them, relative to SOURCE_ROOT '
    '(unset: refused), without `..`. `{name, kind: "sql", url, query}`: a PostgreSQL URL '
    "(`postgresql+asyncpg://` or `postgresql+psycopg://`, no `?options`, a host that resolves to global "
    "addresses only unless SOURCE_ALLOW_PRIVATE=true) or `sqlite:///file.db` under SOURCE_ROOT, and one "
    "SELECT, run read-only with a statement timeout. Use a read-only database role. The password is stored "
    "encrypted and never shown back. A name taken: 409.",
    responses=errors(401, 403, 409, 422),
)
async def create_source(sources: Sources, admin: AdminUser, body: SourceCreate) -> SourcePublic:
    return await sources.create(body, by=admin.username)


@router.get(
    "",
    summary="Every data source (analyst)",
    description="Sorted by name; a SQL source's password shows as `***`.",
    responses=errors(401, 403),
)
async def list_sources(sources: Sources, _: AnalystUser) -> SourceList:
    return SourceList(sources=await sources.list())


@router.get(
    "/{name}",
    summary="One data source (analyst)",
    description="A SQL source's password shows as `***`. Unknown: 404.",
    responses=errors(401, 403, 404, 422),
)
async def get_source(sources: Sources, _: AnalystUser, name: Name) -> SourcePublic:
    return await sources.get(name)


@router.delete(
    "/{name}",
    status_code=204,
    summary="Delete a data source (admin)",
    description="Versions trained from it stay. Unknown: 404.",
    responses=errors(401, 403, 404, 422),
)
async def delete_source(sources: Sources, admin: AdminUser, name: Name) -> Response:
    await sources.delete(name, by=admin.username)
    return Response(status_code=204)


@router.post(
    "/{name}/preview",
    summary="The first rows of a data source (analyst)",
    description=f"`{{columns, rows}}`: the first 20 rows as the source reads now, each row in `columns` order. "
    f"Unknown: 404. 422: {READ_ERRORS}.",
    responses=errors(401, 403, 404, 422),
)
async def preview_source(sources: Sources, _: AnalystUser, name: Name) -> SourcePreview:
    return SourcePreview(**await sources.preview(name))
