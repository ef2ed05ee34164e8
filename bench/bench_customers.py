"""Benchmark the customer base: million-customer runs, their changes, audiences and customer reads.

    .venv/bin/python bench/bench_customers.py                      # 1,000,000 customers on SQLite
    .venv/bin/python bench/bench_customers.py --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/bench_cb
    .venv/bin/python bench/bench_customers.py --quick              # 100,000 customers

The service runs as bench/run.py starts it (one uvicorn worker with the flags of `make run`,
LOG_LEVEL=INFO, a fresh database) with the default segmentation trained at k=5. Then:

1. A CSV of N customers (kind customer, `CustomerID`) goes to POST /segmentations/default/runs,
   streamed from disk: seconds from the first byte sent to the 200 (the run completed), and the
   peak RSS summed over the server and its children, polled every 50 ms.
2. A second run after a retrain (k=5, another seed: identity kept, some customers move) with 10%
   of the customers' features redrawn, 2% left out and 2% new: seconds, and its counts.
3. The first page of that run's changes (limit 100): median latency of 20 reads.
4. Every change streamed as CSV, and the audience of the segment nearest 20% of N (200,000 at
   1M) streamed as CSV: rows per second.
5. GET .../customers/{id} (random ids) against GET /history?limit=50 (the reader's 200 rows), each
   from 32 concurrent clients, in alternating rounds: requests per second.

Baseline, in the same run and process: pandas.read_csv of the first run's file (the plain read
an analyst would start from) for the runs, and /history?limit=50 for the customer reads.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (bench/run.py: servers, users)
from bench_segmentations import RssPoller, TimedReader  # noqa: E402

ROOT = bench.ROOT
TARGETS = {"sqlite": 30.0, "postgresql": 20.0}
TARGET_ROWS_PER_SECOND = 200_000
CONCURRENCY = 32
ROUNDS = 3
ROUND_SECONDS = 3.0


def write_files(rows: int, workdir: Path) -> tuple[Path, Path]:
    """The first run's customers, and the second's: 10% redrawn, 2% left out, 2% new."""
    from generate_dataset import generate

    first = generate(rows=rows, seed=21)
    first["CustomerID"] = [f"CUST-{i:08d}" for i in range(rows)]
    first_path = workdir / "run1.csv"
    first.to_csv(first_path, index=False)
    rng = random.Random(5)
    second = first.copy()
    redrawn = generate(rows=rows, seed=22)
    moved = rng.sample(range(rows), rows // 10)
    columns = [c for c in first.columns if c != "CustomerID"]
    second.loc[moved, columns] = redrawn.loc[moved, columns].to_numpy()
    dropped = set(rng.sample(range(rows), rows // 50))
    second = second[[i not in dropped for i in range(rows)]]
    fresh = generate(rows=rows // 50, seed=23)
    fresh["CustomerID"] = [f"NEW-{i:08d}" for i in range(rows // 50)]
    second_path = workdir / "run2.csv"
    __import__("pandas").concat([second, fresh]).to_csv(second_path, index=False)
    return first_path, second_path


def post_run(base: str, token: str, path: Path, server_pid: int) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    with (
        httpx.Client(base_url=base, timeout=httpx.Timeout(1800.0), headers=headers) as http,
        TimedReader(io.FileIO(path, "rb"), buffer_size=1 << 20) as file,
    ):
        poller = RssPoller(server_pid)
        idle_mb = poller.sample() / 2**20
        poller.peak_bytes = 0
        with poller:
            started = time.perf_counter()
            response = http.post("/segmentations/default/runs", files={"file": (path.name, file, "text/csv")})
            done = time.perf_counter()
    if response.status_code != 200:
        raise RuntimeError(f"run answered {response.status_code}: {response.text[:1000]}")
    first = file.first or started
    return {
        "seconds": done - first,
        "upload_seconds": (file.last or done) - first,
        "peak_rss_mb": poller.peak_bytes / 2**20,
        "idle_rss_mb": idle_mb,
        "result": response.json(),
    }


def stream_rows(base: str, token: str, path: str) -> tuple[int, float]:
    """(rows, seconds) of a CSV answer streamed to its last byte."""
    import httpx

    headers = {"Authorization": f"Bearer {token}", "Accept": "text/csv"}
    with httpx.Client(base_url=base, timeout=600, headers=headers) as http:
        started = time.perf_counter()
        lines = 0
        with http.stream("GET", path) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes(1 << 20):
                lines += chunk.count(b"\n")
        return lines - 1, time.perf_counter() - started


def first_page_ms(base: str, token: str, path: str, reads: int = 20) -> float:
    import httpx

    with httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {token}"}) as http:
        http.get(path, params={"limit": 100}).raise_for_status()
        times = []
        for _ in range(reads):
            started = time.perf_counter()
            http.get(path, params={"limit": 100}).raise_for_status()
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def _load(base: str, token: str, paths, seconds: float) -> float:
    import httpx

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(
        base_url=base, timeout=30, limits=limits, headers={"Authorization": f"Bearer {token}"}
    ) as http:
        done = 0
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                answer = await http.get(paths())
                if answer.status_code != 200:
                    raise RuntimeError(f"{answer.status_code}: {answer.text[:300]}")
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
        return done / (time.perf_counter() - started)


def read_rates(base: str, admin: str, reader: str, ids: list[str]) -> tuple[float, float]:
    """Median requests/s of GET customer and of GET /history?limit=50, in alternating rounds."""
    customer, history = [], []
    for _ in range(ROUNDS):
        history.append(asyncio.run(_load(base, reader, lambda: "/history?limit=50", ROUND_SECONDS)))
        customer.append(
            asyncio.run(
                _load(base, admin, lambda: f"/segmentations/default/customers/{random.choice(ids)}", ROUND_SECONDS)
            )
        )
    return statistics.median(customer), statistics.median(history)


def baseline_read(path: Path) -> tuple[float, float]:
    import pandas as pd

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    frame = pd.read_csv(path, dtype={"CustomerID": str})
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del frame
    return seconds, max(after - before, 0.0)


def reset_schema(url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    async def reset() -> None:
        engine = create_async_engine(url)
        async with engine.begin() as conn:
            await conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
            await conn.exec_driver_sql("CREATE SCHEMA public")
        await engine.dispose()

    asyncio.run(reset())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100,000 customers")
    parser.add_argument("--customers", type=int, help="customers per run (default 1,000,000)")
    parser.add_argument("--database-url", default=None, help="a PostgreSQL database to use (emptied first)")
    args = parser.parse_args(argv)
    rows = args.customers or (100_000 if args.quick else 1_000_000)
    mode = dataclasses.replace(bench.QUICK, dataset_rows=5000, deep_history_rows=0, warmup=1)
    backend = "postgresql" if args.database_url else "sqlite"

    import httpx

    workdir = Path(tempfile.mkdtemp(prefix="segbench-customers-"))
    env = bench.service_env(workdir, args.database_url)
    started = time.perf_counter()
    first_file, second_file = write_files(rows, workdir)
    print(
        f"customer base benchmark: {rows:,} customers, {first_file.stat().st_size / 2**20:,.0f} MB CSV "
        f"(written in {time.perf_counter() - started:.1f} s), {backend}"
    )
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; cpus: {os.cpu_count()}")
    print(f"server: one uvicorn worker, the flags of `make run`: {' '.join(bench.uvicorn_flags())}", flush=True)

    service = None
    try:
        if args.database_url:
            reset_schema(args.database_url)
        bench.prepare_service(env, mode)
        service = bench.Server("service", "app.main:app", env=env, app_dir=ROOT, log=workdir / "service.log")
        service.wait_ready()
        tokens = bench.set_up_service(service)
        admin, reader = tokens[bench.ADMIN[0]], tokens[bench.READER[0]]
        with httpx.Client(base_url=service.url, timeout=300, headers={"Authorization": f"Bearer {admin}"}) as http:
            http.post("/train", params={"n_clusters": 5, "random_state": 1}).raise_for_status()
        pid = service.process.pid
        one = post_run(service.url, admin, first_file, pid)
        with httpx.Client(base_url=service.url, timeout=300, headers={"Authorization": f"Bearer {admin}"}) as http:
            http.post("/train", params={"n_clusters": 5, "random_state": 2}).raise_for_status()
            sizes = {c["cluster_id"]: c["size"] for c in http.get("/segmentations/default/clusters").json()["clusters"]}
        two = post_run(service.url, admin, second_file, pid)
        run_id = two["result"]["run_id"]
        changes_path = f"/segmentations/default/runs/{run_id}/changes"
        page_ms = first_page_ms(service.url, admin, changes_path)
        change_rows, change_seconds = stream_rows(service.url, admin, changes_path)
        cluster = min(sizes, key=lambda c: abs(sizes[c] / sum(sizes.values()) - 0.2))
        audience_rows, audience_seconds = stream_rows(
            service.url, admin, f"/segmentations/default/segments/{cluster}/customers"
        )
        ids = [f"CUST-{random.randrange(rows):08d}" for _ in range(5000)]
        customer_rps, history_rps = read_rates(service.url, admin, reader, ids)
    finally:
        if service is not None:
            service.stop()
    base_seconds, base_mb = baseline_read(first_file)
    second = two["result"]

    print()
    print(f"{'row':<64}{'seconds':>9}{'peak RSS MB':>13}")
    print(f"{'baseline: pandas.read_csv of the first file (this process)':<64}{base_seconds:>9.2f}{base_mb:>13,.0f}")
    print(f"{'run 1 (all new), first byte to 200 completed':<64}{one['seconds']:>9.2f}{one['peak_rss_mb']:>13,.0f}")
    print(f"{'  of which the upload':<64}{one['upload_seconds']:>9.2f}")
    print(
        f"{'run 2 (after a retrain), first byte to 200 completed':<64}{two['seconds']:>9.2f}{two['peak_rss_mb']:>13,.0f}"
    )
    print(f"{'  of which the upload':<64}{two['upload_seconds']:>9.2f}")
    print(
        f"run 2: n_customers={second['n_customers']:,} new={second['n_new']:,} changed={second['n_changed']:,} "
        f"unchanged={second['n_unchanged']:,} gone={second['n_gone']:,}; server idle RSS {one['idle_rss_mb']:,.0f} MB"
    )
    print(
        f"run 1 / baseline read: {one['seconds'] / base_seconds:.2f}; run 2 / baseline read: {two['seconds'] / base_seconds:.2f}"
    )
    change_rate = change_rows / change_seconds if change_seconds else 0.0
    audience_rate = audience_rows / audience_seconds if audience_seconds else 0.0
    print(f"first page of changes (limit 100), median of 20: {page_ms:.1f} ms")
    print(f"changes as CSV: {change_rows:,} rows in {change_seconds:.2f} s = {change_rate:,.0f} rows/s")
    print(
        f"audience of segment {cluster} as CSV: {audience_rows:,} rows in {audience_seconds:.2f} s = {audience_rate:,.0f} rows/s"
    )
    print(
        f"GET .../customers/{{id}}: {customer_rps:,.0f} req/s; GET /history?limit=50: {history_rps:,.0f} req/s "
        f"(ratio {customer_rps / history_rps:.2f}; {CONCURRENCY} clients, median of {ROUNDS} rounds)"
    )
    target = TARGETS[backend]
    checks = [
        (f"run 1 < {target:.0f} s ({backend})", f"{one['seconds']:.2f} s", one["seconds"] < target),
        (f"run 2 < {target:.0f} s ({backend})", f"{two['seconds']:.2f} s", two["seconds"] < target),
        (
            f"changes CSV >= {TARGET_ROWS_PER_SECOND:,} rows/s",
            f"{change_rate:,.0f}",
            change_rate >= TARGET_ROWS_PER_SECOND,
        ),
        (
            f"audience CSV >= {TARGET_ROWS_PER_SECOND:,} rows/s",
            f"{audience_rate:,.0f}",
            audience_rate >= TARGET_ROWS_PER_SECOND,
        ),
    ]
    print()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("targets" + (" (quick mode: fewer customers; not the real verdict)" if args.quick else ""))
    for name, value, met in checks:
        print(f"  {name:<46}{value:>14}   {'met' if met else 'MISSED'}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(met for _, _, met in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
