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

from app.ml.encoding import encode
from app.ml.frames import read_training_frame
from app.ml.outofcore import TrainingFile, train_custom_file, train_customer_file
from app.ml.preprocess import FEATURES
from app.ml.schema import FeatureSchema
from generate_dataset import generate
from tests.test_cli import cli_env, create_segmentation, run  # noqa: F401 - cli_env: a fresh installation
from tests.test_segmentations import CRM_FEATURES, as_csv, crm_table

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


# --- kind custom --------------------------------------------------------------------------------


def crm_schema() -> FeatureSchema:
    return FeatureSchema.declare(CRM_FEATURES, id_column="customer_id")


def test_a_custom_file_streamed_is_within_1_percent_of_an_in_memory_fit(tmp_path):
    data = crm_table(30_000, seed=5)
    path = tmp_path / "crm.parquet"
    data.to_parquet(path, index=False)
    source = TrainingFile(path, chunk_rows=3_000, in_memory_rows=1000, sample_rows=4000)
    streamed = train_custom_file(source, crm_schema(), n_clusters=None, random_state=3, k_range=(2, 6))
    meta = streamed.metadata
    assert meta["algorithm"] == "streamed_kmeans" and meta["out_of_core"]["sample_rows"] == 4000
    assert meta["n_samples"] == 30_000 and sum(s["size"] for s in meta["segments"]) == 30_000
    assert meta["missing_shares"]["basket"] == pytest.approx(1 / 30_000, abs=1e-6)  # counted over every row

    # Against scikit-learn's KMeans (same k, n_init=3) on every row, encoded as the streamed model encodes.
    fitted = FeatureSchema.from_dict(meta["schema"])
    frame = read_training_frame(as_csv(data), crm_schema())
    X = encode(fitted, frame)
    k = meta["n_clusters"]
    reference = KMeans(n_clusters=k, n_init=3, random_state=3).fit(X)
    assert meta["inertia"] <= reference.inertia_ * 1.01

    # Segment statistics count every row in the segment serving gives it.
    labels = np.argmin(((X[:, None, :] - streamed.kmeans.cluster_centers_[None]) ** 2).sum(axis=2), axis=1)
    assert np.bincount(labels, minlength=k).tolist() == [s["size"] for s in meta["segments"]]
    for i, segment in enumerate(meta["segments"]):
        rows = frame[labels == i]
        assert segment["means"]["visits"] == pytest.approx(rows["visits"].mean(), abs=1e-3)
        plans = rows["plan"].astype(str).value_counts(normalize=True)
        for level, share in segment["means"]["plan"].items():
            assert share == pytest.approx(plans.get(level, 0.0), abs=1e-4)

    # CSV and Parquet of the same rows give the same model.
    csv = tmp_path / "crm.csv"
    csv.write_bytes(as_csv(data))
    again = train_custom_file(
        TrainingFile(csv, chunk_rows=3_000, in_memory_rows=1000, sample_rows=4000),
        crm_schema(),
        n_clusters=None,
        random_state=3,
        k_range=(2, 6),
    )
    np.testing.assert_allclose(again.kmeans.cluster_centers_, streamed.kmeans.cluster_centers_, rtol=1e-9)
    assert [s["size"] for s in again.metadata["segments"]] == [s["size"] for s in meta["segments"]]


def test_a_small_custom_file_trains_exactly_as_its_upload(tmp_path):
    from app.ml.training import train_custom

    data = crm_table(2000, seed=8)
    path = tmp_path / "crm.parquet"
    data.to_parquet(path, index=False)
    from_file = train_custom_file(TrainingFile(path), crm_schema(), n_clusters=None, random_state=1, k_range=(2, 6))
    upload = train_custom(
        read_training_frame(as_csv(data), crm_schema()), crm_schema(), n_clusters=None, random_state=1, k_range=(2, 6)
    )
    assert from_file.metadata["data_fingerprint"] == upload.metadata["data_fingerprint"]
    np.testing.assert_array_equal(from_file.kmeans.cluster_centers_, upload.kmeans.cluster_centers_)
    assert from_file.metadata["drift_reference"]["features"]


async def test_a_custom_parquet_upload_trains_out_of_core_and_serves(client, analyst_headers, user_headers):
    payload = {"name": "crm", "kind": "custom", "features": CRM_FEATURES, "id_column": "customer_id"}
    assert (await client.post("/segmentations", json=payload, headers=analyst_headers)).status_code == 201
    data = crm_table(6000, seed=4)
    trained = await client.post(
        "/segmentations/crm/train",
        params={"random_state": 2},
        files={"file": ("crm.parquet", parquet_bytes(data), "application/octet-stream")},
        headers=analyst_headers,
    )
    assert trained.status_code == 200, trained.text
    body = trained.json()
    assert body["n_samples"] == 6000
    version = (await client.get(f"/segmentations/crm/models/{body['model_version']}", headers=analyst_headers)).json()
    assert version["algorithm"] == "streamed_kmeans" and version["out_of_core"]["source"] == "parquet", version

    # Serving counts every row in the segment the training counted it in.
    scored = await client.post(
        "/segmentations/crm/predict/batch",
        files={"file": ("crm.csv", as_csv(data), "text/csv")},
        headers=user_headers | {"Accept": "text/csv"},
    )
    assert scored.status_code == 200, scored.text
    clusters = pd.read_csv(io.BytesIO(scored.content))["cluster"]
    sizes = {int(k): v for k, v in body["cluster_sizes"].items()}
    assert clusters.value_counts().to_dict() == sizes
    drift = await client.get("/segmentations/crm/drift", headers=analyst_headers)
    assert drift.status_code == 200, drift.text

    # A bad cell in a large file: 422 naming its row and column, the active version unchanged.
    data["visits"] = data["visits"].astype(str)  # numbers stored as text, as some exports do
    data.loc[4321, "visits"] = "lots"
    bad = await client.post(
        "/segmentations/crm/train",
        files={"file": ("crm.parquet", parquet_bytes(data), "application/octet-stream")},
        headers=analyst_headers,
    )
    assert bad.status_code == 422, bad.text
    assert bad.json()["errors"][0] == {"row": 4322, "line": 4323, "column": "visits", "reason": "not a number: 'lots'"}


def test_the_cli_trains_a_custom_segmentation_from_parquet(tmp_path, cli_env):  # noqa: F811
    create_segmentation(tmp_path, cli_env, name="crm", kind="custom", features=CRM_FEATURES, id_column="customer_id")
    path = tmp_path / "crm.parquet"
    crm_table(5000, seed=6).to_parquet(path, index=False)
    env = cli_env | {"TRAIN_IN_MEMORY_ROWS": "1000", "TRAIN_SAMPLE_ROWS": "1000"}
    done = run(env, tmp_path, "-m", "app", "train", "--segmentation", "crm", "--input", str(path), "--k", "3")
    assert done.returncode == 0, done.stderr
    assert "Out of core: k chosen on a sample of 1,000 rows" in done.stdout and "over 5,000 rows" in done.stdout
    assert "k=3" in done.stdout
