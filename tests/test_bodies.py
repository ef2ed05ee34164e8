"""The route classes of app/core/routing.py, through HTTP: they answer as FastAPI's stock path does.

JsonOrFormRoute: the same fields sent as JSON and as a form give the same answer, and the same 422
(`{detail: one sentence, errors: [{type, loc, msg}]}`) when they break a rule; the form's limits are
answered with a 4xx. FastRoute: the hot routes answer as the same endpoints on a stock APIRoute.
"""

from __future__ import annotations

import io
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from app.core.routing import FastRoute, JsonOrFormRoute
from app.core.tables import Role
from tests.conftest import CUSTOMER, PASSWORD


def assert_422_shape(response: httpx.Response) -> None:
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"detail", "errors"}, body
    assert isinstance(body["detail"], str) and body["detail"].strip(), body
    assert body["errors"] and all(set(error) == {"type", "loc", "msg"} for error in body["errors"]), body


def comparable(body: dict[str, Any]) -> dict[str, Any]:
    """A login answer without what differs from one token to the next."""
    return {key: value for key, value in body.items() if key != "access_token"}


# --- JsonOrFormRoute ---------------------------------------------------------------------------


def test_the_json_or_form_routes_are_json_or_form_routes(app):
    routes = {
        (route.path, method) for route in app.routes if isinstance(route, JsonOrFormRoute) for method in route.methods
    }
    assert {
        ("/auth/login", "POST"),
        ("/predict/batch", "POST"),
        ("/segmentations/{name}/predict/batch", "POST"),
    } <= routes


async def test_login_by_json_and_by_form_gives_the_same_answer(client, make_user):
    user, _ = await make_user(Role.user)
    credentials = {"username": user["username"], "password": PASSWORD}
    by_form = await client.post("/auth/login", data=credentials)
    by_json = await client.post("/auth/login", json=credentials)
    assert by_form.status_code == by_json.status_code == 200, (by_form.text, by_json.text)
    assert comparable(by_form.json()) == comparable(by_json.json())
    for response in (by_form, by_json):
        token = response.json()["access_token"]
        me = await client.get("/auth/me", headers={"Authorization": f"Bearer {token}"})
        assert me.json()["username"] == user["username"]


async def test_a_wrong_password_by_json_and_by_form_gets_the_same_401(client, make_user):
    user, _ = await make_user(Role.user)
    credentials = {"username": user["username"], "password": "not-the-password"}
    by_form = await client.post("/auth/login", data=credentials)
    by_json = await client.post("/auth/login", json=credentials)
    assert by_form.status_code == by_json.status_code == 401
    assert by_form.json() == by_json.json()


@pytest.mark.parametrize(
    "fields",
    [
        {"username": "ana"},
        {"password": "secret-pass"},
        {},
        {"username": "ana", "password": "x" * 129},
        {"username": "", "password": ""},
        {"username": "u" * 321, "password": "secret-pass"},
    ],
    ids=["no-password", "no-username", "nothing", "password-too-long", "empty", "username-too-long"],
)
async def test_a_broken_login_rule_by_json_and_by_form_gets_the_same_422(client, fields):
    by_form = await client.post("/auth/login", data=fields)
    by_json = await client.post("/auth/login", json=fields)
    assert_422_shape(by_form)
    assert_422_shape(by_json)
    if all(fields.values()):
        assert by_form.json() == by_json.json()
    else:  # FastAPI reads an empty form field as a missing one; the same fields are named
        assert [e["loc"] for e in by_form.json()["errors"]] == [e["loc"] for e in by_json.json()["errors"]]
    for name in {"username", "password"} - set(fields):
        assert f"{name}: Field required" in by_json.json()["detail"]


async def test_json_without_a_content_type_is_read_as_json_and_an_empty_body_as_an_empty_form(client, make_user):
    user, _ = await make_user(Role.user)
    sent = httpx.Request(
        "POST", "http://testserver/auth/login", json={"username": user["username"], "password": PASSWORD}
    )
    untyped = await client.post("/auth/login", content=sent.content)  # httpx adds no Content-Type for raw bytes
    assert untyped.status_code == 200, untyped.text
    empty_json = await client.post("/auth/login", json={})
    empty = await client.post("/auth/login", content=b"")
    assert_422_shape(empty)
    assert empty.json() == empty_json.json()


async def test_json_that_is_not_an_object_or_not_json_is_a_422(client):
    for content in (b"{not json", b'["ana", "secret-pass"]', b'"ana"'):
        response = await client.post("/auth/login", content=content, headers={"Content-Type": "application/json"})
        assert_422_shape(response)


async def test_a_json_number_where_the_form_wants_text_is_a_422(client):
    response = await client.post("/auth/login", json={"username": 12345, "password": "secret-pass"})
    assert_422_shape(response)
    assert [error["loc"] for error in response.json()["errors"]] == [["body", "username"]]


def csv_of(customers: list[dict[str, Any]]) -> bytes:
    columns = list(customers[0])
    lines = [",".join(columns)] + [",".join(str(customer[column]) for column in columns) for customer in customers]
    return ("\n".join(lines) + "\n").encode()


CUSTOMERS = [
    CUSTOMER,
    {"sex": "Male", "age": 61, "annual_income": 20.5, "spending_score": 12, "purchase_frequency": 3},
    {"sex": "Other", "age": 35, "annual_income": 140.0, "spending_score": 55, "purchase_frequency": 120},
]


@pytest.mark.parametrize("path", ["/predict/batch", "/segmentations/default/predict/batch"])
async def test_a_batch_as_json_and_as_a_csv_form_gets_the_same_predictions(client, trained_model, user_headers, path):
    by_json = await client.post(path, json={"customers": CUSTOMERS}, headers=user_headers)
    files = {"file": ("customers.csv", io.BytesIO(csv_of(CUSTOMERS)), "text/csv")}
    by_form = await client.post(path, files=files, headers=user_headers)
    assert by_json.status_code == by_form.status_code == 200, (by_json.text, by_form.text)
    assert by_json.json() == by_form.json()
    assert [row["cluster"] for row in by_json.json()["predictions"]] == [
        (await client.post("/predict", json=customer, headers=user_headers)).json()["cluster"] for customer in CUSTOMERS
    ]


@pytest.mark.parametrize("path", ["/predict/batch", "/segmentations/default/predict/batch"])
async def test_a_broken_batch_rule_is_the_contracts_422(client, trained_model, user_headers, path):
    for body in ({"customers": []}, {"customers": "not a list"}, {"customers": [{**CUSTOMER, "age": 5}]}):
        response = await client.post(path, json=body, headers=user_headers)
        assert response.status_code == 422, (body, response.text)
        assert isinstance(response.json()["detail"], str)


@pytest.mark.parametrize("path", ["/predict/batch", "/segmentations/default/predict/batch"])
async def test_the_form_limits_are_answered_with_a_4xx(client, trained_model, user_headers, path):
    csv = csv_of(CUSTOMERS)
    two_files = [("file", ("a.csv", io.BytesIO(csv), "text/csv")), ("file", ("b.csv", io.BytesIO(csv), "text/csv"))]
    too_many_fields = [(f"field{i}", (None, b"x")) for i in range(30)]
    too_many_fields.append(("file", ("a.csv", io.BytesIO(csv), "text/csv")))
    for files in (two_files, too_many_fields):
        response = await client.post(path, files=files, headers=user_headers)
        assert 400 <= response.status_code < 500 and response.status_code not in (401, 403), response.text
        assert isinstance(response.json()["detail"], str) and response.json()["detail"]


# --- FastRoute ---------------------------------------------------------------------------------


HOT_ROUTES = [
    ("POST", "/predict"),
    ("POST", "/segmentations/{name}/predict"),
    ("GET", "/clusters"),
    ("GET", "/elbow"),
    ("GET", "/history"),
    ("GET", "/segmentations/{name}/history"),
]


def add_stock_twins(app) -> None:
    """Each hot route again under /stock, the same endpoint and options on FastAPI's own APIRoute."""
    by_key = {
        (method, route.path): route for route in app.routes if isinstance(route, APIRoute) for method in route.methods
    }
    for method, path in HOT_ROUTES:
        route = by_key[(method, path)]
        assert isinstance(route, FastRoute), path
        # The fast plan applies: the handler is FastRoute's, not FastAPI's fallback.
        assert "FastRoute" in route.get_route_handler().__qualname__, path
        stock = APIRoute(
            "/stock" + path,
            route.endpoint,
            methods=[method],
            dependencies=route.dependencies,
            response_model=route.response_model,
            status_code=route.status_code,
            dependency_overrides_provider=app,
            strict_content_type=False,
        )
        app.router.routes.insert(0, stock)


async def test_the_hot_routes_answer_as_fastapis_stock_route(app, client, trained_model, user_headers):
    add_stock_twins(app)
    predict_bodies: list[Any] = [
        CUSTOMER,
        {**CUSTOMER, "sex": "MALE"},
        {**CUSTOMER, "age": 5},
        {**CUSTOMER, "annual_income": "lots"},
        {"age": 30},
        [CUSTOMER],
        "not an object",
    ]
    named_bodies = [{"customer": body} for body in predict_bodies[:5]] + [predict_bodies[5], {}]
    probes: list[tuple[str, str, dict[str, Any]]] = []
    probes += [("POST", "/predict", {"json": body}) for body in predict_bodies]
    probes += [("POST", "/segmentations/default/predict", {"json": body}) for body in named_bodies]
    probes += [("POST", "/segmentations/nope/predict", {"json": {"customer": CUSTOMER}})]
    probes += [("POST", "/predict", {"content": b"age=30", "headers": {"Content-Type": "text/plain"}})]
    probes += [("GET", "/clusters", {}), ("GET", "/elbow", {}), ("GET", "/elbow?k_min=3&k_max=6", {})]
    probes += [("GET", "/elbow?k_min=1", {}), ("GET", "/elbow?k_min=x", {}), ("GET", "/elbow?k_min=6&k_max=3", {})]
    for query in ("", "?limit=2", "?limit=0", "?limit=201", "?skip=-1", "?limit=2&skip=1"):
        probes += [("GET", "/history" + query, {}), ("GET", "/segmentations/default/history" + query, {})]
    for method, path, options in probes:
        for headers in (user_headers, {}):
            sent = {**options, "headers": {**headers, **options.get("headers", {})}}
            fast = await client.request(method, path, **sent)
            stock = await client.request(method, "/stock" + path, **sent)
            where = f"{method} {path} {options} auth={bool(headers)}"
            assert fast.status_code == stock.status_code, (where, fast.text, stock.text)
            if fast.status_code == 422 and "errors" in stock.json():  # the same fields; a JSON type may be worded apart
                assert_422_shape(fast)
                assert_422_shape(stock)
                locs = [error["loc"] for error in fast.json()["errors"]]
                assert locs == [error["loc"] for error in stock.json()["errors"]], where
            else:  # history included: both doors read it after the same predictions
                assert fast.json() == stock.json(), where
