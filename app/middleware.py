"""Pure ASGI middleware: request body caps and security headers."""
from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

UPLOAD_TYPES = ("multipart/form-data", "text/csv", "application/octet-stream")


class _BodyTooLarge(Exception):
    pass


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


class BodySizeLimit:
    """Refuse bodies over the cap with 413 before reading them whole.

    Uploads (multipart, CSV) get `upload_limit`, everything else `json_limit`. A declared
    Content-Length over the cap is refused before any byte is read; a body without one is
    counted as it streams and refused the moment it passes the cap.
    """

    def __init__(self, app: ASGIApp, *, upload_limit: int, json_limit: int) -> None:
        self.app = app
        self.upload_limit = upload_limit
        self.json_limit = json_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        content_type = (_header(scope, b"content-type") or "").lower()
        upload = content_type.startswith(UPLOAD_TYPES)
        limit = self.upload_limit if upload else self.json_limit
        kind = "uploads (MAX_UPLOAD_MB)" if upload else "JSON and form bodies (MAX_JSON_BODY_MB)"
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
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
        await send({
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close")],
        })
        await send({"type": "http.response.body", "body": body})


TOO_LARGE_RESPONSE = {
    "description": "Request body too large: over MAX_JSON_BODY_MB, or MAX_UPLOAD_MB for uploads",
    "content": {"application/json": {"schema": {
        "type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}}},
}


def document_body_limit(app) -> None:
    """Declare the 413 BodySizeLimit can send on every operation that takes a body."""
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


SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


# Responses that carry a token or account details even when the request had no credentials.
NO_STORE_PREFIXES = ("/auth/",)


def _is_private(scope: Scope) -> bool:
    return _header(scope, b"authorization") is not None or scope.get("path", "").startswith(NO_STORE_PREFIXES)


def hardening_headers(scope: Scope) -> dict[str, str]:
    """The headers SecurityHeaders adds, for a response sent from outside it (the server-error handler)."""
    headers = {name.decode(): value.decode() for name, value in SECURITY_HEADERS}
    if _is_private(scope):
        headers["cache-control"] = "no-store"
    return headers


class SecurityHeaders:
    """Hardening headers on every response; `no-store` on anything sent with credentials or carrying them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        private = _is_private(scope)

        async def add_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers.extend(h for h in SECURITY_HEADERS if h[0] not in present)
                if private and b"cache-control" not in present:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, add_headers)
