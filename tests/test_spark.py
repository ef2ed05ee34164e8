"""Spark as an engine, on local[2]: a Spark-trained version is an ordinary version, Spark scoring is /predict/batch.

Skipped, saying why, where pyspark or Java is missing; `.ci/run` installs both so CI runs these.
"""

from __future__ import annotations

import asyncio
import io
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.test_scoring_cli import batch_csv, cli_env
from tests.test_segmentations import CRM_FEATURES, crm_table

pytest.importorskip("pyspark", reason="pyspark is not installed: make install-spark (requirements-spark.txt)")
if shutil.which("java") is None:
    pytest.skip("no Java runtime for Spark: apt-get install openjdk-17-jre-headless", allow_module_level=True)

pytestmark = pytest.mark.slow

ROWS = 20_000


@pytest.fixture(scope="module")
def spark():
    from app.engines import spark as engine

    session = engine.session("local[2]", "segmentation-tests")
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def customers(tmp_path_factory) -> tuple[pd.DataFrame, object]:
    """20k generated customers, as CSV and as Parquet."""
    from generate_dataset import generate

    folder = tmp_path_factory.mktemp("spark-data")
    frame = generate(rows=ROWS, seed=11)
    frame.to_csv(folder / "customers.csv", index=False)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), folder / "customers.parquet")
    return frame, folder


def in_process_inertia(frame: pd.DataFrame, k: int, random_state: int = 42) -> float:
    from app.ml import SegmentationModel
    from app.ml.preprocess import FEATURES, resolve_columns

    columns = resolve_columns(frame.columns)
    X = frame[[columns[f] for f in FEATURES]].to_numpy(dtype=np.float64)
    return float(SegmentationModel.train(X, n_clusters=k, random_state=random_state).metadata_["inertia"])


async def test_a_spark_trained_version_is_served_like_any_other(
    app, client, spark, customers, analyst_headers, user_headers
):
    from app.engines.spark import scoring, training

    frame, folder = customers
    store = await app.state.segmentations.get("default")
    result = await asyncio.to_thread(
        training.train, spark, folder / "customers.parquet", schema=None, n_clusters=None, random_state=42
    )
    assert result.rows_read == ROWS and result.skipped_rows == 0 and len(result.costs) == 3
    served = await store.adopt(result.model, created_by="spark-test")
    meta = served.metadata
    k = meta["n_clusters"]
    assert meta["k_selection"]["method"] == "silhouette" and meta["k_selection"]["sample_size"] == ROWS
    assert meta["engine"]["name"] == "spark" and meta["engine"]["algorithm"].startswith("mllib_kmeans")

    listed = await client.get("/segmentations/default/models", headers=analyst_headers)
    assert listed.status_code == 200
    assert listed.json()["active_version"] == served.version
    assert listed.json()["models"][0]["created_by"] == "spark-test"
    clusters = (await client.get("/clusters", headers=user_headers)).json()
    assert sum(c["size"] for c in clusters["clusters"]) == ROWS
    assert len({c["cluster_name"] for c in clusters["clusters"]}) == k
    one = await client.post(
        "/predict",
        json={"sex": "Female", "age": 29, "annual_income": 85.0, "spending_score": 82, "purchase_frequency": 40},
        headers=user_headers,
    )
    assert one.status_code == 200 and one.json()["model_version"] == served.version
    drift = await client.get("/drift", headers=analyst_headers)  # a reference was stored from the sample
    assert drift.status_code == 200, drift.text
    assert {f["feature"] for f in drift.json()["features"]} == {
        "age",
        "annual_income",
        "spending_score",
        "purchase_frequency",
    }

    # The centroids are as good as the in-process trainer's on the same data and k.
    reference = in_process_inertia(frame, k)
    assert abs(meta["inertia"] - reference) / reference < 0.02, (meta["inertia"], reference)

    # Segment sizes counted in Spark are the clusters serving gives the training rows.
    expected = pd.read_csv(
        io.BytesIO(await batch_csv(client, user_headers, "/predict/batch", (folder / "customers.csv").read_bytes())),
        keep_default_na=False,
    )
    sizes = expected["cluster"].value_counts().sort_index().tolist()
    assert sizes == [c["size"] for c in clusters["clusters"]]

    # Spark scoring gives every row the cluster and confidence of /predict/batch.
    target = folder / "scored.parquet"
    rows = await asyncio.to_thread(scoring.score, spark, served, folder / "customers.parquet", target)
    assert rows == ROWS
    got = pq.read_table(target).to_pandas().sort_values("CustomerID").reset_index(drop=True)
    want = expected.sort_values("CustomerID").reset_index(drop=True)
    assert got["cluster"].tolist() == want["cluster"].tolist()
    assert got["cluster_name"].tolist() == want["cluster_name"].tolist()
    assert np.allclose(got["confidence"], want["confidence"], atol=1e-6)
    assert got["error"].isna().all()

    # A second Spark version is matched to the first: same data, same ids.
    again = await asyncio.to_thread(
        training.train, spark, folder / "customers.csv", schema=None, n_clusters=k, random_state=7
    )
    second = await store.adopt(again.model, created_by="spark-test")
    identity = second.metadata["identity"]
    assert identity["previous_version"] == served.version
    assert all(m["previous_cluster_id"] == m["cluster_id"] for m in identity["matching"])


async def test_spark_scoring_marks_bad_rows_as_predict_batch_does(
    app, client, spark, customers, user_headers, tmp_path
):
    from app.engines.spark import scoring, training

    _, folder = customers
    store = await app.state.segmentations.get("default")
    result = await asyncio.to_thread(
        training.train, spark, folder / "customers.csv", schema=None, n_clusters=4, random_state=1
    )
    served = await store.adopt(result.model, created_by="spark-test")
    rows = pd.read_csv(folder / "customers.csv", dtype=str, keep_default_na=False).head(500)
    rows.loc[3, "Age"] = "old"
    rows.loc[9, "Spending_Score"] = "150"
    rows.loc[12, "Annual_Income"] = ""
    rows.to_csv(tmp_path / "rows.csv", index=False)
    target = tmp_path / "scored.parquet"
    assert await asyncio.to_thread(scoring.score, spark, served, tmp_path / "rows.csv", target) == 500
    got = pq.read_table(target).to_pandas().sort_values("CustomerID", key=lambda c: c.astype(int))
    want = pd.read_csv(
        io.BytesIO(await batch_csv(client, user_headers, "/predict/batch", (tmp_path / "rows.csv").read_bytes())),
        keep_default_na=False,
    )
    assert got["error"].fillna("").tolist() == want["error"].tolist()
    assert got["cluster"].fillna(-1).astype(int).tolist() == want["cluster"].replace("", -1).astype(int).tolist()


async def test_custom_kind_trains_in_spark_with_its_declared_schema(
    app, client, spark, tmp_path, analyst_headers, user_headers
):
    from app.engines.spark import training

    payload = {"name": "crm", "kind": "custom", "features": CRM_FEATURES, "id_column": "customer_id"}
    assert (await client.post("/segmentations", json=payload, headers=analyst_headers)).status_code == 201
    table = crm_table(3000)
    table.to_csv(tmp_path / "crm.csv", index=False)
    store = await app.state.segmentations.get("crm")
    from app.segmentations.kinds.registry import feature_schema

    result = await asyncio.to_thread(
        training.train,
        spark,
        tmp_path / "crm.csv",
        schema=feature_schema(store.segmentation),
        n_clusters=3,
        random_state=1,
    )
    served = await store.adopt(result.model, created_by="spark-test")
    assert all("fitted" in f for f in served.metadata["schema"]["features"])  # the encoding was learned
    plans = sorted(max(s["means"]["plan"], key=s["means"]["plan"].get) for s in served.segments)
    assert plans == ["free", "pro", "team"]
    assert any("pro" in s["cluster_name"] or "plan" in s["cluster_name"] for s in served.segments)
    in_process = (
        await client.post(
            "/segmentations/crm/train",
            params={"n_clusters": 3, "random_state": 1},
            files={"file": ("crm.csv", (tmp_path / "crm.csv").read_bytes(), "text/csv")},
            headers=analyst_headers,
        )
    ).json()
    assert abs(served.metadata["inertia"] - in_process["inertia"]) / in_process["inertia"] < 0.02
    assert in_process["previous_version"] == served.version
    assert all(m["previous_cluster_id"] == m["cluster_id"] for m in in_process["matching"])


def cli(settings, cwd, *args: str) -> subprocess.CompletedProcess:
    """`python -m app ARGS` in `cwd`, with the test service's database and model folder."""
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=cwd,
        env=cli_env(settings),
        capture_output=True,
        text=True,
        timeout=600,
    )


async def test_train_and_score_from_the_command_line(settings, app, client, customers, tmp_path, user_headers):
    _, folder = customers

    def run(*args: str) -> subprocess.CompletedProcess:
        return cli(settings, tmp_path, *args)

    trained = await asyncio.to_thread(
        run,
        "train",
        "--engine",
        "spark",
        "--master",
        "local[2]",
        "--input",
        str(folder / "customers.parquet"),
        "--k",
        "4",
    )
    assert trained.returncode == 0, trained.stderr
    version = re.search(r"Model (\S+): k=4", trained.stdout).group(1)
    assert "engine spark" in trained.stdout
    scored = await asyncio.to_thread(
        run, "score", "--engine", "spark", "--input", str(folder / "customers.parquet"), "--output", "out.parquet"
    )
    assert scored.returncode == 0, scored.stderr
    assert f"with version {version}" in scored.stdout
    assert pq.read_table(tmp_path / "out.parquet").num_rows == ROWS
    refused = await asyncio.to_thread(
        run, "score", "--engine", "spark", "--input", str(folder / "customers.parquet"), "--output", "out.csv"
    )
    assert refused.returncode == 2 and "parquet" in refused.stderr.lower()


# --- kind rfm: the log summed in Spark --------------------------------------------------------------


def model_lines(stdout: str) -> list[str]:
    """The segments a training printed (`  id: name (size customers, share%, revenue%)`)."""
    return [line for line in stdout.splitlines() if re.match(r"  \d+: ", line)]


async def test_an_rfm_log_trains_and_scores_in_spark_as_it_does_here(settings, client, tmp_path, analyst_headers):
    from tests.test_rfm import create, score_csv, synthetic_log

    data, _ = synthetic_log(customers=2000, seed=5)
    log = tmp_path / "orders.csv"
    log.write_bytes(data)
    assert (await create(client, analyst_headers)).status_code == 201
    common = ("--segmentation", "shop", "--input", str(log), "--k", "4", "--random-state", "3")

    in_spark = await asyncio.to_thread(cli, settings, tmp_path, "train", *common, "--engine", "spark")
    assert in_spark.returncode == 0, in_spark.stderr
    here = await asyncio.to_thread(cli, settings, tmp_path, "train", *common)
    assert here.returncode == 0, here.stderr
    # The same per-customer table, so the same segments, sizes and revenue shares.
    assert model_lines(in_spark.stdout) and model_lines(in_spark.stdout) == model_lines(here.stdout)
    summary = re.compile(r"[\d,]+ rows: [\d,]+ customers as of \S+")
    assert summary.search(in_spark.stdout).group(0) == summary.search(here.stdout).group(0)

    versions = (await client.get("/segmentations/shop/models", headers=analyst_headers)).json()["models"]
    spark_version, local_version = versions[1]["version"], versions[0]["version"]
    detail = await client.get(f"/segmentations/shop/models/{local_version}", headers=analyst_headers)
    assert detail.json()["previous_version"] == spark_version
    matching = detail.json()["matching"]
    assert all(m["previous_cluster_id"] == m["cluster_id"] and m["shift"] == 0 for m in matching)
    # Spark sums each customer's purchase days too: both versions fit the same value models.
    spark_detail = await client.get(f"/segmentations/shop/models/{spark_version}", headers=analyst_headers)
    value, spark_value = detail.json()["value_model"], spark_detail.json()["value_model"]
    assert value["bgnbd"] is not None
    assert spark_value["bgnbd"] == pytest.approx(value["bgnbd"], rel=1e-6)
    assert (spark_value["gamma_gamma"] is None) == (value["gamma_gamma"] is None)
    if value["gamma_gamma"] is not None:
        assert spark_value["gamma_gamma"] == pytest.approx(value["gamma_gamma"], rel=1e-6)

    # Scoring the log in Spark gives every customer the row /predict/batch gives them.
    scored = await asyncio.to_thread(
        cli, settings, tmp_path, "score", "--segmentation", "shop", "--engine", "spark",
        "--input", str(log), "--output", "customers.parquet",
    )  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    assert "2,000 customers" in scored.stdout
    got = pq.read_table(tmp_path / "customers.parquet").to_pandas()
    want = await score_csv(client, analyst_headers, data)
    assert got.columns.tolist() == want.columns.tolist()
    assert got["customer_id"].tolist() == want["customer_id"].tolist()  # in order of first appearance
    pd.testing.assert_frame_equal(got, want, check_dtype=False)


async def test_spark_leaves_out_and_counts_the_log_rows_it_cannot_read(settings, client, tmp_path, analyst_headers):
    from tests.test_rfm import create, score_csv, synthetic_log

    data, _ = synthetic_log(customers=300, seed=9)
    lines = data.decode().splitlines()
    broken = [
        ",O-x,2024-03-01,5.0",  # no customer id
        "0000001,O-y,2024-02-30,5.0",  # no such date
        "0000002,O-z,2024-03-01,five",  # no number
        "0000003,O-w,2031-01-01,9.0",  # after as_of
    ]
    lines.append('"0000004 ""VIP"", north",O-v,2025-06-01,12.5')  # quotes doubled inside a quoted cell
    log = tmp_path / "orders.csv"
    log.write_text("\n".join([lines[0], *broken[:2], *lines[1:], *broken[2:]]) + "\n")
    clean = ("\n".join(lines) + "\n").encode()
    assert (await create(client, analyst_headers)).status_code == 201

    refused = await asyncio.to_thread(
        cli, settings, tmp_path, "train", "--segmentation", "shop", "--input", str(log), "--as-of", "2026-01-01"
    )
    assert refused.returncode == 2 and "cannot be read" in refused.stderr  # in process, such a log is refused
    trained = await asyncio.to_thread(
        cli, settings, tmp_path, "train", "--segmentation", "shop", "--engine", "spark",
        "--input", str(log), "--as-of", "2026-01-01", "--k", "3",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert f"{len(lines) - 1 + len(broken):,} rows" in trained.stdout
    assert "3 rows left out" in trained.stdout and "1 after as_of" in trained.stdout
    scored = await asyncio.to_thread(
        cli, settings, tmp_path, "score", "--segmentation", "shop", "--engine", "spark",
        "--input", str(log), "--as-of", "2026-01-01", "--output", "customers.parquet",
    )  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    got = pq.read_table(tmp_path / "customers.parquet").to_pandas()
    want = await score_csv(client, analyst_headers, clean, as_of="2026-01-01")  # the log without those rows
    assert '0000004 "VIP", north' in got["customer_id"].tolist()
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
