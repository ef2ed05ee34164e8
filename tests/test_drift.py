"""Drift through HTTP: counts from every door and worker, PSI against the training bins, statuses."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import httpx
import numpy as np
import pandas as pd
import pytest
from asgi_lifespan import LifespanManager

from app.core.tables import Role
from app.main import create_app
from app.ml.drift import MIN_OBSERVED
from tests.conftest import CUSTOMER
from tests.test_explain import crm_trained  # noqa: F401 - a fixture
from tests.test_segmentations import CRM_CUSTOMER, as_csv, crm_table

pytestmark = pytest.mark.postgres

FEATURE_NAMES = ["age", "annual_income", "spending_score", "purchase_frequency"]


@pytest.fixture
def settings_overrides() -> dict:
    # Short buckets, so `since` can be tested without waiting a minute.
    return {"drift_flush_seconds": 0.2, "drift_bucket_seconds": 1}


def training_frame(dataset) -> pd.DataFrame:
    frame = pd.read_csv(dataset)
    return frame.rename(columns={c: c.lower() for c in frame.columns})


def resample(dataset, n: int, seed: int) -> pd.DataFrame:
    frame = training_frame(dataset)
    return frame.sample(n=n, replace=True, random_state=seed).reset_index(drop=True)


async def score_csv(client, headers, frame: pd.DataFrame, path: str = "/predict/batch") -> None:
    response = await client.post(path, files={"file": ("c.csv", as_csv(frame), "text/csv")}, headers=headers)
    assert response.status_code == 200, response.text


async def drift(client, headers, path: str = "/drift", **params) -> dict:
    response = await client.get(path, params=params, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def by_feature(report: dict) -> dict[str, dict]:
    return {f["feature"]: f for f in report["features"]}


async def test_a_three_quarter_sd_shift_in_one_feature_is_significant_for_it_alone(
    client, trained_model, dataset, user_headers, analyst_headers
):
    frame = resample(dataset, 10_000, seed=1)
    frame["annual_income"] = (frame["annual_income"] + 0.75 * training_frame(dataset)["annual_income"].std()).round(2)
    await score_csv(client, user_headers, frame)
    report = await drift(client, analyst_headers)
    assert report["n_observed"] == 10_000 and report["model_version"] == trained_model["model_version"]
    features = by_feature(report)
    assert list(features) == FEATURE_NAMES
    assert features["annual_income"]["status"] == "significant"
    for name in ("age", "spending_score", "purchase_frequency"):
        assert features[name]["status"] == "stable", features[name]
    assert report["status"] == "significant"
    income = features["annual_income"]
    assert income["observed_mean"] == pytest.approx(frame["annual_income"].mean(), rel=1e-9)
    assert income["reference_mean"] == pytest.approx(training_frame(dataset)["annual_income"].mean(), rel=1e-6)
    assert sum(report["segment_mix"]["observed"].values()) == pytest.approx(1.0)


async def test_unshifted_resamples_stay_stable(client, trained_model, dataset, user_headers, analyst_headers):
    """Ten resamples of 10,000 of the training population, each read on its own with `since`."""
    false_alarms = 0
    for seed in range(10):
        await asyncio.sleep(1.1)  # into a new count bucket
        since = datetime.now(UTC).isoformat()
        await score_csv(client, user_headers, resample(dataset, 10_000, seed=100 + seed))
        report = await drift(client, analyst_headers, since=since)
        assert report["n_observed"] == 10_000
        statuses = [f["status"] for f in report["features"]] + [report["segment_mix"]["status"]]
        assert "significant" not in statuses, report
        false_alarms += statuses.count("moderate")
    assert false_alarms <= 1


async def test_below_500_rows_the_status_is_insufficient_data(client, trained_model, user_headers, analyst_headers):
    empty = await drift(client, analyst_headers)
    assert empty["n_observed"] == 0 and empty["status"] == "insufficient_data"
    assert all(f["psi"] is None for f in empty["features"])
    for _ in range(3):
        assert (await client.post("/predict", json=CUSTOMER, headers=user_headers)).status_code == 200
    report = await drift(client, analyst_headers)
    assert report["n_observed"] == 3 and report["status"] == "insufficient_data"
    assert all(f["status"] == "insufficient_data" and f["psi"] is not None for f in report["features"])
    assert by_feature(report)["age"]["observed_mean"] == CUSTOMER["age"]
    assert MIN_OBSERVED == 500


async def test_single_and_batch_from_both_doors_are_counted_but_not_failed_rows(
    client, trained_model, dataset, user_headers, analyst_headers
):
    assert (await client.post("/predict", json=CUSTOMER, headers=user_headers)).status_code == 200
    named = await client.post("/segmentations/default/predict", json={"customer": CUSTOMER}, headers=user_headers)
    assert named.status_code == 200
    batch = await client.post("/predict/batch", json={"customers": [CUSTOMER] * 5}, headers=user_headers)
    assert batch.status_code == 200
    frame = resample(dataset, 20, seed=3)
    await score_csv(client, user_headers, frame, "/segmentations/default/predict/batch")
    broken = pd.concat([frame.head(3), frame.head(1).assign(age=7)])
    marked = await client.post(
        "/predict/batch",
        files={"file": ("c.csv", as_csv(broken), "text/csv")},
        headers={**user_headers, "Accept": "text/csv"},
    )
    assert marked.status_code == 200
    report = await drift(client, analyst_headers)
    assert report["n_observed"] == 1 + 1 + 5 + 20 + 3
    observed = sum(v * report["n_observed"] for v in report["segment_mix"]["observed"].values())
    assert round(observed) == report["n_observed"]
    named_report = await drift(client, analyst_headers, "/segmentations/default/drift")
    assert named_report["n_observed"] == report["n_observed"]


async def test_counts_from_another_worker_sharing_the_database_are_read(
    app, client, settings, trained_model, user_headers, analyst_headers
):
    other = create_app(settings.model_copy(update={"drift_flush_seconds": 0.1}))
    async with LifespanManager(other, startup_timeout=60, shutdown_timeout=30):
        transport = httpx.ASGITransport(app=other, client=("127.0.0.1", 50001))
        async with httpx.AsyncClient(transport=transport, base_url="http://other") as second:
            headers = user_headers
            for _ in range(4):
                assert (await second.post("/predict", json=CUSTOMER, headers=headers)).status_code == 200
            rows = await second.post("/predict/batch", json={"customers": [CUSTOMER] * 10}, headers=headers)
            assert rows.status_code == 200
            deadline = asyncio.get_running_loop().time() + 30
            while True:  # the other worker flushes on its own clock
                report = await drift(client, analyst_headers)
                if report["n_observed"] == 14 or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert report["n_observed"] == 14
        assert (await client.post("/predict", json=CUSTOMER, headers=user_headers)).status_code == 200
    assert (await drift(client, analyst_headers))["n_observed"] == 15


async def test_a_clean_shutdown_writes_the_last_counts(settings, dataset, make_user, app, client, trained_model):
    _, headers = await make_user(Role.user)
    _, analyst = await make_user(Role.analyst)
    other = create_app(settings.model_copy(update={"drift_flush_seconds": 300}))
    async with LifespanManager(other, startup_timeout=60, shutdown_timeout=30):
        transport = httpx.ASGITransport(app=other, client=("127.0.0.1", 50002))
        async with httpx.AsyncClient(transport=transport, base_url="http://other") as second:
            for _ in range(2):
                assert (await second.post("/predict", json=CUSTOMER, headers=headers)).status_code == 200
    assert (await drift(client, analyst))["n_observed"] == 2


async def test_since_and_version_choose_what_is_read(client, trained_model, dataset, user_headers, analyst_headers):
    first = trained_model["model_version"]
    await score_csv(client, user_headers, resample(dataset, 30, seed=4))
    # A report flushes this process's counts first: the 30 are written now, in a bucket before `middle`
    # (counts are bucketed when they are written, at most one flush interval after they were made).
    assert (await drift(client, analyst_headers))["n_observed"] == 30
    await asyncio.sleep(1.1)
    middle = datetime.now(UTC)
    await score_csv(client, user_headers, resample(dataset, 12, seed=5))
    assert (await drift(client, analyst_headers))["n_observed"] == 42
    assert (await drift(client, analyst_headers, since=middle.isoformat()))["n_observed"] == 12
    naive = middle.replace(tzinfo=None).isoformat()  # taken as UTC
    assert (await drift(client, analyst_headers, since=naive))["n_observed"] == 12

    retrained = await client.post("/train", params={"n_clusters": 4, "random_state": 3}, headers=analyst_headers)
    assert retrained.status_code == 200
    second = retrained.json()["model_version"]
    await score_csv(client, user_headers, resample(dataset, 7, seed=6))
    current = await drift(client, analyst_headers)
    assert current["model_version"] == second and current["n_observed"] == 7
    assert len(current["segment_mix"]["reference"]) == 4
    old = await drift(client, analyst_headers, version=first)
    assert old["model_version"] == first and old["n_observed"] == 42
    # Back to the first version: counted from its new activation on (to the bucket: so one later
    # than its last counts), unless `since` says otherwise.
    await asyncio.sleep(1.1)
    assert (await client.post(f"/models/{first}/activate", headers=analyst_headers)).status_code == 200
    assert (await drift(client, analyst_headers))["n_observed"] == 0
    assert (await drift(client, analyst_headers, since="2000-01-01T00:00:00Z"))["n_observed"] == 42


async def test_drift_is_for_analysts_and_names_unknown_versions(
    client, trained_model, user_headers, analyst_headers, admin_headers
):
    for path in ("/drift", "/segmentations/default/drift"):
        assert (await client.get(path, headers=user_headers)).status_code == 403
        assert (await client.get(path)).status_code == 401
        assert (await client.get(path, headers=admin_headers)).status_code == 200
        missing = await client.get(path, params={"version": "no-such-version"}, headers=analyst_headers)
        assert missing.status_code == 404 and isinstance(missing.json()["detail"], str)
        bad = await client.get(path, params={"since": "yesterday"}, headers=analyst_headers)
        assert bad.status_code == 422 and bad.json()["errors"][0]["loc"] == ["query", "since"]
        assert bad.json()["detail"].startswith("since: ")
    assert (await client.get("/segmentations/nope/drift", headers=analyst_headers)).status_code == 404


async def test_before_any_training_drift_is_409(client, analyst_headers):
    response = await client.get("/drift", headers=analyst_headers)
    assert response.status_code == 409 and isinstance(response.json()["detail"], str)


async def test_a_version_saved_without_reference_bins_answers_409(app, client, trained_model, analyst_headers):
    from sqlalchemy import select, update

    from app.core.tables import ModelVersion

    version = trained_model["model_version"]
    async with app.state.database.sessionmaker() as session:
        details = (await session.execute(select(ModelVersion.details).where(ModelVersion.version == version))).scalar()
        details = {k: v for k, v in details.items() if k != "drift_reference"}
        await session.execute(update(ModelVersion).where(ModelVersion.version == version).values(details=details))
        await session.commit()
    app.state.models.current.metadata.pop("drift_reference")
    response = await client.get("/drift", headers=analyst_headers)
    assert response.status_code == 409 and "train a new version" in response.json()["detail"]


@pytest.mark.usefixtures("crm_trained")
async def test_a_custom_segmentation_counts_categories_unseen_and_missing(client, user_headers, analyst_headers):
    table = crm_table(rows=600, seed=8)
    await score_csv(client, user_headers, table, "/segmentations/crm/predict/batch")
    customers = [{**CRM_CUSTOMER, "plan": "gold"}, {**CRM_CUSTOMER, "visits": 3}]  # the table has blanks
    batch = await client.post("/segmentations/crm/predict/batch", json={"customers": customers}, headers=user_headers)
    assert batch.status_code == 200, batch.text
    single = await client.post(
        "/segmentations/crm/predict", json={"customer": {**CRM_CUSTOMER, "region": "mars"}}, headers=user_headers
    )
    assert single.status_code == 200, single.text
    report = await drift(client, analyst_headers, "/segmentations/crm/drift")
    assert report["segmentation"] == "crm" and report["n_observed"] == 603
    features = by_feature(report)
    assert list(features) == ["tenure_months", "basket", "visits", "plan", "region"]
    assert features["plan"]["reference_mean"] is None and features["plan"]["observed_mean"] is None
    assert all(f["status"] == "stable" for f in report["features"]), report
    assert features["basket"]["observed_mean"] is not None
    # /drift is the default segmentation's, which has no model here.
    assert (await client.get("/drift", headers=analyst_headers)).status_code == 409


async def test_admin_stats_and_the_prometheus_gauge_show_drift(
    client, trained_model, dataset, user_headers, analyst_headers, admin_headers
):
    stats = (await client.get("/admin/stats", headers=admin_headers)).json()
    assert {s["name"]: s["drift_status"] for s in stats["segmentations"]} == {"default": "insufficient_data"}
    frame = resample(dataset, 2_000, seed=9)
    frame["age"] = (frame["age"] + 10).clip(18, 100)
    await score_csv(client, user_headers, frame)
    stats = (await client.get("/admin/stats", headers=admin_headers)).json()
    assert stats["segmentations"][0]["drift_status"] == "significant"
    metrics = (await client.get("/metrics")).text
    lines = [line for line in metrics.splitlines() if line.startswith("segmentation_feature_psi{")]
    assert len(lines) == 4
    age = next(line for line in lines if 'feature="age"' in line and 'segmentation="default"' in line)
    assert float(age.rsplit(" ", 1)[1]) >= 0.25


async def test_with_drift_counting_off_nothing_is_counted(settings, make_user, app, client, trained_model):
    _, headers = await make_user(Role.user)
    _, analyst = await make_user(Role.analyst)
    other = create_app(settings.model_copy(update={"drift_enabled": False}))
    async with LifespanManager(other, startup_timeout=60, shutdown_timeout=30):
        transport = httpx.ASGITransport(app=other, client=("127.0.0.1", 50003))
        async with httpx.AsyncClient(transport=transport, base_url="http://other") as second:
            assert (await second.post("/predict", json=CUSTOMER, headers=headers)).status_code == 200
            report = await second.get("/drift", headers=analyst)
            assert report.status_code == 200 and report.json()["n_observed"] == 0


def test_psi_of_a_resample_is_small_and_of_a_shift_is_large():
    from app.ml.drift import fit_reference
    from app.ml.schema import FeatureSchema

    rng = np.random.default_rng(0)
    X = rng.normal(50, 10, (5000, 4)).clip(18, 100)
    columns = {name: X[:, j] for j, name in enumerate(FEATURE_NAMES)}
    labels = (X[:, 0] > 50).astype(np.int64)
    reference = fit_reference(FeatureSchema.customer(), columns, labels, 2)
    sample = X[rng.integers(0, 5000, 10_000)]
    counts, sums = reference.tally({n: sample[:, j] for j, n in enumerate(FEATURE_NAMES)}, labels[:10_000] * 0)
    report = reference.report(counts, sums, 10_000)
    assert all(f["psi"] < 0.01 for f in report["features"])
    counter = reference.row_counter()
    one_by_one, row_sums = [0] * reference.size, [0.0] * 4
    for row in sample[:100]:
        counter.add(one_by_one, row_sums, dict(zip(FEATURE_NAMES, row.tolist(), strict=True)), 0)
    vectorized, _ = reference.tally({n: sample[:100, j] for j, n in enumerate(FEATURE_NAMES)}, np.zeros(100))
    assert one_by_one == vectorized.tolist()
