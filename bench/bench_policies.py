"""Benchmark a retraining policy on a PostgreSQL source: trigger to promoted version and completed run.

    .venv/bin/python bench/bench_policies.py --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/bench_policy
    .venv/bin/python bench/bench_policies.py --database-url ... --quick      # 100,000 customers

The service runs as bench/run.py starts it (one uvicorn worker with the flags of `make run`,
LOG_LEVEL=INFO) on the given PostgreSQL database (emptied first), with the default segmentation
trained at k=5 on its small dataset. A table of N customers is loaded into the same server with
COPY; an admin declares it as a SQL source, an analyst sets a policy on it (`then_run: true`) and
fires it. Timed: from the trigger's request to the job's end (the candidate trained on the source,
judged and promoted), and to the customer base run on the source completed. Target: < 90 s for
1,000,000 customers.

Baseline, in the same run: the same by hand, the table exported to CSV and uploaded to
POST /train?n_clusters=5 and then to POST .../runs (the export not timed).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (bench/run.py: servers, users)
from bench_customers import reset_schema  # noqa: E402

ROOT = bench.ROOT
TARGET_SECONDS = 90.0
TABLE = "crm_customers"
COLUMNS = ("CustomerID", "Sex", "Age", "Annual_Income", "Spending_Score", "Purchase_Frequency")


def load_table(url: str, rows: int, csv_path: Path) -> None:
    """N generated customers into TABLE (COPY through asyncpg), and the same as a CSV file."""
    import asyncpg
    from sqlalchemy.engine import make_url

    from generate_dataset import generate

    frame = generate(rows=rows, seed=31)
    frame["CustomerID"] = [f"CRM-{i:08d}" for i in range(rows)]
    frame.to_csv(csv_path, index=False)
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)

    async def copy() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                f'CREATE TABLE {TABLE} ("CustomerID" text PRIMARY KEY, "Sex" text, "Age" integer, '
                '"Annual_Income" double precision, "Spending_Score" integer, "Purchase_Frequency" integer)'
            )
            records = list(frame[list(COLUMNS)].itertuples(index=False, name=None))
            await conn.copy_records_to_table(TABLE, records=records, columns=list(COLUMNS))
        finally:
            await conn.close()

    asyncio.run(copy())


def wait_run(http, deadline: float) -> dict:
    while time.perf_counter() < deadline:
        runs = http.get("/segmentations/default/runs").json()["runs"]
        if runs and runs[0]["status"] != "running":
            return runs[0]
        time.sleep(0.1)
    raise RuntimeError("the run did not finish")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True, help="a PostgreSQL database to use (emptied first)")
    parser.add_argument("--quick", action="store_true", help="100,000 customers")
    parser.add_argument("--customers", type=int, help="customers in the source table (default 1,000,000)")
    args = parser.parse_args(argv)
    rows = args.customers or (100_000 if args.quick else 1_000_000)
    mode = dataclasses.replace(bench.QUICK, dataset_rows=5000, deep_history_rows=0, warmup=1)

    import httpx

    workdir = Path(tempfile.mkdtemp(prefix="segbench-policy-"))
    env = bench.service_env(workdir, args.database_url) | {"SOURCE_ALLOW_PRIVATE": "true"}
    reset_schema(args.database_url)
    csv_path = workdir / "crm.csv"
    started = time.perf_counter()
    load_table(args.database_url, rows, csv_path)
    print(f"policy benchmark: {rows:,} customers in {TABLE} (loaded in {time.perf_counter() - started:.1f} s)")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; cpus: {os.cpu_count()}")
    print(f"server: one uvicorn worker, the flags of `make run`: {' '.join(bench.uvicorn_flags())}", flush=True)

    service = None
    try:
        bench.prepare_service(env, mode)
        service = bench.Server("service", "app.main:app", env=env, app_dir=ROOT, log=workdir / "service.log")
        service.wait_ready()
        tokens = bench.set_up_service(service)
        admin = tokens[bench.ADMIN[0]]
        with httpx.Client(base_url=service.url, timeout=1800, headers={"Authorization": f"Bearer {admin}"}) as http:
            http.post("/train", params={"n_clusters": 5, "random_state": 1}).raise_for_status()
            query = "SELECT " + ", ".join(f'"{c}"' for c in COLUMNS) + f" FROM {TABLE}"
            http.post(
                "/sources", json={"name": "crm", "kind": "sql", "url": args.database_url, "query": query}
            ).raise_for_status()
            http.put("/segmentations/default/policy", json={"source": "crm", "then_run": True}).raise_for_status()

            began = time.perf_counter()
            job = http.post("/segmentations/default/policy/trigger").json()
            while (job := http.get(f"/jobs/{job['job_id']}").json())["state"] in ("queued", "running"):
                time.sleep(0.1)
            promoted = time.perf_counter() - began
            run = wait_run(http, began + 1800)
            completed = time.perf_counter() - began
            if job["state"] != "succeeded" or job["result"]["outcome"] != "activated":
                raise RuntimeError(f"the policy did not promote: {job}")

            began = time.perf_counter()
            with open(csv_path, "rb") as fh:
                http.post(
                    "/train", params={"n_clusters": 5}, files={"file": ("crm.csv", fh, "text/csv")}
                ).raise_for_status()
            trained_by_hand = time.perf_counter() - began
            with open(csv_path, "rb") as fh:
                http.post("/segmentations/default/runs", files={"file": ("crm.csv", fh, "text/csv")}).raise_for_status()
            by_hand = time.perf_counter() - began
    finally:
        if service is not None:
            service.stop()

    print()
    print(f"{'row':<66}{'seconds':>9}")
    print(f"{'baseline: by hand, CSV uploaded to /train (k=5)':<66}{trained_by_hand:>9.2f}")
    print(f"{'baseline: by hand, then uploaded to .../runs: completed':<66}{by_hand:>9.2f}")
    print(f"{'policy: trigger to the promoted version (job succeeded)':<66}{promoted:>9.2f}")
    print(f"{'policy: trigger to the customer base run completed':<66}{completed:>9.2f}")
    print(f"figures: {job['result']['figures']}; run: {run['n_customers']:,} customers, {run['status']}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("targets" + (" (a smaller table than the target's 1,000,000 customers)" if rows < 1_000_000 else ""))
    met = completed < TARGET_SECONDS
    print(f"  {'trigger to promoted and run completed < 90 s':<46}{completed:>10.1f} s   {'met' if met else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
