"""Choosing k and fitting K-Means: silhouette on a sample, the inertia knee beside it.

Everything here works on a standard-scaled matrix (rows x clustering columns)
and blocks; fits run on one thread (:class:`SingleThreaded`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from app.ml.preprocess import DataValidationError
from app.ml.schema import customer_matrix

MIN_ROWS = 10
"""Fewest customers we train on; a k-segment model also needs 2*k of them."""
DEFAULT_K_RANGE = (2, 10)
SELECTION_SAMPLE_ROWS = 20_000
"""Automatic k is chosen on a random sample of at most this many customers."""
SILHOUETTE_SAMPLE_ROWS = 5_000
"""Silhouette scores are computed on a random sample of at most this many customers."""
MINIBATCH_MIN_ROWS = 200_000
"""From this many customers on, the final fit uses MiniBatchKMeans on float32 data."""
N_INIT = 3


class SingleThreaded:
    """Run scikit-learn's OpenMP/BLAS kernels on one thread while fitting.

    On a small shared machine, multi-threaded Lloyd iterations spin-wait for
    a busy core and a 0.1 s fit can take several seconds; one thread is
    fast and predictable for data this narrow. The limit is process-wide,
    so overlapping fits share one reference-counted limiter and the
    original limits come back when the last one ends.
    """

    _lock = threading.Lock()
    _depth = 0
    _limiter: Any = None

    def __enter__(self) -> None:
        cls = type(self)
        with cls._lock:
            if cls._depth == 0:
                cls._limiter = threadpool_limits(limits=1)
            cls._depth += 1

    def __exit__(self, *exc_info: Any) -> None:
        cls = type(self)
        with cls._lock:
            cls._depth -= 1
            if cls._depth == 0 and cls._limiter is not None:
                cls._limiter.restore_original_limits()
                cls._limiter = None


def min_rows(k: int) -> int:
    return max(MIN_ROWS, 2 * k)


def is_large(n: int) -> bool:
    """Data this large is fitted in float32 with MiniBatchKMeans."""
    return n >= MINIBATCH_MIN_ROWS


def sample_indices(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    if n <= size:
        return np.arange(n)
    return np.sort(rng.choice(n, size=size, replace=False))


def silhouette_scores(X: np.ndarray, label_sets: Sequence[np.ndarray]) -> list[float]:
    """Mean silhouette coefficient of X under each labelling, in one pass.

    Matches sklearn.metrics.silhouette_score(X, labels) to about 1e-5 for each
    labelling, but the pairwise distances are computed once, block by block
    in float32, and the per-cluster distance sums of every labelling come
    from one matrix product, so scoring nine candidate k costs little more
    than one. Memory is bounded by the block size, not by len(X)**2.
    """
    X = np.asarray(X, dtype=np.float64)
    X = (X - X.mean(axis=0)).astype(np.float32)  # centring keeps float32 cancellation small
    n = len(X)
    label_sets = [np.asarray(labels, dtype=np.int64) for labels in label_sets]
    onehots, slices, counts = [], [], []
    start = 0
    for labels in label_sets:
        k = int(labels.max()) + 1 if n else 0
        onehot = np.zeros((n, k), dtype=np.float32)
        onehot[np.arange(n), labels] = 1.0
        onehots.append(onehot)
        counts.append(np.bincount(labels, minlength=k).astype(np.float64))
        slices.append(slice(start, start + k))
        start += k
    H = np.hstack(onehots) if onehots else np.zeros((n, 0), dtype=np.float32)
    XT = np.ascontiguousarray(X.T)
    sq = np.einsum("ij,ij->i", X, X)
    totals = [np.zeros(n) for _ in label_sets]
    block = max(1, 2_000_000 // max(n, 1))
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        rows = np.arange(hi - lo)
        dist = X[lo:hi] @ XT
        dist *= -2.0
        dist += sq[lo:hi, None]
        dist += sq[None, :]
        np.maximum(dist, 0.0, out=dist)
        np.sqrt(dist, out=dist)
        dist[rows, np.arange(lo, hi)] = 0.0
        sums = (dist @ H).astype(np.float64)
        for t, (labels, sl, cnt) in enumerate(zip(label_sets, slices, counts, strict=True)):
            own = labels[lo:hi]
            s = sums[:, sl]
            own_count = cnt[own]
            a = s[rows, own] / np.maximum(own_count - 1, 1)
            with np.errstate(divide="ignore", invalid="ignore"):
                mean_other = np.where(cnt > 0, s / cnt, np.inf)
            mean_other[rows, own] = np.inf
            b = mean_other.min(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                coef = np.where(own_count > 1, (b - a) / np.maximum(a, b), 0.0)
            totals[t][lo:hi] = np.nan_to_num(coef, nan=0.0, posinf=0.0, neginf=0.0)
    scores = []
    for labels, total in zip(label_sets, totals, strict=True):
        present = np.unique(labels).size
        scores.append(float(total.mean()) if 2 <= present <= n - 1 else float("nan"))
    return scores


def knee(k_values: Sequence[int], inertias: Sequence[float]) -> int:
    """The elbow of the inertia curve: the point farthest from the chord joining its ends."""
    k = np.asarray(k_values, dtype=np.float64)
    y = np.asarray(inertias, dtype=np.float64)
    if len(k) < 3 or y[0] == y[-1]:
        return int(k_values[0])
    kn = (k - k[0]) / (k[-1] - k[0])
    yn = (y - y[-1]) / (y[0] - y[-1])
    # The chord runs from (0, 1) to (1, 0); distance is proportional to 1 - kn - yn.
    return int(k_values[int(np.argmax(1.0 - kn - yn))])


def kmeans_estimator(k: int, random_state: int, *, init: Any = "k-means++", n_init: int = N_INIT) -> KMeans:
    return KMeans(n_clusters=k, init=init, n_init=n_init, random_state=random_state)


def distinct_rows(X: np.ndarray) -> int:
    return int(np.unique(X, axis=0).shape[0])


def select_k(
    Xs: np.ndarray, k_values: Sequence[int], random_state: int
) -> tuple[dict[str, Any], dict[int, tuple[KMeans, float]], np.ndarray]:
    """Fit each candidate k on Xs (already a sample) and score it by silhouette.

    Returns the selection report, {k: (fitted candidate, silhouette)} and the
    silhouette sample indices (into Xs).
    """
    rng = np.random.default_rng(random_state)
    sil_idx = sample_indices(len(Xs), SILHOUETTE_SAMPLE_ROWS, rng)
    fitted: dict[int, KMeans] = {}
    inertias: list[float] = []
    labels: list[np.ndarray] = []
    for k in k_values:
        km = kmeans_estimator(k, random_state).fit(Xs)
        fitted[k] = km
        inertias.append(float(km.inertia_))
        labels.append(km.labels_[sil_idx])
    scores = silhouette_scores(Xs[sil_idx], labels)
    candidates = {k: (fitted[k], score) for k, score in zip(k_values, scores, strict=True)}
    ranked = [s if math.isfinite(s) else -np.inf for s in scores]
    optimal = int(k_values[int(np.argmax(ranked))])
    report = {
        "method": "silhouette",
        "k_range": [int(k) for k in k_values],
        "inertias": [round(v, 4) for v in inertias],
        "silhouette_scores": [round(s, 6) if math.isfinite(s) else None for s in scores],
        "knee_k": knee(k_values, inertias),
        "optimal_k": optimal,
        "sample_size": int(len(Xs)),
        "silhouette_sample_size": int(len(sil_idx)),
    }
    return report, candidates, sil_idx


def candidate_k(n: int, distinct: int, k_min: int, k_max: int) -> list[int]:
    if k_min < 2 or k_max < k_min:
        raise DataValidationError(f"invalid k range {k_min}..{k_max}: need 2 <= k_min <= k_max")
    if n < MIN_ROWS:
        raise DataValidationError(f"need at least {MIN_ROWS} customers to train, got {n}")
    top = min(k_max, n // 2, distinct)
    if top < k_min:
        raise DataValidationError(
            f"{n} customers ({distinct} distinct) are too few to compare {k_min}..{k_max} segments"
        )
    return list(range(k_min, top + 1))


def elbow(X: Any, *, k_min: int = 2, k_max: int = 10, random_state: int = 42) -> dict[str, Any]:
    """Inertia and sampled silhouette for k = k_min..k_max on standard-scaled customer features X.

    Returns ``{"optimal_k", "k_range", "inertias", "silhouette_scores",
    "method", "knee_k", "sample_size", "silhouette_sample_size"}``;
    ``optimal_k`` is the k with the best silhouette, ``knee_k`` the elbow
    of the inertia curve. Data beyond SELECTION_SAMPLE_ROWS customers is
    sampled, so inertias are those of the sample. The range is cut short
    (never extended) when there are too few customers for its top.
    """
    arr = customer_matrix(X)
    rng = np.random.default_rng(random_state)
    sample = arr[sample_indices(len(arr), SELECTION_SAMPLE_ROWS, rng)]
    Xs = StandardScaler().fit_transform(sample.astype(np.float64))
    k_values = candidate_k(len(arr), distinct_rows(sample), k_min, k_max)
    with SingleThreaded():
        report, _, _ = select_k(Xs, k_values, random_state)
    return report


@dataclass(frozen=True)
class ClusterFit:
    """A fitted K-Means with how k was chosen and where to measure its silhouette."""

    kmeans: KMeans | MiniBatchKMeans
    algorithm: str
    selection: dict[str, Any]
    silhouette_rows: np.ndarray
    """Rows of the training matrix the silhouette is computed on."""
    known_silhouette: float | None
    """The silhouette on those rows when selection already measured this very partition."""


def fit_kmeans(
    X: np.ndarray, Xs: np.ndarray, *, n_clusters: int | None, random_state: int, k_range: tuple[int, int]
) -> ClusterFit:
    """Choose k (unless given) on a sample of Xs and fit the final K-Means on all of it.

    ``X`` is the matrix before scaling (only counted for distinct rows),
    ``Xs`` the scaled one the clusters live in. Raises DataValidationError
    when there are too few (distinct) rows for the requested segments.
    """
    n = len(Xs)
    rng = np.random.default_rng(random_state)
    sel_idx = sample_indices(n, SELECTION_SAMPLE_ROWS, rng)
    sample = Xs[sel_idx].astype(np.float64)
    distinct = distinct_rows(sample)

    selection: dict[str, Any]
    candidates: dict[int, tuple[KMeans, float]] = {}
    sil_idx: np.ndarray | None = None
    if n_clusters is None:
        k_values = candidate_k(n, distinct, int(k_range[0]), int(k_range[1]))
        selection, candidates, sil_idx = select_k(sample, k_values, random_state)
        k = selection["optimal_k"]
    else:
        k = int(n_clusters)
        if k < 2:
            raise DataValidationError(f"n_clusters must be at least 2, got {k}")
        if n < min_rows(k):
            raise DataValidationError(f"need at least {min_rows(k)} customers to form {k} segments, got {n}")
        if distinct < k and (n == len(sample) or distinct_rows(X) < k):
            raise DataValidationError(f"the data has fewer than {k} distinct customers; cannot form {k} segments")
        selection = {"method": "fixed", "requested_k": k}

    # Reuse the candidate when it was fitted on all the data; otherwise start
    # from centroids found on the sample and refine on everything.
    known_silhouette: float | None = None
    if k in candidates and len(sample) == n:
        kmeans, known_silhouette = candidates[k]
        algorithm = "kmeans"
    else:
        seed = candidates[k][0] if k in candidates else kmeans_estimator(k, random_state).fit(sample)
        if len(sample) == n:
            kmeans, algorithm = seed, "kmeans"
        elif is_large(n):
            kmeans = MiniBatchKMeans(
                n_clusters=k,
                init=seed.cluster_centers_.astype(Xs.dtype),
                n_init=1,
                batch_size=8192,
                max_no_improvement=10,
                random_state=random_state,
            ).fit(Xs)
            algorithm = "minibatch_kmeans"
        else:
            kmeans = kmeans_estimator(k, random_state, init=seed.cluster_centers_, n_init=1).fit(Xs)
            algorithm = "kmeans"

    if sil_idx is not None:
        rows = sel_idx[sil_idx]  # the selection's silhouette rows, so the numbers line up
    else:
        rows = sample_indices(n, SILHOUETTE_SAMPLE_ROWS, np.random.default_rng(random_state))
    return ClusterFit(kmeans, algorithm, selection, rows, known_silhouette)
