"""The feature schema: which columns a segmentation clusters on, their types, transforms and levels.

A :class:`FeatureSchema` is declared (the analyst's own columns, or those of
the RFM table) or fixed (the contract's four customer features). Training
fills in what it learns about each feature (median, transform, scaling,
levels) in attributes ending in ``_``; :meth:`FeatureSchema.to_dict` and
:meth:`FeatureSchema.from_dict` carry both into model metadata and back.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, cast

import numpy as np
import pandas as pd

from app.ml.errors import SchemaError
from app.ml.preprocess import FEATURE_RANGES, FEATURES, INTEGER_FEATURES, DataValidationError, resolve_columns

MAX_FEATURES = 50
MAX_NAME_LENGTH = 64
MAX_LEVELS = 50
"""Most frequent categorical levels kept at training; rarer ones are pooled as OTHER_LEVEL."""
OTHER_LEVEL = "other"
MISSING_LEVEL = "missing"

FeatureType = Literal["numeric", "categorical"]
Transform = Literal["none", "log", "auto"]
_DECLARED_KEYS = ("name", "type", "transform", "min", "max")
_FIXED_TAG, _DECLARED_TAG = "customer", "custom"
"""How :meth:`FeatureSchema.to_dict` tells the two apart, as saved models' metadata spells it."""
_IS_FIXED = {_FIXED_TAG: True, _DECLARED_TAG: False}


@dataclass(frozen=True)
class Feature:
    """One clustering feature as declared, plus what training learned about it.

    The learned attributes (ending in ``_``) are None on a declared schema.
    Numeric: ``median_`` (imputes missing values), ``log_`` (whether log1p
    applies), ``mean_``/``std_`` (standard scaling of the transformed column).
    Categorical: ``levels_`` (one indicator column each, in order), their
    training ``shares_`` and the indicator ``weight_`` that makes the feature
    as a whole count as much as one standardized numeric feature.
    """

    name: str
    type: FeatureType
    transform: Transform = "auto"
    min: float | None = None
    max: float | None = None
    integer: bool = False
    median_: float | None = None
    log_: bool | None = None
    mean_: float | None = None
    std_: float | None = None
    levels_: tuple[str, ...] | None = None
    shares_: tuple[float, ...] | None = None
    weight_: float | None = None

    @property
    def numeric(self) -> bool:
        return self.type == "numeric"

    @property
    def fitted(self) -> bool:
        return self.mean_ is not None if self.numeric else self.levels_ is not None

    @property
    def width(self) -> int:
        """Columns this feature takes in the encoded matrix."""
        return 1 if self.numeric else len(self.levels_ or ())

    def to_dict(self) -> dict[str, Any]:
        declared = {key: getattr(self, key) for key in _DECLARED_KEYS}
        if self.integer:
            declared["integer"] = True
        if self.fitted:
            learned = {f.name[:-1]: getattr(self, f.name) for f in fields(self) if f.name.endswith("_")}
            declared["fitted"] = {
                key: list(value) if isinstance(value, tuple) else value
                for key, value in learned.items()
                if value is not None
            }
        return declared


@dataclass(frozen=True)
class FeatureSchema:
    """The clustering features of a segmentation, in the column order of its matrices."""

    features: tuple[Feature, ...]
    id_column: str | None = None
    fixed: bool = False
    """The contract's four customer features: nothing is learned in the schema; the model scales them
    with its StandardScaler (scaler.pkl), takes them as a four-column matrix in FEATURES order and
    orders its ids by centroid income, then spending. A declared schema learns its own encoding and
    orders ids by size."""

    @classmethod
    def customer(cls) -> FeatureSchema:
        """The four customer features with the contract's ranges, clustered untransformed."""
        return cls(
            tuple(
                Feature(
                    name,
                    "numeric",
                    "none",
                    float(FEATURE_RANGES[name][0]),
                    float(FEATURE_RANGES[name][1]),
                    name in INTEGER_FEATURES,
                )
                for name in FEATURES
            ),
            fixed=True,
        )

    @classmethod
    def declare(cls, features: list[dict[str, Any]], id_column: str | None = None) -> FeatureSchema:
        """A declared schema from the analyst's declarations; raises SchemaError."""
        if id_column is not None:
            id_column = _clean_name(id_column, "id_column")
        if not isinstance(features, (list, tuple)) or not features:
            raise SchemaError("declare at least one feature")
        if len(features) > MAX_FEATURES:
            raise SchemaError(f"at most {MAX_FEATURES} features can be declared, got {len(features)}")
        declared: list[Feature] = []
        seen: dict[str, str] = {}
        for number, spec in enumerate(features, start=1):
            feature = _declared_feature(spec, number)
            key = feature.name.casefold()
            if key in seen:
                raise SchemaError(f"feature {feature.name!r} is declared twice (also as {seen[key]!r})")
            if id_column is not None and key == id_column.casefold():
                raise SchemaError(f"feature {feature.name!r} is also the id_column; the id is not a feature")
            seen[key] = feature.name
            declared.append(feature)
        return cls(tuple(declared), id_column)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def fitted(self) -> bool:
        return self.fixed or all(f.fitted for f in self.features)

    @property
    def width(self) -> int:
        """Columns of the encoded matrix."""
        return sum(f.width for f in self.features)

    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        tag = _FIXED_TAG if self.fixed else _DECLARED_TAG
        return {"kind": tag, "id_column": self.id_column, "features": [f.to_dict() for f in self.features]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSchema:
        """Inverse of :meth:`to_dict`; raises SchemaError for anything it did not write."""
        fixed = _IS_FIXED.get(str(data.get("kind"))) if isinstance(data, dict) else None
        if fixed is None:
            raise SchemaError(f"a schema needs kind {_FIXED_TAG!r} or {_DECLARED_TAG!r}")
        if fixed:
            return cls.customer()
        specs = data.get("features")
        if not isinstance(specs, list):
            raise SchemaError("a schema needs a list of features")
        declared = cls.declare([{k: s.get(k) for k in _DECLARED_KEYS} for s in specs], data.get("id_column"))
        learned = []
        for feature, spec in zip(declared.features, specs, strict=True):
            fitted = spec.get("fitted")
            learned.append(feature if fitted is None else _with_learned(feature, fitted))
        return cls(tuple(learned), declared.id_column)


def _clean_name(raw: Any, what: str) -> str:
    if not isinstance(raw, str):
        raise SchemaError(f"{what} must be a string, got {type(raw).__name__}")
    name = raw.strip()
    if not 1 <= len(name) <= MAX_NAME_LENGTH:
        raise SchemaError(f"{what} {raw!r} must be 1 to {MAX_NAME_LENGTH} characters long")
    if any(not ch.isprintable() for ch in name):
        raise SchemaError(f"{what} {raw!r} contains control characters")
    return name


def _bound(spec: dict[str, Any], key: str, name: str) -> float | None:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SchemaError(f"feature {name!r}: {key} must be a finite number, got {value!r}")
    return float(value)


def _declared_feature(spec: Any, number: int) -> Feature:
    if not isinstance(spec, dict):
        raise SchemaError(f"feature {number} must be an object with a name and a type")
    if "name" not in spec or spec["name"] is None:
        raise SchemaError(f"feature {number} has no name")
    name = _clean_name(spec["name"], f"feature {number}: name")
    unknown = sorted(str(k) for k in spec if k not in _DECLARED_KEYS)
    if unknown:
        raise SchemaError(f"feature {name!r}: unknown field(s) {', '.join(unknown)}")
    feature_type = spec.get("type")
    if feature_type not in ("numeric", "categorical"):
        raise SchemaError(f"feature {name!r}: type must be 'numeric' or 'categorical', got {feature_type!r}")
    transform = spec.get("transform")
    low, high = _bound(spec, "min", name), _bound(spec, "max", name)
    if feature_type == "categorical":
        if transform not in (None, "none"):
            raise SchemaError(f"feature {name!r}: a categorical feature takes no transform, got {transform!r}")
        if low is not None or high is not None:
            raise SchemaError(f"feature {name!r}: min and max only apply to numeric features")
        return Feature(name, "categorical", "none")
    if transform is None:
        transform = "auto"
    if transform not in ("none", "log", "auto"):
        raise SchemaError(f"feature {name!r}: transform must be 'none', 'log' or 'auto', got {transform!r}")
    if low is not None and high is not None and low > high:
        raise SchemaError(f"feature {name!r}: min {low:g} is above max {high:g}")
    return Feature(name, "numeric", cast(Transform, transform), low, high)


def _with_learned(feature: Feature, fitted: Any) -> Feature:
    if not isinstance(fitted, dict):
        raise SchemaError(f"feature {feature.name!r}: fitted state must be an object")
    values = {f"{key}_": tuple(v) if isinstance(v, list) else v for key, v in fitted.items()}
    known = {f.name for f in fields(Feature) if f.name.endswith("_")}
    if not set(values) <= known:
        raise SchemaError(f"feature {feature.name!r}: unknown fitted state {sorted(set(values) - known)}")
    learned = Feature(**(asdict(feature) | values))
    if not learned.fitted:
        raise SchemaError(f"feature {feature.name!r}: incomplete fitted state")
    return learned


def customer_matrix(X: Any) -> np.ndarray:
    """Check shape and finiteness of customer features; keep float32 (large data) or use float64.

    X is an (n, 4) array in FEATURES order, or a DataFrame whose columns
    are picked by name (dataset or snake_case headers).
    """
    if isinstance(X, pd.DataFrame):
        columns = resolve_columns(X.columns, optional=())
        X = X[[columns[name] for name in FEATURES]].to_numpy()
    if hasattr(X, "tocsr"):  # a SciPy sparse matrix or array
        raise DataValidationError("sparse input is not supported: pass the customer features as a dense matrix")
    if np.iscomplexobj(X):
        raise DataValidationError("Complex data not supported: features must be real numbers")
    try:
        arr = np.asarray(X)
        if arr.dtype != np.float32:
            arr = arr.astype(np.float64, copy=False)
    except (TypeError, ValueError) as exc:
        raise DataValidationError(f"features must be numbers: {exc}") from exc
    if arr.ndim == 2 and arr.shape[1] != len(FEATURES):
        raise DataValidationError(
            f"X has {arr.shape[1]} features, but SegmentationModel is expecting {len(FEATURES)} features"
            f" as input (a matrix with {len(FEATURES)} columns: {', '.join(FEATURES)})"
        )
    if arr.ndim != 2:
        raise DataValidationError(
            f"expected a matrix with {len(FEATURES)} columns ({', '.join(FEATURES)}), got shape {arr.shape}"
        )
    if not np.isfinite(arr).all():
        raise DataValidationError("features must be finite numbers (no NaN or infinity)")
    return arr


__all__ = [
    "MAX_LEVELS",
    "MISSING_LEVEL",
    "OTHER_LEVEL",
    "Feature",
    "FeatureSchema",
    "SchemaError",
    "customer_matrix",
]
