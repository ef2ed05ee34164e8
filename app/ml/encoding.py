"""A declared schema's numbers: learning each feature at training, encoding rows for K-Means.

The encoded matrix has one column per numeric feature (missing values
imputed with the training median, log1p where chosen, then standardized)
and one indicator column per categorical level, weighted so that a
categorical feature as a whole has the total variance of one standardized
numeric feature. K-Means runs on that matrix as it is.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from app.ml.frames import bad_number_reason, categorical_values, match_columns, numeric_values
from app.ml.preprocess import DataValidationError, _problem, _shown
from app.ml.schema import MAX_LEVELS, MISSING_LEVEL, OTHER_LEVEL, Feature, FeatureSchema

AUTO_LOG_SKEWNESS = 1.0
"""``auto`` takes log1p for a non-negative training column skewed more than this."""


# --------------------------------------------------------------------------- #
# Training


def fit_schema(schema: FeatureSchema, frame: pd.DataFrame) -> tuple[FeatureSchema, dict[str, float]]:
    """Learn every feature of ``schema`` from ``frame`` (as read by read_training_frame).

    Returns the fitted schema and each feature's share of empty cells.
    Raises DataValidationError for a column with no values, or one declared
    ``log`` that holds negative values.
    """
    fitted: list[Feature] = []
    missing: dict[str, float] = {}
    for feature in schema.features:
        column = frame[feature.name]
        learned, share = _fit_numeric(feature, column) if feature.numeric else _fit_categorical(feature, column)
        fitted.append(learned)
        missing[feature.name] = share
    return replace(schema, features=tuple(fitted)), missing


def skewness(values: np.ndarray) -> float:
    """Sample skewness (Fisher-Pearson, not bias-corrected); 0 for a constant column."""
    if values.size < 2 or float(np.ptp(values)) == 0.0:
        return 0.0
    return float(stats.skew(values, bias=True))


def _no_values(feature: Feature) -> DataValidationError:
    return DataValidationError(
        f"column {feature.name} has no values: every cell is empty", [_problem(None, feature.name, "no values")]
    )


def _fit_numeric(feature: Feature, column: pd.Series) -> tuple[Feature, float]:
    values = column.to_numpy(dtype=np.float64, na_value=np.nan)
    missing = np.isnan(values)
    observed = values[~missing]
    if not observed.size:
        raise _no_values(feature)
    lowest = float(observed.min())
    if feature.transform == "log" and lowest < 0:
        raise DataValidationError(
            f"column {feature.name} is declared with transform 'log' but holds negative values (lowest {lowest:g})",
            [_problem(None, feature.name, f"negative values with transform 'log' (lowest {lowest:g})")],
        )
    use_log = feature.transform == "log" or (
        feature.transform == "auto" and lowest >= 0 and skewness(observed) > AUTO_LOG_SKEWNESS
    )
    median = float(np.median(observed))
    transformed = np.where(missing, median, values)
    if use_log:
        transformed = np.log1p(transformed)
    std = float(transformed.std())
    learned = replace(
        feature,
        median_=median,
        log_=bool(use_log),
        mean_=float(transformed.mean()),
        std_=std if std > 0 and math.isfinite(std) else 1.0,
    )
    return learned, float(missing.mean())


def _fit_categorical(feature: Feature, column: pd.Series) -> tuple[Feature, float]:
    values = column.array if isinstance(column.dtype, pd.CategoricalDtype) else categorical_values(column)
    categories = [str(c) for c in values.categories]
    codes = np.asarray(values.codes)
    n = len(codes)
    counts = np.bincount(codes[codes >= 0], minlength=len(categories))
    ranked = sorted((i for i in range(len(categories)) if counts[i]), key=lambda i: (-counts[i], categories[i]))
    if not ranked:
        raise _no_values(feature)
    shares = {categories[i]: counts[i] / n for i in ranked[:MAX_LEVELS]}
    for level, count in ((OTHER_LEVEL, counts[ranked[MAX_LEVELS:]].sum()), (MISSING_LEVEL, n - counts.sum())):
        if count:  # a real level of that name absorbs them
            shares[level] = shares.get(level, 0.0) + count / n
    spread = sum(p * (1.0 - p) for p in shares.values())
    learned = replace(
        feature,
        levels_=tuple(shares),
        shares_=tuple(float(p) for p in shares.values()),
        weight_=1.0 / math.sqrt(spread) if spread > 0 else 0.0,
    )
    return learned, float((codes < 0).mean())


# --------------------------------------------------------------------------- #
# Encoding


def level_indices(feature: Feature, column: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(level index or -1 for no indicator, unseen mask, missing mask) of a categorical column.

    ``column`` is a ``category`` Series or trimmed text ("" or NaN when
    empty). Unseen levels take ``other`` and empty cells ``missing`` when
    training had such a level, else no indicator at all.
    """
    lookup = pd.Index(feature.levels_ or (), dtype=object)
    if isinstance(column.dtype, pd.CategoricalDtype):
        codes = np.asarray(column.cat.codes)
        missing = codes < 0
        per_category = lookup.get_indexer(pd.Index(column.cat.categories, dtype=object))
        idx = np.where(missing, -1, per_category[np.where(missing, 0, codes)] if len(per_category) else -1)
    else:
        text = column.to_numpy(dtype=object)
        missing = np.asarray(pd.isna(text) | (text == ""), dtype=bool)
        idx = lookup.get_indexer(text)
    unseen = (idx < 0) & ~missing
    idx = np.asarray(idx, dtype=np.int64)
    idx[unseen] = lookup.get_loc(OTHER_LEVEL) if OTHER_LEVEL in lookup else -1
    idx[missing] = lookup.get_loc(MISSING_LEVEL) if MISSING_LEVEL in lookup else -1
    return idx, unseen, missing


def encode(schema: FeatureSchema, frame: pd.DataFrame, dtype: Any = np.float64) -> np.ndarray:
    """The clustering matrix of a fitted schema for ``frame`` (one column per declared feature).

    Numeric columns are float with NaN where empty (imputed here);
    categorical ones as :func:`level_indices` takes them.
    """
    n = len(frame)
    out = np.zeros((n, schema.width), dtype=dtype)
    col = 0
    for feature in schema.features:
        if feature.numeric:
            assert feature.median_ is not None and feature.mean_ is not None and feature.std_ is not None
            values = frame[feature.name].to_numpy(dtype=np.float64, na_value=np.nan)
            values = np.where(np.isnan(values), feature.median_, values)
            if feature.log_:
                values = np.log1p(values)
            out[:, col] = (values - feature.mean_) / feature.std_
        else:
            idx, _, _ = level_indices(feature, frame[feature.name])
            rows = np.flatnonzero(idx >= 0)
            out[rows, col + idx[rows]] = feature.weight_
        col += feature.width
    return out


# --------------------------------------------------------------------------- #
# Scoring input: checks per cell, messages per row


@dataclass(frozen=True)
class CheckedRows:
    """Rows ready to encode, with what was wrong (errors) or worth saying (warnings) per row."""

    frame: pd.DataFrame
    errors: list[list[str]]
    warnings: list[list[str]]

    @property
    def valid(self) -> np.ndarray:
        return np.array([not e for e in self.errors], dtype=bool)


def _range_reason(feature: Feature, value: float) -> str | None:
    lo, hi = feature.min, feature.max
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if lo is not None and hi is not None:
            return f"out of range {lo:g}..{hi:g}: {value:g}"
        return f"below the minimum {lo:g}: {value:g}" if lo is not None else f"above the maximum {hi:g}: {value:g}"
    if feature.log_ and value < 0:
        return f"negative, cannot be log-transformed: {value:g}"
    return None


def check_text_frame(schema: FeatureSchema, frame: pd.DataFrame) -> CheckedRows:
    """Check a batch read as text (every cell a str); a declared column missing raises DataValidationError."""
    raw = match_columns(frame.columns, schema.names, required=schema.names)
    columns: dict[str, Any] = {}
    empties: dict[str, np.ndarray] = {}
    bad: dict[str, tuple[np.ndarray, pd.Series]] = {}
    for feature in schema.features:
        column = frame[raw[feature.name]].reset_index(drop=True)
        if feature.numeric:
            values, empty, refused = numeric_values(column)
            columns[feature.name], empties[feature.name] = values, empty
            bad[feature.name] = (refused, column)
        else:
            text = column.astype(object).where(column.notna(), "").astype(str).str.strip()
            columns[feature.name], empties[feature.name] = text, (text == "").to_numpy()
    return _check(schema, pd.DataFrame(columns), empties, bad)


def check_records(schema: FeatureSchema, records: Sequence[Mapping[str, Any]]) -> CheckedRows:
    """Check already type-checked records (numbers for numeric features, text for categorical)."""
    columns: dict[str, Any] = {}
    empties: dict[str, np.ndarray] = {}
    for feature in schema.features:
        cells = [record.get(feature.name) for record in records]
        if feature.numeric:
            values = np.array([np.nan if v is None else float(v) for v in cells], dtype=np.float64)
            columns[feature.name], empties[feature.name] = values, np.isnan(values)
        else:
            text = pd.Series(["" if v is None else str(v).strip() for v in cells], dtype=object)
            columns[feature.name], empties[feature.name] = text, (text == "").to_numpy(dtype=bool)
    return _check(schema, pd.DataFrame(columns, index=range(len(records))), empties, {})


def _check(
    schema: FeatureSchema,
    frame: pd.DataFrame,
    empties: dict[str, np.ndarray],
    bad: dict[str, tuple[np.ndarray, pd.Series]],
) -> CheckedRows:
    errors: dict[int, list[str]] = defaultdict(list)
    warnings: dict[int, list[str]] = defaultdict(list)
    for feature in schema.features:
        name = feature.name
        for i in np.flatnonzero(empties[name]).tolist():
            warnings[i].append(f"{name}: missing, imputed")
        if feature.numeric:
            refused, raw = bad.get(name, (np.zeros(len(frame), dtype=bool), frame[name]))
            for i in np.flatnonzero(refused).tolist():
                errors[i].append(f"{name}: {bad_number_reason(raw.iloc[i])}")
            values = frame[name].to_numpy(dtype=np.float64)
            with np.errstate(invalid="ignore"):
                suspect = ~np.isnan(values) & (
                    (values < (feature.min if feature.min is not None else -np.inf))
                    | (values > (feature.max if feature.max is not None else np.inf))
                    | ((values < 0) if feature.log_ else False)
                )
            for i in np.flatnonzero(suspect).tolist():
                reason = _range_reason(feature, float(values[i]))
                if reason:
                    errors[i].append(f"{name}: {reason}")
        else:
            _, unseen, _ = level_indices(feature, frame[name])
            for i in np.flatnonzero(unseen).tolist():
                warnings[i].append(f"{name}: unseen category {_shown(frame[name].iloc[i])}")
    n = len(frame)
    return CheckedRows(frame, [errors.get(i, []) for i in range(n)], [warnings.get(i, []) for i in range(n)])


def raise_for_records(checked: CheckedRows) -> None:
    """Records carry no per-row error channel: any error fails them all, every problem listed."""
    problems = []
    offending = 0
    for number, errors in enumerate(checked.errors, start=1):
        offending += bool(errors)
        for message in errors:
            column, _, reason = message.partition(": ")
            problems.append(_problem(number, column, reason))
    if problems:
        raise DataValidationError(
            f"{offending} record(s) cannot be scored (first: record {problems[0]['row']} {problems[0]['column']}: "
            f"{problems[0]['reason']})",
            problems,
            offending,
        )
