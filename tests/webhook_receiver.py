"""A real HTTP receiver for webhook tests: a threading http.server on 127.0.0.1 that keeps every request.

Each path answers as `answers[path]` says: a status, or a list of statuses used up one per request
(the last one then repeats). `/redirect` answers 302 to `/ok`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    def __init__(self, port: int = 0) -> None:
        self.requests: list[Received] = []
        self.answers: dict[str, int | list[int]] = {}
        self.long_error_body = False
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                status = receiver._answer(self.path, Received(self.path, dict(self.headers.items()), body))
                payload = b"x" * 2000 if status >= 300 and receiver.long_error_body else b"ok"
                self.send_response(status)
                if self.path == "/redirect":
                    self.send_header("Location", "/ok")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client closing its kept-alive connection is no news here

        self.server = Server(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _answer(self, path: str, request: Received) -> int:
        with self._lock:
            self.requests.append(request)
            if path == "/redirect":
                return 302
            answer = self.answers.get(path, 200)
            if isinstance(answer, list):
                return answer.pop(0) if len(answer) > 1 else answer[0]
            return answer

    def url(self, path: str = "/ok") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def received(self, path: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if path is None or r.path == path]

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
