"""Route classes for bodies FastAPI's declarations alone do not cover; the declarations stay FastAPI's.

`JsonOrFormRoute`: a route that declares a form (the OAuth2 password form, a CSV upload) and also
takes the same fields as one JSON object. `install_json_alternatives` documents that JSON body in
the OpenAPI schema with the form's own schema, so nothing about it is written by hand.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.datastructures import FormData
from starlette.types import Receive, Scope

JSON = "application/json"
FORM_MEDIA_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def is_json(content_type: str) -> bool:
    """Whether a Content-Type says JSON (`application/json` or `application/...+json`, any case), as FastAPI reads it."""
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == JSON or (media_type.startswith("application/") and media_type.endswith("+json"))


class JsonOrFormRequest(Request):
    """A request whose JSON object body reads as form fields, so the route's declared form validates it.

    A JSON array given for a list field is that field given once per item, as a form repeats a key
    for a list; every other value keeps its JSON type, so a number or an array where the form wants
    text is still a 422. A body with no Content-Type is read as JSON, as FastAPI reads JSON bodies.
    """

    def __init__(self, scope: Scope, receive: Receive, list_fields: frozenset[str]) -> None:
        super().__init__(scope, receive)
        self.list_fields = list_fields

    async def form(self, **limits: Any) -> FormData:  # type: ignore[override]
        content_type = self.headers.get("content-type")
        if content_type is None:
            if not await self.body():
                return FormData()
        elif not is_json(content_type):
            return await super().form(**limits)
        payload = json.loads(await self.body())  # a decode error is FastAPI's 422 `json_invalid`
        if not isinstance(payload, dict):
            return FormData()  # every field is then missing, and FastAPI says so field by field
        items: list[tuple[str, Any]] = []
        for key, value in payload.items():
            if key in self.list_fields and isinstance(value, list):
                items.extend((key, item) for item in value)
            else:
                items.append((key, value))
        return FormData(items)


def _is_list(annotation: Any) -> bool:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _is_list(get_args(annotation)[0])
    if origin in (Union, UnionType):
        return any(_is_list(arg) for arg in get_args(annotation))
    return origin in (list, tuple, set, frozenset)


class JsonOrFormRoute(APIRoute):
    """A route taking its declared form, or the same fields as a JSON object (see JsonOrFormRequest)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        model = self.body_field.field_info.annotation if self.body_field is not None else None
        list_fields: frozenset[str] = frozenset()
        if isinstance(model, type) and issubclass(model, BaseModel):
            list_fields = frozenset(
                info.alias or name for name, info in model.model_fields.items() if _is_list(info.annotation)
            )

        async def handle(request: Request) -> Response:
            return await handler(JsonOrFormRequest(request.scope, request.receive, list_fields))

        return handle


def install_json_alternatives(app: FastAPI) -> None:
    """Document the JSON body of every JsonOrFormRoute: the same schema FastAPI wrote for its form."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        for route in app.routes:
            if not isinstance(route, JsonOrFormRoute) or not route.include_in_schema:
                continue
            for method in route.methods or ():
                operation = schema["paths"].get(route.path_format, {}).get(method.lower())
                content = (operation or {}).get("requestBody", {}).get("content", {})
                form = next((content[media] for media in FORM_MEDIA_TYPES if media in content), None)
                if form is not None:
                    content[JSON] = {"schema": form["schema"]}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
