"""Customer feature rules: every broken rule is a 422 naming the field, on every route that takes them."""

from __future__ import annotations

import json

import pytest

from tests.conftest import CUSTOMER

BAD_VALUES = [
    ("age", 17),
    ("age", 101),
    ("age", "30"),
    ("age", 30.5),
    ("age", None),
    ("age", True),
    ("annual_income", -0.1),
    ("annual_income", 10000.5),
    ("annual_income", "65"),
    ("annual_income", None),
    ("spending_score", 0),
    ("spending_score", 101),
    ("spending_score", "50"),
    ("purchase_frequency", -1),
    ("purchase_frequency", 1001),
    ("purchase_frequency", 3.5),
    ("sex", "robot"),
    ("sex", 1),
    ("sex", None),
    ("sex", ""),
]


def _names_field(response, field) -> bool:
    """Whether a 422 names `field` in its sentence and in its list of broken field rules."""
    body = response.json()
    return f"{field}: " in body["detail"] and any(field in err["loc"] for err in body["errors"])


@pytest.mark.parametrize("field,value", BAD_VALUES)
async def test_profile_feature_rules(client, user_headers, field, value):
    response = await client.post("/profiles/", json={"name": "x", **CUSTOMER, field: value}, headers=user_headers)
    assert response.status_code == 422
    assert _names_field(response, field)


@pytest.mark.parametrize("field,value", BAD_VALUES)
async def test_predict_feature_rules(client, user_headers, field, value):
    response = await client.post("/predict", json={**CUSTOMER, field: value}, headers=user_headers)
    assert response.status_code == 422
    assert _names_field(response, field)


@pytest.mark.parametrize("field", list(CUSTOMER))
async def test_missing_feature_is_422(client, user_headers, field):
    body = {k: v for k, v in CUSTOMER.items() if k != field}
    response = await client.post("/predict", json=body, headers=user_headers)
    assert response.status_code == 422 and _names_field(response, field)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_nan_and_infinity_are_422(client, user_headers, literal):
    raw = f'{{"sex": "Male", "age": 40, "annual_income": {literal}, "spending_score": 50, "purchase_frequency": 10}}'
    response = await client.post("/predict", content=raw, headers={**user_headers, "Content-Type": "application/json"})
    assert response.status_code == 422 and _names_field(response, "annual_income")


@pytest.mark.parametrize(
    "field,value",
    [
        ("age", 18),
        ("age", 100),
        ("annual_income", 0),
        ("annual_income", 10000),
        ("spending_score", 1),
        ("spending_score", 100),
        ("purchase_frequency", 0),
        ("purchase_frequency", 1000),
        ("annual_income", 65),
    ],
)
async def test_boundaries_are_accepted(client, user_headers, field, value):
    response = await client.post("/profiles/", json={"name": "edge", **CUSTOMER, field: value}, headers=user_headers)
    assert response.status_code == 201, response.text
    assert response.json()[field] == value


async def test_body_that_is_not_an_object_is_422(client, user_headers):
    for body in ("[]", "42", '"x"', "{bad json"):
        response = await client.post(
            "/predict", content=body, headers={**user_headers, "Content-Type": "application/json"}
        )
        assert response.status_code == 422


@pytest.mark.parametrize("path,body", [("/predict", CUSTOMER), ("/predict/batch", {"customers": [CUSTOMER]})])
async def test_a_json_body_must_be_sent_as_json(client, trained_model, user_headers, path, body):
    """JSON with a JSON Content-Type (or none) is read; any other type is a 422.

    /predict declares a JSON body: FastAPI names the body. /predict/batch takes JSON or a CSV upload:
    a body that is neither is a string naming both.
    """
    raw = json.dumps(body)
    for content_type in ("application/json", "application/json; charset=utf-8", None):
        headers = {**user_headers, **({"Content-Type": content_type} if content_type else {})}
        assert (await client.post(path, content=raw, headers=headers)).status_code == 200, content_type
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/xml"):
        refused = await client.post(path, content=raw, headers={**user_headers, "Content-Type": content_type})
        assert refused.status_code == 422, content_type
        detail = refused.json()["detail"]
        if path == "/predict":
            assert [error["loc"] for error in refused.json()["errors"]] == [["body"]]
            assert detail == "body: The body must be a JSON object sent as application/json"
        else:
            assert isinstance(detail, str) and "application/json" in detail
