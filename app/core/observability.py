"""Logs and metrics: the logging set-up, one log line per request, /metrics (app.core.metrics).

The request line does not go through `logging`: `AccessLog` formats it where the request ends
and a thread writes the lines in batches (see there). Every other record goes through logging.

Each app has its own `CollectorRegistry` (on `app.state.metrics`), so many apps can live
in one process (the tests make one per test). With several worker processes each
process keeps and reports its own numbers: a scrape of /metrics reaches one of them.
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections import deque
from contextvars import ContextVar
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as _json_string
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import Scope

from app.core.config import Settings
from app.core.errors import Unauthorized
from app.core.metrics import Metrics

access_logger = logging.getLogger("app.requests")

METRICS_PATH = "/metrics"
UNMATCHED_ROUTE = "unmatched"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")

# The request being served by the current task (also seen by threads it starts).
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)


# --- logging -------------------------------------------------------------------------------

_HANDLER_NAME = "app.core.observability"
# Defence in depth: whatever a message carries, a JWT or a bcrypt hash never reaches the log.
_SECRET_PATTERNS = (
    (re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]+"), "[redacted-token]"),
    (re.compile(r"\$2[abxy]?\$\d{2}\$[./A-Za-z0-9]{20,}"), "[redacted-hash]"),
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"), r"\1[redacted]"),
)


def redact(text: str) -> str:
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RequestContextFilter(logging.Filter):
    """Stamps every record with the id of the request it was logged in (None outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return True


class TextFormatter(logging.Formatter):
    """`2025-01-31 12:00:00,123 INFO app.requests POST /predict 200 4.1ms request_id=... user_id=3`"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        suffix = []
        request_id = getattr(record, "request_id", None)
        if request_id:
            suffix.append(f"request_id={request_id}")
        user_id = (getattr(record, "fields", None) or {}).get("user_id")
        if user_id is not None:
            suffix.append(f"user_id={user_id}")
        if suffix:
            first, newline, rest = line.partition("\n")
            line = f"{first} {' '.join(suffix)}{newline}{rest}"
        return redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return redact(json.dumps(entry, default=str))


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time, so a replaced stream is followed.

    The request lines still waiting in `access_log` go out first: a traceback and the line of
    the request that raised it stay in the order they happened.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        access_log.flush(wait=False)
        super().emit(record)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(settings: Settings) -> None:
    """The one place logging is set up: a stderr handler on the root logger, text or JSON.

    Safe to call again (each app does): it replaces its own handler instead of adding one.
    The `app.*` loggers log at LOG_LEVEL; other libraries keep to warnings and above.
    """
    level = logging.getLevelName(settings.log_level.strip().upper())
    if not isinstance(level, int):
        raise ValueError(f"LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not {settings.log_level!r}")

    handler = _StderrHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    access_log.json_format = settings.log_format == "json"
    access_log.flush_seconds = settings.log_flush_seconds
    handler.addFilter(RequestContextFilter())

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > max(level, logging.WARNING):
        root.setLevel(max(level, logging.WARNING))
    logging.getLogger("app").setLevel(level)

    # Under uvicorn its own start-up and error lines use the same format. Its access log
    # repeats our request line without the request id: run uvicorn with --no-access-log.
    server = logging.getLogger("uvicorn")
    if server.handlers:
        server.handlers = [handler]


# --- the request log line ------------------------------------------------------------------

# How often the writer thread empties the queue of request lines (LOG_FLUSH_SECONDS).
ACCESS_FLUSH_SECONDS = 0.2
# Lines kept while the stream does not take them; past this, lines are dropped and counted.
ACCESS_MAX_PENDING = 20_000
# How long the last flush at exit waits for a writer stuck on a blocked stream.
ACCESS_EXIT_TIMEOUT_SECONDS = 5.0


def _clean(value: str) -> str:
    """`redact(value)`, skipped for values in which none of the secret patterns can start."""
    if "eyJ" in value or "$2" in value or " " in value or not value.isprintable():
        return redact(value)
    return value


class AccessLog:
    """The one line per request: formatted where the request ends, written by a thread in batches.

    Through `logging` each request paid for a record, the filters, a handler lock, a formatter
    and a write with its flush; here it pays for one string and an append to a queue. A daemon
    thread writes the queue to `sys.stderr` every LOG_FLUSH_SECONDS, at lifespan end (from
    ServiceMiddleware) and at exit, so a clean stop loses no line. A blocked stream holds up that
    thread, never a request: past ACCESS_MAX_PENDING lines waiting, new ones are dropped, and how
    many is logged once the stream takes writes again. The lines have the fields, formats and
    redaction of `TextFormatter` and `JsonFormatter`.
    """

    def __init__(
        self,
        *,
        json_format: bool = False,
        flush_seconds: float = ACCESS_FLUSH_SECONDS,
        max_pending: int = ACCESS_MAX_PENDING,
        logger_name: str = "app.requests",
    ) -> None:
        self.json_format = json_format
        self.flush_seconds = flush_seconds
        self.max_pending = max_pending
        self.logger_name = logger_name
        self._json_logger = _json_string(logger_name)
        self.dropped = 0
        self._reported_dropped = 0
        self._pending: deque[str] = deque()
        # (second, text stamp, JSON stamp): formatting a time costs more than the rest of a line.
        self._stamps: tuple[int, str, str] = (-1, "", "")
        self._reset()

    def _reset(self) -> None:
        # Also the state of a forked child: the parent's thread and locks do not come along.
        self._pending.clear()
        self._write_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def log(
        self,
        level: int,
        method: str,
        route: str,
        path: str,
        status: int,
        seconds: float,
        request_id: str | None,
        user_id: object,
    ) -> None:
        """Queue the line of one finished request; the caller has checked that `level` is enabled."""
        now = time.time()
        second = int(now)
        stamps = self._stamps
        if stamps[0] != second:
            stamps = self._stamps = _stamps_for(second)
        millis = int((now - second) * 1000)
        duration_ms = round(seconds * 1000, 1)
        level_name = logging.getLevelName(level)
        request_id = _clean(request_id) if request_id else None
        if self.json_format:
            message = f"{method} {route} {status} {duration_ms:.1f}ms"
            line = (
                f'{{"time": "{stamps[2]}.{millis:03d}+00:00", "level": "{level_name}", '
                f'"logger": {self._json_logger}, "message": {_json_string(message)}, '
                + (f'"request_id": {_json_string(request_id)}, ' if request_id else "")
                + f'"method": {_json_string(method)}, "route": {_json_string(route)}, '
                f'"path": {_json_string(_clean(path))}, "status": {status}, "duration_ms": {duration_ms!r}, '
                f'"user_id": {_json_value(user_id)}}}\n'
            )
        else:
            line = (
                f"{stamps[1]},{millis:03d} {level_name} {self.logger_name} {method} {route} {status} "
                f"{duration_ms:.1f}ms"
                + (f" request_id={request_id}" if request_id else "")
                + ("" if user_id is None else f" user_id={_clean(str(user_id))}")
                + "\n"
            )
        pending = self._pending
        if len(pending) < self.max_pending:
            pending.append(line)
        else:
            self.dropped += 1
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.flush_seconds)
            self.flush()

    def flush(self, *, wait: bool = True, timeout: float = -1) -> bool:
        """Write every line queued so far. False when another flush holds the stream and `wait` is off."""
        if not self._write_lock.acquire(wait, timeout if wait else -1):
            return False
        try:
            pending = self._pending
            count = len(pending)
            if count:
                text = "".join([pending.popleft() for _ in range(count)])
                stream = sys.stderr
                try:
                    if stream is None:
                        raise ValueError("no stderr")
                    stream.write(text)
                    stream.flush()
                except Exception:  # a failing stream must not stop the writer: the lines are counted as lost
                    self.dropped += count
                    return True
            dropped = self.dropped - self._reported_dropped
        finally:
            self._write_lock.release()
        if dropped:
            self._reported_dropped += dropped
            logging.getLogger(self.logger_name).warning(
                "%d request log lines were dropped: the log stream did not take them in time", dropped
            )
        return True


def _stamps_for(second: int) -> tuple[int, str, str]:
    """The times of `TextFormatter` (local, as logging's asctime) and `JsonFormatter` (UTC), to the second."""
    text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
    utc = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return second, text, utc


def _json_value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _json_string(_clean(str(value)))


access_log = AccessLog()
os.register_at_fork(after_in_child=access_log._reset)


@atexit.register
def _flush_access_log_at_exit() -> None:
    access_log.flush(timeout=ACCESS_EXIT_TIMEOUT_SECONDS)


# --- metrics -------------------------------------------------------------------------------


class _RequestIds:
    """Request ids: 16 random hex digits per process, then a counter (32 hex digits in all).

    As unique as a uuid4 for this purpose and far cheaper: no system call per request. A forked
    worker draws its own random part.
    """

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


_request_ids = _RequestIds()
os.register_at_fork(after_in_child=_request_ids.reseed)
new_request_id = _request_ids.next


def sane_request_id(value: str | None) -> str | None:
    if value is not None and _SANE_REQUEST_ID.fullmatch(value):
        return value
    return None


def route_template(scope: Scope, outer_root_path: str) -> str:
    """The path template that matched (`/profiles/{profile_id}`), never the raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    if scope.get("endpoint") is not None:
        # A mounted app (the docs assets): its prefix is what the mount added to root_path.
        prefix = scope.get("root_path", "")[len(outer_root_path) :]
        if prefix:
            return prefix + "/{path}"
    return UNMATCHED_ROUTE


def install_observability(app: FastAPI, settings: Settings) -> Metrics:
    """The app's metrics and, unless METRICS_ENABLED=false, the /metrics endpoint.

    The request log line and the request metrics come from `app.core.middleware.ServiceMiddleware`.
    """
    metrics = Metrics(enabled=settings.metrics_enabled)
    app.state.metrics = metrics
    if not settings.metrics_enabled:
        return metrics
    metrics.watch_models(app)

    token = settings.metrics_token.encode()

    @app.get(METRICS_PATH, include_in_schema=False)
    async def prometheus_metrics(request: Request) -> Response:
        if token:
            scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(credentials.strip().encode(), token):
                raise Unauthorized("GET /metrics needs the metrics token (METRICS_TOKEN) as a bearer token")
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return metrics
