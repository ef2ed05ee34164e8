"""Benchmark out-of-core training: a large Parquet file of customers trained from the shell.

    .venv/bin/python bench/bench_outofcore.py                   # 100,000,000 rows (about 1.2 GB of Parquet)
    .venv/bin/python bench/bench_outofcore.py --rows 10000000 --compare   # and an in-memory KMeans beside it
    .venv/bin/python bench/bench_outofcore.py --quick           # 2,000,000 rows

The file is written in chunks of generate_dataset.py's customers (a seed per chunk). Then
`python -m app train --input FILE.parquet` runs as a user runs it (its own SQLite database and
model folder, the default TRAIN_IN_MEMORY_ROWS and TRAIN_SAMPLE_ROWS): seconds, and the peak RSS
summed over the command and its training process, polled every 50 ms. With --compare, an
in-memory scikit-learn KMeans (same k, n_init=3) is fitted on the same rows in this process as
the baseline: its inertia beside the out-of-core version's (target: within 1%).
Then `python -m app score` writes every row's answer to a Parquet file (target: under 5 minutes
for 100,000,000 rows), beside the floor of reading the same file and writing it back with pyarrow.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_segmentations import RssPoller  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 1_000_000
COLUMNS = ["Age", "Annual_Income", "Spending_Score", "Purchase_Frequency"]
TARGET_SECONDS = 600.0
TARGET_RSS_MB = 4 * 1024
SCORE_TARGET_SECONDS = 300.0


def write_parquet(path: Path, rows: int) -> float:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from generate_dataset import generate

    started = time.perf_counter()
    writer = None
    try:
        for i, lo in enumerate(range(0, rows, CHUNK)):
            part = generate(rows=min(CHUNK, rows - lo), seed=1000 + i)
            table = pa.Table.from_pandas(part, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    return time.perf_counter() - started


def run_command(workdir: Path, *args: str) -> dict:
    """`python -m app ARGS` as a user runs it (its own SQLite database and model folder): seconds and peak RSS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "MODEL_", "DATA_", "TRAIN_"))}
    env.update(
        PYTHONPATH=str(ROOT),
        DATABASE_URL=f"sqlite+aiosqlite:///{workdir / 'bench.db'}",
        MODEL_DIR=str(workdir / "models"),
        SECRET_KEY="bench-out-of-core-secret-key-long-enough-0123",
        TRAIN_TIMEOUT_SECONDS="3600",
    )
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "app", *args],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with RssPoller(process.pid) as poller:
        out, err = process.communicate(timeout=3600)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{args[0]} exited {process.returncode}: {err[-2000:]}")
    return {"seconds": seconds, "peak_rss_mb": poller.peak_bytes / 2**20, "out": out}


def train_from_shell(path: Path, workdir: Path) -> dict:
    trained = run_command(workdir, "train", "--input", str(path))
    with sqlite3.connect(workdir / "bench.db") as db:
        (details,) = db.execute("SELECT details FROM model_versions ORDER BY created_at DESC LIMIT 1").fetchone()
    return trained | {"details": json.loads(details)}


def copy_parquet(source: Path, target: Path) -> float:
    """The floor for scoring: read every batch of the file and write it back, nothing computed."""
    import pyarrow.parquet as pq

    started = time.perf_counter()
    parquet = pq.ParquetFile(source)
    with pq.ParquetWriter(target, parquet.schema_arrow) as writer:
        for batch in parquet.iter_batches(batch_size=200_000):
            writer.write_batch(batch)
    return time.perf_counter() - started


def in_memory_inertia(path: Path, k: int) -> tuple[float, float]:
    import numpy as np
    import pyarrow.parquet as pq
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import StandardScaler

    started = time.perf_counter()
    X = pq.read_table(path, columns=COLUMNS).to_pandas().to_numpy(np.float64)
    Xs = StandardScaler().fit_transform(X)
    del X
    fitted = KMeans(n_clusters=k, n_init=3, random_state=42).fit(Xs)
    return float(fitted.inertia_), time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=None, help="rows (default 100,000,000; quick 2,000,000)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compare", action="store_true", help="also fit an in-memory KMeans (n_init=3) on the rows")
    args = parser.parse_args(argv)
    rows = args.rows or (2_000_000 if args.quick else 100_000_000)
    with tempfile.TemporaryDirectory(prefix="segbench-ooc-") as tmp:
        workdir = Path(tmp)
        path = workdir / "customers.parquet"
        generated = write_parquet(path, rows)
        size_mb = path.stat().st_size / 2**20
        print(
            f"out-of-core benchmark: {rows:,} rows x 4 features, {size_mb:,.0f} MB Parquet ({generated:.0f} s to write)"
        )
        print(
            f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; cpus: {os.cpu_count()}", flush=True
        )
        trained = train_from_shell(path, workdir)
        details = trained["details"]
        k = int(details["n_clusters"])
        print(trained["out"].strip())
        print()
        print(f"{'row':<56}{'seconds':>10}{'peak RSS MB':>13}")
        print(
            f"{'python -m app train --input FILE.parquet':<56}{trained['seconds']:>10.1f}{trained['peak_rss_mb']:>13,.0f}"
        )
        ooc = details.get("out_of_core") or {}
        sampled = f"{ooc['sample_rows']:,}" if ooc else "the in-memory sample of"
        print(
            f"algorithm {details.get('algorithm')}, k={k} (chosen on {sampled} rows), "
            f"{ooc.get('lloyd_passes', '-')} passes, inertia {details['inertia']:,.1f}"
        )
        checks = [
            (
                f"train < {TARGET_SECONDS / 60:.0f} min",
                f"{trained['seconds']:.0f} s",
                trained["seconds"] < TARGET_SECONDS,
            ),
            ("peak RSS (summed) < 4 GB", f"{trained['peak_rss_mb']:,.0f} MB", trained["peak_rss_mb"] < TARGET_RSS_MB),
        ]
        scored = run_command(workdir, "score", "--input", str(path), "--output", str(workdir / "scored.parquet"))
        copied = copy_parquet(path, workdir / "copied.parquet")
        (workdir / "copied.parquet").unlink()
        print(
            f"{'python -m app score --input FILE --output OUT.parquet':<56}"
            f"{scored['seconds']:>10.1f}{scored['peak_rss_mb']:>13,.0f}"
        )
        print(f"{'baseline: the same file read and written back (pyarrow)':<56}{copied:>10.1f}")
        print(scored["out"].strip())
        checks.append(
            (
                f"score to Parquet < {SCORE_TARGET_SECONDS / 60:.0f} min",
                f"{scored['seconds']:.0f} s",
                scored["seconds"] < SCORE_TARGET_SECONDS,
            )
        )
        if args.compare:
            inertia, seconds = in_memory_inertia(path, k)
            ratio = details["inertia"] / inertia
            print(f"{'baseline: in-memory KMeans(n_init=3), this process':<56}{seconds:>10.1f}")
            print(f"inertia out-of-core / in-memory: {ratio:.5f}")
            checks.append(("inertia within 1% of in-memory", f"{ratio:.5f}", ratio <= 1.01))
    print()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("targets" + (" (quick: a smaller file; not the real verdict)" if args.quick else ""))
    for name, value, met in checks:
        print(f"  {name:<40}{value:>14}   {'met' if met else 'MISSED'}")
    return 0 if all(met for _, _, met in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
