"""POST /train with an uploaded CSV: good files train, bad files get 422 saying what is wrong, big ones 413."""

from __future__ import annotations

import pandas as pd
import pytest

from generate_dataset import generate


def csv_file(frame: pd.DataFrame | str | bytes, name: str = "customers.csv") -> dict:
    if isinstance(frame, pd.DataFrame):
        frame = frame.to_csv(index=False)
    if isinstance(frame, str):
        frame = frame.encode()
    return {"file": (name, frame, "text/csv")}


async def active_state(client, headers) -> tuple[str | None, int, str | None]:
    """(active version in the database, number of versions, version the app serves)."""
    listing = (await client.get("/models", headers=headers)).json()
    served = (await client.get("/")).json()["model_version"]
    return listing["active_version"], len(listing["models"]), served


async def test_upload_with_fixed_k_becomes_the_active_version(client, analyst_headers, user_headers):
    frame = generate(rows=600, seed=3)
    response = await client.post("/train", params={"n_clusters": 4}, files=csv_file(frame), headers=analyst_headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["n_clusters"] == 4 and body["n_samples"] == 600
    assert sum(body["cluster_sizes"].values()) == 600
    active, count, served = await active_state(client, analyst_headers)
    assert active == served == body["model_version"] and count == 1
    detail = (await client.get(f"/models/{body['model_version']}", headers=analyst_headers)).json()
    assert detail["n_samples"] == 600 and detail["created_by"] and len(detail["data_fingerprint"]) == 64
    predicted = (
        await client.post(
            "/predict",
            json={"sex": "Male", "age": 30, "annual_income": 40.0, "spending_score": 70, "purchase_frequency": 30},
            headers=user_headers,
        )
    ).json()
    assert predicted["model_version"] == body["model_version"]


async def test_upload_with_auto_k_finds_the_latent_types_under_any_header_spelling(client, analyst_headers):
    frame = generate(rows=1500, seed=11)
    frame.columns = [c.lower() for c in frame.columns]  # snake_case headers
    frame["store"] = "north"  # other columns are ignored
    response = await client.post("/train", files=csv_file(frame), headers=analyst_headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["n_clusters"] == 5 and body["n_samples"] == 1500
    assert body["silhouette_score"] > 0.3


async def test_the_same_upload_twice_gives_two_versions_with_one_fingerprint(client, analyst_headers):
    files = csv_file(generate(rows=300, seed=5))
    first = (await client.post("/train", params={"n_clusters": 3}, files=files, headers=analyst_headers)).json()
    second = (await client.post("/train", params={"n_clusters": 3}, files=files, headers=analyst_headers)).json()
    assert first["model_version"] != second["model_version"]
    models = (await client.get("/models", headers=analyst_headers)).json()["models"]
    assert len({m["data_fingerprint"] for m in models}) == 1
    assert first["cluster_sizes"] == second["cluster_sizes"]  # same data and random_state, same clusters


HEADER = "CustomerID,Sex,Age,Annual_Income,Spending_Score,Purchase_Frequency\n"


def _rows(n: int = 30) -> str:
    return "".join(f"{i},Female,{20 + i},{30.0 + i},{40 + i % 50},{10 + i}\n" for i in range(1, n + 1))


def _with_row(bad: str, n: int = 30, at: int = 7) -> str:
    lines = _rows(n).splitlines(keepends=True)
    lines[at - 1] = bad + "\n"
    return HEADER + "".join(lines)


BAD_FILES = {
    "missing column": (
        "CustomerID,Sex,Age,Annual_Income,Purchase_Frequency\n1,Male,30,50.0,10\n",
        {},
        ["spending_score"],
    ),
    "non-numeric": (_with_row("7,Male,thirty,50.0,40,10"), {}, ["row 7", "age", "not a number"]),
    "empty cell": (_with_row("7,Male,30,,40,10"), {}, ["row 7", "annual_income", "empty"]),
    "NaN": (_with_row("7,Male,30,NaN,40,10"), {}, ["row 7", "annual_income", "NaN"]),
    "out of range": (_with_row("7,Male,30,50.0,400,10"), {}, ["row 7", "spending_score", "out of range"]),
    "too few rows for k": (HEADER + _rows(12), {"n_clusters": 8}, ["16", "8 segments"]),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00", {}, ["not a CSV"]),
    "empty file": (b"", {}, ["empty"]),
    "header only": (HEADER, {}, ["no data rows"]),
    "prose": ("Dear team,\nplease find the customers attached.\n", {}, ["missing required column"]),
    "not UTF-8": (HEADER.encode() + "1,Mäle,30,50.0,40,10\n".encode("latin-1"), {}, ["UTF-8"]),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
async def test_a_bad_file_is_422_with_details_and_changes_nothing(client, trained_model, analyst_headers, kind):
    content, params, expected = BAD_FILES[kind]
    before = await active_state(client, analyst_headers)
    response = await client.post("/train", params=params, files=csv_file(content), headers=analyst_headers)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    text = str(detail)
    for fragment in expected:
        assert fragment.lower() in text.lower(), (fragment, detail)
    assert await active_state(client, analyst_headers) == before
    assert before[0] == trained_model["model_version"]


async def test_many_bad_rows_list_the_first_ten_with_row_numbers(client, analyst_headers):
    lines = _rows(40).splitlines(keepends=True)
    for i in range(2, 40, 3):  # rows 3, 6, ..., 39: thirteen of them
        lines[i] = f"{i + 1},Male,{15},50.0,40,10\n"
    response = await client.post("/train", files=csv_file(HEADER + "".join(lines)), headers=analyst_headers)
    assert response.status_code == 422
    body = response.json()
    assert isinstance(body["detail"], str) and "13 of 40 rows" in body["detail"]
    assert [e["row"] for e in body["errors"]] == list(range(3, 31, 3))
    assert [e["line"] for e in body["errors"]] == list(range(4, 32, 3))
    assert all(e["column"] == "age" and "out of range" in e["reason"] for e in body["errors"])


async def test_a_multipart_body_without_a_file_part_is_422(client, analyst_headers):
    response = await client.post(
        "/train", data={"note": "x"}, files={"other": ("a.csv", b"a", "text/csv")}, headers=analyst_headers
    )
    assert response.status_code == 422 and "file" in str(response.json()["detail"])


@pytest.mark.parametrize("settings_overrides", [{"max_upload_mb": 0.02, "max_train_upload_mb": 0.02}])
async def test_an_upload_over_the_cap_is_413_and_changes_nothing(client, trained_model, analyst_headers, user_headers):
    big = generate(rows=2000, seed=1).to_csv(index=False).encode()  # ~50 KB against a 20 KB cap
    before = await active_state(client, analyst_headers)
    response = await client.post("/train", files=csv_file(big), headers=analyst_headers)
    assert response.status_code == 413 and "too large" in response.json()["detail"].lower()
    assert await active_state(client, analyst_headers) == before
    batch = await client.post("/predict/batch", files=csv_file(big), headers=user_headers)
    assert batch.status_code == 413
    small = generate(rows=200, seed=1).to_csv(index=False).encode()
    assert (
        await client.post("/train", params={"n_clusters": 3}, files=csv_file(small), headers=analyst_headers)
    ).status_code == 200


@pytest.mark.parametrize("settings_overrides", [{"max_train_upload_mb": 0.02}])
async def test_a_streamed_upload_without_length_is_cut_at_the_cap(client, trained_model, analyst_headers):
    """No Content-Length to refuse up front: the body is counted as it arrives and stopped at the cap."""
    boundary = "cap-test-boundary"
    chunks_sent = 0

    async def body():
        nonlocal chunks_sent
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.csv"\r\n'
            "Content-Type: text/csv\r\n\r\n"
        ).encode() + HEADER.encode()
        for _ in range(400):  # 400 x 4 KB, far past the cap
            chunks_sent += 1
            yield _rows(150).encode()[:4096]
        yield f"\r\n--{boundary}--\r\n".encode()

    before = await active_state(client, analyst_headers)
    response = await client.post(
        "/train",
        content=body(),
        headers={**analyst_headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 413
    assert chunks_sent < 400  # refused before the whole body was read
    assert await active_state(client, analyst_headers) == before
