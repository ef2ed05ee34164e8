"""Why a customer is in its segment: the exact split of the margin over the runner-up by feature.

In the scaled space K-Means works in (standard scaling, log1p and categorical weights applied),
a customer x is in segment c1 because |x - c1|^2 < |x - c2|^2 for the runner-up c2. That margin
is a sum over the columns of (x - c2)^2 - (x - c1)^2; summing the columns of each declared
feature (a categorical's one-hot columns together) splits it exactly, so the shares add up to 1.
A negative share pulls toward the runner-up. Generic over the feature schema: a kind only has
to say which columns belong to which feature.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.ml.schema import FeatureSchema
from app.ml.scoring import CentroidScorer

DECIDING_SHARE = 0.75
"""The summary names the largest positive shares until together they reach this much (at most three)."""
MAX_NAMED = 3
_CELLS_PER_CHUNK = 4_000_000
_PLAIN_PYTHON_CELLS = 256
"""Up to this many centroid cells (k x columns), one row is explained in plain Python: no array set-up."""
"""Batch explanations work on rows x centroids x columns blocks of at most this many cells."""


@dataclass(frozen=True)
class Explanation:
    """One customer's segment, its runner-up and each feature's share of the margin, largest first."""

    cluster: int
    distance: float
    runner_up: int
    runner_up_distance: float
    shares: tuple[tuple[str, float], ...]

    @property
    def confidence(self) -> float:
        """1 - distance / runner_up_distance, the confidence every prediction reports."""
        if self.runner_up_distance <= 0:
            return 0.0
        return min(1.0, max(0.0, 1.0 - self.distance / self.runner_up_distance))


class Explainer:
    """Explains rows in a scorer's input space; immutable, shared by concurrent requests.

    Rows are what the model's ``CentroidScorer`` takes: the customer features in their own units
    (the scaling is folded in) or a declared schema's encoded row. Explaining in the folded space
    is explaining in the scaled one: x / s - (c + m / s) = (x - m) / s - c, column by column.
    """

    def __init__(self, scorer: CentroidScorer, schema: FeatureSchema, cluster_names: Sequence[str]) -> None:
        widths = [feature.width for feature in schema.features]
        if sum(widths) != scorer.n_columns:
            raise ValueError(f"the schema's {sum(widths)} columns do not fit {scorer.n_columns}-column centroids")
        self.features: tuple[str, ...] = tuple(schema.names)
        self.starts = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.intp)
        self.centers = scorer.folded_centers
        self.inv_scale = scorer.inv_scale
        self.names = tuple(cluster_names)
        self._plain = self.centers.size <= _PLAIN_PYTHON_CELLS
        self._center_rows = tuple(tuple(float(v) for v in row) for row in self.centers)
        self._inv_scale_row = tuple(float(v) for v in self.inv_scale)
        self._columns = tuple(
            tuple(range(int(start), int(start) + width)) for start, width in zip(self.starts, widths, strict=True)
        )

    # -- one customer ---------------------------------------------------------------------------

    def explain_row(self, row: Any) -> Explanation:
        """The nearest centroid, the second-nearest and the per-feature split of the margin."""
        if self._plain:
            x = [float(v) * s for v, s in zip(row, self._inv_scale_row, strict=True)]
            best = second = -1
            nearest = runner_up = math.inf
            for i, center in enumerate(self._center_rows):
                total = 0.0
                for a, c in zip(x, center, strict=True):
                    total += (a - c) * (a - c)
                # The first of equal distances wins, for both places (as min() would pick them).
                if total < nearest:
                    best, second, nearest, runner_up = i, best, total, nearest
                elif total < runner_up:
                    second, runner_up = i, total
            near, far = self._center_rows[best], self._center_rows[second]
            per_feature = []
            for columns in self._columns:
                part = 0.0
                for j in columns:
                    a = x[j]
                    part += (a - far[j]) * (a - far[j]) - (a - near[j]) * (a - near[j])
                per_feature.append(part)
        else:
            diff = self.centers - np.asarray(row, dtype=np.float64) * self.inv_scale
            squares = diff * diff
            d2 = squares.sum(axis=1).tolist()
            best = min(range(len(d2)), key=d2.__getitem__)
            second = min((i for i in range(len(d2)) if i != best), key=d2.__getitem__)
            nearest, runner_up = d2[best], d2[second]
            per_feature = np.add.reduceat(squares[second] - squares[best], self.starts).tolist()
        shares = _shares(per_feature)
        ranked = sorted(zip(self.features, shares, strict=True), key=lambda item: -item[1])
        return Explanation(best, math.sqrt(nearest), second, math.sqrt(runner_up), tuple(ranked))

    def describe(self, explanation: Explanation, values: Mapping[str, Any]) -> dict[str, Any]:
        """The `explanation` object of a prediction; `values` the features as the client sent them."""
        return {
            "distance": explanation.distance,
            "runner_up": {
                "cluster": explanation.runner_up,
                "cluster_name": self.names[explanation.runner_up],
                "distance": explanation.runner_up_distance,
            },
            "contributions": [
                {"feature": name, "value": values.get(name), "share": share} for name, share in explanation.shares
            ],
            "summary": self.summary(explanation),
        }

    def summary(self, explanation: Explanation) -> str:
        """One sentence naming the deciding features."""
        own, other = self.names[explanation.cluster], self.names[explanation.runner_up]
        if explanation.runner_up_distance == explanation.distance:
            return f"Equally close to {other!r} as to {own!r}: no feature decides between them."
        named: list[str] = []
        total = 0.0
        for feature, share in explanation.shares:
            if share <= 0 or len(named) == MAX_NAMED:
                break
            named.append(f"{feature} ({share:.0%})")
            total += share
            if total >= DECIDING_SHARE:
                break
        reasons = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
        return f"In {own!r} rather than {other!r} mainly because of {reasons}."

    # -- many customers -------------------------------------------------------------------------

    def top_features(self, X: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index into `features` of the largest share, runner_up distance - distance) per row.

        `labels` are the rows' segments as scored; the runner-up is the nearest other centroid.
        Vectorized, in blocks whose size is bounded whatever the number of rows or columns.
        """
        n = len(X)
        top = np.zeros(n, dtype=np.intp)
        margin = np.zeros(n, dtype=np.float64)
        k, width = self.centers.shape
        step = max(1, _CELLS_PER_CHUNK // max(1, k * width))
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            x = np.asarray(X[lo:hi], dtype=np.float64) * self.inv_scale
            diff = x[:, None, :] - self.centers[None, :, :]
            squares = diff * diff
            d2 = squares.sum(axis=2)
            rows = np.arange(hi - lo)
            best = np.asarray(labels[lo:hi], dtype=np.intp)
            nearest = d2[rows, best]
            d2[rows, best] = np.inf
            second = d2.argmin(axis=1)
            per_feature = np.add.reduceat(squares[rows, second] - squares[rows, best], self.starts, axis=1)
            top[lo:hi] = per_feature.argmax(axis=1)
            margin[lo:hi] = np.sqrt(d2[rows, second]) - np.sqrt(nearest)
        return top, margin


def _shares(parts: list[float]) -> list[float]:
    """Each part over their sum, summing to 1 to the last bit; 1/n each when the sum is 0 (a tie)."""
    total = math.fsum(parts)
    n = len(parts)
    if total == 0 or not math.isfinite(total):
        return [1.0 / n] * n
    shares = [part / total for part in parts]
    # Rounding may leave the sum a few ulps off 1: the largest share takes the rest.
    largest = max(range(n), key=lambda i: abs(shares[i]))
    shares[largest] += 1.0 - math.fsum(shares)
    return shares
