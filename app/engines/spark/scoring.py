"""Scoring in Spark: every partition scored by the service's own batch scorer, one stored version.

The version's blob is broadcast once; each Python worker loads it once and scores its Arrow
batches with app.segmentations.batch_files's chunk scorer, so a row gets the cluster, name, confidence or
error that `/predict/batch` (and `python -m app score`) gives it. Output: a Parquet dataset of
the input columns plus cluster, cluster_name, confidence and error.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from app.engines.spark.training import read_dataset

_LOADED: dict[str, Any] = {}
"""Per Python worker: the ServedModel of each version it has loaded."""


def loaded(version: str, blob: bytes) -> Any:
    served = _LOADED.get(version)
    if served is None:
        from app.ml import SegmentationModel
        from app.versions.served import ServedModel

        model = SegmentationModel.from_bytes(blob)
        model.version = version
        served = _LOADED[version] = ServedModel(model)
    return served


def score(spark: Any, served: Any, source: Path, target: Path) -> int:
    """Score the dataset at `source` into a Parquet dataset at `target`; the number of rows scored."""
    from pyspark.sql.types import DoubleType, LongType, StringType, StructField, StructType

    frame = read_dataset(spark, source)
    from app.segmentations.kinds.registry import KINDS

    kind = KINDS[served.kind]
    if kind.takes_as_of:
        raise ValueError("a transaction log is scored by app.engines.spark.rfm.score")
    kind.check_columns(frame.columns)
    kept = [
        f
        for f in frame.schema.fields
        if f.name.strip().lower() not in ("cluster", "cluster_name", "confidence", "error")
    ]
    frame = frame.select(*[f"`{f.name}`" for f in kept])
    out_schema = StructType(
        [
            *kept,
            StructField("cluster", LongType(), True),
            StructField("cluster_name", StringType(), True),
            StructField("confidence", DoubleType(), True),
            StructField("error", StringType(), True),
        ]
    )
    version = served.version
    blob = spark.sparkContext.broadcast(served.model.to_bytes())

    def scored(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from app.segmentations.batch_files import score_batch

        model = loaded(version, blob.value)
        for batch in batches:
            if batch.num_rows:
                yield score_batch(model, batch)

    frame.mapInArrow(scored, out_schema).write.mode("overwrite").parquet(str(target))
    return int(spark.read.parquet(str(target)).count())
