"""The segmentation model: a fitted scaler and K-Means with their description.

Pure machine learning: no FastAPI, no database. Everything here blocks, so
the web app calls it from worker threads. A fitted :class:`SegmentationModel`
is never mutated by prediction, so one instance can serve concurrent calls.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.preprocessing import StandardScaler

from app.ml import persistence, selection
from app.ml.persistence import ModelLoadError
from app.ml.schema import customer_matrix
from app.ml.scoring import CentroidScorer
from app.ml.training import TrainedParts, train_customer
from app.preprocess import FEATURES, DataValidationError


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
        mean = np.asarray(scaler.mean_, dtype=np.float64)
        scale = np.asarray(scaler.scale_, dtype=np.float64)
        centers = np.asarray(kmeans.cluster_centers_, dtype=np.float64)
        if (
            mean.shape != (len(FEATURES),)
            or scale.shape != mean.shape
            or centers.ndim != 2
            or centers.shape[1] != len(FEATURES)
            or centers.shape[0] < 2
        ):
            raise ModelLoadError("scaler and K-Means do not fit the four customer features")
        self._scorer = CentroidScorer(centers, mean, scale)
        segments = metadata.get("segments") or []
        self._names = tuple(str(s["cluster_name"]) for s in segments)
        if len(self._names) != centers.shape[0]:
            raise ModelLoadError(
                f"metadata describes {len(self._names)} segments but K-Means has {centers.shape[0]} centroids"
            )

    # -- training ---------------------------------------------------------- #

    @classmethod
    def train(
        cls,
        X: Any,
        *,
        n_clusters: int | None = None,
        random_state: int = 42,
        k_range: tuple[int, int] = selection.DEFAULT_K_RANGE,
    ) -> SegmentationModel:
        """Fit a model on X, an (n, 4) matrix in FEATURES order, original units.

        With ``n_clusters=None`` k is the best sampled silhouette over
        ``k_range`` (inclusive), with the inertia knee reported beside it.
        Raises DataValidationError when X is malformed or has too few
        (distinct) customers for the requested segments.
        """
        with selection.SingleThreaded():
            parts = train_customer(X, n_clusters=n_clusters, random_state=random_state, k_range=k_range)
        return cls._from_training(parts)

    @classmethod
    def _from_training(cls, parts: TrainedParts) -> SegmentationModel:
        model = cls(parts.scaler, parts.kmeans, parts.metadata)  # type: ignore[arg-type]
        model.training_labels = parts.labels
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
        return self._scorer.predict(customer_matrix(X))

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
        scored = self._scorer.predict_four(a, b, c, d)
        if scored is None:
            raise DataValidationError("features must be finite numbers (no NaN or infinity)")
        best_id, confidence = scored
        return best_id, self._names[best_id], confidence

    # -- persistence ------------------------------------------------------- #

    def save(self, directory: str | os.PathLike) -> Path:
        """Write kmeans.pkl, scaler.pkl and metadata.json into directory, atomically file by file.

        See :func:`app.ml.persistence.write_directory`.
        """
        return persistence.write_directory(directory, self.kmeans, self.scaler, self.metadata)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SegmentationModel:
        """Load a model saved by :meth:`save`; any problem raises ModelLoadError."""
        return cls._from_parts(*persistence.read_directory(directory))

    def to_bytes(self) -> bytes:
        """The whole model (both estimators and metadata) as one blob."""
        return persistence.to_bytes(self.kmeans, self.scaler, self.metadata)

    @classmethod
    def from_bytes(cls, blob: bytes) -> SegmentationModel:
        """Inverse of :meth:`to_bytes`; any problem raises ModelLoadError."""
        return cls._from_parts(*persistence.from_bytes(blob))

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
