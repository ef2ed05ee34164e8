"""Route classes for what FastAPI's declarations alone do not cover; the declarations stay FastAPI's.

Both are custom `APIRoute` classes as FastAPI's docs show them ("Custom Request and APIRoute
class"): they override `get_route_handler` and read the request through public Starlette calls only.

`JsonOrFormRoute`: a route that declares a form (the OAuth2 password form, a CSV upload) and also
takes the same fields as one JSON object. `install_json_alternatives` documents that JSON body in
the OpenAPI schema with the form's own schema, so nothing about it is written by hand.
`FastRoute`: a declared JSON body, query models and response model, served in fewer steps on a hot path.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeGuard, get_args, get_origin, get_type_hints

from fastapi import Body, FastAPI, Request, Response, params
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

JSON = "application/json"
FORM_MEDIA_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
RouteHandler = Callable[[Request], Coroutine[Any, Any, Response]]


def is_json(content_type: str) -> bool:
    """Whether a Content-Type says JSON (`application/json` or `application/...+json`, any case), as FastAPI reads it."""
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == JSON or (media_type.startswith("application/") and media_type.endswith("+json"))


def _json_twin(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """`endpoint` with each `Form()`/`File()` parameter declared as a JSON body instead.

    A form model becomes the body itself (`{username, password}`); a single form field becomes a
    member of the body object, as FastAPI embeds several body parameters. Every other parameter
    (dependencies, the Request, query and path parameters) is declared as it was.
    """
    hints = get_type_hints(endpoint, include_extras=True)
    signature = inspect.signature(endpoint)
    parameters = []
    for parameter in signature.parameters.values():
        annotation = hints.get(parameter.name, parameter.annotation)
        if get_origin(annotation) is Annotated:
            inner, *metadata = get_args(annotation)
            if any(isinstance(marker, params.Form) for marker in metadata):
                kept = [marker for marker in metadata if not isinstance(marker, params.Form)]
                annotation = Annotated[(inner, *kept, Body(embed=not _is_model(inner)))]
        parameters.append(parameter.replace(annotation=annotation))

    async def twin(*args: Any, **kwargs: Any) -> Any:
        return await endpoint(*args, **kwargs)

    # What inspect.signature, and so FastAPI, reads for the twin's parameters.
    vars(twin)["__signature__"] = signature.replace(
        parameters=parameters, return_annotation=hints.get("return", signature.return_annotation)
    )
    twin.__name__ = endpoint.__name__
    twin.__qualname__ = endpoint.__qualname__
    twin.__doc__ = endpoint.__doc__
    return twin


class JsonOrFormRoute(APIRoute):
    """A route taking its declared form, or the same fields as one JSON object.

    FastAPI reads a route's body as JSON or as a form, never either. So this route keeps a twin: a
    stock `APIRoute` with the same path and options over the same endpoint, its form parameters
    declared as a JSON body (see `_json_twin`), not in the route table and not in the schema. A body
    sent as JSON (`application/json` or `application/...+json`), or a body sent without a
    Content-Type, is answered by the twin; every other request by the declared form, with the
    route's `form_limits`. Each side is FastAPI's own request handler, so the validation, the 422s
    and the form limits are FastAPI's, field for field: `{"username": ..., "password": ...}` as JSON
    and as a form give the same answer and name the same fields when a rule is broken.
    The endpoint must be a coroutine function.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **options: Any) -> None:
        # Set before APIRoute.__init__, which builds this route's handler (get_route_handler below).
        self.json_route = APIRoute(
            path, _json_twin(endpoint), **{**options, "include_in_schema": False, "strict_content_type": False}
        )
        super().__init__(path, endpoint, **options)

    def get_route_handler(self) -> RouteHandler:
        form_handler = super().get_route_handler()
        json_handler = self.json_route.get_route_handler()

        async def handle(request: Request) -> Response:
            content_type = request.headers.get("content-type")
            if content_type is None:
                # FastAPI reads a body without a Content-Type as JSON on a non-strict route; an empty
                # one is an empty form, so each missing field is named.
                as_json = bool(await request.body())
            else:
                as_json = is_json(content_type)
            return await (json_handler if as_json else form_handler)(request)

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


class FastRoute(APIRoute):
    """A route declared the FastAPI way (a JSON model body, query models, a response model), served in fewer steps.

    The body is parsed and validated in one Pydantic step, each query model in one, and the answer
    serialized in one, where FastAPI's request handler resolves every declared input through its
    generic dependency solver and validates the answer again before serializing it: a tenth of a
    small request such as POST /predict. It applies when the endpoint takes only the Request, a JSON
    model body, `Annotated[Model, Query()]` query models, `Annotated[str, Path()]` path parameters
    without rules of their own and dependencies called with the Request alone (the bearer-token gates); any other
    route is served by FastAPI's own handler. It reads only the route's public attributes (endpoint,
    dependencies, response_model, status_code). A value that breaks a field rule raises FastAPI's
    RequestValidationError naming the body or query field, so the app's handler answers the same 422
    as for the stock route: `detail` one sentence, `errors` the list (tests/test_bodies.py compares them).
    """

    def get_route_handler(self) -> RouteHandler:
        plan = _fast_plan(self.endpoint, self.dependencies)
        response_model = self.response_model if _is_model(self.response_model) else None
        if plan is None or (response_model is None and not plan.returns_response):
            return super().get_route_handler()
        status_code = self.status_code or 200
        endpoint = self.endpoint

        async def handle(request: Request) -> Response:
            arguments: dict[str, Any] = {}
            for gate in plan.gates:
                await gate(request)
            for name, dependency in plan.called.items():
                arguments[name] = await dependency(request)
            if plan.request_name is not None:
                arguments[plan.request_name] = request
            for name in plan.paths:
                arguments[name] = request.path_params[name]
            for name, model in plan.queries.items():
                arguments[name] = _query(model, request)
            if plan.body is not None:
                arguments[plan.body[0]] = await _json_body(plan.body[1], request)
            result = await endpoint(**arguments)
            if isinstance(result, Response):
                return result
            assert response_model is not None  # a route returning a model declares it
            if type(result) is not response_model:
                result = response_model.model_validate(result, from_attributes=True)
            return Response(result.model_dump_json(), status_code=status_code, media_type=JSON)

        return handle


_NOT_JSON = "The body must be a JSON object sent as application/json"
RequestCall = Callable[[Request], Coroutine[Any, Any, Any]]
QUERY_CACHE_ENTRIES = 1024
_QUERIES: dict[tuple[type[BaseModel], bytes], BaseModel] = {}


def _errors(exc: ValidationError, where: str) -> RequestValidationError:
    """A Pydantic error as FastAPI's 422 for a declared input `where` ("body", "query")."""
    return RequestValidationError(
        [{**e, "loc": (where, *e["loc"])} for e in exc.errors(include_url=False, include_context=False)]
    )


async def _json_body(model: type[BaseModel], request: Request) -> BaseModel:
    content_type = request.headers.get("content-type")
    if content_type is not None and not is_json(content_type):
        raise RequestValidationError(
            [{"type": "model_attributes_type", "loc": ("body",), "msg": _NOT_JSON, "input": None}]
        )
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise _errors(exc, "body") from None


def _query(model: type[BaseModel], request: Request) -> BaseModel:
    """The query string as `model`. A frozen model's value is kept per query string (the few that
    clients repeat, such as none at all or `explain=true`; at most QUERY_CACHE_ENTRIES of them), so a
    repeated query is validated once; a query that breaks a rule is never kept."""
    raw: bytes = request.scope.get("query_string") or b""
    frozen = bool(model.model_config.get("frozen"))
    if frozen:
        known = _QUERIES.get((model, raw))
        if known is not None:
            return known
    try:
        value = model.model_validate(dict(request.query_params)) if raw else model()
    except ValidationError as exc:
        raise _errors(exc, "query") from None
    if frozen and len(_QUERIES) < QUERY_CACHE_ENTRIES:
        _QUERIES[(model, raw)] = value
    return value


def _is_model(annotation: Any) -> TypeGuard[type[BaseModel]]:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _plain_path(marker: Any) -> bool:
    """A `Path()` with no rule of its own: the text of the path segment is the value."""
    return type(marker) is params.Path and not marker.metadata


def _request_only(dependency: Any) -> bool:
    """Whether FastAPI would call this dependency with the Request and nothing else."""
    # A function, or an instance with an async __call__ (the bearer-token gates).
    call = dependency if inspect.isfunction(dependency) else type(dependency).__call__
    if not inspect.iscoroutinefunction(call):
        return False
    parameters = list(inspect.signature(dependency).parameters.values())
    if len(parameters) != 1:
        return False
    hints = get_type_hints(call)
    return hints.get(parameters[0].name) is Request


@dataclass
class _Plan:
    gates: list[RequestCall] = field(default_factory=list)
    called: dict[str, RequestCall] = field(default_factory=dict)
    queries: dict[str, type[BaseModel]] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)
    body: tuple[str, type[BaseModel]] | None = None
    request_name: str | None = None
    returns_response: bool = False


def _fast_plan(endpoint: Callable[..., Any], route_dependencies: Sequence[params.Depends]) -> _Plan | None:
    """How FastRoute calls `endpoint`, or None when one of its inputs needs FastAPI's solver."""
    if not inspect.iscoroutinefunction(endpoint):
        return None
    plan = _Plan()
    for gate in route_dependencies:
        if gate.dependency is None or not _request_only(gate.dependency):
            return None
        plan.gates.append(gate.dependency)
    hints = get_type_hints(endpoint, include_extras=True)
    returned = hints.get("return")
    plan.returns_response = isinstance(returned, type) and issubclass(returned, Response)
    for name in inspect.signature(endpoint).parameters:
        annotation = hints.get(name)
        metadata: tuple[Any, ...] = ()
        if get_origin(annotation) is Annotated:
            annotation, *extra = get_args(annotation)
            metadata = tuple(extra)
        depends = [m for m in metadata if isinstance(m, params.Depends)]
        if depends and depends[0].dependency is not None and _request_only(depends[0].dependency):
            plan.called[name] = depends[0].dependency
        elif annotation is Request and not metadata:
            plan.request_name = name
        elif _is_model(annotation) and len(metadata) == 1 and type(metadata[0]) is params.Query:
            plan.queries[name] = annotation
        elif annotation is str and len(metadata) == 1 and _plain_path(metadata[0]):
            plan.paths.append(name)
        elif _is_model(annotation) and not metadata and plan.body is None:
            plan.body = (name, annotation)
        else:
            return None
    return plan
