"""The K-Means customer segmentation model: fit, predict, describe, save, load.

Pure machine learning: no FastAPI, no database. Everything here blocks, so
the web app calls it from worker threads. A fitted :class:`SegmentationModel`
is never mutated by prediction, so one instance can serve concurrent calls.

Features are :data:`app.preprocess.FEATURES`, standard-scaled, in that order.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import sklearn
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from app.preprocess import FEATURES, DataValidationError, resolve_columns

KMEANS_FILE = "kmeans.pkl"
SCALER_FILE = "scaler.pkl"
METADATA_FILE = "metadata.json"
FORMAT_VERSION = 1

MIN_ROWS = 10
"""Fewest customers we train on; a k-segment model also needs 2*k of them."""
DEFAULT_K_RANGE = (2, 10)
SELECTION_SAMPLE_ROWS = 20_000
"""Automatic k is chosen on a random sample of at most this many customers."""
SILHOUETTE_SAMPLE_ROWS = 5_000
"""Silhouette scores are computed on a random sample of at most this many customers."""
MINIBATCH_MIN_ROWS = 200_000
"""From this many customers on, the final fit uses MiniBatchKMeans."""
N_INIT = 3
_PREDICT_CHUNK_ROWS = 65_536

_INCOME, _SPENDING, _FREQUENCY, _AGE = (
    FEATURES.index(name) for name in ("annual_income", "spending_score", "purchase_frequency", "age")
)
_NOTABLE_Z = 0.5  # a centroid this many standard deviations off the mean is "high"/"low"
_AGE_Z = 0.75


class ModelLoadError(Exception):
    """A saved model is missing, unreadable, corrupt or inconsistent."""


# --------------------------------------------------------------------------- #
# Helpers


class _SingleThreaded:
    """Run scikit-learn's OpenMP/BLAS kernels on one thread while fitting.

    On a small shared machine, multi-threaded Lloyd iterations spin-wait for
    a busy core and a 0.1 s fit can take several seconds; one thread is
    fast and predictable for data this narrow (4 features). The limit is
    process-wide, so overlapping fits share one reference-counted limiter
    and the original limits come back when the last one ends.
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


def _min_rows(k: int) -> int:
    return max(MIN_ROWS, 2 * k)


def _as_feature_matrix(X: Any) -> np.ndarray:
    """Check shape and finiteness; keep float32 (large data) or use float64.

    X is an (n, 4) array in FEATURES order, or a DataFrame whose columns
    are picked by name (dataset or snake_case headers).
    """
    if isinstance(X, pd.DataFrame):
        columns = resolve_columns(X.columns, optional=())
        X = X[[columns[name] for name in FEATURES]].to_numpy()
    try:
        arr = np.asarray(X)
        if arr.dtype != np.float32:
            arr = arr.astype(np.float64, copy=False)
    except (TypeError, ValueError) as exc:
        raise DataValidationError(f"features must be numbers: {exc}") from exc
    if arr.ndim != 2 or arr.shape[1] != len(FEATURES):
        raise DataValidationError(
            f"expected a matrix with {len(FEATURES)} columns ({', '.join(FEATURES)}), got shape {arr.shape}"
        )
    if not np.isfinite(arr).all():
        raise DataValidationError("features must be finite numbers (no NaN or infinity)")
    return arr


def _sample_indices(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    if n <= size:
        return np.arange(n)
    return np.sort(rng.choice(n, size=size, replace=False))


def _silhouette_scores(X: np.ndarray, label_sets: Sequence[np.ndarray]) -> list[float]:
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


def _knee(k_values: Sequence[int], inertias: Sequence[float]) -> int:
    """The elbow of the inertia curve: the point farthest from the chord joining its ends."""
    k = np.asarray(k_values, dtype=np.float64)
    y = np.asarray(inertias, dtype=np.float64)
    if len(k) < 3 or y[0] == y[-1]:
        return int(k_values[0])
    kn = (k - k[0]) / (k[-1] - k[0])
    yn = (y - y[-1]) / (y[0] - y[-1])
    # The chord runs from (0, 1) to (1, 0); distance is proportional to 1 - kn - yn.
    return int(k_values[int(np.argmax(1.0 - kn - yn))])


def _kmeans(k: int, random_state: int, *, init: Any = "k-means++", n_init: int = N_INIT) -> KMeans:
    return KMeans(n_clusters=k, init=init, n_init=n_init, random_state=random_state)


def _distinct_rows(X: np.ndarray) -> int:
    return int(np.unique(X, axis=0).shape[0])


def _select_k(
    Xs: np.ndarray, k_values: Sequence[int], random_state: int
) -> tuple[dict[str, Any], dict[int, tuple[KMeans, float]], np.ndarray]:
    """Fit each candidate k on Xs (already a sample) and score it by silhouette.

    Returns the selection report, {k: (fitted candidate, silhouette)} and the
    silhouette sample indices (into Xs).
    """
    rng = np.random.default_rng(random_state)
    sil_idx = _sample_indices(len(Xs), SILHOUETTE_SAMPLE_ROWS, rng)
    fitted: dict[int, KMeans] = {}
    inertias: list[float] = []
    labels: list[np.ndarray] = []
    for k in k_values:
        km = _kmeans(k, random_state).fit(Xs)
        fitted[k] = km
        inertias.append(float(km.inertia_))
        labels.append(km.labels_[sil_idx])
    scores = _silhouette_scores(Xs[sil_idx], labels)
    candidates = {k: (fitted[k], score) for k, score in zip(k_values, scores, strict=True)}
    ranked = [s if math.isfinite(s) else -np.inf for s in scores]
    optimal = int(k_values[int(np.argmax(ranked))])
    report = {
        "method": "silhouette",
        "k_range": [int(k) for k in k_values],
        "inertias": [round(v, 4) for v in inertias],
        "silhouette_scores": [round(s, 6) if math.isfinite(s) else None for s in scores],
        "knee_k": _knee(k_values, inertias),
        "optimal_k": optimal,
        "sample_size": int(len(Xs)),
        "silhouette_sample_size": int(len(sil_idx)),
    }
    return report, candidates, sil_idx


def _candidate_k(n: int, distinct: int, k_min: int, k_max: int) -> list[int]:
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
    """Inertia and sampled silhouette for k = k_min..k_max on standard-scaled X.

    Returns ``{"optimal_k", "k_range", "inertias", "silhouette_scores",
    "method", "knee_k", "sample_size", "silhouette_sample_size"}``;
    ``optimal_k`` is the k with the best silhouette, ``knee_k`` the elbow
    of the inertia curve. Data beyond SELECTION_SAMPLE_ROWS customers is
    sampled, so inertias are those of the sample. The range is cut short
    (never extended) when there are too few customers for its top.
    """
    arr = _as_feature_matrix(X)
    rng = np.random.default_rng(random_state)
    sample = arr[_sample_indices(len(arr), SELECTION_SAMPLE_ROWS, rng)]
    Xs = StandardScaler().fit_transform(sample.astype(np.float64))
    k_values = _candidate_k(len(arr), _distinct_rows(sample), k_min, k_max)
    with _SingleThreaded():
        report, _, _ = _select_k(Xs, k_values, random_state)
    return report


# --------------------------------------------------------------------------- #
# Segment names and descriptions


def _level(z: float, high: str, low: str, middle: str) -> str:
    if z >= _NOTABLE_Z:
        return high
    if z <= -_NOTABLE_Z:
        return low
    return middle


def _age_word(z: float, age: float) -> str | None:
    if z <= -_AGE_Z:
        return "young" if age < 40 else "younger"
    if z >= _AGE_Z:
        return "senior" if age >= 60 else "older"
    return None


def _frequency_word(z: float) -> str:
    return _level(z, "frequent buyers", "occasional buyers", "regular buyers")


def _relative(z: float) -> str:
    if z >= 1.0:
        return "far above"
    if z >= _NOTABLE_Z:
        return "above"
    if z <= -1.0:
        return "far below"
    if z <= -_NOTABLE_Z:
        return "below"
    return "near"


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def segment_names(z: np.ndarray, centers: np.ndarray) -> list[str]:
    """Marketer's names for centroids, unique within the model.

    ``z`` holds each centroid's z-scores against the whole population and
    ``centers`` its values in original units (both (k, 4) in FEATURES order).
    A name states income and spending, adds age when notably young or old and
    purchase frequency when it stands out by a full standard deviation.
    Colliding names first get purchase frequency, then age band, when that
    tells them apart; then, on the feature where the colliding centroids
    spread most, the lowest and highest are marked ("older", "bigger
    spenders"...); a number is the last resort. Deterministic throughout.
    """
    parts: list[list[str]] = []
    for zc, center in zip(z, centers, strict=True):
        words = []
        age = _age_word(zc[_AGE], center[_AGE])
        if age:
            words.append(age)
        words.append(_level(zc[_INCOME], "high income", "low income", "average income"))
        words.append(_level(zc[_SPENDING], "high spending", "low spending", "moderate spending"))
        if abs(zc[_FREQUENCY]) >= 1.0:
            words.append(_frequency_word(zc[_FREQUENCY]))
        parts.append(words)

    base = [_capitalize(", ".join(words)) for words in parts]
    qualifiers: list[list[str]] = [[] for _ in parts]

    def names() -> list[str]:
        return [f"{b} ({', '.join(q)})" if q else b for b, q in zip(base, qualifiers, strict=True)]

    def clashes() -> list[list[int]]:
        current = names()
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(current):
            groups.setdefault(name, []).append(i)
        return [g for g in groups.values() if len(g) > 1]

    # 1. Absolute traits the base name left out, if they tell the group apart.
    for trait, front in (
        (lambda i: _frequency_word(z[i, _FREQUENCY]), False),
        (lambda i: _age_word(z[i, _AGE], centers[i, _AGE]) or "middle-aged", True),
    ):
        for group in clashes():
            words = [trait(i) for i in group]
            if len(set(words)) > 1:
                for i, word in zip(group, words, strict=True):
                    if word in parts[i]:
                        continue
                    if front:
                        parts[i].insert(0, word)
                    else:
                        parts[i].append(word)
        base = [_capitalize(", ".join(words)) for words in parts]

    # 2. Relative to each other: the lowest and highest of the group on the
    #    feature where the group spreads most.
    used: list[set[int]] = [set() for _ in parts]
    for _ in range(len(FEATURES)):
        groups = clashes()
        if not groups:
            break
        for group in groups:
            free = [j for j in range(len(FEATURES)) if not any(j in used[i] for i in group)]
            if not free:
                continue
            spread = {j: float(np.ptp(z[group, j])) for j in free}
            j = max(free, key=lambda f: (spread[f], -f))
            if spread[j] == 0.0:
                continue
            low_word, high_word = _RELATIVE_WORDS[FEATURES[j]]
            values = z[group, j]
            qualifiers[group[int(np.argmin(values))]].append(low_word)
            qualifiers[group[int(np.argmax(values))]].append(high_word)
            for i in group:
                used[i].add(j)

    # 3. Identical centroids (or nearly): number them.
    current = names()
    counter: dict[str, int] = {}
    unique = []
    for name in current:
        if current.count(name) > 1:
            counter[name] = counter.get(name, 0) + 1
            name = f"{name} ({counter[name]})"
        unique.append(name)
    return unique


_RELATIVE_WORDS = {
    "age": ("younger", "older"),
    "annual_income": ("less affluent", "more affluent"),
    "spending_score": ("lighter spenders", "bigger spenders"),
    "purchase_frequency": ("less frequent", "more frequent"),
}


def _describe(center: np.ndarray, zc: np.ndarray, percentage: float) -> str:
    return (
        f"{percentage:.1f}% of customers: aged {center[_AGE]:.0f} on average, earning "
        f"{center[_INCOME]:.1f}k a year ({_relative(zc[_INCOME])} average), with a spending score of "
        f"{center[_SPENDING]:.0f} ({_relative(zc[_SPENDING])} average) and "
        f"{center[_FREQUENCY]:.0f} purchases a year ({_relative(zc[_FREQUENCY])} average)."
    )


# --------------------------------------------------------------------------- #
# The model


class SegmentationModel:
    """A fitted StandardScaler + K-Means pair with its description.

    ``scaler`` and ``kmeans`` are the scikit-learn estimators (the ones saved
    as scaler.pkl and kmeans.pkl); ``metadata`` is a JSON-ready dict with the
    segment statistics and training details. Cluster ids are ordered by
    centroid income, then spending (original units), so the same data and
    ``random_state`` always give the same ids and names.
    """

    def __init__(self, scaler: StandardScaler, kmeans: KMeans | MiniBatchKMeans, metadata: dict[str, Any]):
        self.scaler = scaler
        self.kmeans = kmeans
        self.metadata = metadata
        self.training_labels: np.ndarray | None = None
        """Cluster id of each training row (only on a freshly trained model)."""
        self._prepare()

    # -- construction ------------------------------------------------------ #

    def _prepare(self) -> None:
        """Fold the scaling into the centroids for a scikit-learn-free predict.

        In scaled space a distance is |(x - mean) / scale - c|, which equals
        |x / scale - (c + mean / scale)|: one multiply per feature, then plain
        Euclidean distances to precomputed points.
        """
        mean = np.asarray(self.scaler.mean_, dtype=np.float64)
        scale = np.asarray(self.scaler.scale_, dtype=np.float64)
        centers = np.asarray(self.kmeans.cluster_centers_, dtype=np.float64)
        if (
            mean.shape != (len(FEATURES),)
            or scale.shape != mean.shape
            or centers.ndim != 2
            or centers.shape[1] != len(FEATURES)
            or centers.shape[0] < 2
        ):
            raise ModelLoadError("scaler and K-Means do not fit the four customer features")
        inv_scale = 1.0 / scale
        folded = centers + mean * inv_scale
        for arr in (inv_scale, folded):
            arr.setflags(write=False)
        self._inv_scale = inv_scale
        self._folded_centers = folded
        self._inv_scale_tuple = tuple(float(v) for v in inv_scale)
        self._center_rows = tuple(tuple(float(v) for v in row) for row in folded)
        segments = self.metadata.get("segments") or []
        self._names = tuple(str(s["cluster_name"]) for s in segments)
        if len(self._names) != centers.shape[0]:
            raise ModelLoadError(
                f"metadata describes {len(self._names)} segments but K-Means has {centers.shape[0]} centroids"
            )

    @classmethod
    def train(
        cls,
        X: Any,
        *,
        n_clusters: int | None = None,
        random_state: int = 42,
        k_range: tuple[int, int] = DEFAULT_K_RANGE,
    ) -> SegmentationModel:
        """Fit a model on X, an (n, 4) matrix in FEATURES order, original units.

        With ``n_clusters=None`` k is the best sampled silhouette over
        ``k_range`` (inclusive), with the inertia knee reported beside it.
        Raises DataValidationError when X is malformed or has too few
        (distinct) customers for the requested segments.
        """
        with _SingleThreaded():
            return cls._train(X, n_clusters=n_clusters, random_state=random_state, k_range=k_range)

    @classmethod
    def _train(
        cls, X: Any, *, n_clusters: int | None, random_state: int, k_range: tuple[int, int]
    ) -> SegmentationModel:
        started = time.perf_counter()
        arr = _as_feature_matrix(X)
        n = len(arr)
        large = n >= MINIBATCH_MIN_ROWS
        work_dtype = np.float32 if large else np.float64
        rng = np.random.default_rng(random_state)

        scaler = StandardScaler().fit(arr)
        Xs = scaler.transform(arr).astype(work_dtype, copy=False)
        sel_idx = _sample_indices(n, SELECTION_SAMPLE_ROWS, rng)
        sample = Xs[sel_idx].astype(np.float64)
        distinct = _distinct_rows(sample)

        selection: dict[str, Any]
        candidates: dict[int, tuple[KMeans, float]] = {}
        sil_idx: np.ndarray | None = None
        if n_clusters is None:
            k_values = _candidate_k(n, distinct, int(k_range[0]), int(k_range[1]))
            selection, candidates, sil_idx = _select_k(sample, k_values, random_state)
            k = selection["optimal_k"]
        else:
            k = int(n_clusters)
            if k < 2:
                raise DataValidationError(f"n_clusters must be at least 2, got {k}")
            if n < _min_rows(k):
                raise DataValidationError(f"need at least {_min_rows(k)} customers to form {k} segments, got {n}")
            if distinct < k and (n == len(sample) or _distinct_rows(arr) < k):
                raise DataValidationError(f"the data has fewer than {k} distinct customers; cannot form {k} segments")
            selection = {"method": "fixed", "requested_k": k}

        # Fit: reuse the candidate when it was fitted on all the data; otherwise
        # start from centroids found on the sample and refine on everything.
        known_silhouette: float | None = None
        if k in candidates and len(sample) == n:
            kmeans, known_silhouette = candidates[k]
            algorithm = "kmeans"
        else:
            seed = candidates[k][0] if k in candidates else _kmeans(k, random_state).fit(sample)
            if len(sample) == n:
                kmeans, algorithm = seed, "kmeans"
            elif large:
                kmeans = MiniBatchKMeans(
                    n_clusters=k,
                    init=seed.cluster_centers_.astype(work_dtype),
                    n_init=1,
                    batch_size=8192,
                    max_no_improvement=10,
                    random_state=random_state,
                ).fit(Xs)
                algorithm = "minibatch_kmeans"
            else:
                kmeans = _kmeans(k, random_state, init=seed.cluster_centers_, n_init=1).fit(Xs)
                algorithm = "kmeans"

        model = cls._finish(
            scaler=scaler,
            kmeans=kmeans,
            X=arr,
            Xs=Xs,
            random_state=random_state,
            selection=selection,
            sil_idx=sil_idx,
            sel_idx=sel_idx,
            algorithm=algorithm,
            known_silhouette=known_silhouette,
        )
        model.metadata["duration_seconds"] = round(time.perf_counter() - started, 4)
        return model

    @classmethod
    def _finish(
        cls,
        *,
        scaler: StandardScaler,
        kmeans: KMeans | MiniBatchKMeans,
        X: np.ndarray,
        Xs: np.ndarray,
        random_state: int,
        selection: dict[str, Any],
        sil_idx: np.ndarray | None,
        sel_idx: np.ndarray,
        algorithm: str,
        known_silhouette: float | None = None,
    ) -> SegmentationModel:
        """Order the clusters, compute segment statistics and names, build metadata."""
        centers_scaled = np.asarray(kmeans.cluster_centers_, dtype=np.float64)
        k = len(centers_scaled)
        centers = scaler.inverse_transform(centers_scaled)
        order = np.lexsort((centers[:, _SPENDING], centers[:, _INCOME]))
        new_id = np.empty(k, dtype=np.int64)
        new_id[order] = np.arange(k)
        kmeans.cluster_centers_ = centers_scaled[order]
        if hasattr(kmeans, "_counts"):
            kmeans._counts = kmeans._counts[order]
        labels = getattr(kmeans, "labels_", None)
        if labels is None or len(labels) != len(X):
            labels = None
        else:
            labels = new_id[np.asarray(labels)]
        # Training labels are not part of the artifact: a 1M-row model would
        # otherwise carry 4 MB of them into every saved version.
        if hasattr(kmeans, "labels_"):
            del kmeans.labels_
        centers = centers[order]

        z = kmeans.cluster_centers_
        if labels is None:
            # The estimator kept no labels: assign with the NumPy path.
            provisional = cls(scaler, kmeans, {"segments": [{"cluster_name": str(i)} for i in range(k)]})
            labels, _ = provisional.predict(X)
        sizes = np.bincount(labels, minlength=k)
        if (sizes == 0).any():
            raise DataValidationError(
                f"could not form {k} distinct segments from this data (too few distinct customers)"
            )

        n = len(X)
        sums = np.stack(
            [np.bincount(labels, weights=X[:, j].astype(np.float64), minlength=k) for j in range(len(FEATURES))], axis=1
        )
        means = sums / sizes[:, None]
        names = segment_names(z, centers)
        segments = []
        for i in range(k):
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
                    "description": _describe(means[i], z[i], pct),
                }
            )

        # Silhouette of the final labelling on a sample (the selection sample's
        # silhouette rows when available, so the numbers line up).
        if sil_idx is not None:
            rows = sel_idx[sil_idx]
        else:
            rows = _sample_indices(n, SILHOUETTE_SAMPLE_ROWS, np.random.default_rng(random_state))
        if known_silhouette is not None:
            silhouette = known_silhouette  # same rows, same partition (ids permuted)
        else:
            silhouette = _silhouette_scores(Xs[rows], [labels[rows]])[0]

        inertia = float(kmeans.inertia_)
        fingerprint = hashlib.sha256(np.ascontiguousarray(X, dtype=np.float32).tobytes()).hexdigest()
        trained_at = datetime.now(UTC)
        metadata: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "version": f"{trained_at:%Y%m%dT%H%M%S}Z-{fingerprint[:8]}-k{k}",
            "trained_at": trained_at.isoformat(timespec="seconds"),
            "features": list(FEATURES),
            "n_samples": n,
            "total_customers": n,
            "n_clusters": k,
            "random_state": int(random_state),
            "algorithm": algorithm,
            "inertia": round(inertia, 4),
            "silhouette_score": round(silhouette, 6) if math.isfinite(silhouette) else None,
            "silhouette_sample_size": int(len(rows)),
            "data_fingerprint": fingerprint,
            "k_selection": selection,
            "segments": segments,
            "centroids": [
                {feature: round(float(centers[i, j]), 4) for j, feature in enumerate(FEATURES)} for i in range(k)
            ],
            "library_versions": {
                "python": platform.python_version(),
                "sklearn": sklearn.__version__,
                "numpy": np.__version__,
                "pandas": pd.__version__,
                "joblib": joblib.__version__,
            },
        }
        if selection.get("method") == "silhouette":
            metadata["elbow"] = {
                key: selection[key] for key in ("optimal_k", "k_range", "inertias", "silhouette_scores", "method")
            } | {"knee_k": selection["knee_k"]}
        model = cls(scaler, kmeans, metadata)
        model.training_labels = labels
        return model

    # -- description ------------------------------------------------------- #

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", ""))

    @version.setter
    def version(self, value: str) -> None:
        self.metadata["version"] = str(value)

    @property
    def n_clusters(self) -> int:
        return len(self._names)

    @property
    def cluster_names(self) -> tuple[str, ...]:
        return self._names

    @property
    def segments(self) -> list[dict[str, Any]]:
        return self.metadata["segments"]

    def summary(self) -> dict[str, Any]:
        """The shape of GET /clusters: totals, version and one entry per segment."""
        return {
            "total_customers": self.metadata.get("total_customers"),
            "n_clusters": self.n_clusters,
            "model_version": self.version,
            "clusters": [dict(s) for s in self.segments],
        }

    # -- prediction -------------------------------------------------------- #

    def predict(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid for each row of X (n, 4), original units.

        Returns (cluster ids int64, confidence float64 in [0, 1]) where
        confidence is 1 - d_nearest / d_second: 1 at a centroid, 0 on the
        boundary with the next-nearest segment. Pure NumPy; same ids as
        ``kmeans.predict(scaler.transform(X))``.
        """
        arr = _as_feature_matrix(X)
        n = len(arr)
        labels = np.empty(n, dtype=np.int64)
        confidence = np.empty(n, dtype=np.float64)
        rows = np.arange(min(n, _PREDICT_CHUNK_ROWS))
        for lo in range(0, n, _PREDICT_CHUNK_ROWS):
            hi = min(n, lo + _PREDICT_CHUNK_ROWS)
            x = arr[lo:hi].astype(np.float64, copy=False) * self._inv_scale
            diff = x[:, None, :] - self._folded_centers[None, :, :]
            d2 = np.einsum("nkf,nkf->nk", diff, diff)
            best = d2.argmin(axis=1)
            r = rows[: hi - lo]
            nearest = d2[r, best]
            d2[r, best] = np.inf
            second = d2.min(axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                conf = 1.0 - np.sqrt(nearest / second)
            conf[~(second > 0)] = 0.0
            labels[lo:hi] = best
            confidence[lo:hi] = np.clip(conf, 0.0, 1.0)
        return labels, confidence

    def predict_one(self, *values: Any, **features: Any) -> tuple[int, str, float]:
        """Segment of one customer -> (cluster_id, cluster_name, confidence).

        Call as ``predict_one(age, annual_income, spending_score,
        purchase_frequency)``, ``predict_one(age=..., ...)`` or with one
        mapping or object carrying those fields. Plain Python arithmetic
        over the folded centroids: a few microseconds, no array set-up.
        """
        if len(values) == 4:
            a, b, c, d = values
        elif len(values) == 1 and not features:
            record = values[0]
            if isinstance(record, Mapping):
                a, b, c, d = (record[name] for name in FEATURES)
            else:
                a, b, c, d = (getattr(record, name) for name in FEATURES)
        elif not values:
            a, b, c, d = (features[name] for name in FEATURES)
        else:
            raise TypeError("predict_one takes the four features, a mapping or an object")
        s0, s1, s2, s3 = self._inv_scale_tuple
        x0, x1, x2, x3 = float(a) * s0, float(b) * s1, float(c) * s2, float(d) * s3
        if not (math.isfinite(x0) and math.isfinite(x1) and math.isfinite(x2) and math.isfinite(x3)):
            raise DataValidationError("features must be finite numbers (no NaN or infinity)")
        best = second = math.inf
        best_id = 0
        for idx, (c0, c1, c2, c3) in enumerate(self._center_rows):
            dist = (x0 - c0) ** 2 + (x1 - c1) ** 2 + (x2 - c2) ** 2 + (x3 - c3) ** 2
            if dist < best:
                second, best, best_id = best, dist, idx
            elif dist < second:
                second = dist
        confidence = 1.0 - math.sqrt(best / second) if second > 0 else 0.0
        return best_id, self._names[best_id], min(1.0, max(0.0, confidence))

    # -- persistence ------------------------------------------------------- #

    def save(self, directory: str | os.PathLike) -> Path:
        """Write kmeans.pkl, scaler.pkl and metadata.json into directory.

        Each file is written to a temporary file in the same directory,
        fsynced and moved into place with os.replace, metadata last, so a
        crash never leaves a half-written file. metadata.json records the
        SHA-256 of the two pickles, so if a crash falls between the renames
        :meth:`load` reports the mismatch instead of serving a mixed model.
        """
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        kmeans_bytes = _dump(self.kmeans)
        scaler_bytes = _dump(self.scaler)
        metadata = dict(self.metadata)
        metadata["artifacts"] = {
            KMEANS_FILE: hashlib.sha256(kmeans_bytes).hexdigest(),
            SCALER_FILE: hashlib.sha256(scaler_bytes).hexdigest(),
        }
        metadata_bytes = json.dumps(metadata, indent=2, sort_keys=False).encode("utf-8")
        staged: list[tuple[str, str]] = []
        try:
            for name, payload in (
                (KMEANS_FILE, kmeans_bytes),
                (SCALER_FILE, scaler_bytes),
                (METADATA_FILE, metadata_bytes),
            ):
                fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=target)
                staged.append((tmp, name))
                with os.fdopen(fd, "wb") as fh:
                    fh.write(payload)
                    fh.flush()
                    os.fsync(fh.fileno())
            for tmp, name in staged:
                os.replace(tmp, target / name)
            staged = []
            _fsync_dir(target)
        finally:
            for tmp, _ in staged:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        return target

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SegmentationModel:
        """Load a model saved by :meth:`save`; any problem raises ModelLoadError."""
        source = Path(directory)
        blobs: dict[str, bytes] = {}
        for name in (KMEANS_FILE, SCALER_FILE, METADATA_FILE):
            try:
                blobs[name] = (source / name).read_bytes()
            except FileNotFoundError as exc:
                raise ModelLoadError(f"model file missing: {source / name}") from exc
            except OSError as exc:
                raise ModelLoadError(f"cannot read {source / name}: {exc}") from exc
        try:
            metadata = json.loads(blobs[METADATA_FILE].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{METADATA_FILE} is not valid JSON: {exc}") from exc
        if not isinstance(metadata, dict):
            raise ModelLoadError(f"{METADATA_FILE} does not hold a JSON object")
        artifacts = metadata.get("artifacts")
        if isinstance(artifacts, dict):
            for name in (KMEANS_FILE, SCALER_FILE):
                expected = artifacts.get(name)
                if expected and hashlib.sha256(blobs[name]).hexdigest() != expected:
                    raise ModelLoadError(f"{name} does not match {METADATA_FILE} (interrupted save or mixed versions)")
        kmeans = _undump(blobs[KMEANS_FILE], KMEANS_FILE)
        scaler = _undump(blobs[SCALER_FILE], SCALER_FILE)
        return cls._from_parts(kmeans, scaler, metadata)

    def to_bytes(self) -> bytes:
        """The whole model (both estimators and metadata) as one blob."""
        buffer = io.BytesIO()
        joblib.dump(
            {"format_version": FORMAT_VERSION, "kmeans": self.kmeans, "scaler": self.scaler, "metadata": self.metadata},
            buffer,
            compress=3,
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> SegmentationModel:
        """Inverse of :meth:`to_bytes`; any problem raises ModelLoadError."""
        payload = _undump(blob, "model blob")
        if not isinstance(payload, dict) or not {"kmeans", "scaler", "metadata"} <= payload.keys():
            raise ModelLoadError("model blob does not hold a segmentation model")
        return cls._from_parts(payload["kmeans"], payload["scaler"], payload["metadata"])

    @classmethod
    def _from_parts(cls, kmeans: Any, scaler: Any, metadata: Any) -> SegmentationModel:
        if not isinstance(kmeans, (KMeans, MiniBatchKMeans)) or not hasattr(kmeans, "cluster_centers_"):
            raise ModelLoadError("kmeans artifact is not a fitted scikit-learn K-Means model")
        if not isinstance(scaler, StandardScaler) or not hasattr(scaler, "scale_"):
            raise ModelLoadError("scaler artifact is not a fitted StandardScaler")
        if not isinstance(metadata, dict):
            raise ModelLoadError("model metadata is not a dict")
        if list(metadata.get("features") or []) != list(FEATURES):
            raise ModelLoadError(f"model was trained on {metadata.get('features')}, expected {list(FEATURES)}")
        segments = metadata.get("segments")
        if not isinstance(segments, list) or not all(isinstance(s, dict) and "cluster_name" in s for s in segments):
            raise ModelLoadError("model metadata has no segment descriptions")
        if [s.get("cluster_id") for s in segments] != list(range(len(segments))):
            raise ModelLoadError("segment ids in metadata are not 0..k-1")
        metadata = dict(metadata)
        metadata.pop("artifacts", None)
        try:
            return cls(scaler, kmeans, metadata)
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - a corrupt estimator can fail in many ways
            raise ModelLoadError(f"inconsistent model artifacts: {exc}") from exc


def _dump(obj: Any) -> bytes:
    buffer = io.BytesIO()
    joblib.dump(obj, buffer)
    return buffer.getvalue()


def _undump(blob: bytes, what: str) -> Any:
    try:
        return joblib.load(io.BytesIO(blob))
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - unpickling corrupt data can raise anything
        raise ModelLoadError(f"{what} is corrupt or unreadable: {type(exc).__name__}: {exc}") from exc


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = [
    "ModelLoadError",
    "SegmentationModel",
    "elbow",
    "segment_names",
    "KMEANS_FILE",
    "SCALER_FILE",
    "METADATA_FILE",
]
