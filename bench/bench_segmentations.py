"""Benchmark named segmentations: predict throughput and a large training upload.

    .venv/bin/python bench/bench_segmentations.py             # 1,000,000-row upload, 3 rounds x 5 s
    .venv/bin/python bench/bench_segmentations.py --quick     # 100,000-row upload, 1 round x 2 s
    .venv/bin/python bench/bench_segmentations.py --rows 250000 --rounds 2

The service runs as bench/run.py starts it (one uvicorn worker with the flags of `make run`,
LOG_LEVEL=INFO, a fresh SQLite database), next to the bare FastAPI app. A custom
segmentation `mixed` is declared over the 20 columns of generate_dataset.py's mixed table
and trained on a generated CSV, `default` on the default dataset. Then:

1. wrk drives POST /segmentations/mixed/predict and POST /predict (default) with the same
   settings, in rounds that alternate them, each right after the bare app (bench/run.py's
   measure_endpoints). named/default is the median over rounds of named req/s over default
   req/s in the same round (the two a few seconds apart on the same server); the same
   through each row's own bare run, and the CPU per request of each, are printed beside it.
2. A --rows mixed CSV goes up to POST /segmentations/mixed/train, streamed from disk:
   seconds from the first byte sent to the 200 (the new version active), and the peak of
   the RSS summed over the server and its children (the training fork server and its
   workers), polled every 50 ms. Summed RSS counts pages children share with their parent
   once per process, so it errs high.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (bench/run.py: servers, users, wrk rounds)

ROOT = bench.ROOT
NAME = "mixed"
NAMED_LABEL = f"POST /segmentations/{NAME}/predict"
DEFAULT_LABEL = "POST /predict"
TARGET_NAMED_RATIO = 0.8
TARGET_TRAIN_SECONDS = 30.0
TARGET_TRAIN_RSS_MB = 3 * 1024
PREDICT_BODIES = 1000


def generate_mixed_csv(rows: int, seed: int, out: Path) -> float:
    """Write `rows` mixed customers with generate_dataset.py in a process of its own; its seconds."""
    started = time.perf_counter()
    subprocess.run(
        [
            bench.PYTHON,
            str(ROOT / "generate_dataset.py"),
            "--kind",
            "mixed",
            "--rows",
            str(rows),
            "--seed",
            str(seed),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=900,
    )
    return time.perf_counter() - started


def write_predict_bodies(out: Path, count: int) -> None:
    """`count` request bodies of one customer each, drawn from the mixed table (customer_id left out)."""
    from generate_dataset import generate_mixed, mixed_features

    names = [feature["name"] for feature in mixed_features()]
    frame = generate_mixed(count, seed=99)[names]
    with out.open("w") as file:
        for record in frame.to_dict(orient="records"):
            customer = {k: (v.item() if hasattr(v, "item") else v) for k, v in record.items()}
            file.write(json.dumps({"customer": customer}, separators=(",", ":")) + "\n")


class TimedReader(io.BufferedReader):
    """A file whose reads note when the first and the last bytes were handed to the client."""

    first: float | None = None
    last: float | None = None

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        now = time.perf_counter()
        if chunk and self.first is None:
            self.first = now
        if not chunk and self.first is not None and self.last is None:
            self.last = now
        return chunk


class RssPoller:
    """Peak RSS of a process plus all its descendants, summed, sampled every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_bytes = 0
        self.peak_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        total, counted = 0, 0
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except self._psutil.NoSuchProcess:
            return 0
        for process in processes:
            try:
                total += process.memory_info().rss
                counted += 1
            except (self._psutil.NoSuchProcess, self._psutil.ZombieProcess, self._psutil.AccessDenied):
                pass
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_processes = total, counted
        self.samples += 1
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def create_segmentation(http, headers: dict[str, str]) -> None:
    from generate_dataset import mixed_features

    body = {"name": NAME, "kind": "custom", "id_column": "customer_id", "features": mixed_features()}
    http.post("/segmentations", json=body, headers=headers).raise_for_status()


def upload_training(base: str, token: str, csv: Path, server_pid: int) -> dict:
    """POST the CSV to .../train streamed from disk; seconds to the 200 and the peak RSS meanwhile."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    with (
        httpx.Client(base_url=base, timeout=httpx.Timeout(900.0), headers=headers) as http,
        TimedReader(io.FileIO(csv, "rb"), buffer_size=1 << 20) as file,
    ):
        poller = RssPoller(server_pid)
        idle_mb = poller.sample() / 2**20
        poller.peak_bytes = 0
        with poller:
            started = time.perf_counter()
            response = http.post(f"/segmentations/{NAME}/train", files={"file": (csv.name, file, "text/csv")})
            done = time.perf_counter()
        if response.status_code != 200:
            raise RuntimeError(f"training upload answered {response.status_code}: {response.text[:1000]}")
        result = response.json()
        active = http.get(f"/segmentations/{NAME}").raise_for_status().json()
    first = file.first or started
    last = file.last or done
    return {
        "seconds": done - first,
        "upload_seconds": last - first,
        "after_upload_seconds": done - last,
        "peak_rss_mb": poller.peak_bytes / 2**20,
        "peak_processes": poller.peak_processes,
        "idle_rss_mb": idle_mb,
        "samples": poller.samples,
        "result": result,
        "active_version": active.get("active_version"),
    }


def measure_predict(load, bare, service, tokens, bodies: Path, args, mode) -> bench.Report:
    targets = {
        DEFAULT_LABEL: (
            service,
            bench.Target(
                service.url + "/predict", "predict.lua", token=tokens[bench.USER[0]], method="POST", predict=True
            ),
        ),
        NAMED_LABEL: (
            service,
            bench.Target(
                service.url + f"/segmentations/{NAME}/predict",
                "predict_named.lua",
                token=tokens[bench.USER[0]],
                method="POST",
                env={"BENCH_PATH": f"/segmentations/{NAME}/predict", "BENCH_BODIES": str(bodies)},
            ),
        ),
    }
    report = bench.Report()
    bench.measure_endpoints(load, bare, targets, lambda: 0, args, mode, report)
    return report


def named_over_default(report: bench.Report) -> list[float]:
    """named req/s over default req/s, round by round: the same server, measured one right after the other.

    Going through each row's own bare run instead ((named / bare) / (default / bare)) adds the
    bare app's swings on a shared machine to the figure; both are printed.
    """
    named, default = report.round_rps.get(NAMED_LABEL, []), report.round_rps.get(DEFAULT_LABEL, [])
    return [n / d for n, d in zip(named, default, strict=False) if d]


def named_over_default_via_bare(report: bench.Report) -> list[float]:
    named, default = report.round_ratios.get(NAMED_LABEL, []), report.round_ratios.get(DEFAULT_LABEL, [])
    return [n / d for n, d in zip(named, default, strict=False) if d]


def print_summary(report: bench.Report | None, training: dict | None, rows: int, csv_mb: float, args) -> list:
    checks = []
    if report is not None:
        print()
        print(f"{'row':<40}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'to bare':>9}{'CPU us/req':>12}")
        for label, row in report.rows.items():
            print(
                f"{label:<40}{row['rps']:>9,.0f}{row['p50']:>9.1f}{row['p99']:>9.1f}{row['ratio']:>9.2f}"
                f"{row['cpu_us']:>12,.0f}"
            )
        direct = named_over_default(report)
        via_bare = named_over_default_via_bare(report)
        ratio = bench.median(direct)
        print(f"named / default req/s per round: {', '.join(f'{r:.2f}' for r in direct)} (median {ratio:.2f})")
        print(
            f"the same through each row's bare run: {', '.join(f'{r:.2f}' for r in via_bare)} "
            f"(median {bench.median(via_bare):.2f})"
        )
        named_cpu, default_cpu = report.rows[NAMED_LABEL]["cpu_us"], report.rows[DEFAULT_LABEL]["cpu_us"]
        if named_cpu:
            print(f"CPU per request, default / named: {default_cpu / named_cpu:.2f}")
        checks.append(
            (f"named/default predict req/s >= {TARGET_NAMED_RATIO}", f"{ratio:.2f}", ratio >= TARGET_NAMED_RATIO)
        )
        checks.append(("default POST /predict / bare GET / (info)", f"{report.rows[DEFAULT_LABEL]['ratio']:.2f}", None))
    if training is not None:
        result = training["result"]
        print()
        print(
            f"train {rows:,} rows x 20 declared columns ({csv_mb:,.0f} MB CSV): {training['seconds']:.2f} s first byte "
            f"to 200 (upload {training['upload_seconds']:.2f} s, then {training['after_upload_seconds']:.2f} s); "
            f"k={result.get('n_clusters')}, n_samples={result.get('n_samples')}, skipped_rows={result.get('skipped_rows')}, "
            f"version {result.get('model_version') or result.get('version')} (active: {training['active_version']})"
        )
        print(
            f"server + children RSS: {training['idle_rss_mb']:,.0f} MB before, peak {training['peak_rss_mb']:,.0f} MB "
            f"over {training['peak_processes']} processes ({training['samples']} samples)"
        )
        checks.append(
            (
                f"{rows:,}-row upload + training < {TARGET_TRAIN_SECONDS:.0f} s",
                f"{training['seconds']:.2f} s",
                training["seconds"] < TARGET_TRAIN_SECONDS,
            )
        )
        checks.append(
            (
                f"{rows:,}-row peak RSS (summed) < 3 GB",
                f"{training['peak_rss_mb']:,.0f} MB",
                training["peak_rss_mb"] < TARGET_TRAIN_RSS_MB,
            )
        )
    print()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("targets" + (" (quick mode: smaller sizes; not the real verdict)" if args.quick else ""))
    for name, value, met in checks:
        verdict = "-" if met is None else ("met" if met else "MISSED")
        print(f"  {name:<46}{value:>12}   {verdict}")
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100,000-row upload, one 2-second round")
    parser.add_argument("--rows", type=int, help="rows of the training upload (default 1,000,000; quick 100,000)")
    parser.add_argument("--train-rows", type=int, default=20_000, help="rows the throughput model is trained on")
    parser.add_argument("--rounds", type=int, help="rounds alternating the rows (default 3; quick 1)")
    parser.add_argument("--duration", type=float, help="wrk seconds per row per round (default 5; quick 2)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--python-load", action="store_true", help="use the asyncio load generator, not wrk")
    parser.add_argument("--skip-predict", action="store_true", help="only the training upload")
    parser.add_argument("--skip-upload", action="store_true", help="only the predict throughput")
    args = parser.parse_args(argv)
    args.rows = args.rows or (100_000 if args.quick else 1_000_000)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (2 if args.quick else 5)
    mode = dataclasses.replace(
        bench.QUICK if args.quick else bench.FULL, dataset_rows=5000, deep_history_rows=0, warmup=1
    )

    import httpx

    load = bench.LoadGenerator(None if args.python_load else bench.ensure_wrk())
    workdir = Path(tempfile.mkdtemp(prefix="segbench-named-"))
    env = bench.service_env(workdir, None)
    print(
        f"named segmentations benchmark: {load.name}, {args.connections} connections on {args.threads} wrk "
        f"thread(s), {args.rounds} round(s) x {args.duration:g} s per row; upload {args.rows:,} rows"
    )
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; cpus: {os.cpu_count()}")
    print(f"servers: one uvicorn worker each, the flags of `make run`: {' '.join(bench.uvicorn_flags())}")
    print(f"service: {bench.log_settings(env)}, SQLite in {workdir}", flush=True)

    report = training = None
    csv_mb = 0.0
    servers: list[bench.Server] = []
    try:
        bench.prepare_service(env, mode)
        service = bench.Server("service", "app.main:app", env=env, app_dir=ROOT, log=workdir / "service.log")
        servers.append(service)
        if not args.skip_predict:
            bare = bench.Server(
                "bare app", "bare_app:app", env=dict(os.environ), app_dir=bench.BENCH, log=workdir / "bare.log"
            )
            servers.append(bare)
            bare.wait_ready()
        service.wait_ready()
        tokens = bench.set_up_service(service)  # trains `default` on the default dataset
        admin = {"Authorization": f"Bearer {tokens[bench.ADMIN[0]]}"}
        with httpx.Client(base_url=service.url, timeout=600) as http:
            create_segmentation(http, admin)
        if not args.skip_predict:
            small = workdir / f"mixed-{args.train_rows}.csv"
            generate_mixed_csv(args.train_rows, 7, small)
            first = upload_training(service.url, tokens[bench.ADMIN[0]], small, service.process.pid)
            print(
                f"`{NAME}` trained on {args.train_rows:,} rows in {first['seconds']:.2f} s "
                f"(k={first['result'].get('n_clusters')})",
                flush=True,
            )
            bodies = workdir / "bodies.jsonl"
            write_predict_bodies(bodies, PREDICT_BODIES)
            with httpx.Client(base_url=service.url, timeout=60) as http:
                line = bodies.read_text().splitlines()[0]
                user = {"Authorization": f"Bearer {tokens[bench.USER[0]]}", "Content-Type": "application/json"}
                http.post(f"/segmentations/{NAME}/predict", content=line, headers=user).raise_for_status()
            report = measure_predict(load, bare, service, tokens, bodies, args, mode)
            for failure in report.failures:
                print(f"error: {failure}")
            bare.stop()
            servers.remove(bare)
        if not args.skip_upload:
            big = workdir / f"mixed-{args.rows}.csv"
            seconds = generate_mixed_csv(args.rows, 11, big)
            csv_mb = big.stat().st_size / 2**20
            print(f"generated {args.rows:,} rows, {csv_mb:,.0f} MB in {seconds:.1f} s; uploading ...", flush=True)
            time.sleep(1)
            training = upload_training(service.url, tokens[bench.ADMIN[0]], big, service.process.pid)
            big.unlink()
    finally:
        for server in servers:
            server.stop()
    checks = print_summary(report, training, args.rows, csv_mb, args)
    shutil.rmtree(workdir, ignore_errors=True)
    failed = (report is not None and report.failures) or any(met is False for _, _, met in checks)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
