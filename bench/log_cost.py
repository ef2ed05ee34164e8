"""What the request log line costs, in CPU time per request, measured inside one process.

    .venv/bin/python bench/log_cost.py                 # GET /clusters, text lines, 10 blocks a side
    .venv/bin/python bench/log_cost.py --format json --path /

`bench/run.py` compares servers under wrk, which a busy machine blurs: its with-log and
without-log rows are different processes measured at different moments. Here one app serves
GET /clusters (with a bearer token and a trained model) straight through ASGI, in blocks that
alternate between the request log on and off (the `app.requests` logger's level, nothing
else changes; on, off, off, on, ...), and each side's figure is the median of its blocks' CPU
time per request.
The lines go to a file, as a worker's stderr usually does. HTTP parsing is left out, so the
share printed is of the app's own work, an upper bound for the share of a served request.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


async def measure(args) -> dict[str, list[float]]:
    import httpx
    from asgi_lifespan import LifespanManager

    from app.core import security as auth
    from app.core.config import Settings
    from app.core.tables import Role
    from app.main import create_app
    from app.users import service as user_service
    from generate_dataset import generate

    home = Path(tempfile.mkdtemp(prefix="logcost-"))
    generate(rows=2000, seed=42).to_csv(home / "customers.csv", index=False)
    settings = Settings(
        _env_file=None,
        secret_key="log-cost-bench-secret-key-long-enough-000",
        database_url=f"sqlite+aiosqlite:///{home / 'bench.db'}",
        model_dir=home / "models",
        data_path=home / "customers.csv",
        bcrypt_rounds=4,
        log_format=args.format,
        log_level="INFO",
    )
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=120, shutdown_timeout=60):
        async with app.state.database.sessionmaker() as session:
            await user_service.create(
                session=session,
                email="logcost@example.com",
                username="logcost",
                full_name="Log Cost",
                hashed_password=auth.hash_password("log-cost-pass-1", 4),
                role=Role.admin,
            )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=300) as http:
            login = await http.post("/auth/login", data={"username": "logcost", "password": "log-cost-pass-1"})
            token = login.json()["access_token"]
            headers = {"Authorization": f"Bearer {token}"}
            (await http.post("/train", params={"n_clusters": 5}, headers=headers)).raise_for_status()
            (await http.get(args.path, headers=headers)).raise_for_status()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": args.path,
            "raw_path": args.path.encode(),
            "query_string": b"",
            "root_path": "",
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }
        request_headers = [(b"host", b"bench"), (b"authorization", f"Bearer {token}".encode())]

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        statuses: list[int] = []

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        async def block(count: int) -> float:
            statuses.clear()
            started = time.process_time()
            for _ in range(count):
                await app({**scope, "headers": list(request_headers)}, receive, send)
            spent = time.process_time() - started
            if set(statuses) != {200}:
                raise SystemExit(f"{args.path} answered {sorted(set(statuses))}")
            return spent / count * 1e6

        requests_logger = logging.getLogger("app.requests")
        await block(args.requests)  # warm-up
        results: dict[str, list[float]] = {"on": [], "off": []}
        for number in range(2 * args.blocks):
            side = "on" if number % 4 in (0, 3) else "off"  # on, off, off, on, ...: neither side always goes first
            requests_logger.setLevel(logging.NOTSET if side == "on" else logging.WARNING)
            results[side].append(await block(args.requests))
        requests_logger.setLevel(logging.NOTSET)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", default="/clusters", help="a GET route (default /clusters)")
    parser.add_argument("--format", choices=["text", "json"], default="text", help="LOG_FORMAT")
    parser.add_argument("--blocks", type=int, default=10, help="blocks a side")
    parser.add_argument("--requests", type=int, default=3000, help="requests a block")
    args = parser.parse_args()
    log_file = tempfile.NamedTemporaryFile("w", prefix="logcost-", suffix=".log", delete=False)  # noqa: SIM115
    real_stderr, sys.stderr = sys.stderr, log_file
    try:
        results = asyncio.run(measure(args))
    finally:
        sys.stderr = real_stderr
        log_file.close()
    lines = sum(1 for line in Path(log_file.name).open() if " app.requests " in line or '"app.requests"' in line)
    on, off = statistics.median(results["on"]), statistics.median(results["off"])
    print(f"GET {args.path}, LOG_FORMAT={args.format}: {args.blocks} blocks of {args.requests:,} requests a side")
    print(f"  request log on : {on:7.1f} us CPU/request (blocks: {min(results['on']):.1f} .. {max(results['on']):.1f})")
    print(
        f"  request log off: {off:7.1f} us CPU/request (blocks: {min(results['off']):.1f} .. {max(results['off']):.1f})"
    )
    print(f"  the line costs {on - off:.1f} us, {(on - off) / on:.1%} of the request; {lines:,} lines written")
    Path(log_file.name).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
