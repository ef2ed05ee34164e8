"""One record of a declared schema encoded in plain Python: the predict hot path.

`check_records` and `encode` (app.ml.encoding) do this for many records with pandas and
NumPy, which for a single record costs milliseconds of set-up. `RecordEncoder` holds each
feature's learned numbers as plain values and a dict per categorical feature, so one
record is encoded in microseconds, with the same imputation, indicators and warnings.
A record that breaks a rule is left to the batch path, which words the error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from app.ml.preprocess import _shown
from app.ml.schema import MISSING_LEVEL, OTHER_LEVEL, FeatureSchema

_NUMERIC, _CATEGORICAL = 0, 1


class RecordEncoder:
    """Encodes one record of a fitted `custom` schema; immutable once built."""

    def __init__(self, schema: FeatureSchema) -> None:
        plan: list[tuple[Any, ...]] = []
        column = 0
        for feature in schema.features:
            if feature.numeric:
                low = -math.inf if feature.min is None else float(feature.min)
                high = math.inf if feature.max is None else float(feature.max)
                if feature.log_:
                    low = max(low, 0.0)
                plan.append(
                    (
                        _NUMERIC,
                        feature.name,
                        column,
                        float(feature.median_ or 0.0),
                        bool(feature.log_),
                        float(feature.mean_ or 0.0),
                        float(feature.std_ or 1.0),
                        low,
                        high,
                    )
                )
            else:
                levels = {level: column + i for i, level in enumerate(feature.levels_ or ())}
                plan.append(
                    (
                        _CATEGORICAL,
                        feature.name,
                        levels,
                        levels.get(OTHER_LEVEL),
                        levels.get(MISSING_LEVEL),
                        float(feature.weight_ or 0.0),
                    )
                )
            column += feature.width
        self._plan = tuple(plan)
        self.width = column

    def encode(self, record: Mapping[str, Any]) -> tuple[np.ndarray, list[str]] | None:
        """(encoded row, warnings), or None when a value breaks a rule (range, log of a negative)."""
        row = [0.0] * self.width
        warnings: list[str] = []
        for step in self._plan:
            if step[0] == _NUMERIC:
                _, name, column, median, log, mean, std, low, high = step
                value = record.get(name)
                if value is None:
                    warnings.append(f"{name}: missing, imputed")
                    value = median
                else:
                    value = float(value)
                    if not (low <= value <= high):
                        return None
                if log:
                    value = math.log1p(value)
                row[column] = (value - mean) / std
            else:
                _, name, levels, other, missing, weight = step
                raw = record.get(name)
                text = "" if raw is None else str(raw).strip()
                if text == "":
                    warnings.append(f"{name}: missing, imputed")
                    index = missing
                else:
                    index = levels.get(text)
                    if index is None:
                        warnings.append(f"{name}: unseen category {_shown(text)}")
                        index = other
                if index is not None:
                    row[index] = weight
        return np.asarray(row, dtype=np.float64), warnings
