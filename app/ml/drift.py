"""Population drift: a version's training distribution in bins, counts of what it scores, and PSI.

Each clustering feature is binned in its own units, as the client sends it: a numeric feature
by the distinct deciles of its training values (half-open bins [e_i, e_i+1), open-ended at both
ends) plus one bin for missing values; a categorical feature by its training levels plus one bin
for unseen levels and one for missing values. The reference is the training rows run through
the same binning, so reference and observed shares are comparable bin for bin; the segment mix
is compared over the cluster ids. PSI = sum (o - r) ln(o / r) with both shares floored at 1e-4.

Counts live in one flat integer vector per version: every feature's bins in schema order, then
one bin per cluster; beside it, each numeric feature's sum of observed values (for the means).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from app.ml.schema import MISSING_LEVEL, FeatureSchema

SHARE_FLOOR = 1e-4
STABLE_BELOW = 0.1
MODERATE_BELOW = 0.25
MIN_OBSERVED = 500
INSUFFICIENT = "insufficient_data"
_STATUS_ORDER = ("stable", "moderate", "significant")
_DECILES = np.linspace(0.1, 0.9, 9)
FORMAT = 1


def status_of(psi: float) -> str:
    if psi < STABLE_BELOW:
        return "stable"
    return "moderate" if psi < MODERATE_BELOW else "significant"


def psi(observed: np.ndarray, reference: np.ndarray) -> float:
    """Population stability index of two share vectors over the same bins, shares floored at 1e-4."""
    o = np.maximum(np.asarray(observed, dtype=np.float64), SHARE_FLOOR)
    r = np.maximum(np.asarray(reference, dtype=np.float64), SHARE_FLOOR)
    return float(np.sum((o - r) * np.log(o / r)))


@dataclass(frozen=True)
class FeatureBins:
    """How one feature is binned: numeric `edges` or categorical `levels`, and its training shares."""

    name: str
    numeric: bool
    edges: tuple[float, ...] = ()
    levels: tuple[str, ...] = ()
    reference: tuple[float, ...] = ()
    mean: float | None = None

    @property
    def n_bins(self) -> int:
        # numeric: len(edges) + 1 value bins and missing; categorical: levels, unseen and missing
        return len(self.edges) + 2 if self.numeric else len(self.levels) + 2

    @property
    def missing_bin(self) -> int:
        return self.n_bins - 1

    def bins_of(self, values: Any) -> np.ndarray:
        """The bin of each value: numbers (NaN when missing), or text ("" or None when missing)."""
        if self.numeric:
            x = np.asarray(values, dtype=np.float64)
            index = np.searchsorted(np.asarray(self.edges, dtype=np.float64), x, side="right")
            return np.where(np.isnan(x), self.missing_bin, index)
        series = pd.Series(values, dtype=object) if not isinstance(values, pd.Series) else values
        if isinstance(series.dtype, pd.CategoricalDtype):
            categories = pd.Index([str(c).strip() for c in series.cat.categories], dtype=object)
            per_category = self._level_index(categories)
            codes = np.asarray(series.cat.codes)
            empty = np.append(per_category == -2, True)  # code -1 (NaN) is missing
            index = np.append(per_category, self.missing_bin)[codes]
            return np.where(empty[codes], self.missing_bin, index)
        text = series.astype(object).where(series.notna(), "").astype(str).str.strip()
        return self._level_index(pd.Index(text, dtype=object), missing=self.missing_bin)

    def _level_index(self, text: pd.Index, missing: int = -2) -> np.ndarray:
        found = pd.Index(self.levels, dtype=object).get_indexer(text)
        unseen = len(self.levels)
        index = np.where(found < 0, unseen, found)
        return np.where(np.asarray(text == ""), missing, index)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "type": "numeric" if self.numeric else "categorical"}
        if self.numeric:
            data["edges"] = list(self.edges)
            data["mean"] = self.mean
        else:
            data["levels"] = list(self.levels)
        data["reference"] = list(self.reference)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureBins:
        numeric = data["type"] == "numeric"
        return cls(
            name=str(data["name"]),
            numeric=numeric,
            edges=tuple(float(e) for e in data.get("edges", ())),
            levels=tuple(str(level) for level in data.get("levels", ())),
            reference=tuple(float(s) for s in data["reference"]),
            mean=data.get("mean"),
        )


@dataclass(frozen=True)
class DriftReference:
    """A version's reference: each feature's bins and training shares, and the training segment mix."""

    features: tuple[FeatureBins, ...]
    segment_mix: tuple[float, ...]

    @property
    def n_clusters(self) -> int:
        return len(self.segment_mix)

    @property
    def offsets(self) -> list[int]:
        """Where each feature's bins start in the count vector; the clusters start at the last entry."""
        out, at = [], 0
        for feature in self.features:
            out.append(at)
            at += feature.n_bins
        out.append(at)
        return out

    @property
    def size(self) -> int:
        return self.offsets[-1] + self.n_clusters

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "features": [f.to_dict() for f in self.features],
            "segment_mix": list(self.segment_mix),
        }

    @classmethod
    def from_dict(cls, data: Any) -> DriftReference | None:
        """The reference a version's metadata holds, or None (a version saved before drift existed)."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            return None
        return cls(
            tuple(FeatureBins.from_dict(f) for f in data["features"]),
            tuple(float(s) for s in data["segment_mix"]),
        )

    # -- counting -------------------------------------------------------------------------------

    def tally(self, columns: Mapping[str, Any], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(counts, sums) of scored rows: `columns` each feature's values as sent, `labels` their segments."""
        counts = np.zeros(self.size, dtype=np.int64)
        sums = np.zeros(len(self.features), dtype=np.float64)
        offsets = self.offsets
        for j, feature in enumerate(self.features):
            values = columns[feature.name]
            bins = feature.bins_of(values)
            at = offsets[j]
            counts[at : at + feature.n_bins] += np.bincount(bins, minlength=feature.n_bins)
            if feature.numeric:
                sums[j] = float(np.nansum(np.asarray(values, dtype=np.float64)))
        at = offsets[-1]
        counts[at:] += np.bincount(np.asarray(labels, dtype=np.int64), minlength=self.n_clusters)[: self.n_clusters]
        return counts, sums

    def row_counter(self) -> RowCounter:
        return RowCounter(self)

    # -- comparing ------------------------------------------------------------------------------

    def report(self, counts: np.ndarray, sums: np.ndarray, n_observed: int) -> dict[str, Any]:
        """Each feature's and the segment mix's PSI against the reference, and the overall status."""
        enough = n_observed >= MIN_OBSERVED
        offsets = self.offsets
        features = []
        statuses = []
        for j, feature in enumerate(self.features):
            observed = counts[offsets[j] : offsets[j] + feature.n_bins]
            value: float | None = None
            observed_mean: float | None = None
            if n_observed:
                value = psi(observed / n_observed, np.asarray(feature.reference))
                valued = n_observed - int(observed[feature.missing_bin])
                if feature.numeric and valued:
                    observed_mean = float(sums[j]) / valued
            state = status_of(value) if enough and value is not None else INSUFFICIENT
            statuses.append(state)
            features.append(
                {
                    "feature": feature.name,
                    "psi": value,
                    "status": state,
                    "reference_mean": feature.mean if feature.numeric else None,
                    "observed_mean": observed_mean,
                }
            )
        clusters = counts[offsets[-1] :]
        mix_psi = psi(clusters / n_observed, np.asarray(self.segment_mix)) if n_observed else None
        mix_status = status_of(mix_psi) if enough and mix_psi is not None else INSUFFICIENT
        statuses.append(mix_status)
        overall = max(statuses, key=_STATUS_ORDER.index) if enough else INSUFFICIENT
        return {
            "n_observed": int(n_observed),
            "status": overall,
            "features": features,
            "segment_mix": {
                "psi": mix_psi,
                "status": mix_status,
                "reference": {str(i): share for i, share in enumerate(self.segment_mix)},
                "observed": {str(i): (int(c) / n_observed if n_observed else 0.0) for i, c in enumerate(clusters)},
            },
        }


class RowCounter:
    """Counts one scored row at a time in plain Python (the predict hot path): a bisect per feature."""

    def __init__(self, reference: DriftReference) -> None:
        offsets = reference.offsets
        plan: list[tuple[Any, ...]] = []
        for j, feature in enumerate(reference.features):
            if feature.numeric:
                plan.append((True, feature.name, j, offsets[j], list(feature.edges), offsets[j] + feature.missing_bin))
            else:
                levels = {level: offsets[j] + i for i, level in enumerate(feature.levels)}
                unseen = offsets[j] + len(feature.levels)
                plan.append((False, feature.name, j, levels, unseen, offsets[j] + feature.missing_bin))
        self._plan = tuple(plan)
        self._clusters = offsets[-1]
        self.size = reference.size
        self.n_features = len(reference.features)

    def add(self, counts: list[int], sums: list[float], record: Mapping[str, Any], cluster: int) -> None:
        """Count `record` (feature name -> value as sent) scored into `cluster` into `counts` and `sums`."""
        for numeric, name, j, first, edges_or_unseen, missing in self._plan:
            value = record.get(name)
            if numeric:
                if value is None:
                    counts[missing] += 1
                else:
                    value = float(value)
                    counts[first + bisect_right(edges_or_unseen, value)] += 1
                    sums[j] += value
            else:
                text = "" if value is None else str(value).strip()
                if text == "":
                    counts[missing] += 1
                else:
                    counts[first.get(text, edges_or_unseen)] += 1
        counts[self._clusters + cluster] += 1


# --- at training ----------------------------------------------------------------------------------


def fit_reference(schema: FeatureSchema, columns: Mapping[str, Any], labels: np.ndarray, k: int) -> DriftReference:
    """The reference of a freshly trained version: `columns` each feature's training values as read
    (numbers with NaN when empty; text or a category column), `labels` each row's segment."""
    n = len(labels)
    features = []
    for feature in schema.features:
        values = columns[feature.name]
        if feature.numeric:
            x = np.asarray(values, dtype=np.float64)
            seen = x[~np.isnan(x)]
            edges = tuple(float(e) for e in np.unique(np.quantile(seen, _DECILES))) if seen.size else ()
            bins = FeatureBins(feature.name, True, edges=edges, mean=float(seen.mean()) if seen.size else None)
        else:
            levels = tuple(level for level in (feature.levels_ or ()) if level != MISSING_LEVEL)
            bins = FeatureBins(feature.name, False, levels=levels)
        shares = np.bincount(bins.bins_of(values), minlength=bins.n_bins) / max(n, 1)
        features.append(
            FeatureBins(
                bins.name, bins.numeric, bins.edges, bins.levels, tuple(float(s) for s in shares), _rounded(bins.mean)
            )
        )
    mix = np.bincount(np.asarray(labels, dtype=np.int64), minlength=k) / max(n, 1)
    return DriftReference(tuple(features), tuple(float(s) for s in mix))


def _rounded(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 6)
