"""Benchmark explanations and drift counting on POST /predict.

    .venv/bin/python bench/bench_explain_drift.py            # 3 rounds x 5 s per row
    .venv/bin/python bench/bench_explain_drift.py --quick    # 1 round x 2 s per row

Two services run as bench/run.py starts them (one uvicorn worker each with the flags of
`make run`, LOG_LEVEL=INFO, a SQLite database of their own, the default model trained on the
same generated dataset), one with DRIFT_ENABLED=true (the default), one with
DRIFT_ENABLED=false, next to the bare FastAPI app. wrk drives three rows in rounds that rotate
their order, each right after the bare app (bench/run.py's measure_endpoints):

- `POST /predict` on the service counting drift,
- `POST /predict?explain=true` on the same service,
- `POST /predict (drift off)` on the service not counting.

explain/plain is the median over rounds of the explain row's req/s over the plain row's in the
same round (same server, seconds apart); drift on/off likewise, plain on the counting service over
plain on the other. Targets: explain/plain >= 0.8, drift on/off >= 0.95.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (bench/run.py: servers, users, wrk rounds)

ROOT = bench.ROOT
PLAIN = "POST /predict"
EXPLAIN = "POST /predict?explain=true"
OFF = "POST /predict (drift off)"
TARGET_EXPLAIN = 0.8
TARGET_DRIFT = 0.95


def predict_target(server: bench.Server, token: str, path: str) -> bench.Target:
    return bench.Target(
        server.url + path, "predict.lua", token=token, method="POST", predict=True, env={"BENCH_PATH": path}
    )


def paired(report: bench.Report, top: str, bottom: str) -> list[float]:
    """`top` req/s over `bottom` req/s, round by round."""
    over, under = report.round_rps.get(top, []), report.round_rps.get(bottom, [])
    return [a / b for a, b in zip(over, under, strict=False) if b]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one 2-second round per row")
    parser.add_argument("--rounds", type=int, help="rounds rotating the rows (default 3; quick 1)")
    parser.add_argument("--duration", type=float, help="wrk seconds per row per round (default 5; quick 2)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--python-load", action="store_true", help="use the asyncio load generator, not wrk")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (2 if args.quick else 5)
    mode = dataclasses.replace(
        bench.QUICK if args.quick else bench.FULL, dataset_rows=5000, deep_history_rows=0, warmup=1
    )
    load = bench.LoadGenerator(None if args.python_load else bench.ensure_wrk())
    print(
        f"explain and drift benchmark: {load.name}, {args.connections} connections on {args.threads} wrk "
        f"thread(s), {args.rounds} round(s) x {args.duration:g} s per row"
    )
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; cpus: {os.cpu_count()}")
    workdirs = [Path(tempfile.mkdtemp(prefix=f"segbench-drift-{side}-")) for side in ("on", "off")]
    servers: list[bench.Server] = []
    report = bench.Report()
    try:
        services = []
        for workdir, enabled in zip(workdirs, ("true", "false"), strict=True):
            env = {**bench.service_env(workdir, None), "DRIFT_ENABLED": enabled}
            bench.prepare_service(env, mode)
            server = bench.Server(
                f"service (drift {enabled})", "app.main:app", env=env, app_dir=ROOT, log=workdir / "service.log"
            )
            servers.append(server)
            services.append(server)
        bare = bench.Server(
            "bare app", "bare_app:app", env=dict(os.environ), app_dir=bench.BENCH, log=workdirs[0] / "bare.log"
        )
        servers.append(bare)
        for server in servers:
            server.wait_ready()
        on, off = services
        tokens_on = bench.set_up_service(on)
        tokens_off = bench.set_up_service(off)
        user = bench.USER[0]
        targets = {
            PLAIN: (on, predict_target(on, tokens_on[user], "/predict")),
            EXPLAIN: (on, predict_target(on, tokens_on[user], "/predict?explain=true")),
            OFF: (off, predict_target(off, tokens_off[user], "/predict")),
        }
        print(f"service: {bench.log_settings(bench.service_env(workdirs[0], None))}, SQLite", flush=True)
        bench.measure_endpoints(load, bare, targets, lambda: 0, args, mode, report)
    finally:
        for server in servers:
            server.stop()
    for failure in report.failures:
        print(f"error: {failure}")
    print()
    print(f"{'row':<32} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>11} {'vs bare':>8}")
    for label, row in report.rows.items():
        print(
            f"{label:<32} {row['rps']:>9.0f} {row['p50']:>8.2f} {row['p99']:>8.2f} {row['cpu_us']:>11.0f} "
            f"{row['ratio']:>8.2f}"
        )
    explain = bench.median(paired(report, EXPLAIN, PLAIN))
    drift = bench.median(paired(report, PLAIN, OFF))
    checks = [
        ("explain/plain throughput", explain, TARGET_EXPLAIN),
        ("drift on/off throughput", drift, TARGET_DRIFT),
    ]
    print()
    for name, value, target in checks:
        verdict = "met" if value >= target else "NOT met"
        rounds = ", ".join(
            f"{r:.3f}" for r in paired(report, *((EXPLAIN, PLAIN) if "explain" in name else (PLAIN, OFF)))
        )
        print(f"{name}: {value:.3f} (target >= {target}) {verdict}; rounds: {rounds}")
    for workdir in workdirs:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if report.failures or any(value < target for _, value, target in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
