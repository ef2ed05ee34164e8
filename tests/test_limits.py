"""Resource limits: every request that would make the service do unbounded work gets a 4xx that says why.

Page sizes, the k range of the elbow, batch sizes, JSON body size (MAX_JSON_BODY_MB), upload size
(MAX_UPLOAD_MB) and training time (TRAIN_TIMEOUT_SECONDS). Small limits come from settings_overrides.
"""

from __future__ import annotations

import io

import pytest

from app.core.tables import Role
from tests.conftest import CUSTOMER

# 10 KiB of JSON, 20 KiB of upload (training uploads too)
SMALL_BODIES = {"max_json_body_mb": 0.01, "max_upload_mb": 0.02, "max_train_upload_mb": 0.02}
CSV_HEADER = b"Sex,Age,Annual_Income,Spending_Score,Purchase_Frequency\n"


def _csv(rows: int) -> bytes:
    return CSV_HEADER + b"Female,29,85.0,82,40\n" * rows


async def _chunks(data: bytes, size: int = 4096):
    """A body sent without Content-Length (chunked), as a streaming client would."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def _names(response, field: str) -> bool:
    """Whether a 422 names `field` in its sentence and in its list of broken field rules."""
    body = response.json()
    return f"{field}: " in body["detail"] and any(field in err["loc"] for err in body["errors"])


# --- paging and ranges ----------------------------------------------------------------------

PAGED = [("/history", Role.user), ("/profiles/", Role.user), ("/users/", Role.admin), ("/admin/users", Role.admin)]


@pytest.mark.parametrize("path,role", PAGED, ids=[p for p, _ in PAGED])
async def test_page_size_is_at_most_200(client, make_user, path, role):
    _, headers = await make_user(role)
    assert (await client.get(path, params={"limit": 200}, headers=headers)).status_code == 200
    for limit in (201, 10**6, 2**63):
        over = await client.get(path, params={"limit": limit}, headers=headers)
        assert over.status_code == 422 and _names(over, "limit")
        assert "200" in over.text
    huge_skip = await client.get(path, params={"skip": 2**63}, headers=headers)
    assert huge_skip.status_code == 422 and _names(huge_skip, "skip")


async def test_elbow_k_max_is_at_most_15(client, dataset, user_headers):
    over = await client.get("/elbow", params={"k_max": 16}, headers=user_headers)
    assert over.status_code == 422 and _names(over, "k_max") and "15" in over.text
    inverted = await client.get("/elbow", params={"k_min": 9, "k_max": 4}, headers=user_headers)
    assert inverted.status_code == 422 and "k_min" in inverted.text
    assert (await client.get("/elbow", params={"k_min": 14, "k_max": 15}, headers=user_headers)).status_code == 200


async def test_train_n_clusters_is_at_most_20(client, analyst_headers):
    over = await client.post("/train", params={"n_clusters": 21}, headers=analyst_headers)
    assert over.status_code == 422 and _names(over, "n_clusters")


async def test_a_json_batch_holds_at_most_10000_customers(client, trained_model, user_headers):
    over = await client.post("/predict/batch", json={"customers": [CUSTOMER] * 10_001}, headers=user_headers)
    assert over.status_code == 422 and _names(over, "customers")
    empty = await client.post("/predict/batch", json={"customers": []}, headers=user_headers)
    assert empty.status_code == 422


@pytest.mark.parametrize("settings_overrides", [{"max_batch_rows": 5}], ids=["batch-5"])
async def test_a_json_batch_holds_at_most_max_batch_rows(client, trained_model, user_headers):
    over = await client.post("/predict/batch", json={"customers": [CUSTOMER] * 6}, headers=user_headers)
    assert over.status_code == 422 and "MAX_BATCH_ROWS" in over.text and "customers" in over.text
    assert (
        await client.post("/predict/batch", json={"customers": [CUSTOMER] * 5}, headers=user_headers)
    ).status_code == 200


# --- body sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize("settings_overrides", [SMALL_BODIES], ids=["small-bodies"])
async def test_json_bodies_over_the_cap_are_413_with_the_limit(client, user_headers):
    big = {"name": "n", **CUSTOMER, "notes": "x" * 12_000}
    declared = await client.post("/profiles/", json=big, headers=user_headers)
    assert declared.status_code == 413
    assert declared.json() == {
        "detail": "Request body too large: the limit for JSON and form bodies (MAX_JSON_BODY_MB) is 0.01 MB"
    }
    import json

    streamed = await client.post(
        "/profiles/",
        content=_chunks(json.dumps(big).encode()),
        headers={**user_headers, "Content-Type": "application/json"},
    )
    assert streamed.status_code == 413 and "too large" in streamed.json()["detail"]
    # Under the cap is served as usual.
    small = await client.post("/profiles/", json={"name": "n", **CUSTOMER, "notes": "x" * 1000}, headers=user_headers)
    assert small.status_code == 201


@pytest.mark.parametrize("settings_overrides", [SMALL_BODIES], ids=["small-bodies"])
async def test_login_and_register_bodies_are_capped_too(client):
    form = await client.post("/auth/login", data={"username": "u", "password": "p" * 20_000})
    assert form.status_code == 413
    register = await client.post(
        "/auth/register",
        content=b'{"username": "' + b"a" * 20_000 + b'"}',
        headers={"Content-Type": "application/json"},
    )
    assert register.status_code == 413


@pytest.mark.parametrize("settings_overrides", [SMALL_BODIES], ids=["small-bodies"])
@pytest.mark.parametrize("path", ["/train", "/predict/batch"])
async def test_uploads_over_the_cap_are_413_with_the_limit(client, trained_model, make_user, path):
    _, headers = await make_user(Role.analyst)
    big = _csv(2_000)  # ~43 KiB
    declared = await client.post(path, files={"file": ("big.csv", big, "text/csv")}, headers=headers)
    assert declared.status_code == 413
    cap = "training uploads (MAX_TRAIN_UPLOAD_MB)" if path == "/train" else "uploads (MAX_UPLOAD_MB)"
    assert declared.json() == {"detail": f"Request body too large: the limit for {cap} is 0.02 MB"}
    boundary = "limit-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.csv"\r\n'
            f"Content-Type: text/csv\r\n\r\n"
        ).encode()
        + big
        + f"\r\n--{boundary}--\r\n".encode()
    )
    streamed = await client.post(
        path, content=_chunks(body), headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert streamed.status_code == 413


@pytest.mark.parametrize("settings_overrides", [SMALL_BODIES], ids=["small-bodies"])
async def test_an_upload_under_the_upload_cap_but_over_the_json_cap_is_accepted(client, trained_model, user_headers):
    csv_bytes = _csv(600)  # ~13 KiB: over the JSON cap, under the upload cap
    response = await client.post(
        "/predict/batch", files={"file": ("ok.csv", csv_bytes, "text/csv")}, headers=user_headers
    )
    assert response.status_code == 200 and len(response.json()["predictions"]) == 600


async def test_a_lying_content_length_does_not_bypass_the_cap(client, user_headers, app):
    """A client declaring fewer bytes than it sends is still cut off at the cap."""
    import httpx

    cap = app.state.settings.max_json_body_bytes
    body = b'{"name": "' + b"x" * (cap + 10) + b'"}'
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as raw:
        request = raw.build_request(
            "POST",
            "/profiles/",
            content=_chunks(body, 1 << 20),
            headers={**user_headers, "Content-Type": "application/json", "Content-Length": "10"},
        )
        response = await raw.send(request)
    assert response.status_code in (413, 422)


async def test_multipart_with_too_many_parts_is_refused(client, analyst_headers):
    files = [("file", (f"f{i}.csv", _csv(1), "text/csv")) for i in range(3)]
    response = await client.post("/train", files=files, headers=analyst_headers)
    assert response.status_code == 422
    fields = {f"field{i}": "x" for i in range(50)}
    response = await client.post(
        "/train", data=fields, files={"file": ("f.csv", _csv(5), "text/csv")}, headers=analyst_headers
    )
    assert response.status_code == 422


# --- training time --------------------------------------------------------------------------


@pytest.mark.parametrize("settings_overrides", [{"train_timeout_seconds": 0.01}], ids=["timeout-10ms"])
async def test_a_training_over_the_time_limit_is_a_4xx_that_says_so(client, dataset, analyst_headers):
    response = await client.post("/train", headers=analyst_headers)
    assert response.status_code == 422, (response.status_code, response.text)
    detail = response.json()["detail"]
    assert "TRAIN_TIMEOUT_SECONDS" in detail and "0.01" in detail
    assert (await client.get("/")).json()["model_loaded"] is False
    models = await client.get("/models", headers=analyst_headers)
    assert models.json()["models"] == []
    # The service is not left thinking a training still runs.
    again = await client.post("/train", headers=analyst_headers)
    assert again.status_code == response.status_code


async def test_every_operation_with_a_body_documents_its_413(client):
    spec = (await client.get("/openapi.json")).json()
    with_body = [(m, p) for p, ops in spec["paths"].items() for m, op in ops.items() if "requestBody" in op]
    assert len(with_body) >= 10
    for method, path in with_body:
        assert "413" in spec["paths"][path][method]["responses"], (method, path)


async def test_the_training_time_limit_is_documented(client):
    spec = (await client.get("/openapi.json")).json()
    train = spec["paths"]["/train"]["post"]
    assert "TRAIN_TIMEOUT_SECONDS" in train["description"] or any(
        "time" in r.get("description", "").lower() for r in train["responses"].values()
    )


async def test_a_train_upload_is_one_small_file_in_memory_terms(client, analyst_headers):
    """An upload with many rows is parsed in bounded chunks (here: a 3 MB CSV trains or fails cleanly)."""
    response = await client.post(
        "/train",
        params={"n_clusters": 3},
        files={"file": ("many.csv", io.BytesIO(_csv(150_000)), "text/csv")},
        headers=analyst_headers,
    )
    assert response.status_code in (200, 422), response.text
