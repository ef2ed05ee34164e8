"""The segmentation model: a fitted scaler and K-Means with their description.

Pure machine learning: no FastAPI, no database. Everything here blocks, so
the web app calls it from worker threads. A fitted :class:`SegmentationModel`
is never mutated by prediction, so one instance can serve concurrent calls.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from app.ml import persistence, selection
from app.ml.drift import DriftReference, fit_reference
from app.ml.encoding import check_records, check_text_frame, encode, raise_for_records
from app.ml.explain import Explainer, Explanation
from app.ml.outofcore import TrainingFile, train_custom_file, train_customer_file
from app.ml.persistence import ModelLoadError
from app.ml.preprocess import FEATURES, DataValidationError, features_matrix
from app.ml.preprocess import score_frame as score_customer_frame
from app.ml.records import RecordEncoder
from app.ml.rfm import RfmTable, clustering_frame
from app.ml.schema import FeatureSchema, SchemaError, customer_matrix
from app.ml.scoring import CentroidScorer, ScoredFrame, ScoredRecords
from app.ml.training import TrainedParts, train_custom, train_customer, train_rfm


class SegmentationModel(ClusterMixin, BaseEstimator):
    """K-Means segments over a feature schema, as a scikit-learn estimator, with their description.

    Hyperparameters: ``n_clusters`` (None: the best sampled silhouette over ``k_range``, inclusive,
    with the inertia knee reported beside it), ``random_state`` and ``schema`` (None or
    ``FeatureSchema.customer()``: the four customer features; else a declared schema).
    :meth:`fit` learns ``kmeans_`` (the scikit-learn estimator, saved as kmeans.pkl), ``scaler_``
    (a StandardScaler for the customer features, saved as scaler.pkl; None for a declared schema,
    which encodes rows straight into the K-Means space), ``schema_`` (the fitted schema),
    ``metadata_`` (a JSON-ready dict: segment statistics, the fitted schema, training details),
    ``n_clusters_``, ``cluster_names_`` and, after an in-memory fit, ``labels_``. The same data and
    ``random_state`` give the same ids and names. A fitted model is never changed by prediction, so
    one instance serves concurrent calls.
    """

    def __init__(
        self,
        n_clusters: int | None = None,
        *,
        k_range: tuple[int, int] = selection.DEFAULT_K_RANGE,
        random_state: int = 42,
        schema: FeatureSchema | None = None,
    ) -> None:
        self.n_clusters = n_clusters
        self.k_range = k_range
        self.random_state = random_state
        self.schema = schema

    # -- training ---------------------------------------------------------- #

    def fit(self, X: Any, y: Any = None) -> SegmentationModel:
        """Fit on ``X``: for the customer features an (n, 4) matrix in FEATURES order, original units,
        or a DataFrame with those columns; for a declared schema the DataFrame from
        :func:`app.ml.frames.read_training_frame`; an :class:`app.ml.rfm.RfmTable` (the RFM kind's
        table of :func:`app.ml.rfm.read_log`); or a :class:`app.ml.outofcore.TrainingFile` (CSV or
        Parquet of any size). ``y`` is ignored. Raises DataValidationError when the data is
        malformed or has too few (distinct) rows for the requested segments.
        """
        k_min, k_max = self.k_range
        parts = train_parts(
            X, self.schema, n_clusters=self.n_clusters, random_state=self.random_state, k_range=(k_min, k_max)
        )
        self._fitted_as(parts.scaler, parts.kmeans, parts.metadata)
        if len(parts.labels) or not parts.metadata["n_samples"]:
            self.labels_ = parts.labels
        self.metadata_["drift_reference"] = _drift_reference(self.schema_, X, parts, self.n_clusters_)
        return self

    @classmethod
    def train(cls, data: Any, **params: Any) -> SegmentationModel:
        """``SegmentationModel(**params).fit(data)``, for one-line callers."""
        return cls(**params).fit(data)

    @classmethod
    def from_fitted(
        cls, scaler: StandardScaler | None, kmeans: KMeans | MiniBatchKMeans, metadata: dict[str, Any]
    ) -> SegmentationModel:
        """A fitted model from its parts (loaded, renumbered or fitted by another engine); raises
        ModelLoadError when they do not make one."""
        schema = _schema_of(metadata)
        model = cls(random_state=int(metadata.get("random_state") or 0), schema=None if schema.fixed else schema)
        model._fitted_as(scaler, kmeans, metadata)
        return model

    def _fitted_as(
        self, scaler: StandardScaler | None, kmeans: KMeans | MiniBatchKMeans, metadata: dict[str, Any]
    ) -> None:
        self.scaler_ = scaler
        self.kmeans_ = kmeans
        self.metadata_ = metadata
        self.schema_ = _schema_of(metadata)
        self.n_features_in_ = len(self.schema_.features)
        self._scorer = _scorer_for(self.schema_, scaler, kmeans)
        self._records = None if self.schema_.fixed else RecordEncoder(self.schema_)
        centers = self._scorer.folded_centers
        segments = metadata.get("segments") or []
        self.cluster_names_ = tuple(str(s["cluster_name"]) for s in segments)
        self.n_clusters_ = len(self.cluster_names_)
        if self.n_clusters_ != centers.shape[0]:
            raise ModelLoadError(
                f"metadata describes {self.n_clusters_} segments but K-Means has {centers.shape[0]} centroids"
            )

    # -- description ------------------------------------------------------- #

    @property
    def version(self) -> str:
        return str(self.metadata_.get("version", ""))

    @version.setter
    def version(self, value: str) -> None:
        self.metadata_["version"] = str(value)

    @property
    def segments(self) -> list[dict[str, Any]]:
        return self.metadata_["segments"]

    def summary(self) -> dict[str, Any]:
        """The shape of GET /clusters: totals, version and one entry per segment."""
        return {
            "total_customers": self.metadata_.get("total_customers"),
            "n_clusters": self.n_clusters_,
            "model_version": self.version,
            "clusters": [dict(s) for s in self.segments],
        }

    # -- prediction -------------------------------------------------------- #

    def predict(self, X: Any) -> np.ndarray:
        """The cluster id (int64) of each row of X, data as :meth:`fit` takes it (not a file)."""
        return self.predict_with_confidence(X)[0]

    def predict_with_confidence(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        """(cluster ids int64, confidence float64 in [0, 1]) for each row of X, nearest centroid.

        Confidence is 1 - d_nearest / d_second: 1 at a centroid, 0 on the boundary with the
        next-nearest segment. Pure NumPy; the same ids as ``kmeans_.predict(encode(X))``.
        """
        check_is_fitted(self, "kmeans_")
        if self.schema_.fixed:
            return self._scorer.predict(customer_matrix(X))
        return self._scorer.predict(encode(self.schema_, X))

    def predict_one(self, *values: Any, **features: Any) -> tuple[int, str, float]:
        """Segment of one customer -> (cluster_id, cluster_name, confidence): the four features, as
        keywords, or one mapping or object carrying them. Plain Python arithmetic over the folded
        centroids: a few microseconds, no array set-up."""
        if not self.schema_.fixed:
            raise TypeError("predict_one takes the four customer features; score a declared schema with score_records")
        scored = self._scorer.predict_four(*_four_features(values, features))
        if scored is None:
            raise DataValidationError("features must be finite numbers (no NaN or infinity)")
        best_id, confidence = scored
        return best_id, self.cluster_names_[best_id], confidence

    def score_records(self, records: Sequence[Mapping[str, Any]]) -> ScoredRecords:
        """Segments of records (mappings from feature name to value), already type-checked. Unseen
        categories are accepted and warned about, empty values imputed as at training; an
        out-of-range value raises DataValidationError naming the record and feature."""
        if self.schema_.fixed:
            labels, confidence = self._scorer.predict(customer_matrix(features_matrix(records)))
            return ScoredRecords(labels, confidence, [[] for _ in records])
        if len(records) == 1:
            one = self.score_one(records[0])
            if one is not None:
                return ScoredRecords(np.array([one[0]]), np.array([one[1]]), [one[2]])
        checked = check_records(self.schema_, records)
        raise_for_records(checked)
        labels, confidence = self._scorer.predict(encode(self.schema_, checked.frame))
        return ScoredRecords(labels, confidence, checked.warnings)

    def score_one(self, record: Mapping[str, Any]) -> tuple[int, float, list[str]] | None:
        """(cluster id, confidence, warnings) of one record of a declared schema, in plain Python (the
        predict hot path); None when the record breaks a rule (score_records then words the error) or
        for the customer features."""
        if self._records is None:
            return None
        encoded = self._records.encode(record)
        if encoded is None:
            return None
        row, warnings = encoded
        label, score = self._scorer.predict_row(row)
        return label, score, warnings

    def score_frame(self, frame: pd.DataFrame) -> ScoredFrame:
        """Segments of a batch read as text (``dtype=str, keep_default_na=False``), row by row.

        A row with a bad value gets an error instead of a segment; empty cells
        are imputed and unseen categories accepted, both with a warning. A
        declared column missing from the frame raises DataValidationError.
        Works for every schema (the customer features follow
        :func:`app.ml.preprocess.score_frame`).
        """
        if self.schema_.fixed:
            batch = score_customer_frame(frame)
            labels, confidence = self._scorer.predict(customer_matrix(batch.features))
            return ScoredFrame(batch.valid, labels, confidence, batch.errors, [None] * len(batch))
        checked = check_text_frame(self.schema_, frame)
        valid = checked.valid
        labels, confidence = self._scorer.predict(encode(self.schema_, checked.frame[valid]))
        return ScoredFrame(
            valid,
            labels,
            confidence,
            ["; ".join(e) if e else None for e in checked.errors],
            ["; ".join(w) if w else None for w in checked.warnings],
            checked.frame,
        )

    # -- explanations and drift -------------------------------------------------------------- #

    @functools.cached_property
    def explainer(self) -> Explainer:
        return Explainer(self._scorer, self.schema_, self.cluster_names_)

    @functools.cached_property
    def drift_reference(self) -> DriftReference | None:
        """The training bins drift is measured against; None for a version saved before they were kept."""
        return DriftReference.from_dict(self.metadata_.get("drift_reference"))

    def explain_one(self, record: Mapping[str, Any]) -> Explanation | None:
        """Why one record (feature name -> value, already type-checked) is in its segment; None when it
        breaks a rule (scoring words the error)."""
        if self._records is None:
            return self.explainer.explain_row([float(record[name]) for name in FEATURES])
        encoded = self._records.encode(record)
        return None if encoded is None else self.explainer.explain_row(encoded[0])

    def scorer_rows(self, columns: Mapping[str, Any]) -> np.ndarray:
        """The rows the scorer takes for checked feature columns (the customer features in their units,
        or a declared schema's values encoded)."""
        if self.schema_.fixed:
            return np.column_stack([np.asarray(columns[name], dtype=np.float64) for name in FEATURES])
        return encode(self.schema_, pd.DataFrame({name: columns[name] for name in self.schema_.names}))

    def encode(self, data: Any) -> np.ndarray:
        """The K-Means input for ``data``: ``kmeans_.predict(model.encode(data))`` are the served ids.

        A declared schema: a frame as read for training; the customer features: scaled.
        """
        if self.scaler_ is not None:
            return self.scaler_.transform(customer_matrix(data))
        return encode(self.schema_, data)

    # -- persistence ------------------------------------------------------- #

    def save(self, directory: str | os.PathLike) -> Path:
        """Write kmeans.pkl, scaler.pkl and metadata.json (:func:`app.ml.persistence.write_directory`)."""
        return persistence.write_directory(directory, self.kmeans_, self.scaler_, self.metadata_)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SegmentationModel:
        """Load a model saved by :meth:`save`; any problem raises ModelLoadError."""
        return _from_parts(*persistence.read_directory(directory))

    def to_bytes(self) -> bytes:
        """The whole model (both estimators and metadata) as one blob."""
        return persistence.to_bytes(self.kmeans_, self.scaler_, self.metadata_)

    @classmethod
    def from_bytes(cls, blob: bytes) -> SegmentationModel:
        """Inverse of :meth:`to_bytes`; any problem raises ModelLoadError."""
        return _from_parts(*persistence.from_bytes(blob))


def _four_features(values: tuple[Any, ...], features: Mapping[str, Any]) -> tuple[Any, Any, Any, Any]:
    """The four customer features of :meth:`SegmentationModel.predict_one`'s arguments, in FEATURES order."""
    if len(values) == 4:
        return values[0], values[1], values[2], values[3]
    if len(values) == 1 and not features:
        record = values[0]
        if isinstance(record, Mapping):
            a, b, c, d = (record[name] for name in FEATURES)
        else:
            a, b, c, d = (getattr(record, name) for name in FEATURES)
        return a, b, c, d
    if not values:
        a, b, c, d = (features[name] for name in FEATURES)
        return a, b, c, d
    raise TypeError("predict_one takes the four features, a mapping or an object")


def train_parts(
    data: Any, schema: FeatureSchema | None, *, n_clusters: int | None, random_state: int, k_range: tuple[int, int]
) -> TrainedParts:
    """The trainer for ``data`` and ``schema`` (see :meth:`SegmentationModel.fit`), run on one thread."""
    options: dict[str, Any] = {"n_clusters": n_clusters, "random_state": random_state, "k_range": k_range}
    with selection.SingleThreaded():
        if isinstance(data, RfmTable):
            return train_rfm(data, **options)
        if isinstance(data, TrainingFile):
            if schema is None or schema.fixed:
                return train_customer_file(data, **options)
            return train_custom_file(data, schema, **options)
        if schema is None or schema.fixed:
            return train_customer(data, **options)
        return train_custom(data, schema, **options)


def _drift_reference(schema: FeatureSchema, data: Any, parts: Any, k: int) -> dict[str, Any] | None:
    """The drift reference of a freshly trained model, from its training data in the features' own units
    (an RFM table: the RFM values the scorer takes; a file trained out of core: its trainer's, from the sample)."""
    labels = parts.labels
    if isinstance(data, TrainingFile):
        return parts.metadata.get("drift_reference")
    if isinstance(data, RfmTable):
        data = clustering_frame(data.frame)
    columns: dict[str, Any]
    if schema.fixed:
        arr = customer_matrix(data)
        columns = {name: arr[:, j] for j, name in enumerate(FEATURES)}
    else:
        columns = {
            f.name: data[f.name].to_numpy(dtype=np.float64, na_value=np.nan) if f.numeric else data[f.name]
            for f in schema.features
        }
    return fit_reference(schema, columns, labels, k).to_dict()


def _schema_of(metadata: dict[str, Any]) -> FeatureSchema:
    """The fitted schema a model's metadata records; models saved before schemas were are customer models."""
    if metadata.get("schema") is None:
        return FeatureSchema.customer()
    try:
        schema = FeatureSchema.from_dict(metadata["schema"])
    except SchemaError as exc:
        raise ModelLoadError(f"model metadata holds an unusable schema: {exc}") from exc
    if not schema.fitted:
        raise ModelLoadError("model metadata holds a schema that was never fitted")
    return schema


def _from_parts(kmeans: Any, scaler: Any, metadata: Any) -> SegmentationModel:
    """A model from loaded artifacts, checked for consistency; any problem raises ModelLoadError."""
    if not isinstance(kmeans, (KMeans, MiniBatchKMeans)) or not hasattr(kmeans, "cluster_centers_"):
        raise ModelLoadError("kmeans artifact is not a fitted scikit-learn K-Means model")
    if not isinstance(metadata, dict):
        raise ModelLoadError("model metadata is not a dict")
    schema = _schema_of(metadata)
    if schema.fixed and (not isinstance(scaler, StandardScaler) or not hasattr(scaler, "scale_")):
        raise ModelLoadError("scaler artifact is not a fitted StandardScaler")
    if not schema.fixed and scaler is not None:
        raise ModelLoadError("a custom model has no scaler artifact")
    if list(metadata.get("features") or []) != schema.names:
        raise ModelLoadError(f"model was trained on {metadata.get('features')}, expected {schema.names}")
    segments = metadata.get("segments")
    if not isinstance(segments, list) or not all(isinstance(s, dict) and "cluster_name" in s for s in segments):
        raise ModelLoadError("model metadata has no segment descriptions")
    if [s.get("cluster_id") for s in segments] != list(range(len(segments))):
        raise ModelLoadError("segment ids in metadata are not 0..k-1")
    metadata = dict(metadata)
    metadata.pop("artifacts", None)
    try:
        return SegmentationModel.from_fitted(scaler, kmeans, metadata)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt estimator can fail in many ways
        raise ModelLoadError(f"inconsistent model artifacts: {exc}") from exc


def _scorer_for(
    schema: FeatureSchema, scaler: StandardScaler | None, kmeans: KMeans | MiniBatchKMeans
) -> CentroidScorer:
    """The NumPy scorer of a model: scaling folded into the centroids (customer) or none (declared)."""
    centers = np.asarray(kmeans.cluster_centers_, dtype=np.float64)
    if not schema.fixed:
        if centers.ndim != 2 or centers.shape[1] != schema.width or centers.shape[0] < 2:
            raise ModelLoadError(f"K-Means centroids {centers.shape} do not fit the schema's {schema.width} columns")
        return CentroidScorer(centers)
    if scaler is None:
        raise ModelLoadError("a customer model needs its scaler")
    mean = np.asarray(scaler.mean_, dtype=np.float64)
    scale = np.asarray(scaler.scale_, dtype=np.float64)
    if (
        mean.shape != (len(FEATURES),)
        or scale.shape != mean.shape
        or centers.ndim != 2
        or centers.shape[1] != len(FEATURES)
        or centers.shape[0] < 2
    ):
        raise ModelLoadError("scaler and K-Means do not fit the four customer features")
    return CentroidScorer(centers, mean, scale)
