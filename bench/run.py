"""Benchmark the service against a bare FastAPI app served the same way.

    .venv/bin/python bench/run.py            # the full run behind `make bench` (about ten minutes)
    .venv/bin/python bench/run.py --quick    # a smoke run of a few seconds per row (`make bench-smoke`)

Both apps run as one uvicorn worker with the flags of the Makefile's `run` target (the
service's event loop, httptools, no uvicorn access log), and the service at the settings
`make run` gives: LOG_LEVEL=INFO, its one request log line on. Rows that change one of these
say so in their label ("request log off (LOG_LEVEL=WARNING)", "no middleware"). wrk drives
each endpoint with 64 connections, in rounds that alternate between the bare app and the
service: every row is measured right after the bare app and reported as a ratio to that
measurement, so a noisy machine moves both sides alike. The service gets a temporary SQLite
database (or --database-url), a model trained on a generated dataset and its own users.

Without wrk (and no way to install it) a small asyncio load generator stands in; it is
far slower than wrk, so its ratios say little. Use it for smoke runs only.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import resource
import secrets
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))

PYTHON = sys.executable
ADMIN = ("benchadmin", "bench-admin-pass-1")
USER = ("benchuser", "bench-user-pass-1")
READER = ("benchreader", "bench-reader-pass-1")
HISTORY_ROWS = 200
LOGIN_USERS = [f"benchlogin{i:02d}" for i in range(1, 17)]
LOGIN_PASSWORD = "bench-login-pass-1"
CUSTOMER = {"sex": "Female", "age": 29, "annual_income": 85.0, "spending_score": 82, "purchase_frequency": 40}


@dataclass
class Mode:
    name: str
    rounds: int
    duration: float
    warmup: float
    login_seconds: float
    dataset_rows: int
    train_rows: tuple[int, int, int]
    batch_rows: int
    batch_rounds: int
    deep_history_rows: int  # older history rows seeded for the reader, the deep pages' depth


FULL = Mode(
    "full",
    rounds=5,
    duration=5,
    warmup=2,
    login_seconds=6,
    dataset_rows=5000,
    train_rows=(5000, 100_000, 1_000_000),
    batch_rows=100_000,
    batch_rounds=3,
    deep_history_rows=200_000,
)
QUICK = Mode(
    "quick",
    rounds=1,
    duration=1,
    warmup=0.5,
    login_seconds=3,
    dataset_rows=2000,
    train_rows=(2000, 5000, 20_000),
    batch_rows=5000,
    batch_rounds=1,
    deep_history_rows=20_000,
)


# --------------------------------------------------------------------------------------------
# load generators


@dataclass
class LoadResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    status_errors: int = 0
    socket_errors: int = 0
    cpu_us: float = 0.0  # server CPU time per answered request


@dataclass
class Target:
    """What one load run sends: a wrk script and what the Python fallback needs to do the same."""

    url: str
    script: str
    token: str | None = None
    method: str = "GET"
    forms: list[dict[str, str]] | None = None  # form bodies, taken in turn
    predict: bool = False
    env: dict[str, str] = field(default_factory=dict)


def ensure_wrk() -> str | None:
    """The wrk binary; installs Debian's package when missing and we may. None when there is no way."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.environ.get("BENCH_NO_INSTALL") or not shutil.which("apt-get") or os.geteuid() != 0:
        return None
    print("wrk not found: installing it with apt-get ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"  {' '.join(command)} failed: {exc}")
            return None
        if done.returncode != 0:
            print(f"  {' '.join(command)} failed: {done.stderr.strip()[-300:]}")
            return None
    return shutil.which("wrk")


def run_wrk(
    wrk: str, target: Target, *, connections: int, threads: int, seconds: float, timeout: float = 10
) -> LoadResult:
    env = {**os.environ, "BENCH_DIR": str(BENCH), **target.env}
    if target.token:
        env["BENCH_TOKEN"] = target.token
    command = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={timeout:g}s",
        "-s",
        str(BENCH / target.script),
        target.url,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + timeout + 60)
    match = re.search(r"^WRK_RESULT (\{.*\})$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-500:]} {done.stderr[-500:]}")
    data = json.loads(match.group(1))
    return LoadResult(
        rps=data["rps"],
        p50_ms=data["p50_ms"],
        p99_ms=data["p99_ms"],
        requests=data["requests"],
        status_errors=data["status_errors"],
        socket_errors=data["socket_errors"],
    )


def _request_bytes(target: Target, host: str, path: str, number: int) -> bytes:
    headers = [f"Host: {host}"]
    if target.token:
        headers.append(f"Authorization: Bearer {target.token}")
    body = b""
    if target.predict:
        customer = {
            "sex": random.choice(["Male", "Female", "Other"]),
            "age": random.randint(18, 80),
            "annual_income": random.randint(150, 2000) / 10,
            "spending_score": random.randint(1, 100),
            "purchase_frequency": random.randint(0, 120),
        }
        body = json.dumps(customer).encode()
        headers.append("Content-Type: application/json")
    elif target.forms:
        from urllib.parse import urlencode

        body = urlencode(target.forms[number % len(target.forms)]).encode()
        headers.append("Content-Type: application/x-www-form-urlencoded")
    if body or target.method != "GET":
        headers.append(f"Content-Length: {len(body)}")
    method = "POST" if body else target.method
    head = f"{method} {path} HTTP/1.1\r\n" + "\r\n".join(headers) + "\r\n\r\n"
    return head.encode() + body


async def _python_load(target: Target, connections: int, seconds: float) -> LoadResult:
    from urllib.parse import urlsplit

    parts = urlsplit(target.url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    latencies: list[float] = []
    errors = [0, 0]
    numbers = itertools.count()
    deadline = time.perf_counter() + seconds

    async def connection() -> None:
        try:
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        except OSError:
            errors[1] += 1
            return
        try:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                writer.write(_request_bytes(target, parts.netloc, path, next(numbers)))
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = int(re.search(rb"content-length:\s*(\d+)", head, re.IGNORECASE).group(1))
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
                if status >= 400:
                    errors[0] += 1
        except (OSError, asyncio.IncompleteReadError, AttributeError, ValueError):
            errors[1] += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies) or [0.0]
    return LoadResult(
        rps=len(latencies) / elapsed,
        p50_ms=ordered[len(ordered) // 2] * 1000,
        p99_ms=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        requests=len(latencies),
        status_errors=errors[0],
        socket_errors=errors[1],
    )


class LoadGenerator:
    def __init__(self, wrk: str | None) -> None:
        self.wrk = wrk

    @property
    def name(self) -> str:
        if self.wrk is None:
            return "Python asyncio fallback (client-bound: ratios not meaningful)"
        version = subprocess.run([self.wrk, "-v"], capture_output=True, text=True).stdout.split("\n")[0]
        return " ".join(version.split()[:2])

    def run(
        self, target: Target, *, connections: int, seconds: float, threads: int = 1, timeout: float = 10
    ) -> LoadResult:
        if self.wrk is not None:
            return run_wrk(self.wrk, target, connections=connections, threads=threads, seconds=seconds, timeout=timeout)
        return asyncio.run(_python_load(target, connections, seconds))

    def run_together(self, first: tuple[Target, dict], second: tuple[Target, dict]) -> tuple[LoadResult, LoadResult]:
        """Two loads at the same time (wrk as two processes, the fallback as one event loop)."""
        if self.wrk is not None:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(2) as pool:
                a = pool.submit(self.run, first[0], **first[1])
                b = pool.submit(self.run, second[0], **second[1])
                return a.result(), b.result()

        async def both():
            return await asyncio.gather(
                _python_load(first[0], first[1]["connections"], first[1]["seconds"]),
                _python_load(second[0], second[1]["connections"], second[1]["seconds"]),
            )

        a, b = asyncio.run(both())
        return a, b


# --------------------------------------------------------------------------------------------
# the two servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# What the Makefile's `run` target passes when it cannot be read (it is the reference).
MAKE_RUN_FLAGS = ["--workers", "1", "--loop", "uvloop", "--http", "httptools", "--no-access-log"]


def make_run_flags() -> list[str]:
    """The uvicorn flags of the Makefile's `run` target, host and port aside, at WORKERS=1."""
    try:
        makefile = (ROOT / "Makefile").read_text()
    except OSError:
        return list(MAKE_RUN_FLAGS)
    recipe = re.search(r"^run:.*\n((?:\t.*\n?)+)", makefile, re.MULTILINE)
    words = shlex.split(recipe.group(1).replace("\\\n", " ")) if recipe else []
    starts = [i for i, word in enumerate(words) if word.endswith("/uvicorn")]
    if not starts:
        return list(MAKE_RUN_FLAGS)
    flags: list[str] = []
    rest = iter(words[starts[0] + 2 :])  # after `uvicorn app.main:app`
    for word in rest:
        if word in ("--host", "--port"):
            next(rest, None)
        elif word == "$(WORKERS)":
            flags.append("1")
        elif word.startswith("$(") or word in ("&&", ";", "|"):
            return list(MAKE_RUN_FLAGS)
        else:
            flags.append(word)
    return flags


def uvicorn_flags() -> list[str]:
    flags = make_run_flags()
    # Without httptools (or uvloop) uvicorn would refuse the flag: it uses its default instead.
    for module, flag in (("uvloop", "--loop"), ("httptools", "--http")):
        try:
            __import__(module)
        except ImportError:
            if flag in flags:
                at = flags.index(flag)
                del flags[at : at + 2]
                print(f"note: {module} is not installed; uvicorn uses its default instead")
    return flags


class Server:
    def __init__(self, name: str, app: str, *, env: dict[str, str], app_dir: Path, log: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [
            PYTHON,
            "-m",
            "uvicorn",
            app,
            "--app-dir",
            str(app_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *uvicorn_flags(),
        ]
        self._log_file = open(log, "wb")
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 90) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer within {timeout} s: {self.log.read_text()[-2000:]}")

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far (all its threads)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()


def service_env(workdir: Path, database_url: str | None) -> dict[str, str]:
    """The service's environment: its own database and files, every LOG_* setting at its default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "MODEL_", "DATA_", "LOG_"))}
    env.update(
        APP_ENV="development",
        SECRET_KEY=secrets.token_urlsafe(48),
        DATABASE_URL=database_url or f"sqlite+aiosqlite:///{workdir / 'bench.db'}",
        MODEL_DIR=str(workdir / "models"),
        DATA_PATH=str(workdir / "data" / "customers.csv"),
        PYTHONDONTWRITEBYTECODE="1",
    )
    return env


def log_settings(env: dict[str, str]) -> str:
    """How the service logs, as the settings it reads from `env` decide."""
    from app.core.config import Settings

    fields = Settings.model_fields
    level = env.get("LOG_LEVEL", fields["log_level"].default)
    fmt = env.get("LOG_FORMAT", fields["log_format"].default)
    on = "on" if level.strip().upper() in ("DEBUG", "INFO") else "off"
    return f"LOG_LEVEL={level}, LOG_FORMAT={fmt} (request log {on})"


def prepare_service(env: dict[str, str], mode: Mode) -> None:
    from generate_dataset import generate

    data = Path(env["DATA_PATH"])
    data.parent.mkdir(parents=True, exist_ok=True)
    generate(rows=mode.dataset_rows, seed=42).to_csv(data, index=False)
    if env["DATABASE_URL"].startswith("postgresql"):
        reset_postgres(env["DATABASE_URL"])
    for (name, password), role in ((ADMIN, "admin"), (READER, "user")):
        subprocess.run(
            [
                PYTHON,
                "create_admin.py",
                "--username",
                name,
                "--password",
                password,
                "--role",
                role,
                "--test-username",
                USER[0],
                "--test-password",
                USER[1],
            ],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
        )
    seed_history(env["DATABASE_URL"], READER[0], mode.deep_history_rows)


def seed_history(url: str, username: str, rows: int) -> None:
    """Give `username` `rows` older predictions, straight into the table (as many /predict calls would)."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import select, text
    from sqlalchemy.ext.asyncio import create_async_engine

    from app.core.tables import PREDICTION_HISTORY, User

    start = datetime.now(UTC) - timedelta(days=365)

    async def seed() -> None:
        engine = create_async_engine(url)
        async with engine.begin() as conn:
            user_id = (await conn.execute(select(User.id).where(User.username == username))).scalar_one()
            if conn.dialect.name == "postgresql":
                # One statement: PostgreSQL's count trigger runs once per statement, not per row.
                await conn.execute(
                    text(
                        "INSERT INTO prediction_history (user_id, customer_data, cluster, cluster_name, confidence, "
                        "model_version, created_at) SELECT :user_id, json_build_object('sex', 'Female', "
                        "'age', 18 + n % 60, 'annual_income', 85.0, 'spending_score', 82, 'purchase_frequency', 40), "
                        "n % 5, 'Seeded history', 0.5, 'seeded', CAST(:start AS timestamptz) + n * interval '1 second' "
                        "FROM generate_series(0, :rows - 1) AS n"
                    ),
                    {"user_id": user_id, "start": start, "rows": rows},
                )
                return
            for first in range(0, rows, 10_000):
                chunk = [
                    {
                        "user_id": user_id,
                        "customer_data": {**CUSTOMER, "age": 18 + number % 60},
                        "cluster": number % 5,
                        "cluster_name": "Seeded history",
                        "confidence": 0.5,
                        "model_version": "seeded",
                        "created_at": start + timedelta(seconds=number),
                    }
                    for number in range(first, min(rows, first + 10_000))
                ]
                await conn.execute(PREDICTION_HISTORY.insert(), chunk)
        await engine.dispose()

    asyncio.run(seed())


def reset_postgres(url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    from app.core.tables import Base

    async def drop() -> None:
        engine = create_async_engine(url)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
            await conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
        await engine.dispose()

    asyncio.run(drop())


def login(base: str, username: str, password: str) -> str:
    import httpx

    response = httpx.post(base + "/auth/login", data={"username": username, "password": password}, timeout=60)
    response.raise_for_status()
    return response.json()["access_token"]


def set_up_service(service: Server) -> dict[str, str]:
    """Train the model, seed the reader's history and warm the caches; returns tokens."""
    import httpx

    tokens = {name: login(service.url, name, password) for name, password in (ADMIN, USER, READER)}
    with httpx.Client(base_url=service.url, timeout=300) as http:
        trained = http.post("/train", headers={"Authorization": f"Bearer {tokens[ADMIN[0]]}"})
        trained.raise_for_status()
        reader = {"Authorization": f"Bearer {tokens[READER[0]]}"}
        for _ in range(HISTORY_ROWS):
            http.post("/predict", json=CUSTOMER, headers=reader).raise_for_status()
        for path in ("/clusters", "/elbow", "/history?limit=50"):
            http.get(path, headers=reader).raise_for_status()
        # Accounts for the login row: one login in flight per account stays clear of the throttle.
        for name in LOGIN_USERS:
            http.post(
                "/auth/register", json={"email": f"{name}@example.com", "username": name, "password": LOGIN_PASSWORD}
            ).raise_for_status()
    return tokens


def deep_history_path(base: str, token: str, depth: int) -> str:
    """A page `depth` rows into the reader's history, read by before_id (its cursor found by walking)."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, timeout=60, headers=headers) as http:
        # One read by skip finds the row; the benchmark then reads the page after it by before_id.
        page = http.get("/history", params={"skip": depth - 1, "limit": 1}).raise_for_status().json()
        return f"/history?limit=50&before_id={page['history'][0]['id']}"


def history_total(base: str, token: str) -> int:
    import httpx

    response = httpx.get(base + "/history?limit=1", headers={"Authorization": f"Bearer {token}"}, timeout=60)
    response.raise_for_status()
    return response.json()["total"]


# --------------------------------------------------------------------------------------------
# training and batch figures


def _train_child(rows: int, n_clusters: int | None, csv: Path) -> None:
    """Runs in its own process: load the CSV the way POST /train does, train, report time and peak RSS."""
    from app.ml import SegmentationModel
    from app.ml.preprocess import load_training_matrix

    started = time.perf_counter()
    features = load_training_matrix(csv)
    loaded = time.perf_counter()
    model = SegmentationModel.train(features, n_clusters=n_clusters, random_state=42)
    trained = time.perf_counter()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        "TRAIN_RESULT "
        + json.dumps(
            {
                "rows": rows,
                "load_seconds": loaded - started,
                "train_seconds": trained - loaded,
                "peak_rss_mb": peak_mb,
                "n_clusters": model.n_clusters_,
            }
        )
    )


def measure_training(sizes: tuple[int, ...], workdir: Path) -> list[tuple[int, dict]]:
    """Parse + train seconds and peak RSS per size, each in a fresh process (bench/bench_train.py).

    Automatic k at every size, as POST /train without n_clusters.
    """
    script = BENCH / "bench_train.py"
    if script.exists():
        out = workdir / "train.json"
        done = subprocess.run(
            [PYTHON, str(script), "--rows", ",".join(map(str, sizes)), "--json", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if done.returncode == 0 and out.exists():
            results = json.loads(out.read_text())
            if all("total_seconds" in r and "peak_rss_mb" in r for r in results):
                return [(r["rows"], r) for r in results]
        print(f"note: bench/bench_train.py gave no result ({done.returncode}): {done.stderr[-300:]}; measuring here")
    from generate_dataset import generate

    measured = []
    for rows in sizes:
        csv = workdir / f"train-{rows}.csv"
        generate(rows=rows, seed=7).to_csv(csv, index=False)
        done = subprocess.run(
            [PYTHON, __file__, "--train-child", str(rows), "0", str(csv)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
        csv.unlink(missing_ok=True)
        match = re.search(r"^TRAIN_RESULT (\{.*\})$", done.stdout, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"training run failed: {done.stderr[-1000:]}")
        result = json.loads(match.group(1))
        result["total_seconds"] = result["load_seconds"] + result["train_seconds"]
        measured.append((rows, result))
    return measured


def measure_batch(service: Server, token: str, rows: int, rounds: int) -> dict:
    """Median seconds for one multipart CSV of `rows` customers through POST /predict/batch, CSV and JSON back.

    bench/bench_batch.py does it on a server of its own; without it, this service is used.
    """
    script = BENCH / "bench_batch.py"
    if script.exists():
        done = subprocess.run(
            [PYTHON, str(script), "--rows", str(rows), "--rounds", str(rounds)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        medians = dict(re.findall(r"^\s*(csv|json) out: .*median ([0-9.]+) s", done.stdout, re.MULTILINE))
        if len(medians) == 2:
            return {"rows": rows, "csv": float(medians["csv"]), "json": float(medians["json"])}
        print(f"note: bench/bench_batch.py gave no result ({done.returncode}): {done.stdout[-300:]}; measuring here")
    import httpx

    from generate_dataset import generate

    csv = generate(rows=rows, seed=11).to_csv(index=False).encode()
    result: dict = {"rows": rows}
    with httpx.Client(base_url=service.url, timeout=300, headers={"Authorization": f"Bearer {token}"}) as http:
        for kind, accept in (("csv", "text/csv"), ("json", "application/json")):
            timings = []
            for _ in range(rounds):
                started = time.perf_counter()
                response = http.post(
                    "/predict/batch", files={"file": ("customers.csv", csv, "text/csv")}, headers={"Accept": accept}
                )
                timings.append(time.perf_counter() - started)
                response.raise_for_status()
            result[kind] = statistics.median(timings)
    return result


# --------------------------------------------------------------------------------------------
# the run


ENDPOINTS = [  # (row label, path, script, token owner)
    ("GET /", "/", "get.lua", None),
    ("POST /predict", "/predict", "predict.lua", USER[0]),
    ("GET /clusters", "/clusters", "get.lua", READER[0]),
    ("GET /elbow", "/elbow", "get.lua", READER[0]),
    ("GET /history?limit=50", "/history?limit=50", "get.lua", READER[0]),
    (DEEP_LABEL := "GET /history?limit=50, deep, by before_id", None, "get.lua", READER[0]),
]
DEEP_PROBE_LABEL = "GET / while deep history pages are read"
DEEP_DEPTH = 100_000  # rows before the deep page (at most the seeded history)
# The same service with one thing changed, to show what it costs:
# (row label, path, script, token owner, env, middleware left out).
LOG_OFF_LABEL = "GET /clusters, request log off (LOG_LEVEL=WARNING)"
VARIANTS = [
    (LOG_OFF_LABEL, "/clusters", "get.lua", READER[0], {"LOG_LEVEL": "WARNING"}, ""),
    (
        "GET /clusters, request log as JSON (LOG_FORMAT=json)",
        "/clusters",
        "get.lua",
        READER[0],
        {"LOG_FORMAT": "json"},
        "",
    ),
    ("GET /clusters, no middleware", "/clusters", "get.lua", READER[0], {}, "ServiceMiddleware"),
    ("POST /predict, no middleware", "/predict", "predict.lua", ADMIN[0], {}, "ServiceMiddleware"),
]
# The request log may cost at most this share of GET /clusters' throughput.
LOG_COST_LIMIT = 0.10
BARE_LABEL = "bare FastAPI GET /"
LOGIN_LABEL = "POST /auth/login, 16 at once"
PROBE_LABEL = "GET / while 16 logins hash"


@dataclass
class Report:
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    logins: LoadResult | None = None
    probe: LoadResult | None = None
    probe_ratio: float = 0.0
    deep_probe: LoadResult | None = None
    batch: dict | None = None
    training: list[tuple[int, dict]] = field(default_factory=list)
    committed: int = 0
    answered: int = 0
    service_rss_mb: float | None = None
    failures: list[str] = field(default_factory=list)
    # Each row's ratio to the bare app, round by round (rows in the same round are paired).
    round_ratios: dict[str, list[float]] = field(default_factory=dict)
    round_rps: dict[str, list[float]] = field(default_factory=dict)  # each row's req/s, round by round


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def measure_endpoints(
    load: LoadGenerator,
    bare: Server,
    targets: dict[str, tuple[Server, Target]],
    history_total_now,
    args,
    mode: Mode,
    report: Report,
) -> None:
    """Rounds over the rows (in a rotating order), each row measured right after the bare app.

    A row's ratio is its req/s over the bare app's in the measurement just before it: a
    shared machine that slows down for a while slows both sides of a pair alike.
    """
    bare_target = Target(bare.url + "/", "get.lua")
    run = {"connections": args.connections, "threads": args.threads}
    if mode.warmup:
        for _, target in (("bare", bare_target), *targets.values()):
            load.run(target, seconds=mode.warmup, **run)
    time.sleep(0.5)  # let the warm-up's last predictions commit before counting
    history_before = history_total_now()

    def measured(server: Server, target: Target) -> LoadResult:
        cpu_before = server.cpu_seconds()
        result = load.run(target, seconds=args.duration, **run)
        if result.requests:
            result.cpu_us = (server.cpu_seconds() - cpu_before) / result.requests * 1e6
        return result

    results: dict[str, list[LoadResult]] = {BARE_LABEL: [], **{label: [] for label in targets}}
    ratios: dict[str, list[float]] = {label: [] for label in targets}
    labels = list(targets)
    for round_no in range(args.rounds):
        shift = round_no % max(1, len(labels))
        for label in labels[shift:] + labels[:shift]:
            base = measured(bare, bare_target)
            results[BARE_LABEL].append(base)
            server, target = targets[label]
            result = measured(server, target)
            results[label].append(result)
            ratios[label].append(result.rps / base.rps if base.rps else 0.0)
            if result.status_errors or result.socket_errors:
                report.failures.append(
                    f"{label}: {result.status_errors} error statuses, "
                    f"{result.socket_errors} socket errors in round {round_no + 1}"
                )
            if label == "POST /predict":
                report.answered += result.requests - result.status_errors
    report.committed = history_total_now() - history_before
    report.round_ratios = ratios
    report.round_rps = {label: [run.rps for run in runs] for label, runs in results.items()}
    for label, runs in results.items():
        row = median_result(runs)
        report.rows[label] = {
            "rps": row.rps,
            "p50": row.p50_ms,
            "p99": row.p99_ms,
            "cpu_us": row.cpu_us,
            "ratio": 1.0 if label == BARE_LABEL else median(ratios[label]),
        }


def median_result(results: list[LoadResult]) -> LoadResult:
    """Each figure's median over several runs of one row; counts are summed."""
    return LoadResult(
        rps=median([r.rps for r in results]),
        p50_ms=median([r.p50_ms for r in results]),
        p99_ms=median([r.p99_ms for r in results]),
        requests=sum(r.requests for r in results),
        status_errors=sum(r.status_errors for r in results),
        socket_errors=sum(r.socket_errors for r in results),
        cpu_us=median([r.cpu_us for r in results]),
    )


def measure_logins(load: LoadGenerator, service: Server, args, mode: Mode, report: Report) -> None:
    """16 logins at a time hash with bcrypt while a health probe measures what everybody else waits.

    As many rounds as the other rows, each figure the median over them.
    """
    login_target = Target(
        service.url + "/auth/login",
        "login.lua",
        method="POST",
        forms=[{"username": name, "password": LOGIN_PASSWORD} for name in LOGIN_USERS],
        env={"BENCH_USERNAMES": ",".join(LOGIN_USERS), "BENCH_PASSWORD": LOGIN_PASSWORD},
    )
    probe_target = Target(service.url + "/", "get.lua")
    logins, probes = [], []
    for _ in range(args.rounds):
        login_run, probe_run = load.run_together(
            (login_target, {"connections": 16, "seconds": mode.login_seconds, "threads": 1, "timeout": 60}),
            (probe_target, {"connections": args.connections, "seconds": mode.login_seconds, "threads": 1}),
        )
        logins.append(login_run)
        probes.append(probe_run)
        # wrk leaves its last 16 logins queued for the hashing thread; one more login waits
        # behind them, so the next round starts on an idle service.
        login(service.url, LOGIN_USERS[0], LOGIN_PASSWORD)
    report.logins, report.probe = median_result(logins), median_result(probes)
    if report.logins.status_errors or report.logins.socket_errors:
        report.failures.append(
            f"logins: {report.logins.status_errors} error statuses, {report.logins.socket_errors} socket errors"
        )
    bare_rps = report.rows.get(BARE_LABEL, {}).get("rps")
    report.probe_ratio = report.probe.rps / bare_rps if bare_rps else 0.0


def log_cost(report: Report) -> tuple[float, float] | None:
    """(with / without the request log, the median over rounds of the paired ratios; its cost)."""
    with_log = report.round_ratios.get("GET /clusters", [])
    without = report.round_ratios.get(LOG_OFF_LABEL, [])
    pairs = [a / b for a, b in zip(with_log, without, strict=False) if b]
    if not pairs:
        return None
    share = median(pairs)
    return share, 1 - share


def measure_deep_probe(load: LoadGenerator, service: Server, deep: Target, args, report: Report) -> None:
    """Deep history pages on half the connections, a health probe on the other half: what a deep page costs others."""
    half = max(1, args.connections // 2)
    probes = []
    for _ in range(args.rounds):
        _, probe = load.run_together(
            (deep, {"connections": half, "seconds": args.duration, "threads": 1}),
            (Target(service.url + "/", "get.lua"), {"connections": half, "seconds": args.duration, "threads": 1}),
        )
        probes.append(probe)
    report.deep_probe = median_result(probes)


def print_report(report: Report, args) -> None:
    print()
    width = max([40, *(len(label) + 2 for label in report.rows)])
    print(f"{'row':<{width}}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'ratio':>8}{'CPU us/req':>12}")
    for label, row in report.rows.items():
        print(
            f"{label:<{width}}{row['rps']:>9,.0f}{row['p50']:>9.1f}{row['p99']:>9.1f}{row['ratio']:>8.2f}"
            f"{row['cpu_us']:>12,.0f}"
        )
    if report.logins is not None:
        print(
            f"{LOGIN_LABEL:<{width}}{report.logins.rps:>9.1f}{report.logins.p50_ms:>9.0f}{report.logins.p99_ms:>9.0f}"
        )
        print(
            f"{PROBE_LABEL:<{width}}{report.probe.rps:>9,.0f}{report.probe.p50_ms:>9.1f}{report.probe.p99_ms:>9.1f}"
            f"{report.probe_ratio:>8.2f}"
        )
    if report.deep_probe is not None:
        deep = report.deep_probe
        print(f"{DEEP_PROBE_LABEL:<{width}}{deep.rps:>9,.0f}{deep.p50_ms:>9.1f}{deep.p99_ms:>9.1f}")
    if report.batch is not None:
        for kind in ("csv", "json"):
            label = f"batch {report.batch['rows']:,}-row CSV, {kind.upper()} back"
            print(f"{label:<{width}}{report.batch[kind]:>8.2f} s")
    for rows, result in report.training:
        label = f"train {rows:,} rows (auto k={result.get('n_clusters', '?')})"
        print(
            f"{label:<{width}}{result['total_seconds']:>8.2f} s  peak RSS {result['peak_rss_mb']:,.0f} MB  (parse + fit)"
        )
    cost = log_cost(report)
    if cost is not None:
        cpu_on, cpu_off = report.rows["GET /clusters"]["cpu_us"], report.rows[LOG_OFF_LABEL]["cpu_us"]
        print(
            f"request log: GET /clusters keeps {cost[0]:.2f} of the req/s it has without it (median over rounds "
            f"of the paired ratios to the bare app); CPU {cpu_on:,.0f} against {cpu_off:,.0f} us/req"
        )
    if "POST /predict" in report.rows:
        short = "" if report.committed >= report.answered else "   <-- FEWER THAN ANSWERED"
        print(
            f"history rows committed during POST /predict: {report.committed:,} "
            f"for {report.answered:,} answered requests{short}"
        )
    if report.service_rss_mb is not None:
        print(f"service peak RSS during the HTTP rows: {report.service_rss_mb:,.0f} MB")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    checks = []
    rows = report.rows

    def ratio_check(label: str, least: float) -> None:
        if label in rows:
            checks.append(
                (f"{label} ratio >= {least:.2f}", rows[label]["ratio"] >= least, f"{rows[label]['ratio']:.2f}")
            )

    ratio_check("POST /predict", 0.35)
    if "POST /predict" in rows:
        checks.append(
            ("POST /predict p99 <= 30 ms", rows["POST /predict"]["p99"] <= 30, f"{rows['POST /predict']['p99']:.1f} ms")
        )
    ratio_check("GET /clusters", 0.60)
    ratio_check("GET /elbow", 0.60)
    ratio_check("GET /history?limit=50", 0.30)
    if cost is not None:
        checks.append(
            (
                f"request log costs <= {LOG_COST_LIMIT:.0%} of GET /clusters req/s",
                cost[1] <= LOG_COST_LIMIT,
                f"{cost[1]:.0%}",
            )
        )
    if DEEP_LABEL in rows and "GET /history?limit=50" in rows:
        first, deep_p50 = rows["GET /history?limit=50"]["p50"], rows[DEEP_LABEL]["p50"]
        checks.append(
            ("deep history page p50 <= 1.5 x first page's", deep_p50 <= 1.5 * first, f"{deep_p50 / first:.2f} x")
        )
    if report.deep_probe is not None:
        p99 = report.deep_probe.p99_ms
        checks.append(("GET / p99 < 50 ms while deep pages are read", p99 < 50, f"{p99:.1f} ms"))
    if report.probe is not None:
        checks.append(
            ("GET / p99 < 50 ms while 16 logins hash", report.probe.p99_ms < 50, f"{report.probe.p99_ms:.1f} ms")
        )
    if report.batch is not None:
        worst = max(report.batch["csv"], report.batch["json"])
        checks.append((f"{report.batch['rows']:,}-row CSV batch < 2 s", worst < 2, f"{worst:.2f} s"))
    if report.training:
        rows_, result = report.training[-1]
        checks.append(
            (f"{rows_:,}-row training < 30 s", result["total_seconds"] < 30, f"{result['total_seconds']:.2f} s")
        )
        checks.append(
            (
                f"{rows_:,}-row training peak RSS < 1.5 GB",
                result["peak_rss_mb"] < 1536,
                f"{result['peak_rss_mb']:,.0f} MB",
            )
        )
    if "POST /predict" in rows:
        checks.append(
            ("every /predict answer has its history row", report.committed >= report.answered, f"{report.committed:,}")
        )
    print()
    print("targets" + (" (quick mode: smaller sizes, one short round; not the real verdict)" if args.quick else ""))
    for name, met, value in checks:
        print(f"  {name:<44}{value:>12}   {'met' if met else 'MISSED'}")
    for failure in report.failures:
        print(f"error: {failure}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (make bench-smoke)")
    parser.add_argument("--rounds", type=int, help="rounds alternating bare app and service")
    parser.add_argument("--duration", type=float, help="seconds per row per round")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="wrk threads (one keeps up with one worker; a second one competes with the "
        "server for the same cores and inflates every p99)",
    )
    parser.add_argument(
        "--database-url",
        help="benchmark on this database instead of a temporary SQLite file (PostgreSQL: its tables are dropped first)",
    )
    parser.add_argument("--python-load", action="store_true", help="use the asyncio load generator, not wrk")
    parser.add_argument("--only", help="measure only the rows whose label contains this text")
    parser.add_argument("--no-variants", action="store_true", help="leave out the middleware and log-level rows")
    parser.add_argument("--skip-extras", action="store_true", help="leave out the login, batch and training rows")
    parser.add_argument("--train-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train_child:
        rows, k, csv = args.train_child
        _train_child(int(rows), int(k) or None, Path(csv))
        return 0

    mode = QUICK if args.quick else FULL
    args.rounds = args.rounds or mode.rounds
    args.duration = args.duration or mode.duration
    load = LoadGenerator(None if args.python_load else ensure_wrk())

    workdir = Path(tempfile.mkdtemp(prefix="segbench-"))
    env = service_env(workdir, args.database_url)
    database = "PostgreSQL" if env["DATABASE_URL"].startswith("postgresql") else "SQLite (WAL, synchronous=NORMAL)"
    print(
        f"Customer Segmentation API benchmark: {mode.name} mode, {load.name}, {args.connections} connections "
        f"on {args.threads} wrk thread(s), "
        f"{args.rounds} round(s) x {args.duration:g} s per row"
    )
    print(
        f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; cpus: {os.cpu_count()}; "
        f"database: {database}"
    )
    print(f"servers: one uvicorn worker each, the flags of `make run`: {' '.join(uvicorn_flags())}")
    print(f"service: the settings of `make run`: {log_settings(env)}; other rows say what they change", flush=True)

    report = Report()
    servers: list[Server] = []
    try:
        prepare_service(env, mode)
        service = Server("service", "app.main:app", env=env, app_dir=ROOT, log=workdir / "service.log")
        servers.append(service)
        bare = Server("bare app", "bare_app:app", env=dict(os.environ), app_dir=BENCH, log=workdir / "bare.log")
        servers.append(bare)
        service.wait_ready()
        bare.wait_ready()
        tokens = set_up_service(service)

        targets: dict[str, tuple[Server, Target]] = {}
        deep_path = deep_history_path(service.url, tokens[READER[0]], min(DEEP_DEPTH, mode.deep_history_rows))
        for label, path, script, owner in ENDPOINTS:
            path = path or deep_path
            targets[label] = (
                service,
                Target(
                    service.url + path,
                    script,
                    token=tokens.get(owner) if owner else None,
                    method="POST" if script == "predict.lua" else "GET",
                    predict=script == "predict.lua",
                ),
            )
        if not args.no_variants:
            for number, (label, path, script, owner, overrides, dropped) in enumerate(VARIANTS):
                variant_env = {**env, **overrides, "BENCH_DROP_MIDDLEWARE": dropped}
                variant = Server(
                    label, "variant_app:app", env=variant_env, app_dir=BENCH, log=workdir / f"variant{number}.log"
                )
                servers.append(variant)
                variant.wait_ready()
                targets[label] = (
                    variant,
                    Target(
                        variant.url + path,
                        script,
                        token=tokens[owner],
                        method="POST" if script == "predict.lua" else "GET",
                        predict=script == "predict.lua",
                    ),
                )
        if args.only:
            targets = {label: target for label, target in targets.items() if args.only in label}
        measure_endpoints(load, bare, targets, lambda: history_total(service.url, tokens[USER[0]]), args, mode, report)
        # The login and batch rows measure the service alone: the other servers stop first.
        for server in [s for s in servers if s is not service]:
            server.stop()
            servers.remove(server)
        if DEEP_LABEL in targets:
            measure_deep_probe(load, service, targets[DEEP_LABEL][1], args, report)
        if not args.skip_extras:
            measure_logins(load, service, args, mode, report)
            report.batch = measure_batch(service, tokens[USER[0]], mode.batch_rows, mode.batch_rounds)
        report.service_rss_mb = service.peak_rss_mb()
        for server in servers:
            server.stop()
        servers.clear()
        if not args.skip_extras:
            report.training = measure_training(mode.train_rows, workdir)
    finally:
        for server in servers:
            server.stop()
    print_report(report, args)
    shutil.rmtree(workdir, ignore_errors=True)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
