"""Benchmark training: CSV parsing plus model fitting, time and peak memory.

Each size runs in a fresh subprocess, so the reported peak RSS belongs to
that size alone. The CSV is written beforehand by generate_dataset.py in
another subprocess and is not part of the measurement.

    python bench/bench_train.py                       # 5k, 100k and 1M rows, automatic k
    python bench/bench_train.py --quick               # 5k and 100k only
    python bench/bench_train.py --rows 5000,250000 --k 5
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROWS = "5000,100000,1000000"
QUICK_ROWS = "5000,100000"
TARGET_1M_SECONDS = 30.0
TARGET_1M_RSS_MB = 1536.0


def _peak_rss_mb() -> float:
    # ru_maxrss is in kilobytes on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def run_worker(csv_path: Path, n_clusters: int | None, random_state: int) -> dict:
    """Parse and train in this process; return the measurements."""
    sys.path.insert(0, str(ROOT))
    started = time.perf_counter()
    import_start = time.perf_counter()
    from app.ml import SegmentationModel
    from app.ml.preprocess import load_training_matrix

    import_seconds = time.perf_counter() - import_start
    baseline_mb = _peak_rss_mb()

    parse_start = time.perf_counter()
    features = load_training_matrix(csv_path)
    parse_seconds = time.perf_counter() - parse_start

    train_start = time.perf_counter()
    model = SegmentationModel.train(features, n_clusters=n_clusters, random_state=random_state)
    train_seconds = time.perf_counter() - train_start
    meta = model.metadata_
    return {
        "rows": int(len(features)),
        "import_seconds": round(import_seconds, 3),
        "parse_seconds": round(parse_seconds, 3),
        "train_seconds": round(train_seconds, 3),
        "total_seconds": round(parse_seconds + train_seconds, 3),
        "wall_seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "baseline_rss_mb": round(baseline_mb, 1),
        "n_clusters": meta["n_clusters"],
        "k_method": meta["k_selection"]["method"],
        "silhouette": meta["silhouette_score"],
        "algorithm": meta["algorithm"],
    }


def run_size(rows: int, workdir: Path, n_clusters: int | None, random_state: int) -> dict:
    csv_path = workdir / f"customers_{rows}.csv"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "generate_dataset.py"),
            "--rows",
            str(rows),
            "--seed",
            str(random_state),
            "--out",
            str(csv_path),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    command = [sys.executable, __file__, "--worker", str(csv_path), "--random-state", str(random_state)]
    if n_clusters is not None:
        command += ["--k", str(n_clusters)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=None, help=f"comma-separated sizes (default {DEFAULT_ROWS})")
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK_ROWS}")
    parser.add_argument("--k", type=int, default=None, help="fixed number of segments (default: automatic)")
    parser.add_argument("--random-state", type=int, default=42)
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        print(json.dumps(run_worker(args.worker, args.k, args.random_state)))
        return 0

    spec = args.rows or (QUICK_ROWS if args.quick else DEFAULT_ROWS)
    sizes = [int(part.replace("_", "")) for part in spec.split(",") if part.strip()]
    header = (
        f"{'rows':>10} {'k':>3} {'method':>10} {'parse s':>8} {'train s':>8} {'total s':>8} "
        f"{'peak RSS MB':>12} {'silhouette':>10}  algorithm"
    )
    print(header)
    print("-" * len(header))
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for rows in sizes:
            r = run_size(rows, Path(tmp), args.k, args.random_state)
            results.append(r)
            print(
                f"{r['rows']:>10,} {r['n_clusters']:>3} {r['k_method']:>10} {r['parse_seconds']:>8.2f} "
                f"{r['train_seconds']:>8.2f} {r['total_seconds']:>8.2f} {r['peak_rss_mb']:>12.0f} "
                f"{r['silhouette']:>10.3f}  {r['algorithm']}",
                flush=True,
            )
    for r in results:
        if r["rows"] >= 1_000_000:
            ok = r["total_seconds"] < TARGET_1M_SECONDS and r["peak_rss_mb"] < TARGET_1M_RSS_MB
            print(
                f"{r['rows']:,} rows: {r['total_seconds']:.1f}s (target < {TARGET_1M_SECONDS:.0f}s), "
                f"peak RSS {r['peak_rss_mb']:.0f} MB (target < {TARGET_1M_RSS_MB:.0f} MB): "
                f"{'OK' if ok else 'MISSED'}"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
