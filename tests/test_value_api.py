"""Predicted value in the product: what an analyst and a support agent see of BG/NBD and Gamma-Gamma.

Training an rfm segmentation fits both models on its customers (the contract's "Predicted value"):
the train result and the version show them, /predict and /predict/batch give each customer's
p_alive, expected_purchases, expected_order_value and clv, /clusters each segment's mean P(alive)
and share of predicted revenue. The CDNOW sample, trained through the API, gives the papers' table;
`lifetimes`' formulas, given the version's parameters, are the oracle for each customer's numbers.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd
import pytest

from app.ml.value import VALUE_FIELDS

lifetimes = pytest.importorskip("lifetimes", reason="the CDNOW sample ships with lifetimes (requirements-dev.txt)")

pytestmark = pytest.mark.postgres

AS_OF = "1997-09-30"


def cdnow_csv() -> bytes:
    """The CDNOW sample as an rfm log: customer_id = its 4-digit id, date YYYYMMDD, amount the dollars."""
    path = os.path.join(os.path.dirname(lifetimes.__file__), "datasets", "CDNOW_sample.txt")
    log = pd.read_csv(
        path, sep=r"\s+", header=None, names=["master", "customer_id", "date", "cds", "amount"], dtype=str
    )
    return log[["customer_id", "date", "amount"]].to_csv(index=False).encode()


def summary_of(log: pd.DataFrame, as_of: str) -> pd.DataFrame:
    """x, t_x, T and the mean repeat spend per customer, computed here from the contract's words."""
    log = log.assign(day=pd.to_datetime(log["date"].astype(str), format="%Y%m%d"), amount=log["amount"].astype(float))
    log = log[log["day"] <= pd.Timestamp(as_of)]
    daily = log.groupby(["customer_id", "day"])["amount"].sum().reset_index()
    daily = daily[daily["amount"] >= 0].sort_values(["customer_id", "day"])
    per = daily.groupby("customer_id").agg(
        n=("day", "size"),
        first=("day", "min"),
        last=("day", "max"),
        total=("amount", "sum"),
        first_spend=("amount", "first"),
    )
    x = per["n"] - 1
    return pd.DataFrame(
        {
            "x": x.astype(float),
            "t_x": (per["last"] - per["first"]).dt.days / 7.0,
            "T": (pd.Timestamp(as_of) - per["first"]).dt.days / 7.0,
            "m": np.where(x > 0, (per["total"] - per["first_spend"]) / x.where(x > 0, 1), 0.0),
        },
        index=per.index,
    )


async def train_log(client, headers, name: str, data: bytes, **params):
    created = await client.post("/segmentations", json={"name": name, "kind": "rfm"}, headers=headers)
    assert created.status_code == 201, created.text
    return await client.post(
        f"/segmentations/{name}/train", params=params, files={"file": ("log.csv", data, "text/csv")}, headers=headers
    )


async def batch_csv(client, headers, name: str, data: bytes, **params) -> pd.DataFrame:
    answer = await client.post(
        f"/segmentations/{name}/predict/batch",
        params=params,
        files={"file": ("log.csv", data, "text/csv")},
        headers=headers | {"Accept": "text/csv"},
    )
    assert answer.status_code == 200, answer.text
    return pd.read_csv(io.BytesIO(answer.content), dtype={"customer_id": str}).set_index("customer_id")


@pytest.fixture
async def cdnow(client, analyst_headers):
    trained = await train_log(client, analyst_headers, "cdnow", cdnow_csv(), as_of=AS_OF, n_clusters=4)
    assert trained.status_code == 200, trained.text
    return trained.json()


async def test_training_on_cdnow_gives_the_papers_estimates(client, analyst_headers, cdnow):
    value = cdnow["value_model"]
    assert cdnow["warnings"] == []
    bgnbd, spend = value["bgnbd"], value["gamma_gamma"]
    # Fader, Hardie and Lee (2005), table 1; Fader and Hardie (2013): within half a unit of the last digit.
    for name, published in (("r", 0.243), ("alpha", 4.414), ("a", 0.793), ("b", 2.426)):
        assert abs(bgnbd[name] - published) <= 0.0005, (name, bgnbd[name])
    assert abs(bgnbd["log_likelihood"] - -9582.4) <= 0.05 and bgnbd["n_customers"] == 2357
    for name, published in (("p", 6.25), ("q", 3.74), ("gamma", 15.44)):
        assert abs(spend[name] - published) <= 0.005, (name, spend[name])
    assert abs(spend["log_likelihood"] - -4055.9) <= 0.05 and spend["n_customers"] == 946

    detail = await client.get(f"/segmentations/cdnow/models/{cdnow['model_version']}", headers=analyst_headers)
    assert detail.status_code == 200, detail.text
    assert detail.json()["value_model"] == value and detail.json()["warnings"] == []


async def test_each_customers_value_matches_the_reference_formulas(client, analyst_headers, cdnow):
    data = cdnow_csv()
    value = cdnow["value_model"]
    want = summary_of(pd.read_csv(io.BytesIO(data), dtype=str), AS_OF)
    bgnbd = lifetimes.BetaGeoFitter()
    bgnbd.params_ = pd.Series({k: value["bgnbd"][k] for k in ("r", "alpha", "a", "b")})
    spend = lifetimes.GammaGammaFitter()
    spend.params_ = pd.Series(
        {"p": value["gamma_gamma"]["p"], "q": value["gamma_gamma"]["q"], "v": value["gamma_gamma"]["gamma"]}
    )

    for horizon in (90, 273):
        got = await batch_csv(client, analyst_headers, "cdnow", data, as_of=AS_OF, horizon_days=horizon)
        assert list(got.columns[-4:]) == list(VALUE_FIELDS)
        w = want.loc[got.index]
        np.testing.assert_allclose(
            got["p_alive"], bgnbd.conditional_probability_alive(w["x"], w["t_x"], w["T"]), atol=1e-6
        )
        purchases = bgnbd.conditional_expected_number_of_purchases_up_to_time(horizon / 7.0, w["x"], w["t_x"], w["T"])
        np.testing.assert_allclose(got["expected_purchases"], purchases, atol=1e-6)
        order_value = spend.conditional_expected_average_profit(w["x"], w["m"]).where(
            w["x"] > 0, spend.params_["p"] * spend.params_["v"] / (spend.params_["q"] - 1)
        )
        np.testing.assert_allclose(got["expected_order_value"], order_value, rtol=1e-6)
        np.testing.assert_allclose(got["clv"], purchases * order_value, rtol=1e-5, atol=1e-5)
    once = want.loc[got.index, "x"] == 0
    assert (got.loc[once, "p_alive"] == 1.0).all()  # BG/NBD: a one-time buyer has not yet had a chance to leave


async def test_clusters_show_who_is_still_active_and_what_they_will_bring(client, analyst_headers, cdnow):
    answer = await client.get("/segmentations/cdnow/clusters", headers=analyst_headers)
    assert answer.status_code == 200, answer.text
    clusters = {c["cluster_id"]: c for c in answer.json()["clusters"]}
    assert sum(c["predicted_revenue_share"] for c in clusters.values()) == pytest.approx(100.0, abs=0.05)
    # Each segment's figures are its training customers' own: the same customers scored at 90 days.
    scored = await batch_csv(client, analyst_headers, "cdnow", cdnow_csv(), as_of=AS_OF)
    clv = scored.groupby("cluster")["clv"].sum()
    for cluster_id, rows in scored.groupby("cluster"):
        segment = clusters[cluster_id]
        assert 0 < segment["mean_p_alive"] <= 1
        assert segment["mean_p_alive"] == pytest.approx(rows["p_alive"].mean(), abs=1e-4)
        assert segment["predicted_revenue_share"] == pytest.approx(100 * clv[cluster_id] / clv.sum(), abs=0.01)


async def test_a_support_agent_sees_a_customers_value_next_to_its_segment(client, analyst_headers, user_headers, cdnow):
    log = pd.read_csv(io.BytesIO(cdnow_csv()), dtype=str)
    customer = log[log["customer_id"] == "0004"]
    transactions = [{"date": d, "amount": float(a)} for d, a in zip(customer["date"], customer["amount"], strict=True)]
    answer = await client.post(
        "/segmentations/cdnow/predict",
        params={"horizon_days": 273},
        json={"transactions": transactions, "as_of": AS_OF},
        headers=user_headers,
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    row = (await batch_csv(client, analyst_headers, "cdnow", cdnow_csv(), as_of=AS_OF, horizon_days=273)).loc["0004"]
    for name in VALUE_FIELDS:
        assert body[name] == pytest.approx(row[name], abs=1e-6), name
    assert body["cluster"] == row["cluster"] and body["warnings"] == []

    by_values = await client.post(
        "/segmentations/cdnow/predict",
        json={"customer": {"recency_days": 10, "frequency": 3, "monetary": 60.0}},
        headers=user_headers,
    )
    assert by_values.status_code == 200, by_values.text
    body = by_values.json()
    assert all(body[name] is None for name in VALUE_FIELDS)
    assert any("transactions" in w for w in body["warnings"])


@pytest.mark.parametrize("horizon", [0, 3651, "soon"])
async def test_a_horizon_out_of_range_is_refused(client, analyst_headers, cdnow, horizon):
    predict = await client.post(
        "/segmentations/cdnow/predict",
        params={"horizon_days": horizon},
        json={"customer": {"recency_days": 10, "frequency": 3, "monetary": 60.0}},
        headers=analyst_headers,
    )
    batch = await client.post(
        "/segmentations/cdnow/predict/batch",
        params={"horizon_days": horizon},
        files={"file": ("log.csv", b"customer_id,date,amount\na,2024-01-01,5\n", "text/csv")},
        headers=analyst_headers,
    )
    for answer in (predict, batch):
        assert answer.status_code == 422, answer.text
        assert "horizon_days" in answer.text


def few_repeats_log() -> bytes:
    rows = ["customer_id,date,amount"]
    for i in range(120):
        rows.append(f"c{i:03d},2024-01-{1 + i % 28:02d},{10 + i}")
        if i < 30:  # thirty repeat customers: fewer than the 50 the models need
            rows.append(f"c{i:03d},2024-03-{1 + i % 28:02d},{5 + i}")
    return ("\n".join(rows) + "\n").encode()


async def test_too_few_repeat_customers_still_trains_without_a_value_model(client, analyst_headers, user_headers):
    trained = await train_log(client, analyst_headers, "small", few_repeats_log(), n_clusters=3)
    assert trained.status_code == 200, trained.text
    body = trained.json()
    assert body["value_model"] is None
    assert len(body["warnings"]) == 1 and "30 customers bought more than once" in body["warnings"][0]
    detail = (await client.get(f"/segmentations/small/models/{body['model_version']}", headers=analyst_headers)).json()
    assert detail["value_model"] is None and detail["warnings"] == body["warnings"]

    answer = await client.post(
        "/segmentations/small/predict",
        json={"transactions": [{"date": "2024-01-05", "amount": 12}, {"date": "2024-02-05", "amount": 8}]},
        headers=user_headers,
    )
    assert answer.status_code == 200, answer.text
    assert all(answer.json()[name] is None for name in VALUE_FIELDS)
    assert any("no value model" in w for w in answer.json()["warnings"])
    table = await batch_csv(client, analyst_headers, "small", few_repeats_log())
    assert table[list(VALUE_FIELDS)].isna().all().all()  # empty cells, not "nan"
    clusters = (await client.get("/segmentations/small/clusters", headers=user_headers)).json()["clusters"]
    assert all(c.get("mean_p_alive") is None and c.get("predicted_revenue_share") is None for c in clusters)


def awkward_logs() -> dict[str, bytes]:
    rng = np.random.default_rng(5)
    once = "\n".join(f"c{i},2024-01-{1 + i % 28:02d},{1 + i % 7}" for i in range(300))
    same = "\n".join(f"c{i},2024-0{1 + j}-01,10" for i in range(200) for j in range(3))
    huge = "\n".join(
        f"c{i},2024-0{1 + j}-{1 + i % 28:02d},{rng.uniform(1e11, 1e13):.2f}"
        for i in range(200)
        for j in range(1 + i % 3)
    )
    return {
        "every customer once": ("customer_id,date,amount\n" + once + "\n").encode(),
        "constant columns": ("customer_id,date,amount\n" + same + "\n").encode(),
        "huge amounts": ("customer_id,date,amount\n" + huge + "\n").encode(),
        "one customer": b"customer_id,date,amount\nsolo,2024-01-01,5\nsolo,2024-02-01,7\n",
    }


@pytest.mark.parametrize("case", list(awkward_logs()))
async def test_no_log_makes_the_value_fit_fail_the_training(client, analyst_headers, case):
    trained = await train_log(client, analyst_headers, "odd", awkward_logs()[case], n_clusters=2)
    assert trained.status_code in (200, 422), trained.text
    if trained.status_code == 422:  # too few distinct customers for two segments: K-Means' own refusal
        assert case in ("one customer", "constant columns")
        return
    body = trained.json()
    if body["value_model"] is None:
        assert body["warnings"], case
    else:
        for model in body["value_model"].values():
            assert model is None or all(np.isfinite(v) for v in model.values())
    answer = await client.post(
        "/segmentations/odd/predict/batch",
        files={"file": ("log.csv", awkward_logs()[case], "text/csv")},
        headers=analyst_headers,
    )
    assert answer.status_code == 200, answer.text


async def test_valuable_customers_slipping_away_are_one_request(client, analyst_headers, cdnow):
    data = cdnow_csv()
    ran = await client.post(
        "/segmentations/cdnow/runs",
        params={"as_of": AS_OF},
        files={"file": ("log.csv", data, "text/csv")},
        headers=analyst_headers,
    )
    assert ran.status_code == 200, ran.text
    assert ran.json()["status"] == "completed" and ran.json()["n_customers"] == 2357
    scored = await batch_csv(client, analyst_headers, "cdnow", data, as_of=AS_OF)  # clv at 90 days, as kept
    threshold = float(scored["clv"].quantile(0.8))
    for cluster_id, members in scored.groupby("cluster"):
        audience = await client.get(
            f"/segmentations/cdnow/segments/{cluster_id}/customers",
            params={"max_p_alive": 0.5, "min_clv": threshold, "limit": 1000},
            headers=analyst_headers,
        )
        assert audience.status_code == 200, audience.text
        items = audience.json()["items"]
        want = members[(members["p_alive"] <= 0.5) & (members["clv"] >= threshold)]
        assert sorted(i["customer_id"] for i in items) == sorted(want.index)
        for item in items:
            assert item["p_alive"] == pytest.approx(want.loc[item["customer_id"], "p_alive"], abs=1e-6)
            assert item["clv"] == pytest.approx(want.loc[item["customer_id"], "clv"], abs=1e-6)
