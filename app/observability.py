"""Logs and metrics: the logging set-up, one log line per request, Prometheus at /metrics.

Each app has its own `CollectorRegistry` (on `app.state.metrics`), so many apps can live
in one process (the tests make one per test). With several worker processes each
process keeps and reports its own numbers: a scrape of /metrics reaches one of them.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import secrets
import sys
import weakref
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import Scope

from app.config import Settings
from app.errors import Unauthorized

access_logger = logging.getLogger("app.requests")

METRICS_PATH = "/metrics"
UNMATCHED_ROUTE = "unmatched"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")

# The request being served by the current task (also seen by threads it starts).
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)


# --- logging -------------------------------------------------------------------------------

_HANDLER_NAME = "app.observability"
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
    """Writes to whatever `sys.stderr` is at the time, so a replaced stream is followed."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

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


# --- metrics -------------------------------------------------------------------------------

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TRAINING_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
LOGIN_FAILURE_REASONS = {401: "invalid_credentials", 403: "inactive", 429: "throttled"}


class _ActiveModelCollector(Collector):
    """The served model version, read from the model store at scrape time."""

    def __init__(self, app: FastAPI) -> None:
        self._app = weakref.ref(app)

    def collect(self) -> Iterable[Metric]:
        app = self._app()
        store = getattr(app.state, "models", None) if app is not None else None
        served = getattr(store, "current", None)
        yield GaugeMetricFamily(
            "segmentation_model_loaded", "1 when a trained model is being served", value=0 if served is None else 1
        )
        info = InfoMetricFamily(
            "segmentation_model", "The model version being served", labels=["version", "n_clusters"]
        )
        if served is not None:
            info.add_metric([str(served.version), str(served.metadata.get("n_clusters", ""))], {})
        yield info


class Metrics:
    """The service's Prometheus metrics, in a registry of their own. No-ops when disabled."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "http_requests",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Time to serve an HTTP request, by method, route template and status",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.predictions = Counter(
            "segmentation_predictions",
            "Customers assigned to a segment, by segment and kind (single or batch)",
            ["cluster", "cluster_name", "kind"],
            registry=self.registry,
        )
        self.training_runs = Counter(
            "segmentation_training_runs",
            "Training runs in this process by outcome (success, failed, timeout)",
            ["outcome"],
            registry=self.registry,
        )
        self.training_duration = Histogram(
            "segmentation_training_duration_seconds",
            "Time to train a model version (successful runs)",
            buckets=TRAINING_BUCKETS,
            registry=self.registry,
        )
        self.login_failures = Counter(
            "auth_login_failures",
            "Failed logins by reason (invalid_credentials, inactive, throttled)",
            ["reason"],
            registry=self.registry,
        )

        # Labelled children, looked up once: `labels()` takes a lock and builds a key every time.
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._prediction_children: dict[tuple[int, str, str], Any] = {}

    def watch_models(self, app: FastAPI) -> None:
        self.registry.register(_ActiveModelCollector(app))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        if not self.enabled:
            return
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:
            labels = (method, route, str(status))
            children = self._request_children[key] = (self.requests.labels(*labels), self.latency.labels(*labels))
        children[0].inc()
        children[1].observe(seconds)
        if route == "/auth/login" and method == "POST" and status in LOGIN_FAILURE_REASONS:
            self.login_failures.labels(LOGIN_FAILURE_REASONS[status]).inc()

    def count_predictions(self, names: Sequence[str], labels: Any, kind: str) -> None:
        """Count assignments: `labels` is one cluster id or an array of them, `names` the model's names."""
        if not self.enabled:
            return
        if isinstance(labels, (int, np.integer)):
            self._prediction_child(int(labels), names, kind).inc()
            return
        counts = np.bincount(np.atleast_1d(np.asarray(labels, dtype=np.int64)), minlength=len(names))
        for cluster, count in enumerate(counts):
            if count:
                self._prediction_child(cluster, names, kind).inc(int(count))

    def _prediction_child(self, cluster: int, names: Sequence[str], kind: str):
        name = names[cluster] if cluster < len(names) else ""
        key = (cluster, name, kind)
        child = self._prediction_children.get(key)
        if child is None:
            child = self._prediction_children[key] = self.predictions.labels(str(cluster), name, kind)
        return child

    def training_finished(self, outcome: str, seconds: float) -> None:
        if not self.enabled:
            return
        self.training_runs.labels(outcome).inc()
        if outcome == "success":
            self.training_duration.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# --- request ids and route names, for app.middleware.ServiceMiddleware ----------------------


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

    The request log line and the request metrics come from `app.middleware.ServiceMiddleware`.
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
