"""Swagger UI and ReDoc served from this service, with no CDN.

The JavaScript and CSS come from the `fastapi-offline` package, which ships the
Swagger UI and ReDoc bundles; we only serve its files and render FastAPI's own
page templates pointing at them. The app is created with `docs_url=None,
redoc_url=None` and this module registers the pages instead.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL = "/docs"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
REDOC_URL = "/redoc"
STATIC_URL = "/static-docs"
STATIC_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"

# The pages may load only from this service. This also stops the one asset the ReDoc
# bundle still fetches from a CDN (the "API docs by Redocly" logo) from leaving the browser.
DOCS_CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline'",  # FastAPI's page templates start the UI with an inline script
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self' data:",
        "connect-src 'self'",
        "worker-src 'self' blob:",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

SWAGGER_UI_PARAMETERS = {
    # Keep the token from Authorize across page reloads (stored in the browser's localStorage).
    "persistAuthorization": True,
    "displayRequestDuration": True,
    # The online validator would send the schema to a third-party host.
    "validatorUrl": None,
}


def install_docs(app: FastAPI) -> None:
    """Register /docs, /docs/oauth2-redirect, /redoc and the /static-docs assets on `app`."""
    if not (STATIC_DIR / "swagger-ui-bundle.js").is_file():
        raise RuntimeError(f"Swagger UI assets not found in {STATIC_DIR}: reinstall fastapi-offline")
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="static-docs")
    app.swagger_ui_oauth2_redirect_url = OAUTH2_REDIRECT_URL

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _local_only(
            get_swagger_ui_html(
                openapi_url=f"{root}{app.openapi_url}",
                title=f"{app.title} - Swagger UI",
                oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_URL}",
                swagger_js_url=f"{root}{STATIC_URL}/swagger-ui-bundle.js",
                swagger_css_url=f"{root}{STATIC_URL}/swagger-ui.css",
                swagger_favicon_url=f"{root}{STATIC_URL}/favicon.png",
                swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
            )
        )

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    async def swagger_ui_oauth2_redirect() -> HTMLResponse:
        return _local_only(get_swagger_ui_oauth2_redirect_html())

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _local_only(
            get_redoc_html(
                openapi_url=f"{root}{app.openapi_url}",
                title=f"{app.title} - ReDoc",
                redoc_js_url=f"{root}{STATIC_URL}/redoc.standalone.js",
                redoc_favicon_url=f"{root}{STATIC_URL}/favicon.png",
                with_google_fonts=False,
            )
        )


def _local_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page
