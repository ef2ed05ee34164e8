"""The request log writer (app.core.observability.AccessLog): lines queued by requests, written by a thread.

What an operator relies on: a stream that stops taking writes never holds up a request, lines
that cannot be kept are counted and reported, and a worker that is stopped cleanly (SIGTERM,
as a process manager does) writes every line of the requests it answered before it exits.
Nothing here measures time: each wait polls until a generous deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from app.core.observability import AccessLog, access_log
from tests.conftest import TEST_SECRET

ROOT = Path(__file__).resolve().parent.parent
# A busy machine makes these waits longer; it must not make the tests fail.
DEADLINE_SECONDS = 60


class BlockingStream:
    """A stderr that takes no write until released, and notes which threads tried to write."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()
        self.writers: set[str] = set()
        self.chunks: list[str] = []
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        self.writers.add(threading.current_thread().name)
        self.entered.set()
        self.released.wait(DEADLINE_SECONDS)
        with self._lock:
            self.chunks.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        with self._lock:
            return "".join(self.chunks)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {DEADLINE_SECONDS} s"
        time.sleep(0.02)


def test_a_blocked_stream_holds_up_only_the_writer_and_dropped_lines_are_reported(monkeypatch, caplog):
    access_log.flush()  # the service's own writer has nothing for this stream
    caplog.set_level(logging.WARNING, logger="app.requests")
    stream = BlockingStream()
    monkeypatch.setattr(sys, "stderr", stream)
    log = AccessLog(flush_seconds=0.05, max_pending=5)
    try:
        log.log(logging.INFO, "GET", "/", "/", 200, 0.001, "first", None)
        wait_until(stream.entered.is_set, "the writer thread never wrote")  # it is now stuck in write()
        for number in range(8):
            log.log(logging.INFO, "GET", "/", "/", 200, 0.001, f"queued-{number}", None)
        # Five are kept while the stream is blocked, three are dropped; nothing was written here.
        assert log.dropped == 3
        assert not stream.released.is_set() and stream.writers == {"access-log"}
    finally:
        stream.released.set()
    wait_until(lambda: "queued-4" in stream.text, "the kept lines were not written")
    lines = [line for line in stream.text.splitlines() if " INFO app.requests " in line]
    assert [line.rsplit("request_id=", 1)[1] for line in lines] == ["first", *(f"queued-{n}" for n in range(5))]
    wait_until(lambda: "3 request log lines were dropped" in caplog.text, "the drop was not reported")


@pytest.mark.parametrize("settings_overrides", [{"log_format": "json"}])
async def test_requests_are_answered_while_the_log_stream_is_blocked(client, monkeypatch):
    stream = BlockingStream()
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        assert (await client.get("/", headers={"X-Request-ID": "blocks-the-writer"})).status_code == 200
        await asyncio.to_thread(wait_until, stream.entered.is_set, "the writer thread never wrote")
        for number in range(20):
            response = await client.get("/", headers={"X-Request-ID": f"while-blocked-{number}"})
            assert response.status_code == 200
        # Answered while the stream still took nothing, and no request tried to write to it.
        assert not stream.released.is_set() and stream.writers == {"access-log"}
    finally:
        stream.released.set()
    await asyncio.to_thread(wait_until, lambda: "while-blocked-19" in stream.text, "lines lost")
    logged = [json.loads(line) for line in stream.text.splitlines() if line.startswith("{")]
    ids = [
        line["request_id"]
        for line in logged
        if line["logger"] == "app.requests" and line["request_id"].startswith(("blocks-", "while-blocked-"))
    ]
    assert ids == ["blocks-the-writer", *(f"while-blocked-{n}" for n in range(20))]


def test_flush_writes_every_queued_line_to_the_current_stderr(capsys):
    access_log.flush()
    capsys.readouterr()
    log = AccessLog(flush_seconds=1.0)
    for number in range(3):
        log.log(logging.INFO, "POST", "/predict", "/predict", 200, 0.002, f"now-{number}", 7)
    log.flush()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" app.requests ", 1)[1] for line in lines] == [
        f"POST /predict 200 2.0ms request_id=now-{number} user_id=7" for number in range(3)
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_a_uvicorn_worker_stopped_with_sigterm_writes_every_request_line(tmp_path):
    """Two workers run as `make run` runs them; SIGTERM right after the last answer loses no line.

    The flush interval is the longest allowed (one second), so most lines are still queued when
    the signal comes: they are written at lifespan shutdown.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith(("LOG_", "DATABASE_", "MODEL_"))}
    env.update(
        PYTHONPATH=str(ROOT),
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'log.db'}",
        MODEL_DIR=str(tmp_path / "models"),
        DATA_PATH=str(tmp_path / "customers.csv"),
        SECRET_KEY=TEST_SECRET,
        BCRYPT_ROUNDS="4",
        LOG_FORMAT="json",
        LOG_FLUSH_SECONDS="1.0",
    )
    # The tables first, so the two workers do not both create them.
    subprocess.run(
        [sys.executable, str(ROOT / "create_admin.py"), "--username", "logadmin", "--password", "log-admin-pass-1"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    port = _free_port()
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", "2", "--loop", "uvloop", "--http", "httptools", "--no-access-log"]
    # Without uvicorn's own shutdown lines, which would write the queued lines ahead of themselves:
    # the flush at the end of the lifespan (or at exit) has to.
    command += ["--log-level", "warning"]
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        server = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert server.poll() is None, stderr_path.read_text()
            try:
                return httpx.get(base + "/", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, "uvicorn did not start")
        token = httpx.post(
            base + "/auth/login", data={"username": "logadmin", "password": "log-admin-pass-1"}, timeout=60
        ).json()["access_token"]

        def send(number: int) -> int:
            headers = {"Authorization": f"Bearer {token}", "X-Request-ID": f"stop-{number}"}
            with httpx.Client(base_url=base, timeout=60) as http:  # a connection each: both workers serve
                return http.get("/auth/me", headers=headers).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(send, range(200)))
        assert statuses == [200] * 200
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=DEADLINE_SECONDS) == 0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    output = stderr_path.read_text()
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    logged = [line for line in lines if line["logger"] == "app.requests" and line["request_id"].startswith("stop-")]
    assert sorted(line["request_id"] for line in logged) == sorted(f"stop-{n}" for n in range(200)), output[-3000:]
    assert {(line["route"], line["status"], line["user_id"] is not None) for line in logged} == {
        ("/auth/me", 200, True)
    }


class BrokenStream:
    def write(self, text: str) -> int:
        raise BrokenPipeError("the reader went away")

    def flush(self) -> None:
        pass


def test_a_failing_stream_loses_its_lines_but_not_the_writer(monkeypatch, capsys):
    access_log.flush()
    log = AccessLog(flush_seconds=0.05)
    monkeypatch.setattr(sys, "stderr", BrokenStream())
    log.log(logging.INFO, "GET", "/", "/", 200, 0.001, "lost-1", None)
    wait_until(lambda: log.dropped == 1, "the failed write was not counted")
    monkeypatch.undo()  # stderr is capsys' again
    log.log(logging.INFO, "GET", "/", "/", 200, 0.001, "after-1", None)
    seen = ""

    def written() -> bool:
        nonlocal seen
        seen += capsys.readouterr().err
        return "request_id=after-1" in seen

    wait_until(written, "the writer stopped after a failed write")
    assert "lost-1" not in seen
