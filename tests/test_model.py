"""The ML core: dataset generator, preprocessing, the K-Means model, charts and the notebook."""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score, silhouette_score

from app.charts import png_data_uri, render_cluster_charts, render_elbow_chart
from app.ml import ModelLoadError, SegmentationModel, elbow, persistence, segment_names, selection
from app.ml.preprocess import (
    FEATURE_RANGES,
    FEATURES,
    DataValidationError,
    canonical_sex,
    features_matrix,
    load_training_matrix,
    read_csv_frame,
    resolve_columns,
    score_frame,
)
from generate_dataset import generate
from generate_dataset import main as generate_main

ROOT = Path(__file__).resolve().parent.parent
DATASET_COLUMNS = ["CustomerID", "Sex", "Age", "Annual_Income", "Spending_Score", "Purchase_Frequency"]
HEADER = "age,annual_income,spending_score,purchase_frequency\n"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def as_matrix(frame: pd.DataFrame) -> np.ndarray:
    return frame[["Age", "Annual_Income", "Spending_Score", "Purchase_Frequency"]].to_numpy(np.float64)


@pytest.fixture(scope="module")
def customers() -> pd.DataFrame:
    return generate(5000, seed=42, with_labels=True)


@pytest.fixture(scope="module")
def X(customers) -> np.ndarray:
    return as_matrix(customers)


@pytest.fixture(scope="module")
def model(X) -> SegmentationModel:
    return SegmentationModel.train(X, random_state=42)


def in_range_customers(n: int, seed: int) -> np.ndarray:
    """Uniform over the contract ranges for half the rows, around the data for the rest."""
    rng = np.random.default_rng(seed)
    wide = np.column_stack(
        [
            rng.integers(18, 101, n),
            rng.uniform(0, 10000, n).round(1),
            rng.integers(1, 101, n),
            rng.integers(0, 1001, n),
        ]
    )
    near = np.column_stack(
        [
            rng.integers(18, 90, n),
            rng.uniform(0, 250, n).round(1),
            rng.integers(1, 101, n),
            rng.integers(0, 120, n),
        ]
    )
    return np.vstack([wide, near]).astype(np.float64)


# --------------------------------------------------------------------------- #
# Dataset generator


def test_generator_columns_ranges_and_determinism(customers):
    plain = generate(5000, seed=42)
    assert list(plain.columns) == DATASET_COLUMNS
    assert list(customers.columns) == DATASET_COLUMNS + ["Segment"]
    assert plain["CustomerID"].tolist() == list(range(1, 5001))
    assert set(plain["Sex"]) == {"Male", "Female", "Other"}
    assert 0.005 < (plain["Sex"] == "Other").mean() < 0.05
    for column, feature in zip(DATASET_COLUMNS[2:], FEATURES, strict=True):
        lo, hi = FEATURE_RANGES[feature]
        assert plain[column].between(lo, hi).all()
    for column in ("Age", "Spending_Score", "Purchase_Frequency"):
        assert pd.api.types.is_integer_dtype(plain[column])
    assert (plain["Annual_Income"] == plain["Annual_Income"].round(1)).all()
    assert customers["Segment"].nunique() == 5
    pd.testing.assert_frame_equal(plain, generate(5000, seed=42))
    assert not plain.equals(generate(5000, seed=43))


def test_generator_cli_writes_csv(tmp_path, capsys):
    out = tmp_path / "nested" / "customers.csv"
    assert generate_main(["--rows", "300", "--seed", "7", "--out", str(out), "--with-labels"]) == 0
    written = pd.read_csv(out)
    assert list(written.columns) == DATASET_COLUMNS + ["Segment"]
    assert len(written) == 300
    summary = capsys.readouterr().out.strip()
    assert "300" in summary and str(out) in summary and "\n" not in summary
    assert load_training_matrix(out).shape == (300, 4)


# --------------------------------------------------------------------------- #
# Training, k selection, segment descriptions


def test_auto_k_finds_the_latent_types(model, customers):
    selection = model.metadata_["k_selection"]
    assert selection["method"] == "silhouette"
    assert selection["k_range"] == list(range(2, 11))
    assert selection["optimal_k"] == model.n_clusters_ == 5
    assert len(selection["inertias"]) == len(selection["silhouette_scores"]) == 9
    assert selection["silhouette_scores"][3] == max(selection["silhouette_scores"])
    assert 2 <= selection["knee_k"] <= 10
    assert adjusted_rand_score(customers["Segment"], model.labels_) >= 0.8
    assert 0.3 < model.metadata_["silhouette_score"] < 0.7


def test_fixed_k_recovers_types_on_other_seeds():
    for seed in (1, 2):
        data = generate(4000, seed=seed, with_labels=True)
        fitted = SegmentationModel.train(as_matrix(data), n_clusters=5, random_state=seed)
        assert fitted.metadata_["k_selection"] == {"method": "fixed", "requested_k": 5}
        assert "elbow" not in fitted.metadata_
        assert adjusted_rand_score(data["Segment"], fitted.labels_) >= 0.8


def test_metadata_and_segment_statistics(model, X):
    meta = model.metadata_
    for key in (
        "version",
        "trained_at",
        "features",
        "n_samples",
        "total_customers",
        "n_clusters",
        "random_state",
        "algorithm",
        "inertia",
        "silhouette_score",
        "data_fingerprint",
        "k_selection",
        "segments",
        "centroids",
        "library_versions",
        "duration_seconds",
        "elbow",
    ):
        assert key in meta, key
    assert meta["features"] == list(FEATURES)
    assert meta["kind"] == "customer" and meta["schema"]["kind"] == "customer"
    assert meta["missing_shares"] == dict.fromkeys(FEATURES, 0.0)
    assert len({s["segment_key"] for s in meta["segments"]}) == len(meta["segments"])
    assert meta["n_samples"] == meta["total_customers"] == len(X)
    assert set(meta["library_versions"]) >= {"sklearn", "numpy", "pandas"}
    assert set(meta["elbow"]) >= {"optimal_k", "k_range", "inertias", "silhouette_scores", "method"}
    assert len(meta["data_fingerprint"]) == 64
    json.dumps(meta)  # JSON-ready throughout

    labels = model.labels_
    assert [s["cluster_id"] for s in meta["segments"]] == list(range(5))
    assert sum(s["size"] for s in meta["segments"]) == len(X)
    assert sum(s["percentage"] for s in meta["segments"]) == pytest.approx(100, abs=0.05)
    for segment in meta["segments"]:
        assert set(segment) == {
            "cluster_id",
            "cluster_name",
            "size",
            "percentage",
            "avg_age",
            "avg_income",
            "avg_spending_score",
            "avg_purchase_frequency",
            "description",
            "means",
            "segment_key",
            "generated_name",
        }
        assert segment["generated_name"] == segment["cluster_name"]
        assert segment["means"]["age"] == pytest.approx(segment["avg_age"], abs=0.01)
        assert segment["means"]["purchase_frequency"] == pytest.approx(segment["avg_purchase_frequency"], abs=0.01)
        members = X[labels == segment["cluster_id"]]
        assert segment["size"] == len(members)
        assert segment["avg_age"] == pytest.approx(members[:, 0].mean(), abs=0.01)
        assert segment["avg_income"] == pytest.approx(members[:, 1].mean(), abs=0.01)
        assert segment["avg_spending_score"] == pytest.approx(members[:, 2].mean(), abs=0.01)
        assert segment["avg_purchase_frequency"] == pytest.approx(members[:, 3].mean(), abs=0.01)
        assert segment["description"].endswith(".") and segment["description"].count(".") <= 5

    summary = model.summary()
    assert summary["n_clusters"] == 5 and summary["total_customers"] == len(X)
    assert summary["model_version"] == model.version
    assert summary["clusters"] == meta["segments"]


def test_same_data_and_seed_give_same_ids_and_names(model, X):
    again = SegmentationModel.train(X, random_state=42)
    assert again.cluster_names_ == model.cluster_names_
    np.testing.assert_array_equal(again.labels_, model.labels_)
    np.testing.assert_allclose(again.kmeans_.cluster_centers_, model.kmeans_.cluster_centers_)
    assert again.metadata_["data_fingerprint"] == model.metadata_["data_fingerprint"]
    # Ids follow centroid income (then spending), whatever order K-Means found them in.
    incomes = [c["annual_income"] for c in model.metadata_["centroids"]]
    assert incomes == sorted(incomes)


def test_names_describe_the_centroids(model):
    names = model.cluster_names_
    assert len(set(names)) == len(names)
    by_name = {s["cluster_name"]: s for s in model.segments}
    richest_spenders = max(model.segments, key=lambda s: s["avg_income"] + s["avg_spending_score"])
    assert richest_spenders["cluster_name"] == "High income, high spending"
    youngest = min(model.segments, key=lambda s: s["avg_age"])
    assert youngest["cluster_name"].startswith("Young")
    oldest = max(model.segments, key=lambda s: s["avg_age"])
    assert oldest["cluster_name"].startswith("Senior")
    assert any("low spending" in name and "High income" in name for name in by_name)


@pytest.mark.parametrize("k", [2, 3, 4, 6, 7, 8, 9, 10])
def test_names_unique_for_any_k(X, k):
    fitted = SegmentationModel.train(X, n_clusters=k)
    names = fitted.cluster_names_
    assert len(names) == k and len(set(names)) == k
    assert all(name and name[0].isupper() for name in names)


def test_names_follow_the_population_not_a_fixed_list(customers):
    # Without the affluent high spenders, no segment may carry their name.
    subset = customers[customers["Segment"] != "Affluent high spenders"]
    fitted = SegmentationModel.train(as_matrix(subset), n_clusters=4)
    assert "High income, high spending" not in fitted.cluster_names_
    assert len(set(fitted.cluster_names_)) == 4


def test_segment_names_disambiguate_collisions():
    z = np.array([[0.0, 1.0, -1.0, -0.6], [0.2, 1.2, -1.1, -0.7], [0.0, 1.0, -1.0, -0.6]])
    centers = np.array([[45, 110, 20, 12], [48, 115, 19, 11], [45, 110, 20, 12]], dtype=float)
    names = segment_names(z, centers)
    assert len(set(names)) == 3
    assert all(name.startswith("High income, low spending") for name in names)
    identical = segment_names(np.zeros((3, 4)), np.full((3, 4), 50.0))
    assert identical == [
        "Average income, moderate spending (1)",
        "Average income, moderate spending (2)",
        "Average income, moderate spending (3)",
    ]


def test_silhouette_matches_scikit_learn(model, X):
    scaled = model.scaler_.transform(X[:1500])
    labelings = [model.labels_[:1500], np.arange(1500) % 3]
    ours = selection.silhouette_scores(scaled, labelings)
    for labels, score in zip(labelings, ours, strict=True):
        assert score == pytest.approx(silhouette_score(scaled, labels), abs=1e-4)


def test_large_data_path_samples_then_refines(monkeypatch, X, customers):
    monkeypatch.setattr(selection, "SELECTION_SAMPLE_ROWS", 2000)
    monkeypatch.setattr(selection, "SILHOUETTE_SAMPLE_ROWS", 1000)
    mid = SegmentationModel.train(X)
    assert mid.metadata_["algorithm"] == "kmeans"
    assert mid.metadata_["k_selection"]["sample_size"] == 2000
    monkeypatch.setattr(selection, "MINIBATCH_MIN_ROWS", 3000)
    big = SegmentationModel.train(X.astype(np.float32))
    assert big.metadata_["algorithm"] == "minibatch_kmeans"
    for fitted in (mid, big):
        assert fitted.n_clusters_ == 5
        assert adjusted_rand_score(customers["Segment"], fitted.labels_) >= 0.8
        assert fitted.metadata_["silhouette_sample_size"] == 1000
        sample = in_range_customers(1000, seed=3)
        labels, _ = fitted.predict_with_confidence(sample)
        np.testing.assert_array_equal(labels, fitted.kmeans_.predict(fitted.scaler_.transform(sample)))


def test_elbow_report(X):
    report = elbow(X, k_min=2, k_max=8, random_state=0)
    assert report["k_range"] == list(range(2, 9))
    assert len(report["inertias"]) == len(report["silhouette_scores"]) == 7
    assert report["method"] == "silhouette"
    assert report["optimal_k"] == 5
    assert report["inertias"] == sorted(report["inertias"], reverse=True)
    small = elbow(X[:12], k_min=2, k_max=10)
    assert small["k_range"] == list(range(2, 7))  # capped at n // 2
    with pytest.raises(DataValidationError):
        elbow(X[:5])
    with pytest.raises(DataValidationError):
        elbow(X, k_min=6, k_max=4)


def test_train_accepts_a_dataframe_by_column_name(customers, model):
    shuffled_columns = customers[["Spending_Score", "Sex", "Purchase_Frequency", "Age", "Annual_Income"]]
    fitted = SegmentationModel.train(shuffled_columns, n_clusters=5)
    assert fitted.cluster_names_ == model.cluster_names_
    np.testing.assert_array_equal(fitted.labels_, model.labels_)


@pytest.mark.parametrize(
    "data, kwargs, fragment",
    [
        (np.ones((5, 4)), {}, "at least 10"),
        (np.arange(48, dtype=float).reshape(12, 4) + 20, {"n_clusters": 8}, "at least 16"),
        (np.tile([[30, 50, 40, 10]], (40, 1)).astype(float), {"n_clusters": 3}, "distinct"),
        (np.tile([[30, 50, 40, 10]], (40, 1)).astype(float), {}, "too few"),
        (np.full((20, 3), 30.0), {}, "4 columns"),
        (np.array([[30, 50, 40, np.nan]] * 20), {}, "finite"),
        (np.ones((30, 4)), {"n_clusters": 1}, "at least 2"),
    ],
)
def test_train_rejects_unusable_data(data, kwargs, fragment):
    with pytest.raises(DataValidationError) as caught:
        SegmentationModel.train(data, **kwargs)
    assert fragment in caught.value.message


# --------------------------------------------------------------------------- #
# Prediction


def test_numpy_predict_equals_scikit_learn(model, X):
    sample = in_range_customers(3000, seed=11)
    for fitted in (model, SegmentationModel.train(X, n_clusters=8, random_state=3)):
        labels, confidence = fitted.predict_with_confidence(sample)
        expected = fitted.kmeans_.predict(fitted.scaler_.transform(sample))
        np.testing.assert_array_equal(labels, expected)
        assert labels.dtype.kind == "i"
        assert ((confidence >= 0) & (confidence <= 1)).all()


def test_confidence_is_one_at_a_centroid_and_zero_on_a_boundary(model):
    centroids = model.scaler_.inverse_transform(model.kmeans_.cluster_centers_)
    rounded = np.array([[c[f] for f in FEATURES] for c in model.metadata_["centroids"]])
    np.testing.assert_allclose(rounded, centroids, atol=1e-4)
    labels, confidence = model.predict_with_confidence(centroids)
    np.testing.assert_array_equal(labels, np.arange(model.n_clusters_))
    np.testing.assert_allclose(confidence, 1.0, atol=1e-6)

    scaled = model.kmeans_.cluster_centers_
    gaps = np.linalg.norm(scaled[:, None] - scaled[None], axis=2) + np.eye(len(scaled)) * 1e9
    i, j = np.unravel_index(gaps.argmin(), gaps.shape)
    midpoint = (centroids[i] + centroids[j]) / 2  # scaling is affine: midpoints map to midpoints
    label, conf = model.predict_with_confidence(midpoint[None])
    assert label[0] in (i, j)
    assert conf[0] == pytest.approx(0.0, abs=1e-6)


def test_predict_one_matches_predict_in_every_calling_style(model, X):
    labels, confidence = model.predict_with_confidence(X[:200])
    for row, label, conf in zip(X[:200], labels, confidence, strict=True):
        cluster_id, name, one_conf = model.predict_one(*row)
        assert cluster_id == label and name == model.cluster_names_[label]
        assert one_conf == pytest.approx(conf, abs=1e-12)
    customer = dict(zip(FEATURES, (29, 42.0, 81, 48), strict=True))
    expected = model.predict_one(29, 42.0, 81, 48)
    assert model.predict_one(customer) == expected
    assert model.predict_one(**customer) == expected
    assert model.predict_one(SimpleNamespace(**customer)) == expected
    assert expected[1] == model.cluster_names_[expected[0]]
    with pytest.raises(DataValidationError):
        model.predict_one(29, float("nan"), 81, 48)


def test_concurrent_predictions_agree(model):
    sample = in_range_customers(2000, seed=5)
    expected = model.predict_with_confidence(sample)
    results: list[tuple[np.ndarray, np.ndarray]] = []

    def work() -> None:
        for _ in range(5):
            results.append(model.predict_with_confidence(sample))
            [model.predict_one(*row) for row in sample[:100]]

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 20
    for labels, confidence in results:
        np.testing.assert_array_equal(labels, expected[0])
        np.testing.assert_array_equal(confidence, expected[1])


# --------------------------------------------------------------------------- #
# Persistence


def assert_same_model(a: SegmentationModel, b: SegmentationModel) -> None:
    sample = in_range_customers(500, seed=9)
    for left, right in zip(a.predict_with_confidence(sample), b.predict_with_confidence(sample), strict=True):
        np.testing.assert_array_equal(left, right)
    assert a.cluster_names_ == b.cluster_names_
    assert a.version == b.version
    assert a.metadata_["segments"] == b.metadata_["segments"]


def test_save_and_load_round_trip(model, tmp_path):
    model.save(tmp_path / "models")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["kmeans.pkl", "metadata.json", "scaler.pkl"]
    loaded = SegmentationModel.load(tmp_path / "models")
    assert_same_model(model, loaded)
    assert not hasattr(loaded, "labels_")
    # The pickles are the plain scikit-learn estimators the contract names.
    kmeans = joblib.load(tmp_path / "models" / "kmeans.pkl")
    scaler = joblib.load(tmp_path / "models" / "scaler.pkl")
    sample = in_range_customers(200, seed=1)
    np.testing.assert_array_equal(kmeans.predict(scaler.transform(sample)), model.predict_with_confidence(sample)[0])


def test_version_is_settable_and_persisted(X, tmp_path):
    fitted = SegmentationModel.train(X[:600], n_clusters=3)
    assert fitted.version.endswith("-k3")
    fitted.version = "v42"
    fitted.save(tmp_path)
    assert SegmentationModel.load(tmp_path).version == "v42"
    assert SegmentationModel.from_bytes(fitted.to_bytes()).version == "v42"


def test_bytes_round_trip(model):
    blob = model.to_bytes()
    assert isinstance(blob, bytes) and len(blob) < 100_000
    assert_same_model(model, SegmentationModel.from_bytes(blob))


@pytest.mark.parametrize("blob", [b"", b"not a model", b"\x80\x04garbage", "truncate", "wrong-object"])
def test_from_bytes_rejects_garbage(model, blob):
    if blob == "truncate":
        blob = model.to_bytes()[:200]
    elif blob == "wrong-object":
        buffer = io.BytesIO()
        joblib.dump({"kmeans": "nope", "scaler": None, "metadata": {}}, buffer)
        blob = buffer.getvalue()
    with pytest.raises(ModelLoadError):
        SegmentationModel.from_bytes(blob)


def _break_missing(directory: Path, name: str) -> None:
    (directory / name).unlink()


def _break_corrupt(directory: Path, name: str) -> None:
    data = (directory / name).read_bytes()
    (directory / name).write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name", ["kmeans.pkl", "scaler.pkl", "metadata.json"])
@pytest.mark.parametrize("damage", [_break_missing, _break_corrupt])
def test_load_rejects_missing_and_corrupt_files(model, tmp_path, name, damage):
    model.save(tmp_path)
    damage(tmp_path, name)
    with pytest.raises(ModelLoadError):
        SegmentationModel.load(tmp_path)


def test_load_rejects_inconsistent_files(model, X, tmp_path):
    with pytest.raises(ModelLoadError):
        SegmentationModel.load(tmp_path / "nowhere")

    model.save(tmp_path / "a")
    other = SegmentationModel.train(X[:1000], n_clusters=3)
    other.save(tmp_path / "b")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name, source in (("kmeans.pkl", "b"), ("scaler.pkl", "a"), ("metadata.json", "a")):
        (mixed / name).write_bytes((tmp_path / source / name).read_bytes())
    with pytest.raises(ModelLoadError, match="does not match"):
        SegmentationModel.load(mixed)

    # Without the checksums the shape check still catches a 3-centroid model described as 5 segments.
    metadata = json.loads((mixed / "metadata.json").read_text())
    del metadata["artifacts"]
    (mixed / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelLoadError, match="segments"):
        SegmentationModel.load(mixed)

    metadata["features"] = ["age", "income"]
    (mixed / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelLoadError):
        SegmentationModel.load(mixed)

    joblib.dump({"not": "a model"}, mixed / "kmeans.pkl")
    with pytest.raises(ModelLoadError):
        SegmentationModel.load(mixed)


def test_failed_save_keeps_previous_model(model, X, tmp_path, monkeypatch):
    model.save(tmp_path)
    replacement = SegmentationModel.train(X[:1000], n_clusters=3)

    real_fsync = os.fsync
    calls = {"n": 0}

    def failing_fsync(fd):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_fsync(fd)

    monkeypatch.setattr(persistence.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        replacement.save(tmp_path)
    monkeypatch.setattr(persistence.os, "fsync", real_fsync)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kmeans.pkl", "metadata.json", "scaler.pkl"]
    assert_same_model(model, SegmentationModel.load(tmp_path))

    # A crash between the renames leaves a detectable mix, never a silently wrong model.
    real_replace = os.replace
    replaced = {"n": 0}

    def crash_after_first(src, dst):
        replaced["n"] += 1
        if replaced["n"] == 2:
            raise OSError("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(persistence.os, "replace", crash_after_first)
    with pytest.raises(OSError, match="power cut"):
        replacement.save(tmp_path)
    monkeypatch.setattr(persistence.os, "replace", real_replace)
    with pytest.raises(ModelLoadError):
        SegmentationModel.load(tmp_path)
    replacement.save(tmp_path)
    assert SegmentationModel.load(tmp_path).n_clusters_ == 3


# --------------------------------------------------------------------------- #
# Preprocessing


def test_training_csv_with_dataset_headers(customers, tmp_path):
    path = tmp_path / "customers.csv"
    customers.to_csv(path, index=False)
    matrix = load_training_matrix(path, chunksize=777)
    assert matrix.dtype == np.float32 and matrix.shape == (5000, 4)
    np.testing.assert_allclose(matrix, as_matrix(customers), rtol=1e-6)


def test_training_csv_with_snake_case_headers_any_case_and_order():
    text = " Purchase_Frequency ,notes,SPENDING_SCORE,annual_income, Age ,sex\n12,hello,40,55.5,30,male\n0,,1,0,100,\n"
    matrix = load_training_matrix(text.encode())
    np.testing.assert_array_equal(matrix, np.array([[30, 55.5, 40, 12], [100, 0, 1, 0]], dtype=np.float32))


def test_training_csv_from_file_objects():
    payload = (HEADER + "30,55.5,40,12\n").encode("utf-8-sig")  # with a byte-order mark
    assert load_training_matrix(io.BytesIO(payload)).shape == (1, 4)

    class Stream(io.RawIOBase):  # an upload that cannot seek
        def __init__(self, data: bytes):
            self._data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return False

        def readinto(self, buffer) -> int:
            chunk = self._data.read(len(buffer))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    assert load_training_matrix(Stream(payload)).tolist() == [[30, 55.5, 40, 12]]


@pytest.mark.parametrize(
    "payload, fragment",
    [
        (b"", "empty"),
        (b"   \n\n", "empty"),
        (HEADER.encode(), "no data rows"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "binary"),
        (b"age,annual_income\n\xff\xfe\xfa,1\n", "UTF-8"),
        (b'age,annual_income,spending_score,purchase_frequency\n30,"55,40,12\n', "malformed"),
        (b"age;annual_income;spending_score;purchase_frequency\n30;55;40;12\n", "comma-separated"),
        (b'{"customers": [{"age": 30}]}', "missing required column"),
        (b"Age,age,annual_income,spending_score,purchase_frequency\n30,30,1,1,1\n", "both mean age"),
    ],
)
def test_unusable_csv_files(payload, fragment):
    with pytest.raises(DataValidationError) as caught:
        load_training_matrix(payload)
    assert fragment in caught.value.message


def test_missing_columns_are_named():
    with pytest.raises(DataValidationError) as caught:
        load_training_matrix(b"CustomerID,Age,Annual_Income\n1,30,50\n")
    assert "spending_score" in caught.value.message and "purchase_frequency" in caught.value.message
    assert [p["column"] for p in caught.value.problems] == ["spending_score", "purchase_frequency"]


@pytest.mark.parametrize(
    "row, column, reason",
    [
        ("abc,55,40,12", "age", "not a number: 'abc'"),
        ("30,,40,12", "annual_income", "empty value"),
        ("30,NaN,40,12", "annual_income", "not a number: 'NaN'"),
        ("30,55,inf,12", "spending_score", "not a finite number"),
        ("30,55,-Infinity,12", "spending_score", "not a finite number"),
        ("30.5,55,40,12", "age", "not a whole number: 30.5"),
        ("30,55,40,12.25", "purchase_frequency", "not a whole number"),
        ("17,55,40,12", "age", "out of range 18..100: 17"),
        ("30,10000.1,40,12", "annual_income", "out of range 0..10000"),
        ("30,-1,40,12", "annual_income", "out of range"),
        ("30,55,0,12", "spending_score", "out of range 1..100: 0"),
        ("30,55,40,1001", "purchase_frequency", "out of range 0..1000"),
        ("30,55,40", "purchase_frequency", "empty value"),
    ],
)
def test_bad_values_are_reported_with_row_and_column(row, column, reason):
    good = "45,70,50,30\n"
    text = HEADER + good * 3 + row + "\n" + good
    with pytest.raises(DataValidationError) as caught:
        load_training_matrix(text.encode(), chunksize=2)  # the bad row sits in the second chunk
    error = caught.value
    assert error.offending_rows == 1
    assert error.problems == [{"row": 4, "line": 5, "column": column, "reason": error.problems[0]["reason"]}]
    assert reason in error.problems[0]["reason"]
    assert "row 4" in error.message and column in error.message


def test_many_bad_rows_list_ten_problems_and_count_all():
    rows = ["45,70,50,30"] * 5 + ["17,70,50,30"] * 25 + ["45,70,50,x"] * 5
    with pytest.raises(DataValidationError) as caught:
        load_training_matrix((HEADER + "\n".join(rows) + "\n").encode(), chunksize=8)
    error = caught.value
    assert error.offending_rows == 30
    assert len(error.problems) == 10
    assert [p["row"] for p in error.problems] == list(range(6, 16))
    assert "30 of 35 rows" in error.message


def test_only_data_validation_errors_escape(tmp_path):
    for source in (tmp_path / "missing.csv", 12345, b"\x00" * 10, b"a,b\n" + os.urandom(2000)):
        with pytest.raises(DataValidationError):
            load_training_matrix(source)


def test_canonical_sex():
    assert canonical_sex(" female ") == "Female"
    assert canonical_sex("MALE") == "Male"
    assert canonical_sex("other") == "Other"
    for bad in ("f", "", None, 1, "unknown"):
        with pytest.raises(ValueError):
            canonical_sex(bad)


def test_resolve_columns_maps_both_conventions():
    assert resolve_columns(DATASET_COLUMNS) == {
        "sex": "Sex",
        "age": "Age",
        "annual_income": "Annual_Income",
        "spending_score": "Spending_Score",
        "purchase_frequency": "Purchase_Frequency",
    }
    assert resolve_columns(["AGE", " annual_income", "Spending_score ", "purchase_frequency"])["age"] == "AGE"


def test_score_frame_marks_bad_rows_instead_of_failing():
    frame = read_csv_frame(
        b"Name,Sex,Age,Annual_Income,Spending_Score,Purchase_Frequency\n"
        b"ann,female,30,55.5,40,12\n"
        b"bob,robot,abc,55,140,12\n"
        b"cy,,45,70,50,30.5\n"
        b"di,Male,45,70,50,30\n"
    )
    assert list(frame.columns)[0] == "Name" and frame.loc[0, "Name"] == "ann"
    batch = score_frame(frame)
    assert len(batch) == 4
    assert batch.valid.tolist() == [True, False, False, True]
    np.testing.assert_array_equal(batch.features, [[30, 55.5, 40, 12], [45, 70, 50, 30]])
    assert batch.errors[0] is None and batch.errors[3] is None
    assert "sex" in batch.errors[1] and "age: not a number: 'abc'" in batch.errors[1]
    assert "spending_score: out of range 1..100: 140" in batch.errors[1]
    assert batch.errors[2] == "purchase_frequency: not a whole number: 30.5"
    assert batch.customers["sex"].tolist() == ["Female", None, None, "Male"]
    assert list(batch.customers.columns) == ["sex", *FEATURES]

    numeric = score_frame(
        pd.DataFrame(
            {"age": [30, 200], "annual_income": [1.5, 2], "spending_score": [1, 2], "purchase_frequency": [0, 1]}
        )
    )
    assert numeric.valid.tolist() == [True, False]
    with pytest.raises(DataValidationError, match="purchase_frequency"):
        score_frame(pd.DataFrame({"age": [30], "annual_income": [1], "spending_score": [1]}))
    with pytest.raises(DataValidationError, match="too many rows"):
        read_csv_frame((HEADER + "30,1,1,1\n" * 5).encode(), max_rows=4)


def test_features_matrix_from_dicts_and_objects():
    records = [
        {"age": 30, "annual_income": 55.5, "spending_score": 40, "purchase_frequency": 12, "sex": "Male"},
        SimpleNamespace(age=45, annual_income=70, spending_score=50, purchase_frequency=30),
    ]
    matrix = features_matrix(records)
    assert matrix.dtype == np.float64
    np.testing.assert_array_equal(matrix, [[30, 55.5, 40, 12], [45, 70, 50, 30]])
    assert features_matrix([]).shape == (0, 4)
    with pytest.raises(DataValidationError) as caught:
        features_matrix([records[0], {"age": 30, "annual_income": "x", "spending_score": 1}])
    assert [(p["row"], p["column"]) for p in caught.value.problems] == [(2, "annual_income"), (2, "purchase_frequency")]


# --------------------------------------------------------------------------- #
# Charts


def test_charts_render_png(model):
    charts = render_cluster_charts(model)
    assert set(charts) == {"pie_chart", "bar_chart", "size_chart"}
    for png in charts.values():
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert render_cluster_charts(model.summary())["pie_chart"].startswith(PNG_MAGIC)
    elbow_png = render_elbow_chart(model.metadata_["elbow"])
    assert elbow_png.startswith(PNG_MAGIC)
    assert png_data_uri(elbow_png).startswith("data:image/png;base64,iVBOR")


def test_charts_render_from_several_threads(model):
    results: list[bytes] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(render_elbow_chart(model.metadata_["elbow"]))
            results.append(render_cluster_charts(model)["size_chart"])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 6 and all(png.startswith(PNG_MAGIC) for png in results)


# --------------------------------------------------------------------------- #
# Notebook


def test_notebook_runs_end_to_end(monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    path = ROOT / "notebooks" / "experimentation.ipynb"
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")

    monkeypatch.setenv("NOTEBOOK_ROWS", "800")
    client = NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    text = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream"
    )
    assert "800 customers from generated in memory" in text
    assert "adjusted Rand index vs latent types" in text
    assert "both value models fitted" in text  # and the P(alive) map below it drew
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert len(images) >= 7
