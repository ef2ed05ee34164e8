"""Benchmark kind rfm: a large transaction log trained over HTTP and scored back as CSV.

    .venv/bin/python bench/bench_rfm.py              # 1,000,000 customers, about 10M lines (350 MB)
    .venv/bin/python bench/bench_rfm.py --quick      # 100,000 customers, about 1M lines
    .venv/bin/python bench/bench_rfm.py --customers 300000

The service runs as bench/run.py starts it (one uvicorn worker with the flags of `make run`,
LOG_LEVEL=INFO, a fresh SQLite database). generate_transactions.py writes a log with an
order_id column and each customer's latent behaviour. Then:

1. The log goes up to POST /segmentations/shop/train, streamed from disk: seconds from the
   first byte sent to the 200 (the new version active), and the peak RSS summed over the
   server and its children (the training fork server and its workers), polled every 50 ms.
2. The same log goes to POST /segmentations/shop/predict/batch with `Accept: text/csv`: seconds
   from the first byte sent to the last byte of the per-customer answer, and the peak RSS.
3. ARI of the answer's clusters against the latent behaviours.

Baseline, in the same run and process: pandas.read_csv of the same log's four columns (the
plain read an analyst would start from), its seconds and the RSS it adds.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (bench/run.py: servers, users)
from bench_segmentations import RssPoller, TimedReader  # noqa: E402

ROOT = bench.ROOT
NAME = "shop"
TARGET_SECONDS = 30.0
TARGET_RSS_MB = 3 * 1024
TARGET_ARI = 0.8


def generate_log(customers: int, out: Path, labels: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        [
            bench.PYTHON,
            str(ROOT / "generate_transactions.py"),
            "--customers",
            str(customers),
            "--seed",
            "11",
            "--out",
            str(out),
            "--labels",
            str(labels),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=900,
    )
    return time.perf_counter() - started


def post_log(base: str, token: str, path: str, log: Path, server_pid: int, answer: Path | None) -> dict:
    """POST the log streamed from disk (and stream the answer to `answer`); seconds and peak RSS."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    if answer is not None:
        headers["Accept"] = "text/csv"
    with (
        httpx.Client(base_url=base, timeout=httpx.Timeout(900.0), headers=headers) as http,
        TimedReader(io.FileIO(log, "rb"), buffer_size=1 << 20) as file,
    ):
        poller = RssPoller(server_pid)
        idle_mb = poller.sample() / 2**20
        poller.peak_bytes = 0
        with poller:
            started = time.perf_counter()
            with http.stream("POST", path, files={"file": (log.name, file, "text/csv")}) as response:
                if response.status_code != 200:
                    response.read()
                    raise RuntimeError(f"{path} answered {response.status_code}: {response.text[:1000]}")
                if answer is not None:
                    with answer.open("wb") as out:
                        for chunk in response.iter_bytes(1 << 20):
                            out.write(chunk)
                    body = None
                else:
                    body = response.read()
            done = time.perf_counter()
    first = file.first or started
    return {
        "seconds": done - first,
        "upload_seconds": (file.last or done) - first,
        "peak_rss_mb": poller.peak_bytes / 2**20,
        "idle_rss_mb": idle_mb,
        "processes": poller.peak_processes,
        "result": None if body is None else __import__("json").loads(body),
    }


def baseline_read(log: Path) -> tuple[float, float]:
    """pandas.read_csv of the log's four columns in this process: seconds and MB of RSS added."""
    import pandas as pd

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    frame = pd.read_csv(log, dtype={"customer_id": str, "order_id": str, "date": str})
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del frame
    return seconds, max(after - before, 0.0)


def ari(answer: Path, labels: Path) -> float:
    import pandas as pd
    from sklearn.metrics import adjusted_rand_score

    got = pd.read_csv(answer, usecols=["customer_id", "cluster"], dtype={"customer_id": str})
    truth = pd.read_csv(labels, dtype=str).set_index("customer_id")["behaviour"]
    return float(adjusted_rand_score(truth.loc[got["customer_id"]].to_numpy(), got["cluster"].to_numpy()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100,000 customers (about 1M lines)")
    parser.add_argument("--customers", type=int, help="customers in the log (default 1,000,000: about 10M lines)")
    args = parser.parse_args(argv)
    customers = args.customers or (100_000 if args.quick else 1_000_000)
    mode = dataclasses.replace(bench.QUICK, dataset_rows=5000, deep_history_rows=0, warmup=1)

    import httpx

    workdir = Path(tempfile.mkdtemp(prefix="segbench-rfm-"))
    env = bench.service_env(workdir, None)
    log, labels, answer = workdir / "orders.csv", workdir / "behaviours.csv", workdir / "answer.csv"
    seconds = generate_log(customers, log, labels)
    lines = sum(1 for _ in log.open("rb")) - 1
    log_mb = log.stat().st_size / 2**20
    print(f"rfm benchmark: {customers:,} customers, {lines:,} lines, {log_mb:,.0f} MB (generated in {seconds:.1f} s)")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; cpus: {os.cpu_count()}")
    print(f"server: one uvicorn worker, the flags of `make run`: {' '.join(bench.uvicorn_flags())}")
    print(f"service: {bench.log_settings(env)}, SQLite in {workdir}", flush=True)

    service = None
    try:
        bench.prepare_service(env, mode)
        service = bench.Server("service", "app.main:app", env=env, app_dir=ROOT, log=workdir / "service.log")
        service.wait_ready()
        tokens = bench.set_up_service(service)
        token = tokens[bench.ADMIN[0]]
        with httpx.Client(base_url=service.url, timeout=60, headers={"Authorization": f"Bearer {token}"}) as http:
            http.post("/segmentations", json={"name": NAME, "kind": "rfm"}).raise_for_status()
        time.sleep(1)
        pid = service.process.pid
        trained = post_log(service.url, token, f"/segmentations/{NAME}/train", log, pid, None)
        time.sleep(1)
        scored = post_log(service.url, token, f"/segmentations/{NAME}/predict/batch", log, pid, answer)
    finally:
        if service is not None:
            service.stop()
    base_seconds, base_mb = baseline_read(log)
    quality = ari(answer, labels)
    answer_rows = sum(1 for _ in answer.open("rb")) - 1
    result = trained["result"] or {}

    print()
    print(f"{'row':<58}{'seconds':>9}{'peak RSS MB':>13}")
    print(f"{'baseline: pandas.read_csv of the log (this process)':<58}{base_seconds:>9.2f}{base_mb:>13,.0f}")
    print(
        f"{'POST .../train, first byte to 200 (new version active)':<58}{trained['seconds']:>9.2f}"
        f"{trained['peak_rss_mb']:>13,.0f}"
    )
    print(f"{'  of which the upload':<58}{trained['upload_seconds']:>9.2f}")
    print(
        f"{'POST .../predict/batch as CSV, first byte to last byte':<58}{scored['seconds']:>9.2f}"
        f"{scored['peak_rss_mb']:>13,.0f}"
    )
    print(f"{'  of which the upload':<58}{scored['upload_seconds']:>9.2f}")
    print(
        f"train result: k={result.get('n_clusters')}, n_samples={result.get('n_samples'):,}, "
        f"n_transactions={result.get('n_transactions'):,}, skipped_rows={result.get('skipped_rows')}, "
        f"skipped_customers={result.get('skipped_customers')}, as_of={result.get('as_of')}"
    )
    print(f"answer: {answer_rows:,} customer rows; server idle RSS {trained['idle_rss_mb']:,.0f} MB")
    print(
        f"train / baseline read: {trained['seconds'] / base_seconds:.2f}; batch / baseline read: "
        f"{scored['seconds'] / base_seconds:.2f}"
    )
    checks = [
        (f"train < {TARGET_SECONDS:.0f} s", f"{trained['seconds']:.2f} s", trained["seconds"] < TARGET_SECONDS),
        ("train peak RSS (summed) < 3 GB", f"{trained['peak_rss_mb']:,.0f} MB", trained["peak_rss_mb"] < TARGET_RSS_MB),
        (f"batch CSV < {TARGET_SECONDS:.0f} s", f"{scored['seconds']:.2f} s", scored["seconds"] < TARGET_SECONDS),
        ("batch peak RSS (summed) < 3 GB", f"{scored['peak_rss_mb']:,.0f} MB", scored["peak_rss_mb"] < TARGET_RSS_MB),
        (f"ARI vs latent behaviours >= {TARGET_ARI}", f"{quality:.3f}", quality >= TARGET_ARI),
    ]
    print()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("targets" + (" (quick mode: a smaller log; not the real verdict)" if args.quick else ""))
    for name, value, met in checks:
        print(f"  {name:<46}{value:>12}   {'met' if met else 'MISSED'}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(met for _, _, met in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
