"""Spark local[2] against the in-process trainer and /predict/batch, on the same generated customers.

Generates N customers (default 1,000,000) as CSV and Parquet, then in one run:

1. trains with Spark (MLlib K-Means, k chosen on a sample) and records the result as a version
   of `default` through the service's store (matching, activation), as `python -m app train
   --engine spark` does;
2. trains in process (SegmentationModel.train, the /train fit) with the same k;
3. compares the two inertias on every row, each model scoring with its own scaler and centroids;
4. scores the Parquet file with the stored Spark version in Spark (`score --engine spark`), and
   the CSV through POST /predict/batch (Accept: text/csv) of the app serving that version, and
   counts the rows whose cluster differs.

    python bench/bench_spark.py                   # 1,000,000 rows on local[2]
    python bench/bench_spark.py --rows 100000 --master local[2]

Needs requirements-spark.txt and Java 17. Prints one row per step and exits non-zero when a
target is missed (inertia within 2%, every cluster the same).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

INERTIA_TOLERANCE = 0.02
PASSWORD = "bench-password-123"


def inertia(model, X: np.ndarray) -> float:
    """Sum of squared distances to the nearest centroid, in the model's own scaled space."""
    Z = model.encode(X)
    centers = np.asarray(model.kmeans_.cluster_centers_, dtype=np.float64)
    total = 0.0
    for lo in range(0, len(Z), 200_000):
        chunk = Z[lo : lo + 200_000]
        d2 = ((chunk[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)
        total += float(d2.min(axis=1).sum())
    return total


async def run(args) -> int:
    import httpx
    from asgi_lifespan import LifespanManager

    from app.core import security as auth
    from app.core.config import Settings
    from app.core.tables import Role
    from app.engines import spark as engine
    from app.engines.spark import scoring, training
    from app.main import create_app
    from app.ml import SegmentationModel
    from app.ml.preprocess import FEATURES, resolve_columns
    from app.users import service as user_service
    from generate_dataset import generate

    work = Path(tempfile.mkdtemp(prefix="bench-spark-"))
    frame = generate(rows=args.rows, seed=args.seed)
    csv_path, parquet_path = work / "customers.csv", work / "customers.parquet"
    frame.to_csv(csv_path, index=False)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), parquet_path)
    columns = resolve_columns(frame.columns)
    X = frame[[columns[f] for f in FEATURES]].to_numpy(dtype=np.float64)
    print(f"{args.rows:,} customers x {len(FEATURES)} features in {work}")

    settings = Settings(
        _env_file=None,
        database_url=f"sqlite+aiosqlite:///{work / 'bench.db'}",
        secret_key="bench-secret-key-long-enough-for-hs256-0000",
        model_dir=work / "models",
        data_path=csv_path,
        bcrypt_rounds=4,
        max_upload_mb=max(50, 4 * csv_path.stat().st_size // (1 << 20)),
        log_level="WARNING",
    )
    app = create_app(settings)
    rows: list[tuple[str, str]] = []
    ok = True
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=30):
        async with app.state.database.sessionmaker() as session:
            await user_service.create(
                session=session,
                email="bench@example.com",
                username="bench",
                full_name="Bench",
                hashed_password=auth.hash_password(PASSWORD, 4),
                role=Role.analyst,
            )
        store = await app.state.segmentations.get("default")
        spark = engine.session(args.master, "segmentation-bench")
        spark.sparkContext.setLogLevel("ERROR")
        try:
            started = time.perf_counter()
            result = await asyncio.to_thread(
                training.train, spark, parquet_path, schema=None, n_clusters=None, random_state=args.seed
            )
            served = await store.adopt(result.model, created_by="bench")
            spark_seconds = time.perf_counter() - started
            k = served.metadata["n_clusters"]
            rows.append(("Spark train (k on a sample, 3 seeds) + record", f"{spark_seconds:.1f} s, k={k}"))

            started = time.perf_counter()
            local = await asyncio.to_thread(SegmentationModel.train, X, n_clusters=k, random_state=args.seed)
            rows.append(
                ("in-process train, same k", f"{time.perf_counter() - started:.1f} s ({local.metadata_['algorithm']})")
            )

            spark_inertia, local_inertia = inertia(served.model, X), inertia(local, X)
            gap = (spark_inertia - local_inertia) / local_inertia
            within = abs(gap) <= INERTIA_TOLERANCE
            ok &= within
            rows.append(
                ("inertia Spark / in-process", f"{spark_inertia:,.1f} / {local_inertia:,.1f} ({100 * gap:+.2f}%)")
            )

            started = time.perf_counter()
            scored = await asyncio.to_thread(scoring.score, spark, served, parquet_path, work / "scored.parquet")
            rows.append(("Spark score Parquet -> Parquet", f"{time.perf_counter() - started:.1f} s, {scored:,} rows"))
        finally:
            spark.stop()

        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as client:
            login = await client.post("/auth/login", data={"username": "bench", "password": PASSWORD})
            headers = {"Authorization": f"Bearer {login.json()['access_token']}", "Accept": "text/csv"}
            started = time.perf_counter()
            answer = await client.post(
                "/predict/batch", files={"file": ("customers.csv", csv_path.read_bytes(), "text/csv")}, headers=headers
            )
            answer.raise_for_status()
            rows.append(("POST /predict/batch (CSV answer)", f"{time.perf_counter() - started:.1f} s"))
    from io import BytesIO

    want = pd.read_csv(BytesIO(answer.content), usecols=["CustomerID", "cluster"]).set_index("CustomerID")["cluster"]
    got = pq.read_table(work / "scored.parquet", columns=["CustomerID", "cluster"]).to_pandas()
    got = got.set_index("CustomerID")["cluster"].reindex(want.index)
    differing = int((got.to_numpy() != want.to_numpy()).sum())
    ok &= differing == 0 and len(got) == args.rows
    rows.append(("rows whose Spark cluster differs from /predict/batch", f"{differing:,} of {len(want):,}"))

    width = max(len(label) for label, _ in rows)
    print(f"\nSpark {args.master}, {args.rows:,} rows")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    target = f"inertia within {100 * INERTIA_TOLERANCE:.0f}%, every cluster the same"
    print(f"  {'target':<{width}}  {target}: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--seed", type=int, default=42)
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
