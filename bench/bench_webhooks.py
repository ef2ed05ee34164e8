"""Benchmark webhook deliveries: 10,000 queued messages drained to a local receiver.

    .venv/bin/python bench/bench_webhooks.py                 # 10,000 messages, SQLite
    .venv/bin/python bench/bench_webhooks.py --messages 2000 # fewer (the smoke run)
    .venv/bin/python bench/bench_webhooks.py --database-url postgresql+asyncpg://...  # tables dropped first

The service runs in this process (httpx over ASGI for its API, a fresh SQLite database in a temporary
folder), its delivery worker as `make run` starts it (WEBHOOK_CONCURRENCY, WEBHOOK_POLL_SECONDS at
their defaults). The receiver is a uvicorn server in a subprocess that checks every signature with the
`standardwebhooks` package and counts what it got. The messages are queued with the worker stopped,
through the outbox every domain uses (app.state.events); then the worker starts and the clock runs
until every delivery is `delivered`. The baseline row is the same number of POSTs sent to the same
receiver by a plain httpx client at the same concurrency, unsigned and unrecorded: what the worker
adds is the database, the signing and the address checks. Target: < 60 s for 10,000.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from asgi_lifespan import LifespanManager
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Importing app.main reads the settings of the environment; without a key they would write one to disk.
os.environ.setdefault("SECRET_KEY", "bench-secret-key-that-is-long-enough-0000000")

from app.core import security as auth  # noqa: E402
from app.core.config import Settings  # noqa: E402
from app.core.tables import Role  # noqa: E402
from app.main import create_app  # noqa: E402
from app.users import service as user_service  # noqa: E402
from app.webhooks.tables import WebhookDelivery  # noqa: E402

TARGET_SECONDS = 60.0
PASSWORD = "bench-password-42"
QUEUE_BATCH = 500


# --- the receiver (a subprocess: `bench_webhooks.py --receiver PORT SECRET`) ---------------------


def receiver_app(secret: str):
    from standardwebhooks import Webhook

    verifier = Webhook(secret)
    counts = {"verified": 0, "rejected": 0, "ids": set()}

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        if scope["method"] == "GET":
            answer = json.dumps({k: len(v) if isinstance(v, set) else v for k, v in counts.items()}).encode()
        else:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            try:
                verifier.verify(body, headers)
                counts["verified"] += 1
                counts["ids"].add(headers.get("webhook-id"))
            except Exception:  # noqa: BLE001 - any failure to verify counts as rejected
                counts["rejected"] += 1
            answer = b"ok"
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(answer))]}
        )
        await send({"type": "http.response.body", "body": answer})

    return app


def serve_receiver(port: int, secret: str) -> None:
    import uvicorn

    uvicorn.run(receiver_app(secret), host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --- the run ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def admin_headers(app, http: httpx.AsyncClient) -> dict[str, str]:
    async with app.state.database.sessionmaker() as session:
        await user_service.create(
            session=session,
            email="bench@example.com",
            username="bench",
            full_name="Bench",
            hashed_password=auth.hash_password(PASSWORD, 4),
            role=Role.admin,
        )
    response = await http.post("/auth/login", data={"username": "bench", "password": PASSWORD})
    response.raise_for_status()
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def start_receiver(port: int, secret: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, __file__, "--receiver", str(port), secret], cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1, trust_env=False)
            return process
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the receiver did not start")


async def baseline(port: int, n: int, concurrency: int) -> float:
    """n plain POSTs to the receiver from `concurrency` senders (they count as rejected there: unsigned)."""
    body = json.dumps({"type": "run.completed", "timestamp": "2026-12-09T10:00:00+00:00", "data": {"n": 0}}).encode()
    left = iter(range(n))
    async with httpx.AsyncClient(trust_env=False, limits=httpx.Limits(max_connections=concurrency)) as http:

        async def sender() -> None:
            for _ in left:
                (await http.post(f"http://127.0.0.1:{port}/hook", content=body)).raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(concurrency)))
        return time.perf_counter() - started


async def delivered(app) -> int:
    async with app.state.database.sessionmaker() as session:
        return (
            await session.execute(
                select(func.count()).select_from(WebhookDelivery).where(WebhookDelivery.status == "delivered")
            )
        ).scalar_one()


async def main_async(args) -> int:
    folder = Path(tempfile.mkdtemp(prefix="bench-webhooks-"))
    url = args.database_url or f"sqlite+aiosqlite:///{folder / 'bench.db'}"
    if args.database_url:
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(url)
        async with engine.begin() as conn:
            await conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
            await conn.exec_driver_sql("CREATE SCHEMA public")
        await engine.dispose()
    settings = Settings(
        _env_file=None,
        database_url=url,
        secret_key=os.environ["SECRET_KEY"],
        model_dir=folder / "models",
        bcrypt_rounds=4,
        webhook_allow_private=True,
        log_level="WARNING",
        metrics_enabled=False,
    )
    app = create_app(settings)
    port = free_port()
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
            headers = await admin_headers(app, http)
            hook = await http.post(
                "/webhooks",
                json={"url": f"http://127.0.0.1:{port}/hook", "events": ["run.completed"]},
                headers=headers,
            )
            hook.raise_for_status()
            receiver = start_receiver(port, hook.json()["secret"])
            try:
                base = await baseline(port, args.messages, settings.webhook_concurrency)
                await app.state.deliveries.stop()
                queued_at = time.perf_counter()
                for start in range(0, args.messages, QUEUE_BATCH):
                    async with app.state.database.sessionmaker() as session:
                        for n in range(start, min(start + QUEUE_BATCH, args.messages)):
                            await app.state.events.add(session, "run.completed", {"run_id": n, "n_customers": n})
                        await session.commit()
                queue_seconds = time.perf_counter() - queued_at
                started = time.perf_counter()
                await app.state.deliveries.start()
                while await delivered(app) < args.messages:
                    await asyncio.sleep(0.1)
                    if time.perf_counter() - started > 20 * TARGET_SECONDS:
                        break
                seconds = time.perf_counter() - started
                async with httpx.AsyncClient(trust_env=False) as plain:
                    counts = (await plain.get(f"http://127.0.0.1:{port}/")).json()
            finally:
                receiver.terminate()
                receiver.wait()
    n, distinct = args.messages, counts["ids"]
    print(f"webhook deliveries, {n:,} queued messages to a local receiver ({settings.webhook_concurrency} at a time):")
    print(f"  {'queueing (outbox, 500 a transaction)':<44}{queue_seconds:>9.2f} s")
    print(f"  {'baseline: plain httpx POSTs':<44}{base:>9.2f} s {n / base:>9,.0f}/s")
    print(
        f"  {'delivered, signed and recorded':<44}{seconds:>9.2f} s {n / seconds:>9,.0f}/s   {seconds / base:.1f} x baseline"
    )
    print(f"  receiver: {counts['verified']:,} signatures verified, {distinct:,} distinct message ids")
    met = seconds < TARGET_SECONDS * n / 10_000 and distinct == n
    print(f"target: {n:,} delivered < {TARGET_SECONDS * n / 10_000:.0f} s   {'met' if met else 'MISSED'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--database-url", help="benchmark on this database (PostgreSQL: its tables are dropped first)")
    parser.add_argument("--receiver", nargs=2, metavar=("PORT", "SECRET"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.receiver:
        serve_receiver(int(args.receiver[0]), args.receiver[1])
        return 0
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
