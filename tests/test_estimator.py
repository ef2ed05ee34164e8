"""SegmentationModel as a scikit-learn estimator, and the one K-Means built from given centroids."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

from app.ml import SegmentationModel
from app.ml.kmeans import kmeans_with_centers
from app.ml.schema import FeatureSchema, customer_matrix
from generate_dataset import generate

FOUR_COLUMNS = "its data is the four customer features; the check fits on generated data of another width"

EXPECTED_FAILED_CHECKS = dict.fromkeys(
    (
        "check_clustering",
        "check_dict_unchanged",
        "check_dont_overwrite_parameters",
        "check_dtype_object",
        "check_estimators_dtypes",
        "check_estimators_fit_returns_self",
        "check_estimators_overwrite_params",
        "check_estimators_pickle",
        "check_f_contiguous_array_estimator",
        "check_fit2d_predict1d",
        "check_fit_check_is_fitted",
        "check_fit_idempotent",
        "check_fit_score_takes_y",
        "check_methods_sample_order_invariance",
        "check_methods_subset_invariance",
        "check_n_features_in",
        "check_pipeline_consistency",
        "check_readonly_memmap_input",
    ),
    FOUR_COLUMNS,
) | {
    "check_estimators_nan_inf": FOUR_COLUMNS + " (NaN and infinity are refused: see the test below)",
    "check_estimators_empty_data_messages": "a matrix of zero columns is refused for its width, in the schema's words",
    "check_fit2d_1sample": "one sample is refused by the ten-customer minimum, in the schema's words",
    "check_fit2d_1feature": "one column is refused for its width, in the schema's words",
}


@parametrize_with_checks([SegmentationModel()], expected_failed_checks=lambda _: EXPECTED_FAILED_CHECKS)
def test_scikit_learn_checks(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def customers() -> np.ndarray:
    return customer_matrix(generate(1500, seed=7))


def test_hyperparameters_are_kept_and_fit_returns_the_fitted_estimator(customers):
    model = SegmentationModel(n_clusters=4, k_range=(2, 6), random_state=3)
    assert model.get_params() == {"n_clusters": 4, "k_range": (2, 6), "random_state": 3, "schema": None}
    assert model.fit(customers) is model
    assert model.n_clusters == 4 and model.n_clusters_ == 4
    assert model.labels_.shape == (len(customers),)
    np.testing.assert_array_equal(model.fit_predict(customers), model.predict(customers))
    assert clone(model).get_params() == model.get_params() and not hasattr(clone(model), "kmeans_")


def test_automatic_k_is_learned_not_written_into_the_parameters(customers):
    model = SegmentationModel(k_range=(2, 5)).fit(customers)
    assert model.n_clusters is None and 2 <= model.n_clusters_ <= 5


def test_nan_and_infinity_are_refused(customers):
    broken = customers.copy()
    broken[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        SegmentationModel(n_clusters=3).fit(broken)


def test_the_saved_kmeans_predicts_the_served_ids(customers):
    model = SegmentationModel(random_state=1).fit(customers)
    served = model.predict(customers)
    np.testing.assert_array_equal(model.kmeans_.predict(model.scaler_.transform(customers)), served)
    np.testing.assert_array_equal(model.labels_, served)


def test_kmeans_with_centers_predicts_the_nearest_given_centroid(customers):
    model = SegmentationModel(n_clusters=5, random_state=2).fit(customers)
    scaled = model.scaler_.transform(customers)
    order = np.array([3, 0, 4, 1, 2])
    reordered = kmeans_with_centers(model.kmeans_.cluster_centers_[order], like=model.kmeans_)
    new_id = np.empty(5, dtype=np.int64)
    new_id[order] = np.arange(5)
    np.testing.assert_array_equal(reordered.predict(scaled), new_id[model.predict(customers)])
    np.testing.assert_array_equal(reordered.cluster_centers_, model.kmeans_.cluster_centers_[order])
    assert not hasattr(reordered, "labels_")
    # Without an estimator to copy (centroids found by another engine): the same predictions.
    fresh = kmeans_with_centers(model.kmeans_.cluster_centers_[order], inertia=12.5)
    np.testing.assert_array_equal(fresh.predict(scaled), reordered.predict(scaled))
    assert fresh.inertia_ == 12.5
    # The estimator copied from is left as it was.
    np.testing.assert_array_equal(model.kmeans_.predict(scaled), model.predict(customers))


def test_a_declared_schema_is_a_hyperparameter_and_its_fit_is_learned():
    rng = np.random.default_rng(0)

    frame = pd.DataFrame({"tenure": rng.gamma(2.0, 10.0, 600), "spend": rng.normal(50, 10, 600)})
    declared = FeatureSchema.declare([{"name": "tenure", "type": "numeric"}, {"name": "spend", "type": "numeric"}])
    model = SegmentationModel(n_clusters=3, schema=declared).fit(frame)
    assert model.schema is declared and not declared.fitted and model.schema_.fitted
    np.testing.assert_array_equal(model.predict(frame), model.kmeans_.predict(model.encode(frame)))
