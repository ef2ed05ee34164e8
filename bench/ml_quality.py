"""Segmentation quality and the cost of training a wide custom schema.

Prints, each on its own line:
  1. the default dataset as `make run` makes it (5000 rows, seed 42), default kind:
     adjusted Rand index against the latent customer types, silhouette, k;
  2. the mixed table (`generate_dataset.py --kind mixed`), all 17 numeric and
     3 categorical columns declared: ARI against the planted segments, silhouette, k;
  3. read_training_frame + train on a large mixed CSV (1,000,000 rows x 20 declared
     columns by default), in a fresh subprocess: seconds and peak RSS.

    python bench/ml_quality.py
    python bench/ml_quality.py --rows 200000     # a smaller large-data run
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
sys.path.insert(0, str(ROOT))


def _peak_rss_mb() -> float:
    # ru_maxrss is in kilobytes on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def default_quality() -> dict:
    from sklearn.metrics import adjusted_rand_score

    from app.ml import SegmentationModel
    from generate_dataset import generate

    data = generate(5000, seed=42, with_labels=True)
    model = SegmentationModel.train(
        data[["Age", "Annual_Income", "Spending_Score", "Purchase_Frequency"]].to_numpy(), random_state=42
    )
    return {
        "ari": round(adjusted_rand_score(data["Segment"], model.labels_), 4),
        "silhouette": model.metadata_["silhouette_score"],
        "k": model.n_clusters_,
    }


def mixed_quality(rows: int, seed: int) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from app.ml import SegmentationModel
    from app.ml.frames import read_training_frame
    from app.ml.schema import FeatureSchema
    from generate_dataset import generate_mixed, mixed_features

    data = generate_mixed(rows, seed=seed, with_labels=True)
    schema = FeatureSchema.declare(mixed_features(), id_column="customer_id")
    frame = read_training_frame(data.to_csv(index=False).encode(), schema)
    model = SegmentationModel.train(frame, schema=schema, random_state=42)
    return {
        "ari": round(adjusted_rand_score(data["latent_segment"], model.labels_), 4),
        "silhouette": model.metadata_["silhouette_score"],
        "k": model.n_clusters_,
        "names": list(model.cluster_names),
    }


def large_worker(csv_path: Path) -> dict:
    """Read and train in this (fresh) process; ARI is computed after the measurements."""
    import pandas as pd
    from sklearn.metrics import adjusted_rand_score

    from app.ml import SegmentationModel
    from app.ml.frames import read_training_frame
    from app.ml.schema import FeatureSchema
    from generate_dataset import mixed_features

    schema = FeatureSchema.declare(mixed_features(), id_column="customer_id")
    baseline = _peak_rss_mb()
    started = time.perf_counter()
    frame = read_training_frame(csv_path, schema)
    read_seconds = time.perf_counter() - started
    model = SegmentationModel.train(frame, schema=schema, random_state=42)
    total_seconds = time.perf_counter() - started
    peak = _peak_rss_mb()
    latent = pd.read_csv(csv_path, usecols=["latent_segment"])["latent_segment"].to_numpy()
    return {
        "rows": len(frame),
        "declared_columns": len(schema.features),
        "encoded_columns": model.schema_.width,
        "read_seconds": round(read_seconds, 2),
        "train_seconds": round(total_seconds - read_seconds, 2),
        "total_seconds": round(total_seconds, 2),
        "peak_rss_mb": round(peak, 1),
        "baseline_rss_mb": round(baseline, 1),
        "algorithm": model.metadata_["algorithm"],
        "k": model.n_clusters_,
        "ari": round(adjusted_rand_score(latent, model.labels_), 4),
    }


def large_run(rows: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="ml-quality-") as tmp:
        csv_path = Path(tmp) / "mixed.csv"
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "generate_dataset.py"),
                "--kind",
                "mixed",
                "--rows",
                str(rows),
                "--with-labels",
                "--out",
                str(csv_path),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        result = subprocess.run(
            [sys.executable, __file__, "--worker", str(csv_path)], check=True, capture_output=True, text=True
        )
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        measured["csv_mb"] = round(csv_path.stat().st_size / 1e6, 1)
        return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the large mixed CSV (default 1,000,000)")
    parser.add_argument("--mixed-rows", type=int, default=5000, help="rows of the mixed quality run (default 5000)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(large_worker(args.worker)))
        return 0

    default = default_quality()
    print(
        f"default dataset, 5000 rows, kind customer: ARI {default['ari']}, silhouette {default['silhouette']}, k {default['k']}"
    )
    mixed = mixed_quality(args.mixed_rows, seed=42)
    print(
        f"mixed dataset, {args.mixed_rows} rows, 17 numeric + 3 categorical declared: ARI {mixed['ari']}, "
        f"silhouette {mixed['silhouette']}, k {mixed['k']}"
    )
    print(f"  names: {'; '.join(mixed['names'])}")
    large = large_run(args.rows)
    print(
        f"large mixed CSV, {large['rows']:,} rows x {large['declared_columns']} declared columns "
        f"({large['encoded_columns']} encoded, {large['csv_mb']} MB): read {large['read_seconds']} s + "
        f"train {large['train_seconds']} s = {large['total_seconds']} s, peak RSS {large['peak_rss_mb']} MB "
        f"(baseline {large['baseline_rss_mb']} MB), {large['algorithm']}, k {large['k']}, ARI {large['ari']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
