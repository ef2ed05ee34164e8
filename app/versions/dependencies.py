"""The segmentation a request acts on, as a dependency: the one its path names, else `default`.

Every segmentation route is one handler served at two doors: `/segmentations/{name}/...` and, for
`default`, the seed's path (`/clusters`, `/predict`, ...). The handler takes `SegmentationStore`; which
segmentation that is comes from the path alone.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from app.core.tables import DEFAULT_SEGMENTATION
from app.versions.store import ModelStore


async def segmentation_store(request: Request) -> ModelStore:
    """The segmentation named in the path (404 if there is none of that name); `default` at the seed's paths."""
    return await request.app.state.segmentations.get(request.path_params.get("name", DEFAULT_SEGMENTATION))


SegmentationStore = Annotated[ModelStore, Depends(segmentation_store)]

NAME_PARAMETER: dict[str, Any] = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "The segmentation's name (`default` is the seed's)",
    "schema": {"type": "string", "pattern": "^[a-z0-9_-]{2,40}$", "title": "Name"},
}
NAMED: dict[str, Any] = {"parameters": [NAME_PARAMETER]}
"""`openapi_extra` of a route under /segmentations/{name}: the name is read by `segmentation_store`."""
