"""The feature schema: which columns a segmentation clusters on, and the matrix they make."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from app.preprocess import FEATURES, DataValidationError, resolve_columns


def customer_matrix(X: Any) -> np.ndarray:
    """Check shape and finiteness of customer features; keep float32 (large data) or use float64.

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
