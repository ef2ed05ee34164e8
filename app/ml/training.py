"""Training: scale, choose k, fit, order the clusters and describe them in metadata."""

from __future__ import annotations

import hashlib
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import joblib
import numpy as np
import pandas as pd
import sklearn
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.preprocessing import StandardScaler

from app.ml import selection
from app.ml.encoding import encode, fit_schema, level_indices
from app.ml.frames import match_columns
from app.ml.kmeans import kmeans_with_centers
from app.ml.naming import (
    custom_segment_names,
    describe_custom_segment,
    describe_customer_segment,
    segment_names,
    segment_traits,
)
from app.ml.persistence import FORMAT_VERSION
from app.ml.preprocess import FEATURES, DataValidationError
from app.ml.schema import FeatureSchema, customer_matrix
from app.ml.scoring import CentroidScorer
from app.ml.value import DEFAULT_HORIZON_DAYS, ValueModel, table_summary

_INCOME, _SPENDING, _FREQUENCY, _AGE = (
    FEATURES.index(name) for name in ("annual_income", "spending_score", "purchase_frequency", "age")
)


@dataclass(frozen=True)
class TrainedParts:
    """What a training produces: the estimators, the JSON-ready metadata and each row's cluster."""

    scaler: StandardScaler | None
    kmeans: KMeans | MiniBatchKMeans
    metadata: dict[str, Any]
    labels: np.ndarray


def train_customer(X: Any, *, n_clusters: int | None, random_state: int, k_range: tuple[int, int]) -> TrainedParts:
    """Fit the customer kind on X, an (n, 4) matrix in FEATURES order (or a DataFrame), original units.

    Cluster ids are ordered by centroid income, then spending (original
    units), so the same data and ``random_state`` always give the same ids.
    """
    started = time.perf_counter()
    arr = customer_matrix(X)
    n = len(arr)
    work_dtype = np.float32 if selection.is_large(n) else np.float64
    scaler = StandardScaler().fit(arr)
    Xs = scaler.transform(arr).astype(work_dtype, copy=False)
    fit = selection.fit_kmeans(arr, Xs, n_clusters=n_clusters, random_state=random_state, k_range=k_range)

    centers_scaled = np.asarray(fit.kmeans.cluster_centers_, dtype=np.float64)
    centers = scaler.inverse_transform(centers_scaled)
    order = np.lexsort((centers[:, _SPENDING], centers[:, _INCOME]))
    centers = centers[order]
    labels = _fitted_labels(
        fit.kmeans, n, lambda: CentroidScorer(centers_scaled, scaler.mean_, scaler.scale_).predict(arr)[0]
    )
    kmeans, labels = _renumber(fit.kmeans, centers_scaled, order, labels)
    z = kmeans.cluster_centers_
    sizes = _sizes(labels, len(order))

    means = (
        np.stack(
            [
                np.bincount(labels, weights=arr[:, j].astype(np.float64), minlength=len(sizes))
                for j in range(len(FEATURES))
            ],
            axis=1,
        )
        / sizes[:, None]
    )
    segments, centroids = customer_segments(z, centers, sizes, means, n)
    fingerprint = hashlib.sha256(np.ascontiguousarray(arr, dtype=np.float32).tobytes()).hexdigest()
    metadata = _metadata(fit, Xs, labels, n=n, random_state=random_state, fingerprint=fingerprint)
    metadata["segments"] = segments
    metadata["centroids"] = centroids
    _finish_metadata(metadata, FeatureSchema.customer(), dict.fromkeys(FEATURES, 0.0), fit.selection, started)
    return TrainedParts(scaler, kmeans, metadata, labels)


def customer_segments(
    z: np.ndarray, centers: np.ndarray, sizes: np.ndarray, means: np.ndarray, n: int
) -> tuple[list[dict[str, Any]], list[dict[str, float]]]:
    """The customer kind's segment descriptions and centroids from the ordered centroids (scaled ``z``,
    original units ``centers``), each segment's size and feature means (rows in id order)."""
    names = segment_names(z, centers)
    segments = []
    for i in range(len(sizes)):
        pct = 100.0 * sizes[i] / n
        segments.append(
            {
                "cluster_id": i,
                "cluster_name": names[i],
                "size": int(sizes[i]),
                "percentage": round(float(pct), 2),
                "avg_age": round(float(means[i, _AGE]), 2),
                "avg_income": round(float(means[i, _INCOME]), 2),
                "avg_spending_score": round(float(means[i, _SPENDING]), 2),
                "avg_purchase_frequency": round(float(means[i, _FREQUENCY]), 2),
                "description": describe_customer_segment(means[i], z[i], pct),
                "means": {feature: round(float(means[i, j]), 4) for j, feature in enumerate(FEATURES)},
            }
        )
    centroids = [
        {feature: round(float(centers[i, j]), 4) for j, feature in enumerate(FEATURES)} for i in range(len(sizes))
    ]
    return segments, centroids


def train_custom(
    frame: pd.DataFrame,
    schema: FeatureSchema,
    *,
    n_clusters: int | None,
    random_state: int,
    k_range: tuple[int, int],
) -> TrainedParts:
    """Fit a declared schema on ``frame`` (from read_training_frame): learn the features, encode, cluster.

    Cluster ids are ordered by size (largest first), then by centroid, so
    the same data and ``random_state`` give the same ids.
    """
    started = time.perf_counter()
    if not isinstance(frame, pd.DataFrame):
        raise DataValidationError("a custom segmentation trains on a DataFrame with one column per declared feature")
    found = match_columns(frame.columns, schema.names, required=schema.names)
    frame = frame.rename(columns={raw: name for name, raw in found.items()})
    fitted, missing_shares = fit_schema(schema, frame)
    n = len(frame)
    Xs = encode(fitted, frame, np.float32 if selection.is_large(n) else np.float64)
    fit = selection.fit_kmeans(Xs, Xs, n_clusters=n_clusters, random_state=random_state, k_range=k_range)

    centers_scaled = np.asarray(fit.kmeans.cluster_centers_, dtype=np.float64)
    k = len(centers_scaled)
    labels = _fitted_labels(fit.kmeans, n, lambda: CentroidScorer(centers_scaled).predict(Xs)[0])
    keys = [centers_scaled[:, j] for j in reversed(range(centers_scaled.shape[1]))]
    order = np.lexsort((*keys, -np.bincount(labels, minlength=k)))
    kmeans, labels = _renumber(fit.kmeans, centers_scaled, order, labels)
    centers = centers_scaled[order]
    sizes = _sizes(labels, k)

    stats = segment_statistics(fitted, frame, labels, sizes)
    segments = custom_segments(fitted, centers, sizes, stats, n)
    fingerprint = hashlib.sha256(np.ascontiguousarray(Xs, dtype=np.float32).tobytes()).hexdigest()
    metadata = _metadata(fit, Xs, labels, n=n, random_state=random_state, fingerprint=fingerprint)
    metadata["segments"] = segments
    metadata["centroids"] = [decode_centroid(fitted, center) for center in centers]
    _finish_metadata(metadata, fitted, missing_shares, fit.selection, started)
    return TrainedParts(None, kmeans, metadata, labels)


def custom_segments(
    fitted: FeatureSchema, centers: np.ndarray, sizes: np.ndarray, stats: list[dict[str, Any]], n: int
) -> list[dict[str, Any]]:
    """A declared schema's segment descriptions from the ordered centroids (encoded space), each
    segment's size and statistics (segment_statistics), and the number of training rows."""
    k = len(sizes)
    z = np.full((k, len(fitted.features)), np.nan)
    col = 0
    for j, feature in enumerate(fitted.features):
        if feature.numeric:
            z[:, j] = centers[:, col]
        col += feature.width
    traits = segment_traits(fitted, z, stats)
    names = custom_segment_names(traits)
    return [
        {
            "cluster_id": i,
            "cluster_name": names[i],
            "size": int(sizes[i]),
            "percentage": round(100.0 * sizes[i] / n, 2),
            "description": describe_custom_segment(fitted, traits[i], stats[i], z[i], 100.0 * sizes[i] / n),
            "means": stats[i],
        }
        for i in range(k)
    ]


def segment_statistics(
    schema: FeatureSchema, frame: pd.DataFrame, labels: np.ndarray, sizes: np.ndarray
) -> list[dict[str, Any]]:
    """Per segment: numeric means in the feature's own units (over non-empty cells), level shares."""
    k = len(sizes)
    stats: list[dict[str, Any]] = [{} for _ in range(k)]
    for feature in schema.features:
        if feature.numeric:
            values = frame[feature.name].to_numpy(dtype=np.float64, na_value=np.nan)
            seen = ~np.isnan(values)
            counts = np.bincount(labels[seen], minlength=k)
            sums = np.bincount(labels[seen], weights=values[seen], minlength=k)
            for i in range(k):
                mean = sums[i] / counts[i] if counts[i] else (feature.median_ or 0.0)
                stats[i][feature.name] = round(float(mean), 4)
        else:
            levels = feature.levels_ or ()
            idx, _, _ = level_indices(feature, frame[feature.name])
            coded = idx >= 0  # every training cell has a level; kept defensive for hand-made frames
            cells = labels[coded] * len(levels) + idx[coded]
            counts = np.bincount(cells, minlength=k * len(levels)).reshape(k, len(levels))
            for i in range(k):
                stats[i][feature.name] = {
                    level: round(float(c / sizes[i]), 4) for level, c in zip(levels, counts[i], strict=True)
                }
    return stats


def decode_centroid(schema: FeatureSchema, center: np.ndarray) -> dict[str, Any]:
    """A centroid in the features' own units: numeric values back through scaling and log1p, level shares."""
    decoded: dict[str, Any] = {}
    col = 0
    for feature in schema.features:
        if feature.numeric:
            assert feature.mean_ is not None and feature.std_ is not None
            value = float(center[col]) * feature.std_ + feature.mean_
            decoded[feature.name] = round(math.expm1(value) if feature.log_ else value, 4)
        else:
            weight = feature.weight_ or 1.0
            cells = center[col : col + feature.width] / weight
            decoded[feature.name] = {
                level: round(float(v), 4) for level, v in zip(feature.levels_ or (), cells, strict=True)
            }
        col += feature.width
    return decoded


def _segment_keys(fingerprint: str, k: int) -> list[str]:
    """Short keys, stable for the same data and k, unique within the model."""
    digests = [hashlib.sha256(f"{fingerprint}:{k}:{i}".encode()).hexdigest() for i in range(k)]
    size = 10
    while len({d[:size] for d in digests}) < k:
        size += 2
    return [d[:size] for d in digests]


def _fitted_labels(kmeans: KMeans | MiniBatchKMeans, n: int, assign: Callable[[], np.ndarray]) -> np.ndarray:
    """Each training row's cluster as fitted; ``assign()`` labels them when the estimator kept none."""
    labels = getattr(kmeans, "labels_", None)
    if labels is None or len(labels) != n:
        return np.asarray(assign(), dtype=np.int64)
    return np.asarray(labels, dtype=np.int64)


def _renumber(
    kmeans: KMeans | MiniBatchKMeans, centers_scaled: np.ndarray, order: np.ndarray, labels: np.ndarray
) -> tuple[KMeans | MiniBatchKMeans, np.ndarray]:
    """Renumber the fitted clusters so new cluster i is old ``order[i]``: the estimator whose own
    ``predict`` returns the new ids (see :func:`app.ml.kmeans.kmeans_with_centers`; ``centers_scaled``
    are the fitted centroids in float64) and the labels renumbered."""
    k = len(order)
    new_id = np.empty(k, dtype=np.int64)
    new_id[order] = np.arange(k)
    return kmeans_with_centers(centers_scaled[order], like=kmeans), new_id[labels]


def _sizes(labels: np.ndarray, k: int) -> np.ndarray:
    sizes = np.bincount(labels, minlength=k)
    if (sizes == 0).any():
        raise DataValidationError(f"could not form {k} distinct segments from this data (too few distinct customers)")
    return sizes


def _metadata(
    fit: selection.ClusterFit,
    Xs: np.ndarray,
    labels: np.ndarray,
    *,
    n: int,
    random_state: int,
    fingerprint: str,
) -> dict[str, Any]:
    """The metadata every kind shares, up to (not including) segments and centroids."""
    rows = fit.silhouette_rows
    if fit.known_silhouette is not None:
        silhouette = fit.known_silhouette  # same rows, same partition (ids permuted)
    else:
        silhouette = selection.silhouette_scores(Xs[rows], [labels[rows]])[0]
    k = int(fit.kmeans.cluster_centers_.shape[0])
    trained_at = datetime.now(UTC)
    return {
        "format_version": FORMAT_VERSION,
        "version": f"{trained_at:%Y%m%dT%H%M%S}Z-{fingerprint[:8]}-k{k}",
        "trained_at": trained_at.isoformat(timespec="seconds"),
        "features": None,  # filled in by _finish_metadata, kept here for the key order
        "n_samples": n,
        "total_customers": n,
        "n_clusters": k,
        "random_state": int(random_state),
        "algorithm": fit.algorithm,
        "inertia": round(float(fit.kmeans.inertia_), 4),
        "silhouette_score": round(silhouette, 6) if math.isfinite(silhouette) else None,
        "silhouette_sample_size": int(len(rows)),
        "data_fingerprint": fingerprint,
        "k_selection": fit.selection,
    }


def _finish_metadata(
    metadata: dict[str, Any],
    schema: FeatureSchema,
    missing_shares: dict[str, float],
    report: dict[str, Any],
    started: float,
) -> None:
    """Add what every kind shares after the segments: schema, keys, library versions, elbow, duration."""
    metadata["features"] = schema.names
    metadata["schema"] = schema.to_dict()
    metadata["kind"] = metadata["schema"]["kind"]
    metadata["missing_shares"] = {name: round(float(share), 6) for name, share in missing_shares.items()}
    keys = _segment_keys(metadata["data_fingerprint"], len(metadata["segments"]))
    for segment, key in zip(metadata["segments"], keys, strict=True):
        segment["segment_key"] = key
        segment["generated_name"] = segment["cluster_name"]
    metadata["library_versions"] = {
        "python": platform.python_version(),
        "sklearn": sklearn.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "joblib": joblib.__version__,
    }
    if report.get("method") == "silhouette":
        metadata["elbow"] = {
            key: report[key] for key in ("optimal_k", "k_range", "inertias", "silhouette_scores", "method")
        } | {"knee_k": report["knee_k"]}
    metadata["duration_seconds"] = round(time.perf_counter() - started, 4)


def _value_models(
    frame: pd.DataFrame, labels: np.ndarray, k: int
) -> tuple[ValueModel | None, list[str], dict[str, list[float | None]]]:
    """BG/NBD and Gamma-Gamma fitted on the training customers, the warnings of what could not be,
    and per segment the mean P(alive) and its share (0..100) of the customers' summed clv at 90 days."""
    empty: dict[str, list[float | None]] = {"mean_p_alive": [None] * k, "predicted_revenue_share": [None] * k}
    summary = table_summary(frame)
    if summary is None:
        return None, ["No value model: the table has no purchase days (summed by an engine that keeps none)"], empty
    model, warnings = ValueModel.fit(summary)
    if model is None:
        return None, warnings, empty
    values = model.predict(summary, DEFAULT_HORIZON_DAYS)
    sizes = np.bincount(labels, minlength=k).astype(np.float64)
    alive = np.bincount(labels, weights=values["p_alive"], minlength=k) / np.maximum(sizes, 1)
    shares: list[float | None] = [None] * k
    clv = np.nan_to_num(values["clv"], nan=0.0, posinf=0.0, neginf=0.0)
    total = float(clv.sum())
    if model.gamma_gamma is not None and total > 0:
        shares = [round(100.0 * float(v) / total, 2) for v in np.bincount(labels, weights=clv, minlength=k)]
    return model, warnings, {"mean_p_alive": [round(float(v), 4) for v in alive], "predicted_revenue_share": shares}


def train_rfm(data: Any, *, n_clusters: int | None, random_state: int, k_range: tuple[int, int]) -> TrainedParts:
    """Fit kind ``rfm`` on a per-customer RFM table (an app.ml.rfm.RfmTable, or its frame).

    K-Means runs on recency_days, log1p(frequency) and log1p(max(monetary, 0)),
    standardized; the quintile cut points are learned here and kept in the
    metadata, segments are named in RFM words and carry their revenue share.
    """
    from app.ml import rfm

    started = time.perf_counter()
    facts = getattr(data, "facts", None)
    frame = data.frame if facts is not None else data
    if len(frame) == 0:
        raise DataValidationError(
            "no customer in the log has a counted purchase (every order nets to a negative amount)",
            [{"row": None, "line": None, "column": None, "reason": "no customers"}],
        )
    parts = train_custom(
        rfm.clustering_frame(frame), rfm.rfm_schema(), n_clusters=n_clusters, random_state=random_state, k_range=k_range
    )
    metadata, labels = parts.metadata, parts.labels
    k = len(metadata["segments"])
    cuts = rfm.fit_cuts(frame)
    got = rfm.scores(frame, cuts)
    sizes = np.bincount(labels, minlength=k).astype(np.float64)
    mean_scores = np.stack(
        [np.bincount(labels, weights=got[name], minlength=k) / sizes for name in ("r_score", "f_score", "m_score")],
        axis=1,
    )
    monetary = frame["monetary"].to_numpy(dtype=np.float64)
    revenue = np.bincount(labels, weights=monetary, minlength=k)
    total = float(monetary.sum())
    columns = ("recency_days", "frequency", "monetary", "tenure_days", "avg_order_value")
    means = {
        name: np.bincount(labels, weights=frame[name].to_numpy(dtype=np.float64), minlength=k) / sizes
        for name in columns
    }
    names = rfm.segment_names(mean_scores, means["tenure_days"])
    value_model, value_warnings, value_means = _value_models(frame, labels, k)
    n = len(frame)
    for i, segment in enumerate(metadata["segments"]):
        share = 100.0 * float(revenue[i]) / total if total > 0 else 0.0
        segment_means = {name: round(float(means[name][i]), 4) for name in columns}
        segment["cluster_name"] = segment["generated_name"] = names[i]
        segment["revenue_share"] = round(share, 2)
        segment["means"] = segment_means
        segment["mean_scores"] = {
            name: round(float(mean_scores[i, j]), 4) for j, name in enumerate(("r_score", "f_score", "m_score"))
        }
        segment["description"] = rfm.describe_segment(int(sizes[i]), 100.0 * sizes[i] / n, share, segment_means)
        segment["mean_p_alive"] = value_means["mean_p_alive"][i]
        segment["predicted_revenue_share"] = value_means["predicted_revenue_share"][i]
    metadata["kind"] = "rfm"
    metadata["value_model"] = value_model.as_dict() if value_model is not None else None
    metadata["warnings"] = value_warnings
    metadata["rfm"] = {"cuts": cuts, "quantiles": list(rfm.QUANTILES)}
    if facts is not None:
        metadata["rfm"]["log"] = facts.to_dict()
        metadata["skipped_rows"] = facts.skipped_rows
        metadata["n_transactions"] = facts.n_transactions
    metadata["duration_seconds"] = round(time.perf_counter() - started, 4)
    return TrainedParts(None, parts.kmeans, metadata, labels)
