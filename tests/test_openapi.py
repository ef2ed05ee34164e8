"""The OpenAPI schema documents every operation, and the docs pages work offline."""

from __future__ import annotations

import json
import re

import pytest

# The health check takes no input and needs no login: it has no client error to declare.
NO_CLIENT_ERRORS = {("get", "/")}

_ASSET = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
_URL_IN_SCRIPT = re.compile(r"""["'](?:https?:)?//[^"']+["']""")


def _operations(spec: dict):
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def _schema_example(spec: dict, schema: dict | None) -> bool:
    if not schema:
        return False
    if "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    if schema.get("type") == "array":
        return _schema_example(spec, schema.get("items"))
    return bool(schema.get("examples") or schema.get("example"))


@pytest.fixture
async def spec(client) -> dict:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


async def test_every_operation_has_summary_description_and_client_errors(spec):
    problems = []
    for method, path, operation in _operations(spec):
        if not operation.get("summary"):
            problems.append(f"{method.upper()} {path}: no summary")
        if not operation.get("description"):
            problems.append(f"{method.upper()} {path}: no description")
        client_errors = [code for code in operation.get("responses", {}) if code.startswith("4")]
        if not client_errors and (method, path) not in NO_CLIENT_ERRORS:
            problems.append(f"{method.upper()} {path}: no 4xx response declared")
        for code in client_errors:
            if not operation["responses"][code].get("description"):
                problems.append(f"{method.upper()} {path}: {code} has no description")
    assert not problems, "\n".join(problems)


async def test_every_json_body_and_success_response_has_an_example(spec):
    problems = []
    for method, path, operation in _operations(spec):
        body = operation.get("requestBody", {}).get("content", {}).get("application/json")
        if body is not None and not (_schema_example(spec, body.get("schema")) or body.get("examples")):
            problems.append(f"{method.upper()} {path}: request body has no example")
        for code, response in operation.get("responses", {}).items():
            media = response.get("content", {}).get("application/json")
            if (
                code.startswith("2")
                and media is not None
                and media.get("schema")
                and not (_schema_example(spec, media.get("schema")) or media.get("examples"))
            ):
                problems.append(f"{method.upper()} {path}: {code} response has no example")
    assert not problems, "\n".join(problems)


async def test_every_schema_reference_resolves(spec):
    referenced = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(spec)))
    assert referenced <= set(spec["components"]["schemas"]), referenced - set(spec["components"]["schemas"])


async def test_login_is_an_oauth2_password_flow(spec):
    schemes = spec["components"]["securitySchemes"]
    flows = [s["flows"]["password"] for s in schemes.values() if s.get("type") == "oauth2"]
    assert flows and flows[0]["tokenUrl"] == "/auth/login"


async def test_operational_endpoints_stay_out_of_the_schema(spec):
    for path in ("/docs", "/redoc", "/metrics", "/docs/oauth2-redirect"):
        assert path not in spec["paths"]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_use_only_local_assets(client, page):
    response = await client.get(page)
    assert response.status_code == 200
    html = response.text
    assets = _ASSET.findall(html)
    assert assets, "the page loads no assets at all"
    for url in assets:
        assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url} from elsewhere"
        asset = await client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 1000, url
    assert not _URL_IN_SCRIPT.findall(html), _URL_IN_SCRIPT.findall(html)
    assert "fonts.googleapis.com" not in html and "cdn." not in html


async def test_swagger_ui_keeps_the_authorize_flow(client):
    html = (await client.get("/docs")).text
    assert "/openapi.json" in html
    assert "oauth2RedirectUrl" in html and "/docs/oauth2-redirect" in html
    assert '"persistAuthorization": true' in html
    redirect = await client.get("/docs/oauth2-redirect")
    assert redirect.status_code == 200 and "oauth2" in redirect.text.lower()
