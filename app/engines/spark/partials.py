"""What the Spark trainers share: per-partition partial sums, the shared metadata, and the
scikit-learn estimators that hold what Spark computed."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.preprocessing import StandardScaler

from app.ml import selection
from app.ml.kmeans import kmeans_with_centers
from app.ml.persistence import FORMAT_VERSION

# --- per-partition statistics ---------------------------------------------------------------

PARTIAL_SCHEMA = "cluster long, key string, value double"
"""One partition's sums, long format: (cluster, "count" | "sum:feature" | "seen:feature" | "level:feature:i", value)."""


def partial_rows(labels: np.ndarray, k: int, parts: dict[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """Per cluster: the row count, and for each entry of `parts` ({key: (mask, weights)}) the masked sum."""
    clusters: list[int] = []
    keys: list[str] = []
    values: list[float] = []
    counts = np.bincount(labels, minlength=k)
    for key, (mask, weights) in {"count": (np.ones(len(labels), bool), np.ones(len(labels))), **parts}.items():
        sums = counts if key == "count" else np.bincount(labels[mask], weights=weights[mask], minlength=k)
        clusters.extend(range(k))
        keys.extend([key] * k)
        values.extend(np.asarray(sums, dtype=np.float64).tolist())
    return pd.DataFrame({"cluster": clusters, "key": keys, "value": values})


def collect_partials(partials: Any) -> dict[str, np.ndarray]:
    """Every partition's partial sums added up: {key: per-cluster totals}."""
    rows = partials.groupBy("cluster", "key").sum("value").toPandas()
    k = int(rows["cluster"].max()) + 1
    totals: dict[str, np.ndarray] = {}
    for key, part in rows.groupby("key"):
        values = np.zeros(k)
        values[part["cluster"].to_numpy(dtype=np.int64)] = part["sum(value)"].to_numpy()
        totals[str(key)] = values
    return totals


def spark_metadata(
    *,
    n: int,
    k: int,
    inertia: float,
    silhouette: float,
    sil_rows: np.ndarray,
    report: dict[str, Any],
    random_state: int,
    fingerprint: str,
) -> dict[str, Any]:
    """The metadata every kind shares (the keys of app.ml.training's), up to the segments."""
    trained_at = datetime.now(UTC)
    return {
        "format_version": FORMAT_VERSION,
        "version": f"{trained_at:%Y%m%dT%H%M%S}Z-{fingerprint[:8]}-k{k}",
        "trained_at": trained_at.isoformat(timespec="seconds"),
        "features": None,
        "n_samples": n,
        "total_customers": n,
        "n_clusters": k,
        "random_state": int(random_state),
        "algorithm": "spark_kmeans",
        "inertia": round(float(inertia), 4),
        "silhouette_score": round(silhouette, 6) if np.isfinite(silhouette) else None,
        "silhouette_sample_size": int(len(sil_rows)),
        "data_fingerprint": fingerprint,
        "k_selection": report,
    }


def data_fingerprint(sample_x: np.ndarray, totals: dict[str, np.ndarray], n: int) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(sample_x, dtype=np.float32).tobytes())
    digest.update(str(n).encode())
    for key in sorted(totals):
        digest.update(key.encode() + np.round(totals[key], 6).tobytes())
    return digest.hexdigest()


def spark_kmeans(centers: np.ndarray, inertia: float, random_state: int) -> KMeans | MiniBatchKMeans:
    """A fitted scikit-learn KMeans whose centroids are Spark's, in served-id order (saved as kmeans.pkl)."""
    return kmeans_with_centers(
        np.ascontiguousarray(centers, dtype=np.float64), inertia=inertia, random_state=random_state
    )


def scaler_with_moments(mean: np.ndarray, std: np.ndarray) -> StandardScaler:
    """A StandardScaler fitted to two rows, ``mean - std`` and ``mean + std``: their mean and population
    standard deviation are the dataset's, so it scales as one fitted on every row would (a column of
    zero deviation keeps scale 1, as scikit-learn gives it)."""
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    return StandardScaler().fit(np.stack([mean - std, mean + std]))


def sample_silhouette(sample_x: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> float:
    return float(selection.silhouette_scores(sample_x[rows], [labels[rows]])[0])
