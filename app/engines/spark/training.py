"""Training in Spark: MLlib K-Means on the whole dataset, everything else by the service's own code.

The feature encoding (kind custom) and k are learned on a bounded sample with app.ml (fit_schema,
select_k), the final K-Means runs in MLlib (k-means|| initialisation, several seeds, the lowest
cost kept), and the segment statistics are accumulated over every partition with the service's
scorer, so each row counts in the segment serving will give it. The result is an ordinary
:class:`SegmentationModel` (a StandardScaler and a scikit-learn KMeans holding Spark's centroids)
named and described by app.ml.naming, recorded like any other version.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.preprocessing import StandardScaler

from app.ml import SegmentationModel, selection
from app.ml.drift import fit_reference
from app.ml.encoding import encode, fit_schema, level_indices
from app.ml.frames import categorical_values, match_columns, numeric_values
from app.ml.kmeans import kmeans_with_centers
from app.ml.persistence import FORMAT_VERSION
from app.ml.preprocess import FEATURE_RANGES, FEATURES, INTEGER_FEATURES, DataValidationError, resolve_columns
from app.ml.schema import FeatureSchema
from app.ml.scoring import CentroidScorer
from app.ml.training import _finish_metadata, custom_segments, customer_segments, decode_centroid

SEEDS = 3
"""MLlib K-Means runs, each from its own k-means|| initialisation; the lowest cost is kept."""
MAX_ITER = 100
TOLERANCE = 1e-6
SAMPLE_ROWS = selection.SELECTION_SAMPLE_ROWS
"""Rows drawn (at most) to learn the encoding and choose k, as the in-process trainer draws."""

_INCOME, _SPENDING, _FREQUENCY, _AGE = (
    FEATURES.index(name) for name in ("annual_income", "spending_score", "purchase_frequency", "age")
)


@dataclass(frozen=True)
class SparkTraining:
    """A Spark-trained model with what the run saw."""

    model: SegmentationModel
    rows_read: int
    skipped_rows: int
    costs: list[float]


def read_dataset(spark: Any, path: Path) -> Any:
    """A Spark DataFrame of a Parquet file or dataset (a directory), or of a CSV with a header (text cells)."""
    text = str(path)
    if path.suffix.lower() == ".csv":
        # Quotes inside a quoted cell are doubled (RFC 4180), as pandas and pyarrow write and read them.
        return spark.read.option("header", "true").option("inferSchema", "false").option("escape", '"').csv(text)
    return spark.read.parquet(text)


def train(
    spark: Any,
    source: Path,
    *,
    schema: FeatureSchema | None,
    n_clusters: int | None,
    random_state: int,
    k_range: tuple[int, int] = selection.DEFAULT_K_RANGE,
    seeds: int = SEEDS,
) -> SparkTraining:
    """Fit kind customer (``schema`` None) or custom on the dataset at ``source``.

    Rows that cannot be used (a customer feature out of its range or not a number; a custom
    numeric cell holding text) are left out and counted in ``skipped_rows``.
    """
    started = time.perf_counter()
    frame = read_dataset(spark, source)
    rows_read = frame.count()
    if schema is None or schema.fixed:
        trainer: _Trainer = _CustomerTrainer(frame)
    else:
        trainer = _CustomTrainer(frame, schema)
    usable = trainer.usable.cache()
    n = usable.count()
    if n < selection.MIN_ROWS:
        raise DataValidationError(f"need at least {selection.MIN_ROWS} usable rows to train, got {n}")
    fraction = min(1.0, 1.5 * SAMPLE_ROWS / n)
    sample = usable.sample(fraction=fraction, seed=random_state).limit(SAMPLE_ROWS).toPandas()
    trainer.learn(sample, usable)
    sample_x = trainer.encode(sample)
    k, report, sil_rows = _choose_k(sample_x, n, n_clusters, random_state, k_range)

    vectors = trainer.vectors(usable).cache()
    best, costs = None, []
    from pyspark.ml.clustering import KMeans as SparkKMeans

    for i in range(seeds):
        fitted = SparkKMeans(
            k=k,
            seed=random_state + i,
            initMode="k-means||",
            maxIter=MAX_ITER,
            tol=TOLERANCE,
            featuresCol="features",
        ).fit(vectors)
        cost = float(fitted.summary.trainingCost)
        costs.append(cost)
        if best is None or cost < best[1]:
            best = (fitted, cost)
    assert best is not None
    vectors.unpersist()
    centers = np.array([np.asarray(c, dtype=np.float64) for c in best[0].clusterCenters()])
    partials = trainer.statistics(usable, centers)
    usable.unpersist()
    model = trainer.model(
        centers,
        partials,
        n=n,
        inertia=best[1],
        sample_x=sample_x,
        sil_rows=sil_rows,
        report=report,
        random_state=random_state,
        started=started,
    )
    model.metadata_["engine"] = {
        "name": "spark",
        "master": spark.sparkContext.master,
        "spark_version": spark.version,
        "algorithm": "mllib_kmeans (k-means||)",
        "seeds": [random_state + i for i in range(seeds)],
        "costs": [round(c, 4) for c in costs],
        "sample_rows": len(sample),
    }
    model.metadata_["skipped_rows"] = rows_read - n
    # The drift reference from the sample, in the features' own units (as the out-of-core trainer takes it).
    sample_labels = CentroidScorer(np.asarray(model.kmeans_.cluster_centers_)).predict(sample_x)[0]
    model.metadata_["drift_reference"] = fit_reference(
        model.schema_, trainer.sample_columns(sample), sample_labels, model.n_clusters_
    ).to_dict()
    return SparkTraining(model=model, rows_read=rows_read, skipped_rows=rows_read - n, costs=costs)


def _choose_k(
    sample_x: np.ndarray, n: int, n_clusters: int | None, random_state: int, k_range: tuple[int, int]
) -> tuple[int, dict[str, Any], np.ndarray]:
    """k by the service's own selection on the sample (or as given), and the silhouette rows of the sample."""
    distinct = selection.distinct_rows(sample_x)
    if n_clusters is None:
        k_values = selection.candidate_k(n, distinct, int(k_range[0]), int(k_range[1]))
        report, _, sil_rows = selection.select_k(sample_x, k_values, random_state)
        return int(report["optimal_k"]), report, sil_rows
    k = int(n_clusters)
    if k < 2:
        raise DataValidationError(f"n_clusters must be at least 2, got {k}")
    if n < selection.min_rows(k) or distinct < k:
        raise DataValidationError(f"the data has too few distinct rows to form {k} segments")
    rows = selection.sample_indices(
        len(sample_x), selection.SILHOUETTE_SAMPLE_ROWS, np.random.default_rng(random_state)
    )
    return k, {"method": "fixed", "requested_k": k}, rows


# --- per-partition statistics ---------------------------------------------------------------

PARTIAL_SCHEMA = "cluster long, key string, value double"
"""One partition's sums, long format: (cluster, "count" | "sum:feature" | "seen:feature" | "level:feature:i", value)."""


def _partial_rows(labels: np.ndarray, k: int, parts: dict[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """Per cluster: the row count, and for each entry of `parts` ({key: (mask, weights)}) the masked sum."""
    clusters: list[int] = []
    keys: list[str] = []
    values: list[float] = []
    counts = np.bincount(labels, minlength=k)
    for key, (mask, weights) in {"count": (np.ones(len(labels), bool), np.ones(len(labels))), **parts}.items():
        sums = counts if key == "count" else np.bincount(labels[mask], weights=weights[mask], minlength=k)
        clusters.extend(range(k))
        keys.extend([key] * k)
        values.extend(np.asarray(sums, dtype=np.float64).tolist())
    return pd.DataFrame({"cluster": clusters, "key": keys, "value": values})


def _collect(partials: Any) -> dict[str, np.ndarray]:
    """Every partition's partial sums added up: {key: per-cluster totals}."""
    rows = partials.groupBy("cluster", "key").sum("value").toPandas()
    k = int(rows["cluster"].max()) + 1
    totals: dict[str, np.ndarray] = {}
    for key, part in rows.groupby("key"):
        values = np.zeros(k)
        values[part["cluster"].to_numpy(dtype=np.int64)] = part["sum(value)"].to_numpy()
        totals[str(key)] = values
    return totals


class _Trainer:
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


def _metadata(
    *,
    n: int,
    k: int,
    inertia: float,
    silhouette: float,
    sil_rows: np.ndarray,
    report: dict[str, Any],
    random_state: int,
    fingerprint: str,
) -> dict[str, Any]:
    """The metadata every kind shares (the keys of app.ml.training's), up to the segments."""
    trained_at = datetime.now(UTC)
    return {
        "format_version": FORMAT_VERSION,
        "version": f"{trained_at:%Y%m%dT%H%M%S}Z-{fingerprint[:8]}-k{k}",
        "trained_at": trained_at.isoformat(timespec="seconds"),
        "features": None,
        "n_samples": n,
        "total_customers": n,
        "n_clusters": k,
        "random_state": int(random_state),
        "algorithm": "spark_kmeans",
        "inertia": round(float(inertia), 4),
        "silhouette_score": round(silhouette, 6) if np.isfinite(silhouette) else None,
        "silhouette_sample_size": int(len(sil_rows)),
        "data_fingerprint": fingerprint,
        "k_selection": report,
    }


def _fingerprint(sample_x: np.ndarray, totals: dict[str, np.ndarray], n: int) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(sample_x, dtype=np.float32).tobytes())
    digest.update(str(n).encode())
    for key in sorted(totals):
        digest.update(key.encode() + np.round(totals[key], 6).tobytes())
    return digest.hexdigest()


def _estimator(centers: np.ndarray, inertia: float, random_state: int) -> KMeans | MiniBatchKMeans:
    """A fitted scikit-learn KMeans whose centroids are Spark's, in served-id order (saved as kmeans.pkl)."""
    return kmeans_with_centers(
        np.ascontiguousarray(centers, dtype=np.float64), inertia=inertia, random_state=random_state
    )


def scaler_with_moments(mean: np.ndarray, std: np.ndarray) -> StandardScaler:
    """A StandardScaler fitted to two rows, ``mean - std`` and ``mean + std``: their mean and population
    standard deviation are the dataset's, so it scales as one fitted on every row would (a column of
    zero deviation keeps scale 1, as scikit-learn gives it)."""
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    return StandardScaler().fit(np.stack([mean - std, mean + std]))


def _silhouette(sample_x: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> float:
    return float(selection.silhouette_scores(sample_x[rows], [labels[rows]])[0])


# --- kind customer ----------------------------------------------------------------------------


class _CustomerTrainer(_Trainer):
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
                yield _partial_rows(labels, k, {f"sum:{f}": (every, arr[:, j]) for j, f in enumerate(FEATURES)})

        return _collect(usable.mapInPandas(partials, PARTIAL_SCHEMA))

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
        metadata = _metadata(
            n=n,
            k=len(z),
            inertia=fit["inertia"],
            silhouette=_silhouette(sample_x, sample_labels, fit["sil_rows"]),
            sil_rows=fit["sil_rows"],
            report=fit["report"],
            random_state=fit["random_state"],
            fingerprint=_fingerprint(sample_x, totals, n),
        )
        metadata["segments"] = segments
        metadata["centroids"] = centroids
        _finish_metadata(metadata, FeatureSchema.customer(), dict.fromkeys(FEATURES, 0.0), fit["report"], started)
        return SegmentationModel.from_fitted(self.scaler, _estimator(z, fit["inertia"], fit["random_state"]), metadata)


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


class _CustomTrainer(_Trainer):
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

        fitted = self.fitted

        def encoded(chunks: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
            for chunk in chunks:
                x = encode(fitted, training_frame(fitted, chunk)[0])
                yield pd.DataFrame({"encoded": list(x)})

        return usable.mapInPandas(encoded, "encoded array<double>").select(array_to_vector("encoded").alias("features"))

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
                yield _partial_rows(labels, k, parts)

        return _collect(usable.mapInPandas(partials, PARTIAL_SCHEMA))

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
        metadata = _metadata(
            n=n,
            k=k,
            inertia=fit["inertia"],
            silhouette=_silhouette(sample_x, sample_labels, fit["sil_rows"]),
            sil_rows=fit["sil_rows"],
            report=fit["report"],
            random_state=fit["random_state"],
            fingerprint=_fingerprint(sample_x, totals, n),
        )
        metadata["segments"] = segments
        metadata["centroids"] = [decode_centroid(fitted, center) for center in centers]
        _finish_metadata(metadata, fitted, self.missing_shares, fit["report"], fit["started"])
        return SegmentationModel.from_fitted(None, _estimator(centers, fit["inertia"], fit["random_state"]), metadata)
