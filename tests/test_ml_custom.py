"""Kind `custom` at library level: declaring a schema, reading its CSV, training, naming and scoring."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from app.ml import SegmentationModel, frames
from app.ml.errors import SchemaError
from app.ml.frames import read_training_frame
from app.ml.preprocess import FEATURE_RANGES, FEATURES, DataValidationError
from app.ml.schema import MISSING_LEVEL, OTHER_LEVEL, FeatureSchema
from generate_dataset import generate, generate_mixed, mixed_features

ROWS = 3000


@pytest.fixture(scope="module")
def mixed() -> pd.DataFrame:
    return generate_mixed(ROWS, seed=7, with_labels=True)


@pytest.fixture(scope="module")
def schema() -> FeatureSchema:
    return FeatureSchema.declare(mixed_features(), id_column="customer_id")


@pytest.fixture(scope="module")
def csv_bytes(mixed) -> bytes:
    return mixed.to_csv(index=False).encode()


@pytest.fixture(scope="module")
def frame(csv_bytes, schema) -> pd.DataFrame:
    return read_training_frame(csv_bytes, schema)


@pytest.fixture(scope="module")
def model(frame, schema) -> SegmentationModel:
    return SegmentationModel.train(frame, schema=schema, random_state=42)


def as_text(frame: pd.DataFrame) -> pd.DataFrame:
    """A table as a batch upload arrives: every cell a str."""
    return pd.read_csv(io.BytesIO(frame.to_csv(index=False).encode()), dtype=str, keep_default_na=False)


# --------------------------------------------------------------------------- #
# Declaring


@pytest.mark.parametrize(
    "features, id_column, fragment",
    [
        ([], None, "at least one feature"),
        ([{"name": f"f{i}", "type": "numeric"} for i in range(51)], None, "at most 50"),
        ([{"name": "  ", "type": "numeric"}], None, "1 to 64"),
        ([{"name": "x" * 65, "type": "numeric"}], None, "1 to 64"),
        ([{"type": "numeric"}], None, "no name"),
        ([{"name": "Tenure", "type": "numeric"}, {"name": " tenure ", "type": "numeric"}], None, "'tenure'"),
        ([{"name": "cust", "type": "numeric"}], "CUST", "'cust' is also the id_column"),
        ([{"name": "plan", "type": "text"}], None, "'plan': type must be"),
        ([{"name": "tenure", "type": "numeric", "transform": "sqrt"}], None, "'tenure': transform"),
        ([{"name": "plan", "type": "categorical", "transform": "log"}], None, "'plan': a categorical"),
        ([{"name": "plan", "type": "categorical", "min": 0}], None, "'plan': min and max"),
        ([{"name": "basket", "type": "numeric", "min": 5, "max": 1}], None, "'basket': min 5 is above max 1"),
        ([{"name": "basket", "type": "numeric", "max": "lots"}], None, "'basket': max must be a finite number"),
        ([{"name": "basket", "type": "numeric", "min": float("nan")}], None, "'basket': min"),
        ([{"name": "basket", "type": "numeric", "scale": 2}], None, "'basket': unknown field(s) scale"),
        (["basket"], None, "feature 1 must be an object"),
    ],
)
def test_declaration_errors_name_the_feature(features, id_column, fragment):
    with pytest.raises(SchemaError) as caught:
        FeatureSchema.declare(features, id_column=id_column)
    assert fragment in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_declaration_defaults_and_round_trip():
    schema = FeatureSchema.declare(
        [
            {"name": " tenure_months ", "type": "numeric"},
            {"name": "basket", "type": "numeric", "transform": "none", "min": 0, "max": 500},
            {"name": "plan", "type": "categorical", "transform": None},
        ],
        id_column=" id ",
    )
    assert not schema.fixed and schema.id_column == "id"
    assert schema.names == ["tenure_months", "basket", "plan"]
    assert [f.transform for f in schema.features] == ["auto", "none", "none"]
    assert (schema.features[1].min, schema.features[1].max) == (0.0, 500.0)
    assert not schema.fitted
    assert FeatureSchema.from_dict(schema.to_dict()) == schema


def test_customer_schema_follows_the_contract():
    schema = FeatureSchema.customer()
    assert schema.fixed and schema.names == list(FEATURES)
    for feature in schema.features:
        assert (feature.min, feature.max) == FEATURE_RANGES[feature.name]
        assert feature.transform == "none"
    assert [f.integer for f in schema.features] == [True, False, True, True]
    assert FeatureSchema.from_dict(schema.to_dict()) == schema


# --------------------------------------------------------------------------- #
# Reading a training CSV

SMALL = FeatureSchema.declare(
    [
        {"name": "tenure", "type": "numeric"},
        {"name": "basket", "type": "numeric"},
        {"name": "plan", "type": "categorical"},
    ],
    id_column="customer_id",
)


def test_read_matches_headers_ignores_others_and_keeps_ids_as_text():
    text = " Customer_ID ,notes,PLAN, Tenure ,basket\n007,hi, pro ,12,3.5\n008,,basic,,4\n009,x,,3,1e2\n"
    frame = read_training_frame(text.encode(), SMALL)
    assert list(frame.columns) == ["customer_id", "tenure", "basket", "plan"]
    assert frame["customer_id"].tolist() == ["007", "008", "009"]
    assert isinstance(frame["plan"].dtype, pd.CategoricalDtype)
    assert frame["plan"].tolist()[:2] == ["pro", "basic"] and pd.isna(frame["plan"].iloc[2])
    np.testing.assert_array_equal(frame["tenure"].to_numpy(), [12.0, np.nan, 3.0])
    assert frame["basket"].tolist() == [3.5, 4.0, 100.0]


def test_read_names_every_missing_column_at_once():
    with pytest.raises(DataValidationError) as caught:
        read_training_frame(b"customer_id,plan\n1,pro\n", SMALL)
    assert "tenure" in caught.value.message and "basket" in caught.value.message
    assert [p["column"] for p in caught.value.problems] == ["tenure", "basket"]
    assert all(p["row"] is None and p["line"] is None for p in caught.value.problems)


def test_read_lists_mistyped_rows_with_row_and_line(monkeypatch):
    monkeypatch.setattr(frames, "CHUNK_ROWS", 2)  # the bad rows sit in later chunks
    rows = ["1,2,pro"] * 3 + ["abc,2,pro", "1,inf,basic", "1,-Infinity,pro"] + ["1,2,pro"] * 2
    with pytest.raises(DataValidationError) as caught:
        read_training_frame(("tenure,basket,plan\n" + "\n".join(rows) + "\n").encode(), SMALL)
    error = caught.value
    assert error.offending_rows == 3
    assert error.problems == [
        {"row": 4, "line": 5, "column": "tenure", "reason": "not a number: 'abc'"},
        {"row": 5, "line": 6, "column": "basket", "reason": "not a finite number: inf"},
        {"row": 6, "line": 7, "column": "basket", "reason": "not a finite number: -inf"},
    ]
    assert error.message.startswith("3 of 8 rows have invalid values") and "row 4 tenure" in error.message


@pytest.mark.parametrize(
    "payload, fragment",
    [
        (b"", "empty"),
        (b"tenure,basket,plan\n", "no data rows"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
        (b"tenure,basket,plan\n\xff\xfe,1,x\n", "UTF-8"),
        (b'tenure,basket,plan\n1,"2,pro\n', "malformed"),
    ],
)
def test_read_rejects_unusable_files(payload, fragment):
    with pytest.raises(DataValidationError) as caught:
        read_training_frame(payload, SMALL)
    assert fragment in caught.value.message


# --------------------------------------------------------------------------- #
# Training


def test_training_recovers_the_planted_segments(model, mixed):
    assert model.n_clusters_ == 5
    assert adjusted_rand_score(mixed["latent_segment"], model.labels_) >= 0.9
    meta = model.metadata_
    assert meta["kind"] == "custom" and meta["n_samples"] == ROWS
    assert meta["features"] == model.schema_.names and "latent_segment" not in meta["features"]
    assert FeatureSchema.from_dict(meta["schema"]) == model.schema_ and model.schema_.fitted


def test_same_data_and_seed_give_same_ids_and_names(model, frame, schema):
    again = SegmentationModel.train(frame, schema=schema, random_state=42)
    assert again.cluster_names_ == model.cluster_names_
    np.testing.assert_array_equal(again.labels_, model.labels_)
    assert [s["segment_key"] for s in again.segments] == [s["segment_key"] for s in model.segments]
    sizes = [s["size"] for s in model.segments]
    assert sizes == sorted(sizes, reverse=True)  # ids follow size


def test_segments_carry_names_means_and_level_shares(model, frame):
    names = model.cluster_names_
    assert len(set(names)) == len(names) and all(names)
    assert len({s["segment_key"] for s in model.segments}) == model.n_clusters_
    labels = model.labels_
    for segment in model.segments:
        assert set(segment) == {
            "cluster_id",
            "cluster_name",
            "size",
            "percentage",
            "description",
            "means",
            "segment_key",
            "generated_name",
        }
        assert segment["generated_name"] == segment["cluster_name"]
        members = frame[labels == segment["cluster_id"]]
        assert segment["size"] == len(members)
        assert segment["means"]["annual_income"] == pytest.approx(members["annual_income"].mean(), abs=1e-3)
        for name in ("plan", "channel", "region"):
            shares = segment["means"][name]
            assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
            top = max(shares, key=shares.get)
            assert shares[top] == pytest.approx((members[name] == top).mean(), abs=1e-3)
    assert sum(s["size"] for s in model.segments) == ROWS


def test_names_come_from_distinguishing_features(model):
    for segment in model.segments:
        first = segment["cluster_name"].split(", ")[0]
        assert first.startswith(("High ", "Low ")) or ": " in first
        assert "region" not in segment["cluster_name"]  # pure noise never sets a segment apart


def test_categorical_features_weigh_like_one_numeric_feature(model, frame):
    encoded = model.encode(frame)
    col = 0
    for feature in model.schema_.features:
        block = encoded[:, col : col + feature.width]
        assert block.var(axis=0).sum() == pytest.approx(1.0, abs=1e-6)
        col += feature.width
    assert model.schema_.feature("region").width == 40


def test_rare_levels_are_pooled_and_missing_cells_imputed(frame, schema):
    damaged = frame.copy()
    rng = np.random.default_rng(0)
    holes = rng.random(len(damaged)) < 0.1
    damaged.loc[holes, "tenure_months"] = np.nan
    damaged["plan"] = damaged["plan"].cat.add_categories([f"promo_{i}" for i in range(60)])
    damaged.loc[:59, "plan"] = [f"promo_{i}" for i in range(60)]
    damaged.loc[60:89, "plan"] = np.nan
    fitted = SegmentationModel.train(damaged, schema=schema, random_state=1, n_clusters=5)
    shares = fitted.metadata_["missing_shares"]
    assert set(shares) == set(schema.names)
    assert shares["tenure_months"] == pytest.approx(holes.mean(), abs=1e-6)
    assert shares["plan"] == pytest.approx(30 / ROWS, abs=1e-6)
    assert shares["age"] == 0.0
    tenure = fitted.schema_.feature("tenure_months")
    assert tenure.median_ == pytest.approx(np.nanmedian(damaged["tenure_months"]))
    plan = fitted.schema_.feature("plan")
    assert len(plan.levels_) <= 52 and plan.levels_[-2:] == (OTHER_LEVEL, MISSING_LEVEL)
    assert sum(plan.shares_) == pytest.approx(1.0)
    assert np.isfinite(fitted.encode(damaged)).all()


def test_auto_transform_logs_skewed_non_negative_columns_only(model, frame):
    assert frame["annual_income"].skew() > 1 and abs(frame["age"].skew()) < 0.5
    assert model.schema_.feature("annual_income").log_ is True
    assert model.schema_.feature("loyalty_points").log_ is True
    assert model.schema_.feature("age").log_ is False
    assert model.schema_.feature("tenure_months").log_ is False


def test_declared_transforms_are_kept_and_log_needs_non_negative_values(frame):
    declared = FeatureSchema.declare(
        [
            {"name": "annual_income", "type": "numeric", "transform": "none"},
            {"name": "age", "type": "numeric", "transform": "log"},
            {"name": "plan", "type": "categorical"},
        ]
    )
    fitted = SegmentationModel.train(frame, schema=declared, n_clusters=3)
    assert [f.log_ for f in fitted.schema_.features[:2]] == [False, True]
    negative = frame.assign(age=frame["age"] - 100)
    with pytest.raises(DataValidationError) as caught:
        SegmentationModel.train(negative, schema=declared, n_clusters=3)
    assert "age" in caught.value.message and "log" in caught.value.message


def test_training_needs_every_declared_column(frame, schema):
    with pytest.raises(DataValidationError) as caught:
        SegmentationModel.train(frame.drop(columns=["plan", "age"]), schema=schema)
    assert "age" in caught.value.message and "plan" in caught.value.message


# --------------------------------------------------------------------------- #
# Persistence and scoring


def test_bytes_and_directory_round_trips_predict_the_same(model, mixed, tmp_path):
    text = as_text(mixed.head(500))
    expected = model.score_frame(text)
    loaded = SegmentationModel.from_bytes(model.to_bytes())
    model.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kmeans.pkl", "metadata.json"]
    for other in (loaded, SegmentationModel.load(tmp_path)):
        scored = other.score_frame(text)
        np.testing.assert_array_equal(scored.labels, expected.labels)
        np.testing.assert_array_equal(scored.confidence, expected.confidence)
        assert other.schema_ == model.schema_ and other.cluster_names_ == model.cluster_names_
        assert other.metadata_["segments"] == model.metadata_["segments"]


def test_score_frame_reports_errors_warnings_and_imputes(frame, mixed, schema):
    bounded = FeatureSchema.declare(
        [{**f, "min": 0, "max": 500} if f["name"] == "avg_basket" else f for f in mixed_features()]
    )
    model = SegmentationModel.train(frame, schema=bounded, random_state=3, n_clusters=5)
    text = as_text(mixed.head(6).drop(columns=["latent_segment"]))
    text.columns = [c.upper() for c in text.columns]  # headers match case-insensitively
    text.loc[1, "PLAN"] = "gold"
    text.loc[2, "TENURE_MONTHS"] = ""
    text.loc[3, "AVG_BASKET"] = "900"
    text.loc[4, "AGE"] = "abc"
    text.loc[4, "CHANNEL"] = " "
    scored = model.score_frame(text)
    assert scored.valid.tolist() == [True, True, True, False, False, True]
    assert scored.errors == [None, None, None, "avg_basket: out of range 0..500: 900", "age: not a number: 'abc'", None]
    assert scored.warnings == [
        None,
        "plan: unseen category 'gold'",
        "tenure_months: missing, imputed",
        None,
        "channel: missing, imputed",
        None,
    ]
    assert len(scored.labels) == len(scored.confidence) == 4
    assert ((scored.confidence >= 0) & (scored.confidence <= 1)).all()

    # The served ids are scikit-learn's own on the encoded matrix.
    batch = as_text(mixed.head(800))
    scored = model.score_frame(batch)
    typed = read_training_frame(mixed.head(800).to_csv(index=False).encode(), bounded)
    np.testing.assert_array_equal(scored.labels, model.kmeans_.predict(model.encode(typed)))

    with pytest.raises(DataValidationError) as caught:
        model.score_frame(text.drop(columns=["PLAN", "AGE"]))
    assert "plan" in caught.value.message and "age" in caught.value.message


def test_score_records_matches_score_frame(model, mixed):
    head = mixed.head(50).drop(columns=["latent_segment"])
    records = head.to_dict("records")
    records[0]["plan"] = "gold"
    records[1]["tenure_months"] = None
    text = as_text(head)
    text.loc[0, "plan"] = "gold"
    text.loc[1, "tenure_months"] = ""
    scored = model.score_records(records)
    batch = model.score_frame(text)
    np.testing.assert_array_equal(scored.labels, batch.labels)
    np.testing.assert_allclose(scored.confidence, batch.confidence)
    assert scored.labels.dtype == np.int64 and scored.confidence.dtype == np.float64
    assert scored.warnings[0] == ["plan: unseen category 'gold'"]
    assert scored.warnings[1] == ["tenure_months: missing, imputed"]
    assert scored.warnings[2:] == [[]] * 48
    with pytest.raises(TypeError):
        model.predict_one(records[2])


def test_unseen_category_without_other_level_gets_no_indicator(model, mixed):
    region = model.schema_.feature("region")
    assert OTHER_LEVEL not in region.levels_
    record = mixed.head(1).drop(columns=["latent_segment"]).to_dict("records")[0]
    encoded = model.encode(pd.DataFrame([record | {"region": "atlantis"}]))
    col = sum(f.width for f in model.schema_.features[: model.schema_.names.index("region")])
    assert (encoded[0, col : col + region.width] == 0).all()


def test_customer_kind_scores_through_the_same_interface():
    data = generate(1000, seed=3)
    model = SegmentationModel.train(data, n_clusters=4)
    text = as_text(data.head(5))
    text.loc[2, "Age"] = "old"
    scored = model.score_frame(text)
    assert scored.valid.tolist() == [True, True, False, True, True]
    assert scored.errors[2] == "age: not a number: 'old'" and scored.warnings == [None] * 5
    records = [{"age": 30, "annual_income": 40.0, "spending_score": 70, "purchase_frequency": 20}]
    by_records = model.score_records(records)
    assert by_records.labels.tolist() == [model.predict_one(records[0])[0]] and by_records.warnings == [[]]


def test_one_record_is_scored_as_the_batch_path_scores_it():
    """The one-record fast path gives the batch path's ids, confidences and warnings, every case."""
    from app.ml.encoding import check_records, encode

    frame = _training_frame_for_records()
    schema = FeatureSchema.declare(
        [
            {"name": "spend", "type": "numeric", "min": 0},
            {"name": "visits", "type": "numeric", "transform": "none"},
            {"name": "plan", "type": "categorical"},
        ]
    )
    model = SegmentationModel.train(read_training_frame(frame.to_csv(index=False).encode(), schema), schema=schema)
    records = [
        {"spend": 120.0, "visits": 3.0, "plan": "pro"},
        {"spend": 5.0, "visits": 30.0, "plan": " free "},
        {"spend": None, "visits": 10.0, "plan": "gold"},
        {"spend": 40.0, "visits": 1.0, "plan": ""},
    ]
    fitted = model.schema_
    for record in records:
        one = model.score_records([record])
        checked = check_records(fitted, [record])
        labels, confidence = model._scorer.predict(encode(fitted, checked.frame))
        assert one.labels.tolist() == labels.tolist()
        assert one.confidence.tolist() == pytest.approx(confidence.tolist(), abs=1e-12)
        assert one.warnings == checked.warnings
    with pytest.raises(DataValidationError, match="spend"):
        model.score_records([{"spend": -1.0, "visits": 1.0, "plan": "pro"}])


def _training_frame_for_records() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 300
    group = rng.integers(0, 3, n)
    frame = pd.DataFrame(
        {
            "spend": np.exp(rng.normal(np.array([2.0, 4.0, 5.5])[group], 0.3)).round(2),
            "visits": rng.poisson(np.array([2, 10, 30])[group]).astype(float),
            "plan": np.array(["free", "pro", "team"])[group],
        }
    )
    frame.loc[3, "plan"] = None
    return frame
