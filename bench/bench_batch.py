"""Benchmark batch scoring over HTTP: a 100k-row CSV in, CSV or JSON out.

Starts uvicorn in a subprocess on a free port with its own SQLite database and
model folder, creates an analyst, trains on a generated dataset, then POSTs a
generated CSV to /predict/batch with `Accept: text/csv` and with
`Accept: application/json`, and prints the seconds of each request as the
client sees them (upload, parsing, validation, scoring, answer).

    python bench/bench_batch.py                   # 100,000 rows, 3 rounds
    python bench/bench_batch.py --rows 250000 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_SECONDS = 2.0
USERNAME = "bench_analyst"
PASSWORD = "bench-password-123"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(workdir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": f"sqlite+aiosqlite:///{workdir / 'bench.db'}",
        "MODEL_DIR": str(workdir / "models"),
        "DATA_PATH": str(workdir / "customers.csv"),
        "SECRET_KEY": "bench-secret-key-long-enough-for-hs256-0000",
        "BCRYPT_ROUNDS": "4",
        "LOG_LEVEL": "WARNING",
        "MAX_UPLOAD_MB": "200",
    }


def start_server(workdir: Path, port: int, env: dict[str, str]) -> subprocess.Popen:
    log = open(workdir / "uvicorn.log", "wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"uvicorn exited early; see {workdir / 'uvicorn.log'}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("uvicorn did not start within 60 s")


def timed_batch(http: httpx.Client, csv_bytes: bytes, accept: str) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = http.post(
        "/predict/batch", files={"file": ("customers.csv", csv_bytes, "text/csv")}, headers={"Accept": accept}
    )
    return time.perf_counter() - started, response


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows in the scored CSV (default: 100000)")
    parser.add_argument("--rounds", type=int, default=3, help="requests per output format (default: 3)")
    args = parser.parse_args(argv)

    from generate_dataset import generate

    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp:
        workdir = Path(tmp)
        env = server_env(workdir)
        generate(rows=5000, seed=1).to_csv(workdir / "customers.csv", index=False)
        csv_bytes = generate(rows=args.rows, seed=2).to_csv(index=False).encode()
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "create_admin.py"),
                "--username",
                USERNAME,
                "--password",
                PASSWORD,
                "--role",
                "analyst",
                "--no-test-user",
            ],
            cwd=workdir,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        port = free_port()
        server = start_server(workdir, port, env)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
                token = http.post("/auth/login", data={"username": USERNAME, "password": PASSWORD}).json()
                http.headers["Authorization"] = f"Bearer {token['access_token']}"
                trained = http.post("/train", params={"n_clusters": 5})
                trained.raise_for_status()
                print(
                    f"trained {trained.json()['model_version']}; scoring {args.rows:,} rows "
                    f"({len(csv_bytes) / 1e6:.1f} MB CSV), {args.rounds} rounds each"
                )
                results: dict[str, list[float]] = {}
                for label, accept in (("csv", "text/csv"), ("json", "application/json")):
                    timed_batch(http, csv_bytes, accept)  # warm-up
                    seconds = []
                    for _ in range(args.rounds):
                        elapsed, response = timed_batch(http, csv_bytes, accept)
                        response.raise_for_status()
                        seconds.append(elapsed)
                    if accept == "text/csv":
                        lines = response.content.count(b"\n")
                        assert lines == args.rows + 1, f"expected {args.rows + 1} lines, got {lines}"
                    else:
                        assert len(response.json()["predictions"]) == args.rows
                    results[label] = seconds
                    print(
                        f"{label:>4} out: best {min(seconds):.3f} s, median {statistics.median(seconds):.3f} s "
                        f"({', '.join(f'{s:.3f}' for s in seconds)})"
                    )
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
    worst = max(statistics.median(s) for s in results.values())
    verdict = "OK" if worst < TARGET_SECONDS else "SLOWER THAN TARGET"
    print(f"target < {TARGET_SECONDS:g} s per request: {verdict} (worst median {worst:.3f} s)")
    return 0 if worst < TARGET_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
