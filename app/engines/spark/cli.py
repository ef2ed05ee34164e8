"""`python -m app train|score --engine spark`: the command line's Spark door (pyspark imported here only)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from app.engines.spark import SparkUnavailable
from app.ml.preprocess import DataValidationError
from app.segmentations.kinds.registry import kind_of

logger = logging.getLogger("app.engines.spark")


@contextlib.asynccontextmanager
async def _session(master: str) -> AsyncIterator[Any]:
    """A Spark session on `master`, its log quiet, stopped afterwards; SparkUnavailable when it cannot start."""
    from app.engines import spark as engine

    spark = await asyncio.to_thread(engine.session, master)
    try:
        spark.sparkContext.setLogLevel("ERROR")
        yield spark
    finally:
        await asyncio.to_thread(spark.stop)


async def train_with_spark(args, store, source: Path) -> int:
    """Train with MLlib K-Means on `args.master`, record the result as an ordinary version of the segmentation."""

    info = store.segmentation
    if args.as_of is not None:
        print("error: --as-of is for segmentations of kind rfm", file=sys.stderr)
        return 2
    if not await asyncio.to_thread(source.exists):
        print(f"error: no such file or directory: {source}", file=sys.stderr)
        return 2
    kind = kind_of(info)
    schema = None if kind.default_dataset else kind.schema(info)
    from app.engines.spark import training

    try:
        async with _session(args.master) as spark:
            print(
                f"Training {info.name} with Spark on {args.master} from {source}"
                + (f" with k={args.k}" if args.k else " (choosing k on a sample)")
                + " ..."
            )
            result = await asyncio.to_thread(
                training.train, spark, source, schema=schema, n_clusters=args.k, random_state=args.random_state
            )
    except SparkUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DataValidationError as exc:
        print(f"error: {source}: {exc.message}", file=sys.stderr)
        return 2
    print(
        f"{result.rows_read:,} rows read, {result.skipped_rows:,} left out (a value out of its rule); "
        f"best MLlib cost {min(result.costs):.4f} of {len(result.costs)} seeds"
    )
    served = await store.adopt(result.model, created_by="cli")
    meta = served.metadata
    print(f"Model {served.version}: k={meta['n_clusters']}, silhouette={meta.get('silhouette_score')}, engine spark")
    for segment in served.segments:
        print(
            f"  {segment['cluster_id']}: {segment['cluster_name']} ({segment['size']} customers, {segment['percentage']}%)"
        )
    return 0


async def read_log_with_spark(master: str, source: Path, columns: Any, *, as_of: Any) -> Any:
    """Kind rfm: the log at `source` summed per customer in Spark, its table of buying customers brought here."""
    from app.engines.spark import rfm

    async with _session(master) as spark:
        print(f"Summing the log per customer with Spark on {master} ...")
        log = await asyncio.to_thread(rfm.aggregate, spark, source, columns, as_of=as_of)
        return await asyncio.to_thread(rfm.training_table, log)


async def score_with_spark(args, store, served) -> int:
    """Score a dataset with one stored version in Spark; the answer is a Parquet dataset (a directory)."""

    if args.output.suffix.lower() != ".parquet":
        print("error: --engine spark writes a Parquet dataset: give an --output ending in .parquet", file=sys.stderr)
        return 2
    from app.engines.spark import rfm, scoring

    what = "rows"
    try:
        async with _session(args.master) as spark:
            print(
                f"Scoring {args.input} with version {served.version} of {store.segmentation.name} in Spark on "
                f"{args.master} ..."
            )
            if kind_of(store.segmentation).takes_as_of:  # a transaction log: one row per buying customer
                from app.segmentations.as_of import as_of_date
                from app.segmentations.kinds import rfm as rfm_service

                what = "customers"
                as_of = as_of_date(args.as_of)
                log = await asyncio.to_thread(
                    rfm.aggregate, spark, args.input, rfm_service.log_columns(store), as_of=as_of
                )
                rows = await asyncio.to_thread(rfm.score, log, served, args.output)
            else:
                rows = await asyncio.to_thread(scoring.score, spark, served, args.input, args.output)
    except SparkUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DataValidationError as exc:
        print(f"error: {args.input}: {exc.message}", file=sys.stderr)
        return 2
    print(f"Scored {rows:,} {what} into {args.output} with version {served.version}")
    return 0
