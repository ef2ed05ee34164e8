"""What a batch yields beside its segments: each row's explanation columns, and its drift counts.

A `BatchObserver` goes along with one batch through its scoring thread and sees every chunk's
scored rows (their checked values and segments): it adds `top_feature` and `margin` when the
client asked for `explain=true`, and tallies the rows into the version's drift bins. The tally
is handed to the drift counter on the event loop once the batch is done.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from app.versions.served import ServedModel

Columns = Mapping[str, Any]
"""A chunk's scored rows as checked values per feature name (numbers, NaN when empty; text)."""
ExplainColumns = tuple[np.ndarray, np.ndarray]
"""(top_feature names, margins) of a chunk's scored rows."""


class BatchObserver:
    """Explanation columns and drift counts of one batch, chunk by chunk, in the thread that scores it."""

    def __init__(self, served: ServedModel, *, explain: bool, count: bool) -> None:
        self.served = served
        self.explain = explain
        self.reference = served.model.drift_reference if count else None
        self.counts: np.ndarray | None = None
        self.sums: np.ndarray | None = None
        self.n_counted = 0
        self._top: list[np.ndarray] = []
        self._margin: list[np.ndarray] = []

    def observe(self, columns: Columns, labels: np.ndarray) -> ExplainColumns | None:
        """See one chunk's scored rows; returns its explanation columns when explaining."""
        if self.reference is not None and len(labels):
            counts, sums = self.reference.tally(columns, labels)
            if self.counts is None or self.sums is None:
                self.counts, self.sums = counts, sums
            else:
                self.counts += counts
                self.sums += sums
            self.n_counted += len(labels)
        if not self.explain:
            return None
        model = self.served.model
        if len(labels):
            top, margin = model.explainer.top_features(model.scorer_rows(columns), labels)
        else:
            top, margin = np.zeros(0, dtype=np.intp), np.zeros(0)
        names = np.array(model.explainer.features, dtype=object)[top]
        self._top.append(names)
        self._margin.append(margin)
        return names, margin

    @property
    def top_feature(self) -> np.ndarray:
        return np.concatenate(self._top) if self._top else np.zeros(0, dtype=object)

    @property
    def margin(self) -> np.ndarray:
        return np.concatenate(self._margin) if self._margin else np.zeros(0)
