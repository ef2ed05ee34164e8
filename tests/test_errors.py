"""Error bodies as the contract fixes them, for every operation the OpenAPI document lists.

`detail` is one string for every error. A declared field rule broken adds a top-level `errors`,
FastAPI's list reduced to `[{type, loc, msg}]`; problems in customer data add `errors` as a list of
`{row, line, column, reason}`.
The probes are generated from `app.openapi()`, so a route added tomorrow is probed too.
"""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from app.core.errors import Forbidden
from app.core.routing import FastRoute
from app.core.tables import Role
from app.main import install_error_handlers
from tests.conftest import CUSTOMER

METHODS = ("get", "post", "put", "patch", "delete")
UNKNOWN_ID = "987654"  # no user, profile or model version has it


def assert_error_body(response: httpx.Response, operation: str) -> None:
    """The body of an error answer has the contract's shape."""
    where = f"{operation} -> {response.status_code}: {response.text[:300]}"
    assert response.headers["content-type"].startswith("application/json"), where
    body = response.json()
    assert set(body) <= {"detail", "errors"}, where
    detail = body["detail"]
    assert isinstance(detail, str) and detail.strip(), where
    if "errors" in body:
        assert response.status_code == 422 and body["errors"], where
        if set(body["errors"][0]) == {"type", "loc", "msg"}:  # broken field rules, each named in `detail`
            for error in body["errors"]:
                assert set(error) == {"type", "loc", "msg"}, where
                assert isinstance(error["msg"], str) and isinstance(error["type"], str), where
                assert isinstance(error["loc"], list) and error["loc"][0] in ("body", "query", "path"), where
                assert _field(error["loc"]) in detail, where
        else:  # problems in an uploaded file
            assert len(body["errors"]) <= 10, where
            for problem in body["errors"]:
                assert set(problem) == {"row", "line", "column", "reason"}, where
                assert isinstance(problem["reason"], str), where


def _field(loc: list) -> str:
    """How `detail` names the field at `loc`: the part after `body`/`query`/`path`, joined with dots."""
    return ".".join(str(part) for part in loc[1:]) or loc[0]


def _resolve(spec: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _free_text(spec: dict, schema: dict) -> bool:
    """Whether a parameter takes any text (a string without a format, possibly optional): no value is bad."""
    schema = _resolve(spec, schema)
    options = [_resolve(spec, option) for option in schema.get("anyOf", [schema])]
    return any(option.get("type") == "string" and "format" not in option for option in options)


class Operation:
    def __init__(self, spec: dict, path: str, method: str, item: dict) -> None:
        self.spec, self.path, self.method, self.item = spec, path, method, item
        self.name = f"{method.upper()} {path}"
        self.secured = bool(item.get("security"))
        self.documented = {int(code) for code in item.get("responses", {}) if code.isdigit()}
        self.parameters = item.get("parameters", [])

    def url(self, known: dict[str, str] | None = None) -> str:
        """The path with every path parameter unknown, but those given in `known`."""
        url = self.path
        for parameter in self.parameters:
            if parameter["in"] == "path":
                value = (known or {}).get(parameter["name"], UNKNOWN_ID)
                url = url.replace("{" + parameter["name"] + "}", value)
        return url

    @property
    def has_path_parameters(self) -> bool:
        return any(p["in"] == "path" for p in self.parameters)

    def example_body(self) -> Any:
        """The JSON body from the operation's own documented example (every JSON body has one)."""
        content = self.item.get("requestBody", {}).get("content", {})
        if "application/json" not in content:
            return None
        schema = _resolve(self.spec, content["application/json"]["schema"])
        examples = schema.get("examples") or [schema.get("example")]
        return examples[0]

    @property
    def takes_json(self) -> bool:
        return "application/json" in self.item.get("requestBody", {}).get("content", {})

    @property
    def gated(self) -> bool:
        """Analyst or admin only, as the summary or the /admin prefix says."""
        summary = self.item.get("summary", "")
        return self.path.startswith("/admin") or "(analyst)" in summary or "(admin)" in summary

    async def call(
        self,
        client: httpx.AsyncClient,
        headers: dict[str, str] | None = None,
        known: dict[str, str] | None = None,
        **kwargs,
    ) -> httpx.Response:
        if "json" not in kwargs and "content" not in kwargs and self.takes_json:
            kwargs["json"] = self.example_body()
        return await client.request(self.method.upper(), self.url(known), headers=headers or {}, **kwargs)


@pytest.fixture
def operations(app) -> list[Operation]:
    spec = app.openapi()
    found = [
        Operation(spec, path, method, item)
        for path, path_item in spec["paths"].items()
        for method, item in path_item.items()
        if method in METHODS
    ]
    assert len(found) > 30, "the OpenAPI document lists the whole API"
    return found


def _check(problems: list[str], response: httpx.Response, operation: Operation, expected: int | None = None) -> None:
    if expected is not None and response.status_code != expected:
        problems.append(f"{operation.name}: {response.status_code}, expected {expected}: {response.text[:200]}")
        return
    if response.status_code >= 400:
        if response.status_code != 405 and response.status_code not in operation.documented:
            problems.append(f"{operation.name}: {response.status_code} is not documented")
        try:
            assert_error_body(response, operation.name)
        except AssertionError as exc:
            problems.append(str(exc))


# --- a broken default dataset -----------------------------------------------------------------


@pytest.fixture
def broken_dataset(dataset):
    """The default dataset with one unreadable value: data row 5 (line 6) has `abc` for an age."""
    lines = dataset.read_text().splitlines(keepends=True)
    header = [name.strip().lower() for name in lines[0].split(",")]
    cells = lines[5].rstrip("\n").split(",")
    cells[header.index("age")] = "abc"
    lines[5] = ",".join(cells) + "\n"
    dataset.write_text("".join(lines))
    return dataset


@pytest.mark.parametrize(
    "method,path", [("POST", "/train"), ("GET", "/elbow"), ("GET", "/charts/elbow")], ids=["train", "elbow", "chart"]
)
async def test_a_broken_default_dataset_is_422_with_its_problems_on_every_route_that_reads_it(
    client, broken_dataset, analyst_headers, method, path
):
    response = await client.request(method, path, headers=analyst_headers)
    assert response.status_code == 422, response.text
    assert_error_body(response, f"{method} {path}")
    body = response.json()
    assert "1 of 800 rows" in body["detail"]
    assert body["errors"] == [{"row": 5, "line": 6, "column": "age", "reason": "not a number: 'abc'"}]


async def test_a_file_that_is_not_a_csv_lists_one_problem_of_the_whole_file(client, analyst_headers):
    response = await client.post(
        "/train", files={"file": ("x.csv", b"\x00\x01binary", "text/csv")}, headers=analyst_headers
    )
    assert response.status_code == 422
    assert_error_body(response, "POST /train")
    assert response.json()["errors"] == [{"row": None, "line": None, "column": None, "reason": "binary content"}]


# --- rules across fields are a string ---------------------------------------------------------


async def test_rules_across_fields_are_one_string(client, dataset, user_headers):
    checks = [
        await client.get("/elbow", params={"k_min": 6, "k_max": 3}, headers=user_headers),
        await client.put("/users/me", json={"password": "a-new-password"}, headers=user_headers),
    ]
    for response in checks:
        assert response.status_code == 422, response.text
        assert isinstance(response.json()["detail"], str), response.text
    assert "current_password" in checks[1].json()["detail"]


async def test_a_batch_over_max_batch_rows_is_one_string(client, trained_model, user_headers, app):
    app.state.settings.max_batch_rows = 2
    response = await client.post("/predict/batch", json={"customers": [CUSTOMER] * 3}, headers=user_headers)
    assert response.status_code == 422
    assert response.json() == {"detail": "At most 2 customers per request (MAX_BATCH_ROWS)"}


async def test_a_declared_field_rule_is_one_sentence_and_fastapis_list_in_errors(client, user_headers):
    response = await client.post("/profiles/", json={"name": "p", **CUSTOMER, "age": 17}, headers=user_headers)
    assert response.status_code == 422
    assert response.json() == {
        "detail": "age: Input should be greater than or equal to 18",
        "errors": [
            {"type": "greater_than_equal", "loc": ["body", "age"], "msg": "Input should be greater than or equal to 18"}
        ],
    }
    null = await client.put("/users/me", json={"username": None}, headers=user_headers)
    assert null.status_code == 422 and null.json()["detail"].startswith("username: ")
    assert [e["loc"] for e in null.json()["errors"]] == [["body", "username"]]


async def test_every_broken_field_of_a_predict_body_is_named_in_one_sentence(client, user_headers):
    customer = {key: value for key, value in CUSTOMER.items() if key != "age"} | {"annual_income": 20000}
    response = await client.post("/predict", json=customer, headers=user_headers)
    assert response.status_code == 422, response.text
    body = response.json()
    assert sorted(body["detail"].split("; ")) == [
        "age: Field required",
        "annual_income: Input should be less than or equal to 10000",
    ]
    assert sorted((e["type"], e["loc"]) for e in body["errors"]) == [
        ("less_than_equal", ["body", "annual_income"]),
        ("missing", ["body", "age"]),
    ]
    assert_error_body(response, "POST /predict")


async def test_a_bad_row_of_a_json_batch_is_named_by_its_index(client, trained_model, user_headers):
    customers = [CUSTOMER] * 3 + [{**CUSTOMER, "age": 5}] + [CUSTOMER]
    response = await client.post("/predict/batch", json={"customers": customers}, headers=user_headers)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["detail"] == "customers.3.age: Input should be greater than or equal to 18"
    assert [e["loc"] for e in body["errors"]] == [["body", "customers", 3, "age"]]
    assert_error_body(response, "POST /predict/batch")


async def test_a_bad_query_parameter_is_named_in_the_sentence(client, user_headers):
    response = await client.get("/elbow", params={"k_max": 99}, headers=user_headers)
    assert response.status_code == 422, response.text
    assert response.json() == {
        "detail": "k_max: Input should be less than or equal to 15",
        "errors": [
            {"type": "less_than_equal", "loc": ["query", "k_max"], "msg": "Input should be less than or equal to 15"}
        ],
    }


async def test_a_login_form_missing_a_field_names_it(client):
    response = await client.post("/auth/login", data={"username": "someone"})
    assert response.status_code == 422, response.text
    assert response.json() == {
        "detail": "password: Field required",
        "errors": [{"type": "missing", "loc": ["body", "password"], "msg": "Field required"}],
    }


@pytest.mark.parametrize("path", ["/predict", "/profiles/"])
async def test_undecodable_json_is_one_sentence_naming_the_body(client, user_headers, path):
    response = await client.post(
        path, content=b'{"age": 30,', headers={**user_headers, "Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["detail"].startswith("body: ") and "JSON" in body["detail"], body
    assert [(e["type"], e["loc"][0]) for e in body["errors"]] == [("json_invalid", "body")]
    assert_error_body(response, f"POST {path}")


async def test_an_unreadable_body_is_one_sentence_naming_the_body(client, analyst_headers):
    response = await client.post(
        "/train", content=b"--x\r\n", headers={**analyst_headers, "Content-Type": "multipart/form-data"}
    )
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["detail"].startswith("body: "), body
    assert [(e["type"], e["loc"]) for e in body["errors"]] == [("body_unreadable", ["body"])]
    assert body["detail"] == f"body: {body['errors'][0]['msg']}"


async def test_a_password_that_breaks_a_rule_is_never_echoed(client, user_headers):
    secret = "Qz7#kW"  # six characters: under the eight a password needs
    registration = {"email": "echo@example.com", "username": "echo", "password": secret}
    answers = [
        await client.put("/users/me", json={"password": secret, "current_password": "x"}, headers=user_headers),
        await client.post("/auth/register", json=registration),
        await client.post("/auth/register", json={**registration, "password": secret * 30}),
    ]
    for response in answers:
        assert response.status_code == 422, response.text
        assert response.json()["detail"].startswith("password: "), response.text
        assert [e["loc"] for e in response.json()["errors"]] == [["body", "password"]]
        assert secret not in response.text
        assert all("input" not in error and "ctx" not in error for error in response.json()["errors"])


# --- every operation, probed generically ------------------------------------------------------


async def test_every_secured_operation_without_a_token_is_401_with_a_string_detail(client, operations):
    problems: list[str] = []
    secured = [op for op in operations if op.secured]
    assert len(secured) > 25
    for operation in secured:
        response = await operation.call(client)
        _check(problems, response, operation, expected=401)
        if response.status_code == 401 and response.headers.get("www-authenticate") != "Bearer":
            problems.append(f"{operation.name}: 401 without WWW-Authenticate: Bearer")
    assert not problems, "\n".join(problems)


async def test_every_operation_as_a_plain_user_answers_in_the_contracts_shape(client, make_user, operations):
    """Analyst and admin operations are 403; the others answer whatever they answer, in the right shape."""
    problems: list[str] = []
    for operation in operations:
        _, headers = await make_user(Role.user)  # a fresh account: logout and DELETE /users/me spend it
        response = await operation.call(client, headers)
        _check(problems, response, operation, expected=403 if operation.gated else None)
    assert not problems, "\n".join(problems)


async def test_every_unknown_id_in_a_path_is_404_with_a_string_detail(client, operations, admin_headers):
    problems: list[str] = []
    with_ids = [op for op in operations if op.has_path_parameters and 404 in op.documented]
    assert len(with_ids) >= 10
    for operation in with_ids:
        _check(problems, await operation.call(client, admin_headers), operation, expected=404)
    assert not problems, "\n".join(problems)


async def test_every_bad_query_value_and_body_is_422(client, operations, admin_headers, dataset):
    """Of a segmentation that exists (`default`): an unknown one is a 404 whatever the query."""
    problems: list[str] = []
    probed = 0
    for operation in operations:
        for parameter in operation.parameters:
            if parameter["in"] == "query" and not _free_text(operation.spec, parameter["schema"]):
                probed += 1
                response = await operation.call(
                    client, admin_headers, known={"name": "default"}, params={parameter["name"]: "not-a-number"}
                )
                _check(problems, response, operation, expected=422)
                if response.status_code == 422 and (
                    response.json()["errors"][0]["loc"] != ["query", parameter["name"]]
                    or not response.json()["detail"].startswith(f"{parameter['name']}: ")
                ):
                    problems.append(f"{operation.name}: the 422 does not name query {parameter['name']}")
        if operation.takes_json and not operation.has_path_parameters:
            probed += 1
            response = await operation.call(client, admin_headers, json=[["not", "an", "object"]])
            _check(problems, response, operation, expected=422)
    assert probed >= 15
    assert not problems, "\n".join(problems)


async def test_every_method_a_path_does_not_serve_is_405_naming_those_it_does(client, app, operations, admin_headers):
    problems: list[str] = []
    by_path: dict[str, list[Operation]] = {}
    for operation in operations:
        by_path.setdefault(operation.path, []).append(operation)
    for path, served in by_path.items():
        allowed = {op.method for op in served} | ({"head"} if any(op.method == "get" for op in served) else set())
        missing = next(method for method in METHODS if method not in allowed)
        probe = Operation(served[0].spec, path, missing, {"parameters": served[0].parameters})
        response = await probe.call(client, admin_headers)
        _check(problems, response, probe, expected=405)
        documented = {op.method.upper() for op in served}
        if response.status_code == 405 and set(response.headers["allow"].split(", ")) != documented:
            problems.append(f"{probe.name}: Allow {response.headers['allow']}, documented {sorted(documented)}")
    assert not problems, "\n".join(problems)


async def test_every_documented_error_response_has_a_string_detail(operations):
    """The OpenAPI document says the same: every error model's `detail` is a string, and every 422 is one
    model whose `errors` items are a field error or a file problem (never FastAPI's HTTPValidationError)."""
    problems = []
    spec = operations[0].spec
    assert not {"HTTPValidationError", "ValidationError"} & set(spec["components"]["schemas"])
    for operation in operations:
        for code, response in operation.item.get("responses", {}).items():
            if not code.startswith(("4", "5")):
                continue
            schema = response.get("content", {}).get("application/json", {}).get("schema")
            if schema is None:
                problems.append(f"{operation.name} {code}: no JSON schema")
                continue
            detail = _resolve(operation.spec, _resolve(operation.spec, schema)["properties"]["detail"])
            variants = [_resolve(operation.spec, v) for v in detail.get("anyOf", [detail])]
            kinds = {v.get("type") for v in variants}
            if kinds != {"string"}:
                problems.append(f"{operation.name} {code}: detail is {kinds}")
            if code == "422":
                if schema != {"$ref": "#/components/schemas/InvalidRequestBody"}:
                    problems.append(f"{operation.name} 422: {schema}")
                    continue
                items = _resolve(spec, schema)["properties"]["errors"]["items"]["anyOf"]
                shapes = {frozenset(_resolve(spec, item)["properties"]) for item in items}
                if shapes != {frozenset({"type", "loc", "msg"}), frozenset({"row", "line", "column", "reason"})}:
                    problems.append(f"{operation.name} 422: errors items are {shapes}")
    assert not problems, "\n".join(problems)


# --- database errors by type and code -----------------------------------------------------------


@pytest.mark.postgres
async def test_text_the_database_cannot_store_is_a_422_string_not_a_500(client, user_headers, settings):
    response = await client.post("/profiles/", json={"name": "a\x00b", **CUSTOMER}, headers=user_headers)
    if settings.is_sqlite:
        assert response.status_code == 201  # SQLite stores NUL characters
    else:
        assert response.status_code == 422  # PostgreSQL refuses them: SQLSTATE 22021
        assert response.json() == {"detail": "A value cannot be stored (text may not contain NUL characters)"}


# --- the short way of POST /predict answers as FastAPI's own handler --------------------------


class Item(BaseModel):
    name: str = Field(min_length=1)
    size: int = Field(ge=1)


class Answer(BaseModel):
    name: str
    double: int


async def gate(request: Request) -> str:
    if request.headers.get("authorization") != "Bearer ok":
        raise Forbidden("Not enough permissions")
    return "caller"


class Window(BaseModel):
    model_config = ConfigDict(frozen=True)

    low: int = Field(2, ge=1)
    high: int | None = Field(None, le=10)


async def endpoint(request: Request, caller: Annotated[str, Depends(gate)], item: Item) -> Answer:
    return Answer(name=f"{caller}:{item.name}", double=item.size * 2)


async def window_endpoint(caller: Annotated[str, Depends(gate)], window: Annotated[Window, Query()]) -> Answer:
    return Answer(name=f"{caller}:{window.high}", double=window.low * 2)


async def test_fast_route_answers_as_fastapis_own_handler():
    """The same endpoints served by FastRoute and by FastAPI's APIRoute: the same statuses and bodies."""
    # The plan applies: the fast route did not fall back to FastAPI's handler.
    for call in (endpoint, window_endpoint):
        assert "FastRoute" in FastRoute("/x", call, methods=["POST"]).get_route_handler().__qualname__
    app = FastAPI()
    app.router.add_api_route("/fast", endpoint, methods=["POST"], route_class_override=FastRoute)
    app.router.add_api_route("/plain", endpoint, methods=["POST"])
    app.router.add_api_route("/fast-window", window_endpoint, methods=["GET"], route_class_override=FastRoute)
    app.router.add_api_route("/plain-window", window_endpoint, methods=["GET"])
    install_error_handlers(app)
    assert (
        app.openapi()["paths"]["/fast"]["post"]["requestBody"]
        == app.openapi()["paths"]["/plain"]["post"]["requestBody"]
    )
    probes = [
        ({"name": "a", "size": 2}, "Bearer ok"),
        ({"name": "", "size": 0}, "Bearer ok"),
        ({"name": "a"}, "Bearer ok"),
        ({"name": 5, "size": "x"}, "Bearer ok"),
        ({"name": "a", "size": 2}, None),
        ({"name": ""}, None),
        (["not", "an", "object"], "Bearer ok"),
    ]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for body, token in probes:
            headers = {"Authorization": token} if token else {}
            fast = await client.post("/fast", json=body, headers=headers)
            plain = await client.post("/plain", json=body, headers=headers)
            assert fast.status_code == plain.status_code, body
            if fast.status_code == 422:  # the same fields named; a message may word a JSON type apart
                assert [e["loc"] for e in fast.json()["errors"]] == [e["loc"] for e in plain.json()["errors"]], body
                assert isinstance(fast.json()["detail"], str) and isinstance(plain.json()["detail"], str), body
            else:
                assert fast.json() == plain.json(), body
        for query in ("", "low=3", "low=0", "high=11&low=x", "high=4&other=1", "low=3&low=4"):
            for token in ("Bearer ok", None):
                headers = {"Authorization": token} if token else {}
                fast = await client.get(f"/fast-window?{query}", headers=headers)
                plain = await client.get(f"/plain-window?{query}", headers=headers)
                assert (fast.status_code, fast.json()) == (plain.status_code, plain.json()), query
