"""The promotion gate: is a candidate version as good and as stable as the active one?

Three figures, all on the same data (the policy's source, as the comparison reads it):

- `unchanged`: compare's `unchanged_segments`, the share of customers whose segment_key stays;
- `silhouette_active`, `silhouette_candidate`: each version's silhouette on one sample of at most
  10,000 rows (seed 0), each in its own K-Means space;
- `smallest_segment_share`: the candidate's smallest segment's share of the rows (0..1).

Nothing here knows HTTP, the database or the scheduler: `figures` is blocking (a worker thread).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import silhouette_score

from app.ml.estimator import SegmentationModel
from app.versions.identity import score_both

SILHOUETTE_SAMPLE = 10_000
SAMPLE_SEED = 0


@dataclass(frozen=True)
class Gate:
    min_unchanged: float = 0.8
    max_silhouette_drop: float = 0.05
    min_segment_share: float = 0.01

    def judge(self, figures: dict[str, float | None]) -> list[str]:
        """Why the candidate fails the gate: an empty list passes."""
        reasons = []
        unchanged = figures.get("unchanged")
        if unchanged is not None and unchanged < self.min_unchanged:
            reasons.append(f"unchanged {unchanged:.3f} is below min_unchanged {self.min_unchanged}")
        active, candidate = figures.get("silhouette_active"), figures.get("silhouette_candidate")
        if active is not None and candidate is not None and active - candidate > self.max_silhouette_drop:
            reasons.append(
                f"silhouette dropped by {active - candidate:.3f} ({active:.3f} to {candidate:.3f}), "
                f"more than max_silhouette_drop {self.max_silhouette_drop}"
            )
        smallest = figures.get("smallest_segment_share")
        if smallest is not None and smallest < self.min_segment_share:
            reasons.append(
                f"the smallest segment holds {smallest:.3f} of the customers, below {self.min_segment_share}"
            )
        return reasons


def _sample(data: Any, n: int) -> Any:
    if n <= SILHOUETTE_SAMPLE:
        return data
    rows = np.sort(np.random.default_rng(SAMPLE_SEED).choice(n, size=SILHOUETTE_SAMPLE, replace=False))
    return data.iloc[rows] if hasattr(data, "iloc") else np.asarray(data)[rows]


def _silhouette(model: SegmentationModel, sample: Any, labels: np.ndarray) -> float | None:
    if len(np.unique(labels)) < 2 or len(labels) <= len(np.unique(labels)):
        return None  # silhouette is not defined for one segment, or one customer a segment
    return round(float(silhouette_score(model.encode(sample), labels, random_state=SAMPLE_SEED)), 4)


def figures(active: SegmentationModel, candidate: SegmentationModel, data: Any) -> dict[str, float | None]:
    """The gate's figures for `candidate` against `active` on `data` (blocking)."""
    whole = score_both(active, candidate, data)
    sample = _sample(data, len(data))
    sampled = score_both(active, candidate, sample)
    shares = np.bincount(whole.to_labels, minlength=candidate.n_clusters_) / max(len(data), 1)
    return {
        "unchanged": round(float(whole.result()["unchanged_segments"]), 4),
        "silhouette_active": _silhouette(active, sample, sampled.from_labels),
        "silhouette_candidate": _silhouette(candidate, sample, sampled.to_labels),
        "smallest_segment_share": round(float(shares.min()), 4) if len(data) else None,
    }
