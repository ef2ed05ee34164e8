"""Kind rfm with Spark: a transaction log summed in Spark against the same log read in this process.

    python bench/bench_spark_rfm.py                       # 1,000,000 customers, about 10M lines, local[2]
    python bench/bench_spark_rfm.py --customers 100000    # about 1M lines
    python bench/bench_spark_rfm.py --master spark://host:7077

generate_transactions.py writes the log (CSV, as bench_rfm.py does). Then, in one run:

1. baseline: app.ml.rfm.read_log (what `python -m app train` does before it fits): seconds;
2. Spark: app.engines.spark.rfm.aggregate and training_table (what `train --engine spark` does before it
   fits): seconds, and the customers whose RFM row differs from the baseline's (target 0);
3. a model fitted in process on the baseline's table scores the log in Spark (`score --engine
   spark`, a Parquet dataset) and in this process (the per-customer table of `/predict/batch`):
   seconds of the Spark scoring, and the customers whose cluster differs (target 0).

Needs requirements-spark.txt and Java 17. Exits non-zero when a target is missed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_rfm import generate_log  # noqa: E402  (bench/bench_rfm.py: the generated order log)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--master", default="local[2]")
    args = parser.parse_args()

    from app.engines import spark as engine
    from app.engines.spark import rfm as spark_rfm
    from app.ml import SegmentationModel, rfm
    from app.segmentations.kinds import rfm as rfm_service
    from app.versions.served import ServedModel

    with tempfile.TemporaryDirectory(prefix="bench-spark-rfm-") as tmp:
        log = Path(tmp) / "orders.csv"
        generate_log(args.customers, log, Path(tmp) / "labels.csv")  # the log bench_rfm.py sends
        size_mb = log.stat().st_size / 1e6
        columns = rfm.LogColumns.from_mapping(None)

        started = time.perf_counter()
        local = rfm.read_log(log, columns)
        local_seconds = time.perf_counter() - started
        print(f"log: {local.facts.n_transactions:,} lines, {len(local.frame):,} customers, {size_mb:,.0f} MB")
        print(f"{'in process: read_log':<44} {local_seconds:8.1f} s")

        spark = engine.session(args.master, "bench-spark-rfm")
        spark.sparkContext.setLogLevel("ERROR")
        try:
            started = time.perf_counter()
            summed = spark_rfm.aggregate(spark, log, columns, as_of=None)
            table = spark_rfm.training_table(summed)
            spark_seconds = time.perf_counter() - started
            want = local.frame.drop(columns="customer_id").reset_index(drop=True)
            got = table.frame.reset_index(drop=True)
            same_shape = got.shape == want.shape
            differ = (
                int((~np.isclose(got.to_numpy(float), want.to_numpy(float), rtol=0, atol=1e-6)).any(axis=1).sum())
                if same_shape
                else max(len(got), len(want))
            )
            print(f"{f'Spark {args.master}: aggregate + training_table':<44} {spark_seconds:8.1f} s")
            print(f"{'customers whose RFM row differs':<44} {differ:8,} of {len(want):,} (target 0)")

            served = ServedModel(SegmentationModel.train(local, n_clusters=5, random_state=42))
            target = Path(tmp) / "scored.parquet"
            started = time.perf_counter()
            rows = spark_rfm.score(summed, served, target)
            score_seconds = time.perf_counter() - started
            spark_clusters = pq.read_table(target, columns=["cluster"]).column("cluster").to_numpy()
            here = rfm_service.score_table(served, local.frame).column("cluster").to_numpy()
            moved = int((spark_clusters != here).sum()) if len(spark_clusters) == len(here) else max(rows, len(here))
            print(f"{f'Spark {args.master}: score --engine spark':<44} {score_seconds:8.1f} s")
            print(f"{'customers whose cluster differs':<44} {moved:8,} of {len(here):,} (target 0)")
        finally:
            spark.stop()
    return 0 if differ == 0 and moved == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
