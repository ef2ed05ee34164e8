"""Data sources through HTTP: file sources (CSV, Parquet, globs) confined to SOURCE_ROOT, SQL sources
(SQLite under the root; PostgreSQL, with TEST_DATABASE_URL) run read-only, previews, and training from them."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import sqlite3
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import make_url

import generate_transactions
from app.core.tables import Role
from generate_dataset import generate
from tests.conftest import POSTGRES_SKIP_REASON

CUSTOMERS = generate(rows=300, seed=7)
PASSWORD = "Src-pw-7f3a9c1e"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "root"
    (folder / "exports").mkdir(parents=True)
    return folder


@pytest.fixture
def settings_overrides(root: Path) -> dict:
    return {"source_root": root, "source_statement_timeout_seconds": 1}


@pytest.fixture
async def admin(make_user) -> dict[str, str]:
    return (await make_user(Role.admin))[1]


async def create(client, headers, **body):
    return await client.post("/sources", json=body, headers=headers)


async def preview(client, headers, name):
    return await client.post(f"/sources/{name}/preview", headers=headers)


# --- file sources -----------------------------------------------------------------------------


async def test_a_csv_file_source_previews_and_trains(client, root, admin, analyst_headers):
    CUSTOMERS.to_csv(root / "exports" / "customers.csv", index=False)
    created = await create(client, admin, name="exports", kind="file", path="exports/customers.csv")
    assert created.status_code == 201, created.text
    assert created.json()["path"] == "exports/customers.csv" and created.json()["url"] is None

    listed = await client.get("/sources", headers=analyst_headers)
    assert [s["name"] for s in listed.json()["sources"]] == ["exports"]
    assert (await client.get("/sources/exports", headers=analyst_headers)).json()["kind"] == "file"

    shown = await preview(client, analyst_headers, "exports")
    assert shown.status_code == 200, shown.text
    body = shown.json()
    assert body["columns"] == list(CUSTOMERS.columns)
    assert len(body["rows"]) == 20
    # CSV cells are text, exactly as written.
    assert body["rows"][0] == [str(v) for v in CUSTOMERS.iloc[0].tolist()]

    trained = await client.post("/train", params={"n_clusters": 3}, json={"source": "exports"}, headers=analyst_headers)
    assert trained.status_code == 200, trained.text
    assert trained.json()["n_samples"] == len(CUSTOMERS) and trained.json()["n_clusters"] == 3


async def test_a_glob_reads_every_match_in_sorted_order(client, root, admin, analyst_headers):
    CUSTOMERS.iloc[100:].to_csv(root / "exports" / "part-2.csv", index=False)
    CUSTOMERS.iloc[:100].to_csv(root / "exports" / "part-1.csv", index=False)
    (root / "exports" / "notes.txt").write_text("not a match")
    assert (await create(client, admin, name="parts", kind="file", path="exports/part-*.csv")).status_code == 201

    body = (await preview(client, analyst_headers, "parts")).json()
    assert body["rows"][0][0] == str(CUSTOMERS.iloc[0]["CustomerID"])  # part-1 first
    trained = await client.post(
        "/segmentations/default/train", params={"n_clusters": 4}, json={"source": "parts"}, headers=analyst_headers
    )
    assert trained.status_code == 200, trained.text
    assert trained.json()["n_samples"] == len(CUSTOMERS)

    CUSTOMERS.iloc[:10].drop(columns="Sex").to_csv(root / "exports" / "part-3.csv", index=False)
    mismatched = await client.post("/train", json={"source": "parts"}, headers=analyst_headers)
    assert mismatched.status_code == 422 and "part-3.csv" in mismatched.json()["detail"]


async def test_parquet_files_keep_their_types(client, root, admin, analyst_headers):
    CUSTOMERS.iloc[:150].to_parquet(root / "exports" / "a.parquet", index=False)
    CUSTOMERS.iloc[150:].to_parquet(root / "exports" / "b.parquet", index=False)
    assert (await create(client, admin, name="lake", kind="file", path="exports/*.parquet")).status_code == 201

    body = (await preview(client, analyst_headers, "lake")).json()
    first = CUSTOMERS.iloc[0]
    assert body["rows"][0] == [int(first["CustomerID"]), first["Sex"], int(first["Age"]), float(first["Annual_Income"]),
                               int(first["Spending_Score"]), int(first["Purchase_Frequency"])]  # fmt: skip
    created = await client.post(
        "/segmentations",
        json={
            "name": "spend",
            "kind": "custom",
            "features": [{"name": "Annual_Income", "type": "numeric"}, {"name": "Sex", "type": "categorical"}],
        },
        headers=analyst_headers,
    )
    assert created.status_code == 201, created.text
    trained = await client.post(
        "/segmentations/spend/train", params={"n_clusters": 2}, json={"source": "lake"}, headers=analyst_headers
    )
    assert trained.status_code == 200, trained.text
    assert trained.json()["n_samples"] == len(CUSTOMERS)


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("../outside.csv", "`..`"),
        ("exports/../../outside.csv", "`..`"),
        ("/etc/customers.csv", "absolute"),
        ("C:/data/customers.csv", "absolute"),
        ("exports/customers.xlsx", ".csv or .parquet"),
        ("", "relative to SOURCE_ROOT"),
    ],
)
async def test_paths_that_could_leave_the_root_are_refused(client, admin, path, says):
    response = await create(client, admin, name="bad", kind="file", path=path)
    assert response.status_code == 422 and says in response.json()["detail"], response.text


async def test_symlinks_out_of_the_root_are_refused_at_creation_and_at_every_read(
    client, root, tmp_path, admin, analyst_headers
):
    outside = tmp_path / "secret.csv"
    CUSTOMERS.to_csv(outside, index=False)
    (root / "exports" / "link.csv").symlink_to(outside)
    refused = await create(client, admin, name="link", kind="file", path="exports/link.csv")
    assert refused.status_code == 422 and "outside SOURCE_ROOT" in refused.json()["detail"]

    # Declared while nothing matched; a symlink out appears later, among good files: the read refuses it.
    assert (await create(client, admin, name="later", kind="file", path="exports/later*.csv")).status_code == 201
    missing = await preview(client, analyst_headers, "later")
    assert missing.status_code == 422 and "no file under SOURCE_ROOT matches" in missing.json()["detail"]
    CUSTOMERS.to_csv(root / "exports" / "later-1.csv", index=False)
    (root / "exports" / "later-2.csv").symlink_to(outside)
    for response in (
        await preview(client, analyst_headers, "later"),
        await client.post("/train", json={"source": "later"}, headers=analyst_headers),
    ):
        assert response.status_code == 422 and "outside SOURCE_ROOT" in response.json()["detail"], response.text

    # A folder symlinked out of the root is refused the same way.
    (tmp_path / "elsewhere").mkdir()
    CUSTOMERS.to_csv(tmp_path / "elsewhere" / "c.csv", index=False)
    (root / "mounted").symlink_to(tmp_path / "elsewhere")
    refused = await create(client, admin, name="mounted", kind="file", path="mounted/*.csv")
    assert refused.status_code == 422 and "outside SOURCE_ROOT" in refused.json()["detail"]


@pytest.mark.parametrize("settings_overrides", [{}])
async def test_without_source_root_file_and_sqlite_sources_are_refused(client, admin):
    refused = await create(client, admin, name="exports", kind="file", path="exports/customers.csv")
    assert refused.status_code == 422 and "SOURCE_ROOT is not set" in refused.json()["detail"]
    refused = await create(client, admin, name="shop", kind="sql", url="sqlite:///shop.db", query="SELECT 1")
    assert refused.status_code == 422 and "SOURCE_ROOT is not set" in refused.json()["detail"]


# --- the catalogue ----------------------------------------------------------------------------


async def test_roles_names_and_deletion(client, root, make_user, admin, analyst_headers, user_headers):
    body = {"name": "exports", "kind": "file", "path": "exports/customers.csv"}
    assert (await create(client, analyst_headers, **body)).status_code == 403
    assert (await create(client, user_headers, **body)).status_code == 403
    assert (await client.get("/sources", headers=user_headers)).status_code == 403
    assert (await preview(client, user_headers, "exports")).status_code == 403
    assert (await client.post("/sources", json=body)).status_code == 401

    assert (await create(client, admin, **body)).status_code == 201
    taken = await create(client, admin, **body)
    assert taken.status_code == 409 and "already exists" in taken.json()["detail"]
    assert (await create(client, admin, **{**body, "name": "Bad Name"})).status_code == 422
    assert (await create(client, admin, **{**body, "url": "sqlite:///x.db"})).status_code == 422

    assert (await client.delete("/sources/exports", headers=analyst_headers)).status_code == 403
    assert (await client.delete("/sources/exports", headers=admin)).status_code == 204
    assert (await client.get("/sources/exports", headers=analyst_headers)).status_code == 404
    assert (await preview(client, analyst_headers, "exports")).status_code == 404
    assert (await client.delete("/sources/exports", headers=admin)).status_code == 404
    unknown = await client.post("/train", json={"source": "exports"}, headers=analyst_headers)
    assert unknown.status_code == 404 and unknown.json()["detail"] == "Source not found"
    unknown = await client.post("/train", params={"wait": "false"}, json={"source": "nope"}, headers=analyst_headers)
    assert unknown.status_code == 404


async def test_a_source_too_large_for_a_training_is_413(client, root, admin, analyst_headers, settings):
    CUSTOMERS.to_csv(root / "exports" / "customers.csv", index=False)
    settings.max_train_upload_mb = 0.001  # read at every training
    assert (await create(client, admin, name="big", kind="file", path="exports/customers.csv")).status_code == 201
    response = await client.post("/train", json={"source": "big"}, headers=analyst_headers)
    assert response.status_code == 413 and "MAX_TRAIN_UPLOAD_MB" in response.json()["detail"]


# --- SQL sources without a server -------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql+asyncpg://reader:pw@127.0.0.1:5432/shop", "loopback"),
        ("postgresql+asyncpg://reader:pw@localhost/shop", "loopback"),
        ("postgresql+psycopg://reader:pw@[::ffff:127.0.0.1]/shop", "written as IPv6"),
        ("postgresql+asyncpg://reader:pw@10.1.2.3/shop", "private"),
        ("postgresql+asyncpg://reader:pw@100.64.0.7/shop", "shared"),
        ("postgresql+asyncpg://reader:pw@169.254.169.254/shop", "link-local"),
        ("postgresql+asyncpg://reader:pw@0.0.0.0/shop", "unspecified"),
        ("postgresql+asyncpg://reader:pw@224.0.0.1/shop", "multicast"),
        ("postgresql+asyncpg://reader:pw@db.invalid/shop", "does not resolve"),
        ("postgresql+asyncpg://reader:pw@8.8.8.8/shop?sslmode=disable", "query options"),
        ("mysql://reader:pw@8.8.8.8/shop", "must be postgresql+asyncpg"),
        ("postgresql+asyncpg://reader:pw@/shop", "host"),
        ("not a url, pw", "not a valid database URL"),
        ("sqlite:////etc/shop.db", "absolute"),
        ("sqlite:///../shop.db", "`..`"),
    ],
)
async def test_sql_urls_and_hosts_are_checked(client, admin, url, says):
    response = await create(client, admin, name="crm", kind="sql", url=url, query="SELECT 1")
    assert response.status_code == 422 and says in response.json()["detail"], response.text
    assert "pw" not in response.json()["detail"]


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("DELETE FROM customers", "only a SELECT"),
        ("SELECT 1; DROP TABLE customers", "exactly one statement"),
        ("WITH gone AS (DELETE FROM customers RETURNING *) SELECT * FROM gone", "DELETE is not allowed"),
        ("   ", "one SELECT"),
    ],
)
async def test_only_one_select_is_accepted(client, admin, query, says):
    response = await create(client, admin, name="crm", kind="sql", url="sqlite:///shop.db", query=query)
    assert response.status_code == 422 and says in response.json()["detail"], response.text


def _sqlite_shop(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        CUSTOMERS.to_sql("customers", connection, index=False)


async def test_a_sqlite_file_is_read_only_and_stopped_past_the_timeout(client, root, admin, analyst_headers):
    _sqlite_shop(root / "shop.db")
    query = "SELECT CustomerID, Sex, Age, Annual_Income, Spending_Score, Purchase_Frequency FROM customers"
    assert (
        await create(client, admin, name="shop", kind="sql", url="sqlite:///shop.db", query=query)
    ).status_code == 201
    body = (await preview(client, analyst_headers, "shop")).json()
    assert body["columns"][0] == "CustomerID" and body["rows"][0][0] == int(CUSTOMERS.iloc[0]["CustomerID"])
    trained = await client.post("/train", params={"n_clusters": 3}, json={"source": "shop"}, headers=analyst_headers)
    assert trained.status_code == 200 and trained.json()["n_samples"] == len(CUSTOMERS), trained.text

    endless = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT count(*) FROM n"
    assert (
        await create(client, admin, name="endless", kind="sql", url="sqlite:///shop.db", query=endless)
    ).status_code == 201
    stopped = await preview(client, analyst_headers, "endless")
    assert stopped.status_code == 422 and "SOURCE_STATEMENT_TIMEOUT_SECONDS" in stopped.json()["detail"]

    # A statement the static check lets through still cannot reach beyond reading.
    attach = "SELECT * FROM pragma_table_info('customers')"
    assert (
        await create(client, admin, name="pragma", kind="sql", url="sqlite:///shop.db", query=attach)
    ).status_code == 201
    refused = await preview(client, analyst_headers, "pragma")
    assert refused.status_code == 422, refused.text


# --- PostgreSQL ---------------------------------------------------------------------------------


@pytest.fixture
async def pg_schema():
    """A schema of customers and transactions in the TEST_DATABASE_URL database, and a source URL to it
    (with a password: the test server trusts local connections, so any password is accepted)."""
    url = os.environ.get("TEST_DATABASE_URL")
    if not url:
        pytest.skip(POSTGRES_SKIP_REASON)
    base = make_url(url)
    schema = f"src_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
    connection = await asyncpg.connect(
        host=base.host, port=base.port or 5432, user=base.username, password=base.password, database=base.database
    )
    try:
        await connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}")
        await connection.execute(
            f"CREATE TABLE {schema}.customers (customer_id text, sex text, age int, annual_income numeric, "
            "spending_score int, purchase_frequency int)"
        )
        await connection.copy_records_to_table(
            "customers",
            schema_name=schema,
            records=[
                (
                    f"{int(r.CustomerID):05d}",
                    r.Sex,
                    int(r.Age),
                    r.Annual_Income,
                    int(r.Spending_Score),
                    int(r.Purchase_Frequency),
                )
                for r in CUSTOMERS.itertuples()
            ],  # fmt: skip
        )
        log = generate_transactions.generate(400, 7)[0].to_pandas()
        await connection.execute(
            f"CREATE TABLE {schema}.transactions (customer_id text, order_id text, date date, amount numeric)"
        )
        await connection.copy_records_to_table(
            "transactions",
            schema_name=schema,
            records=[(r.customer_id, r.order_id, dt.date.fromisoformat(r.date), r.amount) for r in log.itertuples()],
        )
        await connection.execute(f"CREATE SEQUENCE {schema}.counter")
        source_url = base.set(drivername="postgresql+asyncpg", password=PASSWORD).render_as_string(hide_password=False)
        yield {"schema": schema, "url": source_url, "log": log, "connection": connection}
        await connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await connection.close()


PG = {"source_allow_private": True, "source_statement_timeout_seconds": 1}


@pytest.mark.parametrize("settings_overrides", [PG])
async def test_postgres_sources_preview_and_train_without_showing_the_password(
    client, pg_schema, admin, analyst_headers, caplog
):
    caplog.set_level(logging.DEBUG)
    schema, url = pg_schema["schema"], pg_schema["url"]
    answers = []
    created = await create(
        client,
        admin,
        name="crm",
        kind="sql",
        url=url,
        query=f"SELECT * FROM {schema}.customers ORDER BY customer_id;",
    )
    answers.append(created)
    assert created.status_code == 201, created.text
    assert created.json()["url"].count("***") == 1
    assert created.json()["query"].endswith("ORDER BY customer_id")
    answers.append(await client.get("/sources/crm", headers=analyst_headers))
    answers.append(await client.get("/sources", headers=analyst_headers))

    shown = await preview(client, analyst_headers, "crm")
    answers.append(shown)
    assert shown.json()["columns"] == [
        "customer_id", "sex", "age", "annual_income", "spending_score", "purchase_frequency"
    ]  # fmt: skip
    assert len(shown.json()["rows"]) == 20 and shown.json()["rows"][0][0] == "00001"

    trained = await client.post("/train", params={"n_clusters": 3}, json={"source": "crm"}, headers=analyst_headers)
    answers.append(trained)
    assert trained.status_code == 200, trained.text
    assert trained.json()["n_samples"] == len(CUSTOMERS)

    # An rfm segmentation trains on the transaction log, as a job.
    assert (
        await client.post("/segmentations", json={"name": "shop", "kind": "rfm"}, headers=analyst_headers)
    ).status_code == 201
    assert (
        await create(client, admin, name="orders", kind="sql", url=url, query=f"SELECT * FROM {schema}.transactions")
    ).status_code == 201
    started = await client.post(
        "/segmentations/shop/train",
        params={"n_clusters": 4, "wait": "false"},
        json={"source": "orders"},
        headers=analyst_headers,
    )
    assert started.status_code == 202, started.text
    job = await finished(client, analyst_headers, started.json()["job_id"])
    answers.append(job)
    assert job["state"] == "succeeded", job
    log = pg_schema["log"]
    assert job["result"]["n_samples"] == log["customer_id"].nunique()
    assert job["result"]["n_transactions"] == len(log)

    for answer in answers:
        assert PASSWORD not in (answer.text if hasattr(answer, "text") else str(answer))
    assert PASSWORD not in caplog.text
    stored = await pg_schema["connection"].fetch("SELECT 1")  # the schema is still there
    assert stored


async def finished(client, headers, job_id) -> dict:
    """GET /jobs/{id} until the job has ended (a bounded number of polls, no clock)."""
    for _ in range(2000):
        job = (await client.get(f"/jobs/{job_id}", headers=headers)).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"the job never ended: {job}")


@pytest.mark.parametrize("settings_overrides", [PG])
async def test_postgres_sources_cannot_write_and_stop_past_the_statement_timeout(
    client, pg_schema, admin, analyst_headers
):
    schema, url = pg_schema["schema"], pg_schema["url"]
    for query in (f"DELETE FROM {schema}.customers", f"SELECT 1; DROP TABLE {schema}.customers"):
        refused = await create(client, admin, name="evil", kind="sql", url=url, query=query)
        assert refused.status_code == 422, refused.text

    # A SELECT with a side effect passes the static check; the read-only transaction refuses it.
    sneaky = f"SELECT nextval('{schema}.counter') AS n"
    assert (await create(client, admin, name="sneaky", kind="sql", url=url, query=sneaky)).status_code == 201
    refused = await preview(client, analyst_headers, "sneaky")
    assert refused.status_code == 422 and "read-only" in refused.json()["detail"], refused.text
    assert await pg_schema["connection"].fetchval(f"SELECT count(*) FROM {schema}.customers") == len(CUSTOMERS)

    assert (
        await create(client, admin, name="slow", kind="sql", url=url, query="SELECT pg_sleep(10)")
    ).status_code == 201
    stopped = await preview(client, analyst_headers, "slow")
    assert stopped.status_code == 422 and "SOURCE_STATEMENT_TIMEOUT_SECONDS" in stopped.json()["detail"]
    started = await client.post("/train", params={"wait": "false"}, json={"source": "slow"}, headers=analyst_headers)
    assert started.status_code == 202, started.text
    job = await finished(client, analyst_headers, started.json()["job_id"])
    assert job["state"] == "failed" and job["error_status"] == 422
    assert "SOURCE_STATEMENT_TIMEOUT_SECONDS" in job["error"]["detail"]

    broken = await create(client, admin, name="broken", kind="sql", url=url, query="SELECT * FROM no_such_table")
    assert broken.status_code == 201
    failed = await preview(client, analyst_headers, "broken")
    assert failed.status_code == 422 and "no_such_table" in failed.json()["detail"]
