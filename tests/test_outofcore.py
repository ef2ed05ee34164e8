"""Out-of-core training: Parquet and large CSV files read in chunks, k chosen on a sample, K-Means
refined over the whole file; through HTTP, from the shell and against an in-memory fit."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.cluster import KMeans
from sklearn.preprocessing import StandardScaler

from app.ml.outofcore import TrainingFile, train_customer_file
from app.preprocess import FEATURES
from generate_dataset import generate
from tests.test_cli import cli_env  # noqa: F401 - the fixture of a fresh installation

pytestmark = pytest.mark.postgres

ROWS = 20_000
COLUMNS = ["Age", "Annual_Income", "Spending_Score", "Purchase_Frequency"]


@pytest.fixture
def settings_overrides() -> dict:
    # Files above a thousand rows are streamed, with k chosen on a sample of a thousand.
    return {"train_in_memory_rows": 1000, "train_sample_rows": 1000}


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    out = io.BytesIO()
    frame.to_parquet(out, index=False)
    return out.getvalue()


async def test_a_parquet_upload_trains_out_of_core_and_serves(client, analyst_headers, user_headers):
    data = generate(rows=ROWS, seed=4)
    trained = await client.post(
        "/train",
        params={"random_state": 2},
        files={"file": ("customers.parquet", parquet_bytes(data), "application/octet-stream")},
        headers=analyst_headers,
    )
    assert trained.status_code == 200, trained.text
    body = trained.json()
    assert body["n_samples"] == ROWS and sum(body["cluster_sizes"].values()) == ROWS
    detail = (await client.get(f"/models/{body['model_version']}", headers=analyst_headers)).json()
    assert detail["algorithm"] == "streamed_kmeans", detail
    assert detail["out_of_core"]["sample_rows"] == 1000 and detail["out_of_core"]["source"] == "parquet"
    assert detail["k_selection"]["sample_size"] <= 1000

    # The batch answer of the whole file agrees with the sizes counted while training.
    csv = data.to_csv(index=False).encode()
    scored = await client.post(
        "/predict/batch", files={"file": ("c.csv", csv, "text/csv")}, headers=user_headers | {"Accept": "text/csv"}
    )
    assert scored.status_code == 200
    clusters = pd.read_csv(io.BytesIO(scored.content))["cluster"]
    assert clusters.value_counts().sort_index().tolist() == [
        body["cluster_sizes"][str(i)] for i in range(len(body["cluster_sizes"]))
    ]


async def test_a_bad_parquet_file_is_422_naming_the_problem(client, analyst_headers):
    data = generate(rows=3000, seed=4)
    missing = await client.post(
        "/train",
        files={"file": ("c.parquet", parquet_bytes(data.drop(columns=["Spending_Score"])), "application/octet-stream")},
        headers=analyst_headers,
    )
    assert missing.status_code == 422 and "spending_score" in missing.json()["detail"].lower()
    data.loc[1500, "Age"] = 300
    bad = await client.post(
        "/train",
        files={"file": ("c.parquet", parquet_bytes(data), "application/octet-stream")},
        headers=analyst_headers,
    )
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["row"] == 1501 and bad.json()["errors"][0]["column"] == "age"
    broken = await client.post(
        "/train",
        files={"file": ("c.parquet", b"PAR1 not really parquet", "application/octet-stream")},
        headers=analyst_headers,
    )
    assert broken.status_code == 422


def test_streamed_inertia_is_within_1_percent_of_an_in_memory_fit(tmp_path):
    data = generate(rows=60_000, seed=9)
    path = tmp_path / "customers.parquet"
    data.to_parquet(path, index=False)
    streamed = train_customer_file(
        TrainingFile(path, chunk_rows=7_000, in_memory_rows=1000, sample_rows=5000),
        n_clusters=None,
        random_state=3,
        k_range=(2, 8),
    )
    assert streamed.metadata["algorithm"] == "streamed_kmeans"
    k = streamed.metadata["n_clusters"]
    X = StandardScaler().fit_transform(data[COLUMNS].to_numpy(np.float64))
    reference = KMeans(n_clusters=k, n_init=3, random_state=3).fit(X)
    assert streamed.metadata["inertia"] <= reference.inertia_ * 1.01
    # The scaler was fitted on every row, chunk by chunk.
    np.testing.assert_allclose(streamed.scaler.mean_, data[COLUMNS].to_numpy(np.float64).mean(axis=0), rtol=1e-6)
    # CSV and Parquet of the same rows give the same model.
    csv = tmp_path / "customers.csv"
    data.to_csv(csv, index=False)
    again = train_customer_file(
        TrainingFile(csv, chunk_rows=7_000, in_memory_rows=1000, sample_rows=5000),
        n_clusters=None,
        random_state=3,
        k_range=(2, 8),
    )
    np.testing.assert_allclose(again.kmeans.cluster_centers_, streamed.kmeans.cluster_centers_, rtol=1e-9)
    assert [s["size"] for s in again.metadata["segments"]] == [s["size"] for s in streamed.metadata["segments"]]


def test_a_small_file_trains_exactly_as_in_memory(tmp_path):
    from app.ml.training import train_customer

    data = generate(rows=3000, seed=2)
    path = tmp_path / "customers.parquet"
    data.to_parquet(path, index=False)
    from_file = train_customer_file(TrainingFile(path), n_clusters=None, random_state=1, k_range=(2, 10))
    in_memory = train_customer(data[COLUMNS].to_numpy(np.float32), n_clusters=None, random_state=1, k_range=(2, 10))
    assert from_file.metadata["data_fingerprint"] == in_memory.metadata["data_fingerprint"]
    np.testing.assert_array_equal(from_file.kmeans.cluster_centers_, in_memory.kmeans.cluster_centers_)
    assert len(FEATURES) == from_file.kmeans.cluster_centers_.shape[1]


def test_the_cli_trains_from_parquet(tmp_path, cli_env):  # noqa: F811
    data = generate(rows=4000, seed=6)
    path = tmp_path / "customers.parquet"
    data.to_parquet(path, index=False)
    env = cli_env | {"TRAIN_IN_MEMORY_ROWS": "1000", "TRAIN_SAMPLE_ROWS": "1000"}
    done = subprocess.run(
        [sys.executable, "-m", "app", "train", "--input", str(path), "--k", "4"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "Out of core: k chosen on a sample of 1,000 rows" in done.stdout
    assert "k=4" in done.stdout
