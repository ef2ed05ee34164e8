"""Kind rfm in Spark: a transaction log aggregated where it lives, each batch read by the service's own parser.

Every Arrow batch of the log goes through app.ml.rfm.parse_block, so dates, amounts, order
ids and customer ids are read exactly as `python -m app train` reads them. Spark then sums each
purchase (an order, or a purchase day) and each customer. What comes back to this process is
the per-customer table without its ids (five numbers a customer, in order of first
appearance), which trains as an uploaded log's table does: the same quintile cuts, k selection,
K-Means, names and matching. Scoring keeps the table in Spark and scores each partition with the
stored version (`score`), writing one row per customer to a Parquet dataset.

Rows without a customer id, and rows whose date or amount cannot be read, are left out and
counted in ``skipped_rows`` (the other kinds' Spark trainings also leave such rows out, where
an in-process training refuses the file).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from app.engines.spark.training import read_dataset
from app.ml import rfm

PURCHASE_SCHEMA = "customer_id string, unit string, amount double, row long, day int"
_EPOCH = date(1970, 1, 1)


@dataclass(frozen=True)
class SparkLog:
    """A log's buying customers as a Spark DataFrame (customer_id, first_row and SUMS), and what
    reading it counted."""

    customers: Any
    facts: rfm.LogFacts


def aggregate(spark: Any, source: Path, columns: rfm.LogColumns, *, as_of: date | None) -> SparkLog:
    """Read the log at ``source`` (CSV with a header, Parquet file or dataset) and sum it per customer."""
    from pyspark.sql import functions as F

    frame = read_dataset(spark, source)
    header = rfm.log_header(frame.columns, columns)
    used = rfm.found_columns(header, columns)
    text = frame.select(*[F.col(f"`{raw}`").cast("string").alias(name) for name, raw in header.items()])
    # File order: the ids grow with the partition and the position in it, as the rows' numbers do.
    numbered = text.withColumn("row", F.monotonically_increasing_id())

    def purchases(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """Each row of the log once: read, or (left out) with a null customer_id and day."""
        for batch in batches:
            if not batch.num_rows:
                continue
            block = pa.Table.from_batches([batch])
            parsed = rfm.parse_block(block.drop_columns(["row"]), used, block.column("row"))
            rows = parsed.purchases().filter(pc.invert(parsed.bad))
            rows = rows.set_column(1, "unit", pc.cast(rows.column("unit"), pa.string()))
            yield from rows.to_batches()
            left_out = block.num_rows - rows.num_rows
            if left_out:
                yield pa.RecordBatch.from_pylist([{}] * left_out, schema=rows.schema)

    parsed = numbered.mapInArrow(purchases, PURCHASE_SCHEMA).cache()
    try:
        # One pass counts the rows, the readable ones, the last day and (with a given as_of) the later ones;
        # without one, as_of is the day after the last, so no row is later.
        later = F.lit(0) if as_of is None else F.sum((F.col("day") > (as_of - _EPOCH).days).cast("long"))
        seen = parsed.agg(
            F.count(F.lit(1)).alias("rows"),
            F.count("day").alias("read"),
            F.max("day").alias("last"),
            later.alias("later"),
        ).first()
        counted, readable, after = int(seen["rows"]), int(seen["read"]), int(seen["later"] or 0)
        if as_of is None:
            last = seen["last"]
            as_of = datetime.now(UTC).date() if last is None else _EPOCH + timedelta(days=int(last) + 1)
        kept = parsed.where(F.col("day") <= (as_of - _EPOCH).days)
        per_purchase = kept.groupBy("customer_id", "unit").agg(
            F.sum("amount").alias("amount"), F.min("row").alias("row"), F.min("day").alias("day")
        )
        buying = F.col("amount") >= 0
        per_customer = per_purchase.groupBy("customer_id").agg(
            F.sum("amount").alias("net"),
            F.min("row").alias("first_row"),
            F.sum(buying.cast("long")).alias("frequency"),
            F.max(F.when(buying, F.col("day"))).alias("last_day"),
            F.min(F.when(buying, F.col("day"))).alias("first_day"),
        )
        # The value models' inputs (app.ml.value): the days with a counted purchase, what they sum to,
        # and what the first one spent.
        per_day = per_purchase.where(buying).groupBy("customer_id", "day").agg(F.sum("amount").alias("spend"))
        occasions = per_day.groupBy("customer_id").agg(
            F.count(F.lit(1)).alias("occasions"),
            F.sum("spend").alias("occasion_spend"),
            F.min_by("spend", "day").alias("first_spend"),
        )
        per_customer = per_customer.join(occasions, "customer_id", "left").fillna({"occasions": 0})
        per_customer = per_customer.cache()
        skipped_customers = per_customer.where(F.col("frequency") == 0).count()
    finally:
        parsed.unpersist()  # the sums are held now; a lost partition is read again from the log
    facts = rfm.LogFacts(
        as_of=as_of,
        n_transactions=counted,
        skipped_rows=counted - readable,
        rows_after_as_of=after,
        skipped_customers=int(skipped_customers),
        columns=dict(header),
    )
    return SparkLog(per_customer.where(F.col("frequency") > 0), facts)


def training_table(log: SparkLog) -> rfm.RfmTable:
    """The buying customers' RFM rows without their ids, in order of first appearance, here in this process."""
    sums = log.customers.select("first_row", *SUMS).toPandas()
    sums = sums.sort_values("first_row", kind="stable")
    frame = rfm.customer_frame(
        log.facts.as_of,
        ids=None,
        frequency=sums["frequency"].to_numpy(),
        net=sums["net"].to_numpy(),
        last_day=sums["last_day"].to_numpy(),
        first_day=sums["first_day"].to_numpy(),
        occasions=sums["occasions"].to_numpy(),
        occasion_spend=sums["occasion_spend"].to_numpy(),
        first_spend=sums["first_spend"].to_numpy(),
    )
    return rfm.RfmTable(frame, log.facts)


ANSWER_SCHEMA = (
    "customer_id string, recency_days long, frequency long, monetary double, tenure_days long, "
    "avg_order_value double, r_score long, f_score long, m_score long, rfm_segment string, "
    "cluster long, cluster_name string, confidence double, "
    "p_alive double, expected_purchases double, expected_order_value double, clv double, first_row long"
)
SUMS = ("frequency", "net", "last_day", "first_day", "occasions", "occasion_spend", "first_spend")
"""What the customer table holds of each customer besides its id and first row."""


def score(log: SparkLog, served: Any, target: Path) -> int:
    """Each buying customer scored with ``served`` into a Parquet dataset at ``target`` (in order of first
    appearance); the number of customers."""
    from app.engines.spark.scoring import loaded

    version = served.version
    blob = log.customers.sparkSession.sparkContext.broadcast(served.model.to_bytes())
    as_of = log.facts.as_of

    def scored(chunks: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from app.segmentations.kinds import rfm as rfm_service

        model = loaded(version, blob.value)
        for chunk in chunks:
            if chunk.empty:
                continue
            frame = rfm.customer_frame(
                as_of,
                ids=pa.array(chunk["customer_id"].to_numpy(dtype=object), pa.string()),
                frequency=chunk["frequency"].to_numpy(),
                net=chunk["net"].to_numpy(),
                last_day=chunk["last_day"].to_numpy(),
                first_day=chunk["first_day"].to_numpy(),
                occasions=chunk["occasions"].to_numpy(),
                occasion_spend=chunk["occasion_spend"].to_numpy(),
                first_spend=chunk["first_spend"].to_numpy(),
            )
            answer = rfm_service.score_table(model, frame).to_pandas()
            answer["first_row"] = chunk["first_row"].to_numpy()
            yield answer

    answered = log.customers.select("customer_id", "first_row", *SUMS).mapInPandas(scored, ANSWER_SCHEMA)
    answered.orderBy("first_row").drop("first_row").write.mode("overwrite").parquet(str(target))
    return int(log.customers.sparkSession.read.parquet(str(target)).count())
