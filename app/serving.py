"""The event loop the service runs on: uvloop, accepting a burst of new connections at once.

`uvicorn app.main:app --loop app.serving:new_event_loop` (what `make run` does).

libuv, under uvloop, accepts one connection per pass of the event loop since 1.45. On a busy
worker a pass takes as long as answering every request that is ready, so clients connecting at
once to a loaded worker were accepted one pass apart, the last after hundreds of milliseconds
(docs/performance.md tells how it was found). asyncio's own loop accepts all that are waiting but
answers fewer requests a second. This loop is
uvloop with the listening socket read the asyncio way: each time it is readable, every waiting
connection (up to ACCEPTS_PER_WAKEUP) is accepted and handed to uvloop as an accepted socket.
TLS servers (uvicorn's --ssl-*) and Unix sockets keep uvloop's own accept.

Without uvloop (it is not built for Windows) this is asyncio's default loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("app.serving")

# Connections accepted per wake-up of the listening socket; more stay queued in the kernel for
# the next pass, so with several workers on one socket no worker takes a whole burst.
ACCEPTS_PER_WAKEUP = 64
# Out of file descriptors or kernel memory: accepting pauses this long, as asyncio's does.
ACCEPT_RETRY_SECONDS = 1.0
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class BurstAcceptServer:
    """An `asyncio.Server` whose listening sockets are accepted from by the loop's readers.

    The sockets are bound and set up by uvloop's own `create_server` (not started), so the
    addresses, options and `close()` are uvloop's; only the accepting is done here.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        server: asyncio.Server,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        backlog: int,
    ) -> None:
        self._loop = loop
        self._server = server
        self._protocol_factory = protocol_factory
        self._listeners: list[socket.socket] = []
        for bound in server.sockets:
            listener = socket.socket(bound.family, bound.type, bound.proto, fileno=os.dup(bound.fileno()))
            listener.setblocking(False)
            listener.listen(backlog)
            self._listeners.append(listener)
            loop.add_reader(listener.fileno(), self._accept, listener)

    @property
    def sockets(self) -> tuple:
        return self._server.sockets

    def is_serving(self) -> bool:
        return bool(self._listeners)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                connection, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                logger.error("cannot accept connections (%s); trying again in %.0f s", exc, ACCEPT_RETRY_SECONDS)
                self._loop.remove_reader(listener.fileno())
                self._loop.call_later(ACCEPT_RETRY_SECONDS, self._resume, listener)
                return
            connection.setblocking(False)
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._loop.create_task(self._serve(connection))

    def _resume(self, listener: socket.socket) -> None:
        if listener in self._listeners:
            self._loop.add_reader(listener.fileno(), self._accept, listener)

    async def _serve(self, connection: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._protocol_factory, connection)
        except OSError:  # the client left before its transport was set up
            connection.close()

    def close(self) -> None:
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            self._loop.remove_reader(listener.fileno())
            listener.close()
        self._server.close()

    async def wait_closed(self) -> None:
        await self._server.wait_closed()

    async def start_serving(self) -> None:  # serving started in __init__
        return None

    async def serve_forever(self) -> None:
        await self._loop.create_future()

    async def __aenter__(self) -> BurstAcceptServer:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.close()
        await self.wait_closed()


try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is not built for Windows
    HAVE_UVLOOP = False
else:
    HAVE_UVLOOP = True


if HAVE_UVLOOP:

    class ServiceLoop(uvloop.Loop):
        async def create_server(
            self, protocol_factory, host=None, port=None, *, ssl=None, backlog=100, start_serving=True, **kwargs
        ):
            server = await super().create_server(
                protocol_factory, host, port, ssl=ssl, backlog=backlog, start_serving=False, **kwargs
            )
            if ssl is not None or not start_serving:
                if start_serving:
                    await server.start_serving()
                return server
            return BurstAcceptServer(self, server, protocol_factory, backlog)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The loop factory uvicorn's `--loop app.serving:new_event_loop` calls."""
    if not HAVE_UVLOOP:  # pragma: no cover
        return asyncio.new_event_loop()
    return ServiceLoop()
