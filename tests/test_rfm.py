"""Kind `rfm` through HTTP: a transaction log in, per-customer RFM rows, scores and named segments out.

The RFM fields are checked against an independent pandas computation of the contract's
definitions, on the generator's logs and on the public CDNOW log that the `lifetimes` package
ships (read as a data file).
"""

from __future__ import annotations

import importlib.util
import io
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import generate_transactions
from app.ml.rfm import SEGMENT_GRID
from app.ml.value import VALUE_FIELDS

pytestmark = pytest.mark.postgres

RFM_NAMES = {name for row in SEGMENT_GRID for name in row}
ANSWER = [
    "customer_id",
    "recency_days",
    "frequency",
    "monetary",
    "tenure_days",
    "avg_order_value",
    "r_score",
    "f_score",
    "m_score",
    "rfm_segment",
    "cluster",
    "cluster_name",
    "confidence",
    *VALUE_FIELDS,
]
JSON_ANSWER = [*ANSWER[:10], *VALUE_FIELDS, "cluster", "cluster_name", "confidence"]
"""A JSON batch row's keys: the RFM row and its value fields, then its segment."""


def synthetic_log(customers: int = 3000, seed: int = 7) -> tuple[bytes, pd.DataFrame]:
    log, labels = generate_transactions.generate(customers, seed)
    frame = log.to_pandas()
    return frame.to_csv(index=False).encode(), labels.to_pandas()


def expected_rfm(
    log: pd.DataFrame, *, as_of: date | None = None, order: str | None = "order_id", amount: str = "amount"
) -> pd.DataFrame:
    """The contract's definitions, computed directly with pandas (not with the service's code)."""
    frame = log.copy()
    frame["customer_id"] = frame["customer_id"].astype(str).str.strip()
    frame = frame[frame["customer_id"] != ""]
    text = frame["date"].astype(str).str.strip()
    frame["day"] = pd.to_datetime(
        text.where(~text.str.fullmatch(r"\d{8}"), text.str[:4] + "-" + text.str[4:6] + "-" + text.str[6:8]).str[:10],
        format="%Y-%m-%d",
    )
    if as_of is None:
        as_of_ts = frame["day"].max() + pd.Timedelta(days=1)
    else:
        as_of_ts = pd.Timestamp(as_of)
        frame = frame[frame["day"] <= as_of_ts]
    frame["amount"] = frame[amount].astype(float)
    frame["row"] = np.arange(len(frame))
    frame["purchase_day"] = frame["day"]
    unit = order if order is not None else "purchase_day"
    purchases = frame.groupby(["customer_id", unit], sort=False).agg(
        net=("amount", "sum"), day=("day", "min"), row=("row", "min")
    )
    purchases = purchases.reset_index()
    counted = purchases[purchases["net"] >= 0]
    out = pd.DataFrame(
        {
            "monetary": purchases.groupby("customer_id")["net"].sum(),
            "first_row": purchases.groupby("customer_id")["row"].min(),
            "frequency": counted.groupby("customer_id").size(),
            "last": counted.groupby("customer_id")["day"].max(),
            "first": counted.groupby("customer_id")["day"].min(),
        }
    )
    out = out[out["frequency"].notna()].sort_values("first_row")
    out["recency_days"] = (as_of_ts - out["last"]).dt.days
    out["tenure_days"] = (as_of_ts - out["first"]).dt.days
    out["frequency"] = out["frequency"].astype(int)
    out["avg_order_value"] = out["monetary"] / out["frequency"]
    return out.reset_index()[["customer_id", "recency_days", "frequency", "monetary", "tenure_days", "avg_order_value"]]


def assert_same_rfm(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert got["customer_id"].tolist() == want["customer_id"].tolist()
    for column in ("recency_days", "frequency", "tenure_days"):
        assert got[column].astype(int).tolist() == want[column].astype(int).tolist(), column
    for column in ("monetary", "avg_order_value"):
        np.testing.assert_allclose(got[column].astype(float), want[column].astype(float), rtol=1e-9, atol=1e-5)


async def create(client, headers, name="shop", **body):
    return await client.post("/segmentations", json={"name": name, "kind": "rfm", **body}, headers=headers)


async def train(client, headers, data: bytes, name="shop", **params):
    return await client.post(
        f"/segmentations/{name}/train",
        params=params,
        files={"file": ("orders.csv", data, "text/csv")},
        headers=headers,
    )


async def score_csv(client, headers, data: bytes, name="shop", **params) -> pd.DataFrame:
    answer = await client.post(
        f"/segmentations/{name}/predict/batch",
        params=params,
        files={"file": ("orders.csv", data, "text/csv")},
        headers=headers | {"Accept": "text/csv"},
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/csv")
    return pd.read_csv(io.BytesIO(answer.content), dtype={"customer_id": str})


@pytest.fixture
async def shop(client, analyst_headers):
    data, labels = synthetic_log()
    assert (await create(client, analyst_headers)).status_code == 201
    trained = await train(client, analyst_headers, data, random_state=3)
    assert trained.status_code == 200, trained.text
    return data, labels, trained.json()


# --- creating --------------------------------------------------------------------------------------


async def test_an_rfm_segmentation_shows_its_features_and_mapping(client, analyst_headers, user_headers):
    created = await create(client, analyst_headers, columns={"customer_id": "Client", "date": "Day", "amount": "Total"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["kind"] == "rfm"
    assert [f["name"] for f in body["features"]] == ["recency_days", "frequency", "monetary"]
    assert body["columns"] == {"customer_id": "Client", "date": "Day", "amount": "Total"}
    assert set(body["customer_schema"]["required"]) == {"recency_days", "frequency", "monetary"}
    listed = (await client.get("/segmentations", headers=user_headers)).json()["segmentations"]
    assert [s["kind"] for s in listed] == ["customer", "rfm"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"columns": {"customer": "x"}}, "unknown key"),
        ({"columns": {"quantity": "q"}}, "both quantity and price"),
        ({"columns": {"amount": "a", "quantity": "q", "price": "p"}}, "either amount"),
        ({"columns": {"customer_id": "x", "date": "X"}}, "same header"),
        ({"columns": {"date_format": "dd/mm/yyyy"}}, "strftime"),
        ({"features": [{"name": "a", "type": "numeric"}]}, "leave `features`"),
    ],
)
async def test_bad_declarations_are_422_naming_the_problem(client, analyst_headers, body, says):
    answer = await create(client, analyst_headers, **body)
    assert answer.status_code == 422, answer.text
    assert says in answer.json()["detail"]


async def test_columns_are_for_rfm_only(client, analyst_headers):
    answer = await client.post(
        "/segmentations",
        json={"name": "crm", "kind": "customer", "columns": {"date": "d"}},
        headers=analyst_headers,
    )
    assert answer.status_code == 422 and "kind rfm" in answer.json()["detail"]


# --- training --------------------------------------------------------------------------------------


async def test_training_reports_the_log_and_names_segments_in_rfm_words(client, analyst_headers, shop):
    data, labels, result = shop
    log = pd.read_csv(io.BytesIO(data), dtype=str)
    assert result["segmentation"] == "shop"
    assert result["n_transactions"] == len(log)
    assert result["n_samples"] == log["customer_id"].nunique() - result["skipped_customers"]
    assert result["skipped_rows"] == 0 and result["rows_after_as_of"] == 0
    assert result["as_of"] == "2026-01-01"  # the day after the log's last date
    assert result["columns"]["order_id"] == "order_id"  # an order_id column is used when present

    clusters = (await client.get("/segmentations/shop/clusters", headers=analyst_headers)).json()
    names = [c["cluster_name"] for c in clusters["clusters"]]
    assert len(set(names)) == len(names)
    for name in names:
        assert name.split(",")[0].rstrip(" 0123456789") in RFM_NAMES, name
    assert sum(c["revenue_share"] for c in clusters["clusters"]) == pytest.approx(100, abs=0.1)
    # Each segment's revenue share and means, recomputed from the per-customer table.
    table = await score_csv(client, analyst_headers, data)
    revenue = table.groupby("cluster")["monetary"].sum() / table["monetary"].sum() * 100
    for cluster in clusters["clusters"]:
        i = cluster["cluster_id"]
        assert cluster["revenue_share"] == pytest.approx(revenue[i], abs=0.01)
        members = table[table["cluster"] == i]
        assert cluster["size"] == len(members)
        assert cluster["means"]["recency_days"] == pytest.approx(members["recency_days"].mean(), abs=1e-3)
        assert cluster["means"]["monetary"] == pytest.approx(members["monetary"].mean(), rel=1e-6)


async def test_the_latent_behaviours_are_recovered(client, analyst_headers, shop):
    from sklearn.metrics import adjusted_rand_score

    data, labels, _ = shop
    table = await score_csv(client, analyst_headers, data)
    truth = labels.set_index("customer_id").loc[table["customer_id"], "behaviour"]
    assert adjusted_rand_score(truth, table["cluster"]) >= 0.8


async def test_the_batch_table_equals_an_independent_computation(client, analyst_headers, shop):
    data, _, _ = shop
    got = await score_csv(client, analyst_headers, data)
    assert got.columns.tolist() == ANSWER
    assert_same_rfm(got, expected_rfm(pd.read_csv(io.BytesIO(data), dtype={"customer_id": str, "order_id": str})))
    assert got["customer_id"].str.len().eq(7).all()  # text ids keep their zeros


async def test_scores_follow_the_cut_points_learned_at_training(client, analyst_headers, shop):
    data, _, _ = shop
    trained_on = await score_csv(client, analyst_headers, data)
    cuts = {
        name: np.quantile(trained_on[name].astype(float), [0.2, 0.4, 0.6, 0.8])
        for name in ("recency_days", "frequency", "monetary")
    }
    r = 1 + (trained_on["recency_days"].to_numpy()[:, None] < cuts["recency_days"][None, :]).sum(axis=1)
    f = 1 + (trained_on["frequency"].to_numpy()[:, None] > cuts["frequency"][None, :]).sum(axis=1)
    m = 1 + (trained_on["monetary"].to_numpy()[:, None] > cuts["monetary"][None, :] + 1e-9).sum(axis=1)
    assert trained_on["r_score"].tolist() == r.tolist()
    assert trained_on["f_score"].tolist() == f.tolist()
    assert (np.abs(trained_on["m_score"].to_numpy() - m) <= 1).all()  # cuts are stored rounded to 1e-6
    assert [SEGMENT_GRID[a - 1][b - 1] for a, b in zip(r, f, strict=True)] == trained_on["rfm_segment"].tolist()

    # A later log is scored with the same cuts: one customer, much more recent, gets the top r_score.
    later = b"customer_id,date,amount\nNEW1,2025-12-30,10\nNEW1,2025-12-31,5\n"
    scored = await score_csv(client, analyst_headers, later, as_of="2026-01-01")
    assert scored.loc[0, "recency_days"] == 1 and scored.loc[0, "frequency"] == 2
    assert scored.loc[0, "r_score"] == 1 + int((cuts["recency_days"] > 1).sum())


async def test_json_batches_carry_every_field(client, analyst_headers, shop):
    data, _, _ = shop
    answer = await client.post(
        "/segmentations/shop/predict/batch",
        files={"file": ("orders.csv", data, "text/csv")},
        headers=analyst_headers,
    )
    assert answer.status_code == 200, answer.text
    rows = answer.json()["predictions"]
    assert list(rows[0]) == JSON_ANSWER
    assert rows[0]["customer_id"].isdigit() and len(rows[0]["customer_id"]) == 7

    by_values = await client.post(
        "/segmentations/shop/predict/batch",
        json={"customers": [{"recency_days": 5, "frequency": 20, "monetary": 2000.0}]},
        headers=analyst_headers,
    )
    assert by_values.status_code == 200, by_values.text
    (row,) = by_values.json()["predictions"]
    assert row["avg_order_value"] == 100.0 and row["r_score"] >= 4 and row["f_score"] == 5


async def test_predict_with_values_or_with_transactions(client, user_headers, shop):
    data, _, _ = shop
    log = pd.read_csv(io.BytesIO(data), dtype={"customer_id": str, "order_id": str})
    customer = log[log["customer_id"] == log["customer_id"].iloc[-1]]
    table = expected_rfm(log)
    row = table[table["customer_id"] == customer["customer_id"].iloc[0]].iloc[0]
    transactions = [
        {"date": d, "amount": a, "order_id": o}
        for d, a, o in zip(customer["date"], customer["amount"], customer["order_id"], strict=True)
    ]
    by_log = await client.post(
        "/segmentations/shop/predict",
        json={"transactions": transactions, "as_of": "2026-01-01"},
        headers=user_headers,
    )
    assert by_log.status_code == 200, by_log.text
    got = by_log.json()
    assert got["segmentation"] == "shop"
    assert got["customer_data"]["recency_days"] == row["recency_days"]
    assert got["customer_data"]["frequency"] == row["frequency"]
    assert got["customer_data"]["monetary"] == pytest.approx(row["monetary"])
    assert got["customer_data"]["tenure_days"] == row["tenure_days"]
    assert got["customer_data"]["rfm_segment"] in RFM_NAMES

    values = {name: got["customer_data"][name] for name in ("recency_days", "frequency", "monetary")}
    by_values = await client.post("/segmentations/shop/predict", json={"customer": values}, headers=user_headers)
    assert by_values.status_code == 200, by_values.text
    assert by_values.json()["cluster"] == got["cluster"]
    assert by_values.json()["confidence"] == pytest.approx(got["confidence"])

    history = (await client.get("/segmentations/shop/history", headers=user_headers)).json()
    assert history["total"] == 2

    # Without as_of, the transactions are counted as of today (UTC).
    today = await client.post(
        "/segmentations/shop/predict",
        json={"transactions": [{"date": "2025-12-01", "amount": 10}]},
        headers=user_headers,
    )
    assert today.status_code == 200
    assert today.json()["customer_data"]["recency_days"] == (date.today() - date(2025, 12, 1)).days


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"transactions": [{"date": "01/02/2025", "amount": 1}]}, 422, "row 1 date"),
        ({"transactions": [{"date": "2025-01-01", "amount": -5}]}, 422, "no counted purchase"),
        ({"transactions": [{"date": "2025-01-01", "amount": 5}], "customer": {}}, 422, "exactly one"),
        ({"customer": {"recency_days": 3, "frequency": 2}}, 422, "monetary"),
        ({"customer": {"recency_days": -3, "frequency": 2, "monetary": 5}}, 422, "recency_days"),
        ({"transactions": [{"date": "2025-01-01", "amount": 5}], "as_of": "tomorrow"}, 422, "as_of"),
    ],
)
async def test_bad_predict_bodies_are_422(client, user_headers, shop, body, status, says):
    answer = await client.post("/segmentations/shop/predict", json=body, headers=user_headers)
    assert answer.status_code == status, answer.text
    assert says in answer.text


async def test_more_than_10000_transactions_are_refused(client, user_headers, shop):
    body = {"transactions": [{"date": "2025-01-01", "amount": 1}] * 10_001}
    answer = await client.post("/segmentations/shop/predict", json=body, headers=user_headers)
    assert answer.status_code == 422


async def test_transactions_are_for_rfm_only(client, user_headers):
    answer = await client.post(
        "/segmentations/default/predict",
        json={"transactions": [{"date": "2025-01-01", "amount": 1}]},
        headers=user_headers,
    )
    assert answer.status_code == 422


# --- reading logs ----------------------------------------------------------------------------------


async def test_headers_dates_returns_and_skipped_rows(client, analyst_headers):
    mapping = {"customer_id": "Client", "date": "When", "quantity": "Qty", "price": "Unit Price"}
    assert (await create(client, analyst_headers, name="lines", columns=mapping)).status_code == 201
    rows = ["CLIENT,when,QTY,unit price,ignored"]
    rng = np.random.default_rng(1)
    for i in range(400):
        client_id = f"{i % 80:04d}"
        day = date(2024, 1, 1) + timedelta(days=int(rng.integers(0, 300)))
        when = day.strftime("%Y%m%d") if i % 3 == 0 else f"{day.isoformat()}T10:{i % 60:02d}:00"
        rows.append(f"{client_id},{when},{1 + i % 4},{round(5 + rng.random() * 50, 2)},x")
    rows.append(",2024-05-01,1,10,x")  # no customer id: skipped and counted
    rows.append("0001,2024-06-01,-30,10,x")  # a return bigger than that day's purchases
    rows.append("0079,2024-12-31,1,10,x")  # after as_of: left out and counted
    data = ("\n".join(rows) + "\n").encode()
    trained = await train(client, analyst_headers, data, name="lines", n_clusters=3, as_of="20241101")
    assert trained.status_code == 200, trained.text
    body = trained.json()
    assert body["skipped_rows"] == 1 and body["rows_after_as_of"] == 1 and body["as_of"] == "2024-11-01"
    assert body["n_transactions"] == 403
    assert body["columns"] == {"customer_id": "CLIENT", "date": "when", "quantity": "QTY", "price": "unit price"}

    got = await score_csv(client, analyst_headers, data, name="lines", as_of="2024-11-01")
    log = pd.read_csv(io.BytesIO(data), dtype={"CLIENT": str}, keep_default_na=False)
    log = log.rename(columns={"CLIENT": "customer_id", "when": "date"})
    log["amount"] = log["QTY"].astype(float) * log["unit price"].astype(float)
    want = expected_rfm(log, as_of=date(2024, 11, 1), order=None)
    assert_same_rfm(got, want)
    assert "0001" in got["customer_id"].tolist()


async def test_unreadable_dates_and_amounts_are_422_naming_rows(client, analyst_headers):
    assert (await create(client, analyst_headers)).status_code == 201
    data = b"customer_id,date,amount\n1,2024-01-01,5\n2,2024-02-30,5\n3,2024-01-03,five\n4,,5\n"
    answer = await train(client, analyst_headers, data)
    assert answer.status_code == 422
    body = answer.json()
    assert "3 of 4 rows" in body["detail"]
    assert [(e["row"], e["line"], e["column"]) for e in body["errors"]] == [
        (2, 3, "date"),
        (3, 4, "amount"),
        (4, 5, "date"),
    ]


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"customer,date,amount\n1,2024-01-01,5\n", "customer_id"),
        (b"customer_id,date,amount\n", "no rows"),
        (b"customer_id,date,amount\n1,2024-01-01,-5\n", "no customer"),
        (b"customer_id,date,amount\n,2024-01-01,5\n  ,2024-01-02,6\n", "2 rows without a customer id"),
        (b"\x00\x01\x02", "binary"),
        (b"customer_id,date,amount\n1,2024-01-01,5\n\xff\xfe,2024-01-01,5\n", "UTF-8"),
    ],
)
async def test_unusable_logs_are_422(client, analyst_headers, data, says):
    assert (await create(client, analyst_headers)).status_code == 201
    answer = await train(client, analyst_headers, data)
    assert answer.status_code == 422, answer.text
    assert says in answer.json()["detail"]


async def test_a_date_format_reads_other_dates(client, analyst_headers):
    mapping = {"date_format": "%d/%m/%Y"}
    assert (await create(client, analyst_headers, name="eu", columns=mapping)).status_code == 201
    rows = ["customer_id,date,amount"] + [
        f"c{i % 30},{(date(2024, 1, 1) + timedelta(days=i)).strftime('%d/%m/%Y')},{10 + i % 7}" for i in range(300)
    ]
    data = ("\n".join(rows) + "\n").encode()
    assert (await train(client, analyst_headers, data, name="eu", n_clusters=2)).status_code == 200
    got = await score_csv(client, analyst_headers, data, name="eu")
    log = pd.read_csv(io.BytesIO(data), dtype=str)
    log["date"] = pd.to_datetime(log["date"], format="%d/%m/%Y").dt.strftime("%Y-%m-%d")
    assert_same_rfm(got, expected_rfm(log, order=None))


async def test_as_of_must_be_a_date_and_is_for_rfm_only(client, analyst_headers, shop):
    answer = await client.post(
        "/segmentations/shop/predict/batch",
        params={"as_of": "next week"},
        files={"file": ("orders.csv", b"customer_id,date,amount\n1,2024-01-01,5\n", "text/csv")},
        headers=analyst_headers,
    )
    assert answer.status_code == 422 and "as_of" in answer.text
    answer = await client.post("/segmentations/default/train", params={"as_of": "2024-01-01"}, headers=analyst_headers)
    assert answer.status_code == 422 and "kind rfm" in answer.json()["detail"]


# --- a real public log ------------------------------------------------------------------------------


def _cdnow_path() -> Path | None:
    spec = importlib.util.find_spec("lifetimes")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "CDNOW_master.txt"
    return path if path.is_file() else None


async def test_the_public_cdnow_log_equals_an_independent_computation(client, analyst_headers):
    path = _cdnow_path()
    if path is None:
        pytest.skip("the lifetimes package (requirements-dev.txt), which ships the CDNOW log, is not installed")
    raw = pd.read_csv(path, sep=r"\s+", dtype={"customer_id": str})  # customer_id date number_of_cds dollar_value
    raw.columns = ["customer_id", "date", "cds", "dollars"]
    raw["date"] = raw["date"].astype(str)  # YYYYMMDD, as the file has it
    data = raw.to_csv(index=False).encode()
    mapping = {"amount": "Dollars"}
    assert (await create(client, analyst_headers, name="cdnow", columns=mapping)).status_code == 201
    trained = await train(client, analyst_headers, data, name="cdnow")
    assert trained.status_code == 200, trained.text
    assert trained.json()["n_transactions"] == len(raw) == 69_659
    got = await score_csv(client, analyst_headers, data, name="cdnow")
    want = expected_rfm(raw, order=None, amount="dollars")
    assert len(want) == 23_570 - int((raw.groupby("customer_id")["dollars"].sum() < 0).sum()) or len(want) > 23_000
    assert_same_rfm(got, want)
    assert got["customer_id"].iloc[0] == "00001"


async def test_retraining_next_month_keeps_segment_ids_and_names(client, analyst_headers, shop):
    data, _, first = shop
    before = await score_csv(client, analyst_headers, data)
    named = await client.put(
        "/segmentations/shop/segments/0", json={"cluster_name": "Key accounts"}, headers=analyst_headers
    )
    assert named.status_code == 200, named.text
    # Next month: the same customers a month on, retrained with another seed.
    retrained = await train(client, analyst_headers, data, random_state=11, as_of="2026-02-01")
    assert retrained.status_code == 200, retrained.text
    body = retrained.json()
    assert body["previous_version"] == first["model_version"]
    assert all(m["previous_cluster_id"] == m["cluster_id"] for m in body["matching"])
    after = await score_csv(client, analyst_headers, data, as_of="2026-02-01")
    assert (after["recency_days"] == before["recency_days"] + 31).all()
    kept = (after["cluster"] == before["cluster"]).mean()
    assert kept >= 0.95
    clusters = (await client.get("/segmentations/shop/clusters", headers=analyst_headers)).json()["clusters"]
    assert clusters[0]["cluster_name"] == "Key accounts"
    assert after.loc[after["cluster"] == 0, "cluster_name"].eq("Key accounts").all()


async def test_explanations_and_drift_cover_rfm(client, analyst_headers, shop):
    data, _, _ = shop
    explained = await client.post(
        "/segmentations/shop/predict",
        params={"explain": "true"},
        json={"customer": {"recency_days": 40, "frequency": 6, "monetary": 2500.0}},
        headers=analyst_headers,
    )
    assert explained.status_code == 200, explained.text
    explanation = explained.json()["explanation"]
    assert sorted(c["feature"] for c in explanation["contributions"]) == ["frequency", "monetary", "recency_days"]
    assert sum(c["share"] for c in explanation["contributions"]) == pytest.approx(1.0, abs=1e-9)

    table = await score_csv(client, analyst_headers, data, explain="true")
    assert table.columns.tolist() == [*ANSWER, "top_feature", "margin"]
    assert set(table["top_feature"]) <= {"recency_days", "frequency", "monetary"}
    assert (table["margin"] >= 0).all()

    drift = await client.get("/segmentations/shop/drift", headers=analyst_headers)
    assert drift.status_code == 200, drift.text
    report = drift.json()
    assert report["n_observed"] == len(table) + 1
    assert [f["feature"] for f in report["features"]] == ["recency_days", "frequency", "monetary"]
    assert report["status"] == "stable"  # the training customers themselves


async def test_a_parquet_log_gives_the_same_table_as_its_csv(client, analyst_headers, shop):
    data, _, _ = shop
    log = pd.read_csv(io.BytesIO(data), dtype={"customer_id": str, "order_id": str})
    log["date"] = pd.to_datetime(log["date"]).dt.date  # a real date column, as warehouses export it
    out = io.BytesIO()
    log.to_parquet(out, index=False)
    from_parquet = await score_csv(client, analyst_headers, out.getvalue())
    from_csv = await score_csv(client, analyst_headers, data)
    pd.testing.assert_frame_equal(from_parquet, from_csv)


async def test_a_null_order_id_in_parquet_is_a_purchase_of_its_day_as_an_empty_one_in_csv(client, analyst_headers):
    assert (await create(client, analyst_headers)).status_code == 201
    rows = [
        ("1", "O1", "2024-01-02", 10.0),
        ("1", None, "2024-01-05", 7.5),  # no order id: the purchase of 2024-01-05
        ("1", None, "2024-01-05", 2.5),  # the same day, the same purchase
        ("1", None, "2024-01-09", 4.0),  # another day, another purchase
        ("2", "O2", "2024-01-03", 20.0),
        ("2", None, "2024-01-08", 1.0),
        ("3", "O3", "2024-01-04", 5.0),
        ("3", "O4", "2024-01-06", 6.0),
        *[(str(c), f"O{c}", f"2024-02-{c:02d}", 3.0 * c) for c in range(4, 14)],  # enough customers to train
    ]
    frame = pd.DataFrame(rows, columns=["customer_id", "order_id", "date", "amount"])
    csv = frame.to_csv(index=False).encode()  # None is written as an empty cell
    parquet = io.BytesIO()
    frame.to_parquet(parquet, index=False)  # None stays a null
    trained = await train(client, analyst_headers, csv, n_clusters=2)
    assert trained.status_code == 200, trained.text
    from_csv = await score_csv(client, analyst_headers, csv)
    from_parquet = await score_csv(client, analyst_headers, parquet.getvalue())
    assert from_csv.set_index("customer_id")["frequency"].to_dict() == {"1": 3, "2": 2, "3": 2} | {
        str(c): 1 for c in range(4, 14)
    }
    pd.testing.assert_frame_equal(from_parquet, from_csv)
