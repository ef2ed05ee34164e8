"""Training: scale, choose k, fit, order the clusters and describe them in metadata."""

from __future__ import annotations

import hashlib
import math
import platform
import time
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
from app.ml.naming import describe_customer_segment, segment_names
from app.ml.persistence import FORMAT_VERSION
from app.ml.schema import customer_matrix
from app.ml.scoring import CentroidScorer
from app.preprocess import FEATURES, DataValidationError

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
    labels = _reorder(
        fit.kmeans,
        centers_scaled,
        order,
        n,
        lambda: CentroidScorer(centers_scaled[order], scaler.mean_, scaler.scale_).predict(arr)[0],
    )
    z = fit.kmeans.cluster_centers_
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
            }
        )
    centroids = [
        {feature: round(float(centers[i, j]), 4) for j, feature in enumerate(FEATURES)} for i in range(len(sizes))
    ]
    fingerprint = hashlib.sha256(np.ascontiguousarray(arr, dtype=np.float32).tobytes()).hexdigest()
    metadata = _metadata(
        fit, Xs, labels, n=n, random_state=random_state, fingerprint=fingerprint, features=list(FEATURES)
    )
    metadata["segments"] = segments
    metadata["centroids"] = centroids
    _finish_metadata(metadata, fit.selection, started)
    return TrainedParts(scaler, fit.kmeans, metadata, labels)


def _reorder(
    kmeans: KMeans | MiniBatchKMeans, centers_scaled: np.ndarray, order: np.ndarray, n: int, assign: Any
) -> np.ndarray:
    """Renumber the fitted clusters so cluster i is ``order[i]``; return every training row's new id.

    ``centers_scaled`` are the fitted centroids in float64. Only the public
    ``cluster_centers_`` is replaced (by them, permuted), so the saved estimator's
    own ``predict`` returns the new ids. Training labels are dropped from the
    estimator: a 1M-row model would otherwise carry 4 MB of them into every
    saved version. ``assign()`` labels the rows when the estimator kept none.
    """
    k = len(order)
    new_id = np.empty(k, dtype=np.int64)
    new_id[order] = np.arange(k)
    kmeans.cluster_centers_ = centers_scaled[order]
    labels = getattr(kmeans, "labels_", None)
    if hasattr(kmeans, "labels_"):
        del kmeans.labels_
    if labels is None or len(labels) != n:
        return np.asarray(assign(), dtype=np.int64)
    return new_id[np.asarray(labels)]


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
    features: list[str],
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
        "features": features,
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


def _finish_metadata(metadata: dict[str, Any], report: dict[str, Any], started: float) -> None:
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
