"""Training in Spark: MLlib K-Means on the whole dataset, everything else by the service's own code.

The feature encoding (kind custom) and k are learned on a bounded sample with app.ml (fit_schema,
select_k), the final K-Means runs in MLlib (k-means|| initialisation, several seeds, the lowest
cost kept), and the segment statistics are accumulated over every partition with the service's
scorer, so each row counts in the segment serving will give it. The result is an ordinary
:class:`SegmentationModel` (a StandardScaler and a scikit-learn KMeans holding Spark's centroids)
named and described by app.ml.naming, recorded like any other version.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.engines.spark.trainers import CustomerTrainer, CustomTrainer, Trainer
from app.ml import SegmentationModel, selection
from app.ml.drift import fit_reference
from app.ml.preprocess import DataValidationError
from app.ml.schema import FeatureSchema
from app.ml.scoring import CentroidScorer

SEEDS = 3
"""MLlib K-Means runs, each from its own k-means|| initialisation; the lowest cost is kept."""
MAX_ITER = 100
TOLERANCE = 1e-6
SAMPLE_ROWS = selection.SELECTION_SAMPLE_ROWS
"""Rows drawn (at most) to learn the encoding and choose k, as the in-process trainer draws."""


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
        trainer: Trainer = CustomerTrainer(frame)
    else:
        trainer = CustomTrainer(frame, schema)
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
