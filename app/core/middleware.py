"""The one pure-ASGI layer every request passes: request id, body caps, hardening headers,
CORS, metrics and the request log line.

It is one layer, not five, because on a small request the per-layer work (each one reading
the headers, wrapping `send`, rebuilding the response headers) costs more than the endpoint
(docs/performance.md has the figures). Here the request headers are read in one pass, `send`
is wrapped once and the response headers are extended once.
CORS stays Starlette's `CORSMiddleware`, called only for requests that carry an `Origin`
(the only ones it acts on); the others get the `Vary: Origin` it would have added.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.metrics import Metrics
from app.core.observability import (
    ACCESS_EXIT_TIMEOUT_SECONDS,
    METRICS_PATH,
    access_log,
    access_logger,
    new_request_id,
    request_id_var,
    route_template,
    sane_request_id,
)

UPLOAD_TYPES = (b"multipart/form-data", b"text/csv", b"application/octet-stream")

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
_SECURITY_NAMES = frozenset(name for name, _ in SECURITY_HEADERS)
_NO_STORE = (b"cache-control", b"no-store")
_VARY_ORIGIN = (b"vary", b"Origin")

# Responses that carry a token or account details even when the request had no credentials.
NO_STORE_PREFIXES = ("/auth/",)
CORS_ALLOW_METHODS = ["GET", "POST", "PUT", "DELETE", "OPTIONS"]
CORS_ALLOW_HEADERS = ["Authorization", "Content-Type", "Accept", "X-Request-ID"]
CORS_EXPOSE_HEADERS = ["X-Request-ID", "Retry-After"]


def hardening_headers(scope: Scope) -> dict[str, str]:
    """The headers ServiceMiddleware adds, for a response sent from outside it (the server-error handler)."""
    headers = {name.decode(): value.decode() for name, value in SECURITY_HEADERS}
    if _RequestFacts(scope).private:
        headers["cache-control"] = "no-store"
    return headers


def _takes_a_log(path: str) -> bool:
    """A batch of a named segmentation (a transaction log to score is as large as a training one): it
    takes MAX_TRAIN_UPLOAD_MB rather than MAX_UPLOAD_MB."""
    return path.startswith("/segmentations/") and path.endswith("/predict/batch")


class _BodyTooLarge(Exception):
    pass


class _RequestFacts:
    """What the middleware needs from the request headers, read in one pass."""

    __slots__ = ("private", "origin", "request_id", "upload", "declared_length", "has_body")

    def __init__(self, scope: Scope) -> None:
        self.private = scope["path"].startswith(NO_STORE_PREFIXES)
        self.origin = False
        self.request_id: bytes | None = None
        self.upload = False
        self.declared_length: int | None = None
        self.has_body = False
        # ASGI servers give header names in lower case.
        for key, value in scope["headers"]:
            if key == b"authorization":
                self.private = True
            elif key == b"origin":
                self.origin = True
            elif key == b"x-request-id":
                self.request_id = value
            elif key == b"content-type":
                self.upload = value.lower().startswith(UPLOAD_TYPES)
            elif key == b"content-length":
                self.has_body = True
                if value.isdigit():
                    self.declared_length = int(value)
            elif key == b"transfer-encoding":
                self.has_body = True


def _cors(app: ASGIApp, origins: list[str]) -> CORSMiddleware:
    return CORSMiddleware(
        app,
        allow_origins=origins,
        allow_credentials=True,
        allow_methods=CORS_ALLOW_METHODS,
        allow_headers=CORS_ALLOW_HEADERS,
        expose_headers=CORS_EXPOSE_HEADERS,
    )


def _flush_access_log_before_shutdown_ends(send: Send) -> Send:
    """`send` for the lifespan scope: the server hears that shutdown is complete only once the
    request lines still queued are written, so a clean stop (SIGTERM included) loses none.

    This flush is the one that counts under uvicorn: after its graceful shutdown it raises the
    SIGTERM again, and the process ends without running `atexit` handlers.
    """

    async def lifespan_send(message: Message) -> None:
        if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            await asyncio.to_thread(access_log.flush, timeout=ACCESS_EXIT_TIMEOUT_SECONDS)
        await send(message)

    return lifespan_send


class ServiceMiddleware:
    """Request id in and out, body caps (413), hardening headers, CORS, metrics and one log line.

    Uploads (multipart, CSV) get `upload_limit`, every other body `json_limit`: a declared
    Content-Length over the cap is refused before any byte is read, a body without one is
    counted as it streams and refused the moment it passes the cap. `no-store` goes on every
    response to a request with credentials and on everything under /auth/.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        cors_origins: list[str],
        upload_limit: int,
        json_limit: int,
        train_upload_limit: int | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.upload_limit = upload_limit
        self.train_upload_limit = upload_limit if train_upload_limit is None else train_upload_limit
        self.json_limit = json_limit
        self._cors_app = _cors(app, cors_origins)
        self._cors_capped = _cors(self._capped, cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                send = _flush_access_log_before_shutdown_ends(send)
            await self.app(scope, receive, send)
            return
        facts = _RequestFacts(scope)
        request_id = None
        if facts.request_id is not None:
            request_id = sane_request_id(facts.request_id.decode("latin-1"))
        if request_id is None:
            request_id = new_request_id()
        context = request_id_var.set(request_id)
        outer_root_path = scope.get("root_path", "")
        # request.state writes into this dict: after the app ran it carries the caller's user_id.
        state = scope.setdefault("state", {})
        if isinstance(state, dict):
            state["request_id"] = request_id  # for the server-error handler, which answers outside this layer
        scope["service.request_facts"] = facts
        status = 500
        extra = [(b"x-request-id", request_id.encode())]
        private = facts.private
        if not facts.origin and not private:
            # As CORSMiddleware would: a cache must keep answers to other origins apart.
            # Private answers are never stored, so they need no Vary.
            extra.append(_VARY_ORIGIN)

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                present = {key.lower() for key, _ in headers}
                headers += extra
                if _SECURITY_NAMES.isdisjoint(present):
                    headers += SECURITY_HEADERS
                else:
                    headers += [h for h in SECURITY_HEADERS if h[0] not in present]
                if private and b"cache-control" not in present:
                    headers.append(_NO_STORE)
                message["headers"] = headers
            await send(message)

        app: ASGIApp
        if facts.has_body:
            app = self._cors_capped if facts.origin else self._capped
        else:
            app = self._cors_app if facts.origin else self.app
        started = time.perf_counter()
        failed = False
        try:
            await app(scope, receive, send_with_headers)
        except BaseException:
            failed = True
            raise
        finally:
            elapsed = time.perf_counter() - started
            method = scope["method"]
            route = route_template(scope, outer_root_path)
            self.metrics.observe_request(method, route, status, elapsed)
            # Scrapes come every few seconds; they stay out of the INFO log.
            level = logging.DEBUG if route == METRICS_PATH else logging.INFO
            if access_logger.isEnabledFor(level):
                user_id = state.get("user_id") if isinstance(state, dict) else None
                access_log.log(level, method, route, scope.get("path", ""), status, elapsed, request_id, user_id)
            # After an unhandled error the id stays set: Starlette's 500 handler runs next in
            # this task, and the traceback it logs should carry the id too.
            if not failed:
                request_id_var.reset(context)

    async def _capped(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app, with the request body held to its cap."""
        facts: _RequestFacts = scope["service.request_facts"]
        if not facts.upload:
            limit, kind = self.json_limit, "JSON and form bodies (MAX_JSON_BODY_MB)"
        elif scope["method"] == "POST" and scope["path"].endswith("/train"):
            limit, kind = self.train_upload_limit, "training uploads (MAX_TRAIN_UPLOAD_MB)"
        elif scope["method"] == "POST" and scope["path"].endswith("/runs"):
            limit, kind = self.train_upload_limit, "run uploads (MAX_TRAIN_UPLOAD_MB)"
        elif scope["method"] == "POST" and _takes_a_log(scope["path"]):
            limit, kind = self.train_upload_limit, "batch uploads of named segmentations (MAX_TRAIN_UPLOAD_MB)"
        else:
            limit, kind = self.upload_limit, "uploads (MAX_UPLOAD_MB)"
        if facts.declared_length is not None and facts.declared_length > limit:
            await self._too_large(send, limit, kind)
            return

        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                # Whatever the app made of the aborted read, the client is told the real reason.
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._too_large(send, limit, kind)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if not started:
                await self._too_large(send, limit, kind)

    @staticmethod
    async def _too_large(send: Send, limit: int, kind: str) -> None:
        message = f"Request body too large: the limit for {kind} is {limit / 1024 / 1024:.3g} MB"
        body = json.dumps({"detail": message}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


TOO_LARGE_RESPONSE = {
    "description": "Request body too large: over MAX_JSON_BODY_MB, MAX_UPLOAD_MB for uploads, or "
    "MAX_TRAIN_UPLOAD_MB for training uploads",
    "content": {
        "application/json": {
            "schema": {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}
        }
    },
}


def document_body_limit(app) -> None:
    """Declare the 413 ServiceMiddleware can send on every operation that takes a body."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for path_item in schema.get("paths", {}).values():
                for operation in path_item.values():
                    if isinstance(operation, dict) and "requestBody" in operation:
                        operation.setdefault("responses", {}).setdefault("413", TOO_LARGE_RESPONSE)
        return app.openapi_schema

    app.openapi = openapi
