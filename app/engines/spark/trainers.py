"""One Spark trainer per schema: which rows are usable, how the encoding is learned, the vectors
MLlib clusters, the statistics over every partition, and the model they make."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
from sklearn.preprocessing import StandardScaler

from app.engines.spark.partials import (
    PARTIAL_SCHEMA,
    collect_partials,
    data_fingerprint,
    partial_rows,
    sample_silhouette,
    scaler_with_moments,
    spark_kmeans,
    spark_metadata,
)
from app.ml import SegmentationModel
from app.ml.encoding import encode, fit_schema, level_indices
from app.ml.frames import categorical_values, match_columns, numeric_values
from app.ml.preprocess import FEATURE_RANGES, FEATURES, INTEGER_FEATURES, DataValidationError, resolve_columns
from app.ml.schema import FeatureSchema
from app.ml.scoring import CentroidScorer
from app.ml.training import _finish_metadata, custom_segments, customer_segments, decode_centroid

_INCOME, _SPENDING, _FREQUENCY, _AGE = (
    FEATURES.index(name) for name in ("annual_income", "spending_score", "purchase_frequency", "age")
)


class Trainer:
    usable: Any

    def learn(self, sample: pd.DataFrame, usable: Any) -> None:
        raise NotImplementedError

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        raise NotImplementedError

    def sample_columns(self, sample: pd.DataFrame) -> dict[str, Any]:
        """Each feature's sample values as read (numbers with NaN when empty; categories)."""
        raise NotImplementedError

    def vectors(self, usable: Any) -> Any:
        raise NotImplementedError

    def statistics(self, usable: Any, centers: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def model(self, centers: np.ndarray, totals: dict[str, np.ndarray], **fit: Any) -> SegmentationModel:
        raise NotImplementedError


# --- kind customer ----------------------------------------------------------------------------


class CustomerTrainer(Trainer):
    def __init__(self, frame: Any) -> None:
        from pyspark.sql import functions as F

        columns = resolve_columns(frame.columns)
        selected = frame.select(*[F.col(f"`{columns[f]}`").cast("double").alias(f) for f in FEATURES])
        ok = None
        for feature in FEATURES:
            low, high = FEATURE_RANGES[feature]
            rule = F.col(feature).isNotNull() & (F.col(feature) >= low) & (F.col(feature) <= high)
            if feature in INTEGER_FEATURES:
                rule = rule & (F.floor(F.col(feature)) == F.col(feature))
            ok = rule if ok is None else ok & rule
        self.usable = selected.where(ok)
        self.scaler = StandardScaler()

    def learn(self, sample: pd.DataFrame, usable: Any) -> None:
        """The scaler from the whole dataset's means and (population) standard deviations."""
        from pyspark.sql import functions as F

        moments = usable.agg(
            *[F.avg(f).alias(f"mean_{f}") for f in FEATURES], *[F.stddev_pop(f).alias(f"std_{f}") for f in FEATURES]
        ).first()
        mean = np.array([moments[f"mean_{f}"] for f in FEATURES], dtype=np.float64)
        std = np.array([moments[f"std_{f}"] or 0.0 for f in FEATURES], dtype=np.float64)
        self.scaler = scaler_with_moments(mean, std)

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        return self.scaler.transform(frame[list(FEATURES)].to_numpy(dtype=np.float64))

    def sample_columns(self, sample: pd.DataFrame) -> dict[str, Any]:
        return {f: sample[f].to_numpy(dtype=np.float64) for f in FEATURES}

    def vectors(self, usable: Any) -> Any:
        from pyspark.ml.feature import VectorAssembler
        from pyspark.sql import functions as F

        scaled = usable.select(
            *[
                ((F.col(f) - float(self.scaler.mean_[j])) / float(self.scaler.scale_[j])).alias(f)
                for j, f in enumerate(FEATURES)
            ]
        )
        return VectorAssembler(inputCols=list(FEATURES), outputCol="features").transform(scaled).select("features")

    def statistics(self, usable: Any, centers: np.ndarray) -> dict[str, np.ndarray]:
        scorer = CentroidScorer(centers, self.scaler.mean_, self.scaler.scale_)
        k = len(centers)

        def partials(chunks: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
            for chunk in chunks:
                arr = chunk[list(FEATURES)].to_numpy(dtype=np.float64)
                labels = scorer.predict(arr)[0]
                every = np.ones(len(arr), dtype=bool)
                yield partial_rows(labels, k, {f"sum:{f}": (every, arr[:, j]) for j, f in enumerate(FEATURES)})

        return collect_partials(usable.mapInPandas(partials, PARTIAL_SCHEMA))

    def model(self, centers: np.ndarray, totals: dict[str, np.ndarray], **fit: Any) -> SegmentationModel:
        """As app.ml.training.train_customer describes its fit: ids by centroid income, then spending."""
        started, n = fit["started"], fit["n"]
        original = self.scaler.inverse_transform(centers)
        order = np.lexsort((original[:, _SPENDING], original[:, _INCOME]))
        z = centers[order]
        original = original[order]
        sizes = totals["count"][order]
        if (sizes == 0).any():
            raise DataValidationError(f"could not form {len(order)} distinct segments from this data")
        means = np.stack([totals[f"sum:{f}"][order] for f in FEATURES], axis=1) / sizes[:, None]
        segments, centroids = customer_segments(z, original, sizes, means, n)
        scorer = CentroidScorer(z, self.scaler.mean_, self.scaler.scale_)
        sample_x = fit["sample_x"]
        sample_labels = scorer.predict(self.scaler.inverse_transform(sample_x))[0]
        metadata = spark_metadata(
            n=n,
            k=len(z),
            inertia=fit["inertia"],
            silhouette=sample_silhouette(sample_x, sample_labels, fit["sil_rows"]),
            sil_rows=fit["sil_rows"],
            report=fit["report"],
            random_state=fit["random_state"],
            fingerprint=data_fingerprint(sample_x, totals, n),
        )
        metadata["segments"] = segments
        metadata["centroids"] = centroids
        _finish_metadata(metadata, FeatureSchema.customer(), dict.fromkeys(FEATURES, 0.0), fit["report"], started)
        return SegmentationModel.from_fitted(
            self.scaler, spark_kmeans(z, fit["inertia"], fit["random_state"]), metadata
        )


# --- kind custom ------------------------------------------------------------------------------


def training_frame(schema: FeatureSchema, chunk: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """A chunk as app.ml.frames.read_training_frame gives it (numeric float64 with NaN, categorical
    a category), and which rows hold a numeric cell that is text or an infinity (unusable)."""
    columns: dict[str, Any] = {}
    bad = np.zeros(len(chunk), dtype=bool)
    for feature in schema.features:
        column = chunk[feature.name].reset_index(drop=True)
        if feature.numeric:
            values, _empty, refused = numeric_values(column)
            columns[feature.name] = values
            bad |= refused
        else:
            columns[feature.name] = categorical_values(column)
    return pd.DataFrame(columns), bad


class CustomTrainer(Trainer):
    def __init__(self, frame: Any, schema: FeatureSchema) -> None:
        from pyspark.sql import functions as F

        found = match_columns(frame.columns, schema.names, required=schema.names)
        # Text, as a CSV is read: the service's own parsing decides what is a number.
        selected = frame.select(*[F.col(f"`{found[f.name]}`").cast("string").alias(f.name) for f in schema.features])
        declared = schema

        def usable_rows(chunks: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
            for chunk in chunks:
                _, bad = training_frame(declared, chunk)
                yield chunk[~bad]

        self.schema = schema
        self.usable = selected.mapInPandas(usable_rows, selected.schema)
        self.fitted: FeatureSchema = schema
        self.missing_shares: dict[str, float] = {}

    def learn(self, sample: pd.DataFrame, usable: Any) -> None:
        """The encoding (medians, means and deviations, levels, logs, weights) from the sample."""
        frame, _ = training_frame(self.schema, sample)
        self.fitted, self.missing_shares = fit_schema(self.schema, frame)

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        return encode(self.fitted, training_frame(self.fitted, frame)[0])

    def sample_columns(self, sample: pd.DataFrame) -> dict[str, Any]:
        frame = training_frame(self.fitted, sample)[0]
        return {f.name: frame[f.name] for f in self.fitted.features}

    def vectors(self, usable: Any) -> Any:
        from pyspark.ml.functions import array_to_vector
        from pyspark.sql import functions as F

        fitted = self.fitted

        def encoded(chunks: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
            for chunk in chunks:
                x = encode(fitted, training_frame(fitted, chunk)[0])
                yield pd.DataFrame({"encoded": list(x)})

        return usable.mapInPandas(encoded, "encoded array<double>").select(
            array_to_vector(F.col("encoded")).alias("features")
        )

    def statistics(self, usable: Any, centers: np.ndarray) -> dict[str, np.ndarray]:
        scorer = CentroidScorer(centers)
        fitted = self.fitted
        k = len(centers)

        def partials(chunks: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
            for chunk in chunks:
                frame = training_frame(fitted, chunk)[0]
                labels = scorer.predict(encode(fitted, frame))[0]
                parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
                for feature in fitted.features:
                    if feature.numeric:
                        values = frame[feature.name].to_numpy(dtype=np.float64)
                        seen = ~np.isnan(values)
                        parts[f"sum:{feature.name}"] = (seen, np.where(seen, values, 0.0))
                        parts[f"seen:{feature.name}"] = (seen, np.ones(len(values)))
                    else:
                        idx, _, _ = level_indices(feature, frame[feature.name])
                        for level in range(len(feature.levels_ or ())):
                            parts[f"level:{feature.name}:{level}"] = (idx == level, np.ones(len(idx)))
                yield partial_rows(labels, k, parts)

        return collect_partials(usable.mapInPandas(partials, PARTIAL_SCHEMA))

    def model(self, centers: np.ndarray, totals: dict[str, np.ndarray], **fit: Any) -> SegmentationModel:
        """As app.ml.training.train_custom describes its fit: ids by size (largest first), then centroid."""
        fitted, n, k = self.fitted, fit["n"], len(centers)
        sizes_fitted = totals["count"]
        keys = [centers[:, j] for j in reversed(range(centers.shape[1]))]
        order = np.lexsort((*keys, -sizes_fitted))
        centers = centers[order]
        sizes = sizes_fitted[order]
        if (sizes == 0).any():
            raise DataValidationError(f"could not form {k} distinct segments from this data")
        stats: list[dict[str, Any]] = [{} for _ in range(k)]
        for feature in fitted.features:
            if feature.numeric:
                sums = totals[f"sum:{feature.name}"][order]
                seen = totals[f"seen:{feature.name}"][order]
                for i in range(k):
                    mean = sums[i] / seen[i] if seen[i] else (feature.median_ or 0.0)
                    stats[i][feature.name] = round(float(mean), 4)
            else:
                levels = feature.levels_ or ()
                for i in range(k):
                    stats[i][feature.name] = {
                        level: round(
                            float(totals.get(f"level:{feature.name}:{j}", np.zeros(k))[order][i] / sizes[i]), 4
                        )
                        for j, level in enumerate(levels)
                    }
        segments = custom_segments(fitted, centers, sizes, stats, n)
        sample_x = fit["sample_x"]
        sample_labels = CentroidScorer(centers).predict(sample_x)[0]
        metadata = spark_metadata(
            n=n,
            k=k,
            inertia=fit["inertia"],
            silhouette=sample_silhouette(sample_x, sample_labels, fit["sil_rows"]),
            sil_rows=fit["sil_rows"],
            report=fit["report"],
            random_state=fit["random_state"],
            fingerprint=data_fingerprint(sample_x, totals, n),
        )
        metadata["segments"] = segments
        metadata["centroids"] = [decode_centroid(fitted, center) for center in centers]
        _finish_metadata(metadata, fitted, self.missing_shares, fit["report"], fit["started"])
        return SegmentationModel.from_fitted(None, spark_kmeans(centers, fit["inertia"], fit["random_state"]), metadata)
