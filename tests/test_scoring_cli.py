"""`python -m app score`: a file scored into a file gets the same rows and answers as /predict/batch."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from tests.test_rfm import synthetic_log
from tests.test_segmentations import CRM_FEATURES, as_csv, crm_table

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def cli_env(settings) -> dict[str, str]:
    """The service's own database and model folder, for a command run beside the test's app."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "MODEL_", "DATA_", "APP_ENV"))}
    env.update(
        PYTHONPATH=str(ROOT),
        DATABASE_URL=settings.database_url,
        MODEL_DIR=str(settings.model_dir),
        DATA_PATH=str(settings.data_path),
        SECRET_KEY=settings.secret_key.get_secret_value()
        if hasattr(settings.secret_key, "get_secret_value")
        else settings.secret_key,
    )
    return env


async def score(settings, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "app", "score", *args],
        cwd=tmp_path,
        env=cli_env(settings),
        capture_output=True,
        text=True,
        timeout=180,
    )


async def batch_csv(client, headers, path: str, data: bytes) -> bytes:
    answer = await client.post(
        path, files={"file": ("rows.csv", data, "text/csv")}, headers=headers | {"Accept": "text/csv"}
    )
    assert answer.status_code == 200, answer.text
    return answer.content


def customers_with_bad_rows(dataset: Path) -> bytes:
    frame = pd.read_csv(dataset, dtype=str, keep_default_na=False)
    frame.loc[3, "Age"] = "old"
    frame.loc[10, "Spending_Score"] = "150"
    frame.loc[11, "Sex"] = "=cmd()"
    return frame.to_csv(index=False).encode()


async def test_customer_csv_and_parquet_answers_equal_predict_batch(
    client, settings, tmp_path, dataset, trained_model, user_headers
):
    data = customers_with_bad_rows(dataset)
    (tmp_path / "rows.csv").write_bytes(data)
    expected = await batch_csv(client, user_headers, "/predict/batch", data)

    done = await score(settings, tmp_path, "--input", "rows.csv", "--output", "answer.csv")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "answer.csv").read_bytes() == expected
    assert trained_model["model_version"] in done.stdout and "3 with an error" in done.stdout

    # Parquet in (typed columns), Parquet out: the same answers row for row.
    typed = pd.read_csv(dataset)
    pq.write_table(pa.Table.from_pandas(typed, preserve_index=False), tmp_path / "rows.parquet")
    done = await score(settings, tmp_path, "--input", "rows.parquet", "--output", "answer.parquet")
    assert done.returncode == 0, done.stderr
    got = pq.read_table(tmp_path / "answer.parquet").to_pandas()
    want = pd.read_csv(
        io.BytesIO(await batch_csv(client, user_headers, "/predict/batch", dataset.read_bytes())),
        keep_default_na=False,
    )
    assert list(got.columns) == [*typed.columns, "cluster", "cluster_name", "confidence", "error"]
    assert got["Age"].dtype == typed["Age"].dtype  # input columns keep their own types
    assert got["cluster"].tolist() == want["cluster"].tolist()
    assert got["cluster_name"].tolist() == want["cluster_name"].tolist()
    assert got["confidence"].tolist() == want["confidence"].tolist()
    assert got["error"].isna().all()

    # Parquet in, CSV out: the CSV answer of the same rows (numbers written as Arrow writes them: 114, not 114.0).
    done = await score(settings, tmp_path, "--input", "rows.parquet", "--output", "from-parquet.csv")
    assert done.returncode == 0, done.stderr
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "from-parquet.csv", keep_default_na=False), want)


async def test_bad_rows_are_marked_in_parquet_too(client, settings, tmp_path, dataset, trained_model):
    (tmp_path / "rows.csv").write_bytes(customers_with_bad_rows(dataset))
    done = await score(settings, tmp_path, "--input", "rows.csv", "--output", "answer.parquet")
    assert done.returncode == 0, done.stderr
    got = pq.read_table(tmp_path / "answer.parquet").to_pandas()
    bad = got[got["error"].notna()]
    assert bad.index.tolist() == [3, 10, 11]
    assert "age" in bad.loc[3, "error"] and "spending_score" in bad.loc[10, "error"]
    assert bad["cluster"].isna().all() and bad["confidence"].isna().all()


def parquet_of(frame: pd.DataFrame) -> bytes:
    out = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), out)
    return out.getvalue()


def answers(frame: pd.DataFrame) -> list[tuple]:
    """Each row's (cluster, cluster_name, confidence, error), as numbers and text; None where empty."""

    def cell(value, kind):
        return None if pd.isna(value) or value == "" else kind(value)

    columns = zip(frame["cluster"], frame["cluster_name"], frame["confidence"], frame["error"], strict=True)
    return [(cell(c, int), cell(n, str), cell(p, float), cell(e, str)) for c, n, p, e in columns]


def exported_csv(table: pa.Table) -> bytes:
    """The CSV a user gets when they export the Parquet table (nulls as empty cells)."""
    out = io.BytesIO()
    pa_csv.write_csv(table, out)
    return out.getvalue()


async def test_typed_parquet_cells_get_the_verdicts_their_csv_gets(
    client, settings, tmp_path, dataset, trained_model, user_headers
):
    # Numbers typed as Arrow holds them: a null, a fraction, an out-of-range value, an infinity, a NaN;
    # integer columns with nulls; a column of numbers stored as text. Each row's answer is the one
    # /predict/batch gives the same file exported to CSV.
    frame = pd.read_csv(dataset).head(40)
    n = len(frame)
    age = frame["Age"].astype("float64").tolist()
    age[1], age[2], age[3] = None, 35.5, 150.0
    income = frame["Annual_Income"].astype("float64").tolist()
    income[4], income[5] = float("inf"), float("nan")
    spending = pa.array([None if i == 6 else int(v) for i, v in enumerate(frame["Spending_Score"])], pa.int64())
    sexes = frame["Sex"].tolist()
    sexes[7], sexes[8] = " female ", None
    table = pa.table(
        {
            "CustomerID": pa.array(range(n), pa.int32()),
            "Sex": pa.array(sexes, pa.string()),
            "Age": pa.array(age, pa.float64()),
            "Annual_Income": pa.array(income, pa.float64()),
            "Spending_Score": spending,
            "Purchase_Frequency": pa.array([str(v) for v in frame["Purchase_Frequency"]], pa.string()),
        }
    )
    pq.write_table(table, tmp_path / "typed.parquet")
    want = pd.read_csv(
        io.BytesIO(await batch_csv(client, user_headers, "/predict/batch", exported_csv(table))),
        keep_default_na=False,
    )
    done = await score(settings, tmp_path, "--input", "typed.parquet", "--output", "answer.parquet")
    assert done.returncode == 0, done.stderr
    got = pq.read_table(tmp_path / "answer.parquet").to_pandas()
    assert answers(got) == answers(want)
    assert [i for i, row in enumerate(answers(got)) if row[3] is not None] == [1, 2, 3, 4, 5, 6]
    assert got["Age"].dtype == "float64" and got["Spending_Score"].dtype == "float64"  # nulls: pandas float
    assert pq.read_schema(tmp_path / "answer.parquet").field("Spending_Score").type == pa.int64()


async def test_typed_parquet_of_a_custom_segmentation_equals_its_csv(
    client, settings, tmp_path, analyst_headers, user_headers
):
    payload = {"name": "crm", "kind": "custom", "features": CRM_FEATURES, "id_column": "customer_id"}
    assert (await client.post("/segmentations", json=payload, headers=analyst_headers)).status_code == 201
    trained = await client.post(
        "/segmentations/crm/train",
        files={"file": ("crm.csv", as_csv(crm_table()), "text/csv")},
        headers=analyst_headers,
    )
    assert trained.status_code == 200, trained.text
    rows = crm_table(200, seed=11)
    rows.loc[2, "Tenure_Months"] = 900.0  # above the declared maximum
    rows.loc[3, "visits"] = None  # imputed
    rows.loc[4, "visits"] = float("inf")
    table = pa.Table.from_pandas(rows, preserve_index=False)
    pq.write_table(table, tmp_path / "crm.parquet")
    want = pd.read_csv(
        io.BytesIO(await batch_csv(client, user_headers, "/segmentations/crm/predict/batch", exported_csv(table))),
        keep_default_na=False,
    )
    done = await score(settings, tmp_path, "--segmentation", "crm", "--input", "crm.parquet", "--output", "a.parquet")
    assert done.returncode == 0, done.stderr
    got = pq.read_table(tmp_path / "a.parquet").to_pandas()
    assert answers(got) == answers(want)
    assert [i for i, row in enumerate(answers(got)) if row[3] is not None] == [2, 4]


async def test_a_stored_version_that_is_not_active(
    client, settings, tmp_path, dataset, trained_model, analyst_headers, user_headers
):
    first = trained_model["model_version"]
    again = await client.post("/train", params={"n_clusters": 3}, headers=analyst_headers)
    assert again.status_code == 200, again.text
    done = await score(settings, tmp_path, "--version", first, "--input", str(dataset), "--output", "answer.csv")
    assert done.returncode == 0, done.stderr
    assert f"with version {first}" in done.stdout
    assert (await client.post(f"/models/{first}/activate", headers=analyst_headers)).status_code == 200
    assert (tmp_path / "answer.csv").read_bytes() == await batch_csv(
        client, user_headers, "/predict/batch", dataset.read_bytes()
    )
    unknown = await score(settings, tmp_path, "--version", "nope", "--input", str(dataset), "--output", "x.csv")
    assert unknown.returncode == 2 and "model version" in unknown.stderr.lower()


async def test_custom_kind_equals_predict_batch(client, settings, tmp_path, analyst_headers, user_headers):
    payload = {"name": "crm", "kind": "custom", "features": CRM_FEATURES, "id_column": "customer_id"}
    assert (await client.post("/segmentations", json=payload, headers=analyst_headers)).status_code == 201
    trained = await client.post(
        "/segmentations/crm/train",
        params={"random_state": 1},
        files={"file": ("crm.csv", as_csv(crm_table()), "text/csv")},
        headers=analyst_headers,
    )
    assert trained.status_code == 200, trained.text
    rows = crm_table(300, seed=9).astype(object)
    rows.loc[4, "visits"] = "many"
    rows.loc[6, "plan"] = "gold"  # unseen: accepted
    data = as_csv(rows)
    (tmp_path / "crm.csv").write_bytes(data)
    done = await score(settings, tmp_path, "--segmentation", "crm", "--input", "crm.csv", "--output", "answer.csv")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "answer.csv").read_bytes() == await batch_csv(
        client, user_headers, "/segmentations/crm/predict/batch", data
    )


async def test_rfm_kind_equals_predict_batch(client, settings, tmp_path, analyst_headers, user_headers):
    data, _ = synthetic_log(800)
    created = await client.post("/segmentations", json={"name": "shop", "kind": "rfm"}, headers=analyst_headers)
    assert created.status_code == 201
    trained = await client.post(
        "/segmentations/shop/train", files={"file": ("orders.csv", data, "text/csv")}, headers=analyst_headers
    )
    assert trained.status_code == 200, trained.text
    (tmp_path / "orders.csv").write_bytes(data)
    done = await score(settings, tmp_path, "--segmentation", "shop", "--input", "orders.csv", "--output", "answer.csv")
    assert done.returncode == 0, done.stderr
    expected = await batch_csv(client, user_headers, "/segmentations/shop/predict/batch", data)
    assert (tmp_path / "answer.csv").read_bytes() == expected
    done = await score(
        settings, tmp_path, "--segmentation", "shop", "--input", "orders.csv", "--output", "answer.parquet"
    )
    assert done.returncode == 0, done.stderr
    got = pq.read_table(tmp_path / "answer.parquet").to_pandas()
    want = pd.read_csv(io.BytesIO(expected), dtype={"customer_id": str})
    assert list(got.columns) == list(want.columns)
    assert got["customer_id"].tolist() == want["customer_id"].tolist()
    assert got["cluster"].tolist() == want["cluster"].tolist()
    # A log kept as Parquet is read as its CSV is.
    pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False).to_parquet(tmp_path / "orders.parquet")
    done = await score(
        settings, tmp_path, "--segmentation", "shop", "--input", "orders.parquet", "--output", "from_parquet.csv"
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "from_parquet.csv").read_bytes() == expected


@pytest.mark.parametrize(
    ("make", "args", "says"),
    [
        (None, ("--input", "missing.csv", "--output", "x.csv"), "no such file"),
        ("rows.csv", ("--input", "rows.csv", "--output", "x.json"), "give a .parquet or .csv file"),
        ("rows.txt", ("--input", "rows.txt", "--output", "x.csv"), "give a .parquet or .csv file"),
        ("fake.parquet", ("--input", "fake.parquet", "--output", "x.csv"), "not readable parquet"),
        ("header.csv", ("--input", "header.csv", "--output", "x.csv"), "no data rows"),
        ("other.csv", ("--input", "other.csv", "--output", "x.csv"), "missing required column"),
        ("other.parquet", ("--input", "other.parquet", "--output", "x.csv"), "spending_score (found: 'customerid'"),
    ],
)
async def test_bad_paths_and_formats_exit_2_saying_why(settings, tmp_path, dataset, trained_model, make, args, says):
    contents = {
        "rows.csv": dataset.read_bytes(),
        "rows.txt": dataset.read_bytes(),
        "fake.parquet": b"not parquet at all",
        "header.csv": dataset.read_bytes().splitlines()[0] + b"\n",
        "other.csv": b"a,b\n1,2\n",
        "other.parquet": parquet_of(pd.read_csv(dataset).drop(columns=["Spending_Score"])),
    }
    if make is not None:
        (tmp_path / make).write_bytes(contents[make])
    done = await score(settings, tmp_path, *args)
    assert done.returncode == 2
    assert says in done.stderr.lower(), done.stderr
    assert not (tmp_path / "x.csv").exists()


def test_the_service_and_the_command_line_never_import_pyspark():
    probe = "import sys, app.main, app.__main__, app.segmentations.batch_files; print('pyspark' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
