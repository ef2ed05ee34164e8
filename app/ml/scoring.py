"""Nearest-centroid scoring in NumPy, with the standard scaling folded into the centroids."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

PREDICT_CHUNK_ROWS = 65_536


class CentroidScorer:
    """Cluster ids and confidences for rows of any width, without scikit-learn.

    In scaled space a distance is |(x - mean) / scale - c|, which equals
    |x / scale - (c + mean / scale)|: one multiply per column, then plain
    Euclidean distances to precomputed points. With no ``mean``/``scale``
    the rows are taken as already scaled. Immutable after construction,
    so one instance serves concurrent calls.
    """

    def __init__(self, centers: np.ndarray, mean: np.ndarray | None = None, scale: np.ndarray | None = None):
        folded = np.array(centers, dtype=np.float64)
        if folded.ndim != 2 or folded.shape[0] < 2:
            raise ValueError(f"need at least two centroids in a 2-D array, got shape {folded.shape}")
        width = folded.shape[1]
        mean = np.zeros(width) if mean is None else np.asarray(mean, dtype=np.float64)
        scale = np.ones(width) if scale is None else np.asarray(scale, dtype=np.float64)
        if mean.shape != (width,) or scale.shape != (width,):
            raise ValueError(f"scaling for {mean.shape} / {scale.shape} columns does not fit {width}-column centroids")
        inv_scale = 1.0 / scale
        folded = folded + mean * inv_scale
        for arr in (inv_scale, folded):
            arr.setflags(write=False)
        self.inv_scale = inv_scale
        self.folded_centers = folded
        self._scaled = not np.array_equal(inv_scale, np.ones(width))
        # Plain tuples for the four-column fast path of predict_four.
        self._inv_scale_tuple = tuple(float(v) for v in inv_scale)
        self._center_rows = tuple(tuple(float(v) for v in row) for row in folded)

    @property
    def n_clusters(self) -> int:
        return int(self.folded_centers.shape[0])

    @property
    def n_columns(self) -> int:
        return int(self.folded_centers.shape[1])

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cluster ids int64, confidence float64 in [0, 1]) for each row of X.

        Confidence is 1 - d_nearest / d_second: 1 at a centroid, 0 on the
        boundary with the next-nearest cluster. Works in chunks, so memory
        stays bounded whatever len(X).
        """
        n = len(X)
        labels = np.empty(n, dtype=np.int64)
        confidence = np.empty(n, dtype=np.float64)
        rows = np.arange(min(n, PREDICT_CHUNK_ROWS))
        for lo in range(0, n, PREDICT_CHUNK_ROWS):
            hi = min(n, lo + PREDICT_CHUNK_ROWS)
            x = X[lo:hi].astype(np.float64, copy=False) * self.inv_scale
            diff = x[:, None, :] - self.folded_centers[None, :, :]
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

    def predict_row(self, x: np.ndarray) -> tuple[int, float]:
        """(cluster id, confidence) of one row: as `predict`, without its chunking set-up (the predict hot path).

        The k distances are compared as plain floats. No BLAS call: for one row its thread pool
        costs more than the arithmetic, and under load it competes with the event loop.
        """
        if self._scaled:
            x = x * self.inv_scale
        diff = self.folded_centers - x
        d2 = np.einsum("kf,kf->k", diff, diff).tolist()
        best = min(range(len(d2)), key=d2.__getitem__)
        nearest = d2[best]
        d2[best] = math.inf
        second = min(d2)
        confidence = 1.0 - math.sqrt(nearest / second) if second > 0 else 0.0
        return best, min(1.0, max(0.0, confidence))

    def predict_four(self, a: float, b: float, c: float, d: float) -> tuple[int, float] | None:
        """(cluster id, confidence) of one four-column row in plain Python arithmetic.

        A few microseconds, no array set-up. Returns None when a scaled value
        is not finite; only for four-column centroids.
        """
        s0, s1, s2, s3 = self._inv_scale_tuple
        x0, x1, x2, x3 = float(a) * s0, float(b) * s1, float(c) * s2, float(d) * s3
        if not (math.isfinite(x0) and math.isfinite(x1) and math.isfinite(x2) and math.isfinite(x3)):
            return None
        best = second = math.inf
        best_id = 0
        for idx, (c0, c1, c2, c3) in enumerate(self._center_rows):
            dist = (x0 - c0) ** 2 + (x1 - c1) ** 2 + (x2 - c2) ** 2 + (x3 - c3) ** 2
            if dist < best:
                second, best, best_id = best, dist, idx
            elif dist < second:
                second = dist
        confidence = 1.0 - math.sqrt(best / second) if second > 0 else 0.0
        return best_id, min(1.0, max(0.0, confidence))


@dataclass(frozen=True)
class ScoredRecords:
    """Segments of a list of records, one entry per record in order."""

    labels: np.ndarray
    """Cluster ids, int64."""
    confidence: np.ndarray
    """1 - d_nearest / d_second, float64 in [0, 1]."""
    warnings: list[list[str]]
    """Per record: unseen categories, imputed values."""


@dataclass(frozen=True)
class ScoredFrame:
    """Segments of a batch table: rows with errors are left out of labels/confidence."""

    valid: np.ndarray
    """bool per input row: True where the row was scored."""
    labels: np.ndarray
    """Cluster ids of the valid rows, in input order."""
    confidence: np.ndarray
    errors: list[str | None]
    """Per input row: None, or e.g. "tenure_months: not a number: 'abc'; basket: out of range 0..500: 900"."""
    warnings: list[str | None]
    """Per input row: None, or e.g. "plan: unseen category 'gold'; tenure_months: missing, imputed"."""
    values: pd.DataFrame | None = None
    """Every input row's checked values (numbers, NaN when empty; trimmed text), when the kind keeps them."""

    def __len__(self) -> int:
        return len(self.errors)
