"""The event loop `make run` serves on (app.serving): uvloop that accepts a burst of connections at once.

Here the loop is driven directly, to count its passes; tests/test_multiprocess.py serves the
whole app on it through uvicorn, as `make run` does.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable

import pytest

from app import serving

pytest.importorskip("uvloop", reason="uvloop is not installed on this platform: app.serving is asyncio's loop")


# Generous: a busy machine slows these tests down, it must not fail them.
DEADLINE_SECONDS = 60


class Recorder(asyncio.Protocol):
    made: list[int] = []
    passes = 0
    on_made: Callable[[], None] | None = None

    def connection_made(self, transport):
        Recorder.made.append(Recorder.passes)
        transport.write(b"hello")
        if Recorder.on_made is not None:
            Recorder.on_made()


async def connections_made(count: int) -> None:
    """Return once `count` connections are made, or after DEADLINE_SECONDS (the caller checks)."""
    enough = asyncio.Event()

    def check() -> None:
        if len(Recorder.made) >= count:
            enough.set()

    Recorder.on_made = check
    check()
    try:
        await asyncio.wait_for(enough.wait(), DEADLINE_SECONDS)
    except TimeoutError:
        pass
    finally:
        Recorder.on_made = None

    def data_received(self, data):
        pass


def count_passes(loop: asyncio.AbstractEventLoop) -> None:
    Recorder.passes += 1
    loop.call_soon(count_passes, loop)


def connect_while_busy(port: int, clients: int, opened: list[socket.socket], ready: threading.Event) -> None:
    for _ in range(clients):
        opened.append(socket.create_connection(("127.0.0.1", port)))  # the kernel completes the handshake
    ready.set()


def test_connections_that_arrive_while_the_loop_is_busy_are_accepted_in_one_pass():
    """60 clients connect while a pass of the loop is busy; all are served within a few passes.

    uvloop's own server (libuv 1.45 and later) accepts one connection per pass, so the last of
    them would wait 60 passes: on a loaded worker, 60 times the time it takes to answer every
    request that is ready.
    """
    clients = 60
    loop = serving.new_event_loop()
    opened: list[socket.socket] = []
    Recorder.made, Recorder.passes = [], 0
    try:
        server = loop.run_until_complete(loop.create_server(Recorder, "127.0.0.1", 0, backlog=128))
        port = server.sockets[0].getsockname()[1]
        ready = threading.Event()
        client_thread = threading.Thread(target=connect_while_busy, args=(port, clients, opened, ready))

        def busy_pass() -> None:  # one long pass: the clients connect during it
            client_thread.start()
            assert ready.wait(DEADLINE_SECONDS)
            loop.call_soon(count_passes, loop)

        loop.call_soon(busy_pass)
        loop.run_until_complete(connections_made(clients))
        assert len(Recorder.made) == clients
        assert max(Recorder.made) <= 5, Recorder.made
        for client in opened:  # and every one of them is a working connection
            client.settimeout(5)
            assert client.recv(5) == b"hello"
        server.close()
        loop.run_until_complete(server.wait_closed())
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
    finally:
        for client in opened:
            client.close()
        loop.close()


def test_running_out_of_file_descriptors_pauses_accepting_then_serves_the_waiting_client(monkeypatch):
    """EMFILE on accept: the error is logged, accepting resumes after ACCEPT_RETRY_SECONDS, nobody is dropped."""
    monkeypatch.setattr(serving, "ACCEPT_RETRY_SECONDS", 0.2)
    loop = serving.new_event_loop()
    Recorder.made, Recorder.passes = [], 0
    failures = []
    real_accept = socket.socket.accept

    def accept_out_of_descriptors(self):
        if not failures:
            failures.append(time.monotonic())
            raise OSError(24, "Too many open files")
        return real_accept(self)

    monkeypatch.setattr(socket.socket, "accept", accept_out_of_descriptors)
    client = None
    try:
        server = loop.run_until_complete(loop.create_server(Recorder, "127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        loop.run_until_complete(connections_made(1))
        assert Recorder.made and failures
        assert time.monotonic() - failures[0] >= 0.2
        client.settimeout(5)
        assert client.recv(5) == b"hello"
        server.close()
        loop.run_until_complete(server.wait_closed())
    finally:
        if client is not None:
            client.close()
        loop.close()


def test_a_server_created_without_serving_is_uvloops_own_and_not_listening():
    loop = serving.new_event_loop()
    try:
        server = loop.run_until_complete(loop.create_server(Recorder, "127.0.0.1", 0, start_serving=False))
        assert not isinstance(server, serving.BurstAcceptServer) and not server.is_serving()
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
        loop.run_until_complete(server.start_serving())
        Recorder.made = []
        with socket.create_connection(("127.0.0.1", port), timeout=2) as client:
            loop.run_until_complete(asyncio.sleep(0.1))
            assert len(Recorder.made) == 1 and client.recv(5) == b"hello"
        server.close()
        loop.run_until_complete(server.wait_closed())
    finally:
        loop.close()
