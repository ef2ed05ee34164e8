"""Prometheus metrics of one app: its own CollectorRegistry, served at /metrics (app.core.observability).

Each app has its own registry (on `app.state.metrics`), so many apps can live in one process (the
tests make one per test). With several worker processes each process keeps and reports its own
numbers: a scrape of /metrics reaches one of them.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

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
            "segmentation_model",
            "The model version each segmentation serves",
            labels=["version", "n_clusters", "segmentation"],
        )
        registry = getattr(app.state, "segmentations", None) if app is not None else None
        stores = registry.stores() if registry is not None else [store] if store is not None else []
        for each in stores:
            current = each.current
            if current is not None:
                info.add_metric(
                    [str(current.version), str(current.metadata.get("n_clusters", "")), each.segmentation.name], {}
                )
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
            "Customers assigned to a segment, by segment, kind (single or batch) and segmentation",
            ["cluster", "cluster_name", "kind", "segmentation"],
            registry=self.registry,
        )
        self.training_runs = Counter(
            "segmentation_training_runs",
            "Training runs in this process by outcome (success, failed, timeout) and segmentation",
            ["outcome", "segmentation"],
            registry=self.registry,
        )
        self.training_duration = Histogram(
            "segmentation_training_duration_seconds",
            "Time to train a model version (successful runs), by segmentation",
            ["segmentation"],
            buckets=TRAINING_BUCKETS,
            registry=self.registry,
        )
        self.feature_psi = Gauge(
            "segmentation_feature_psi",
            "Population stability index of each clustering feature of the active version, since its activation",
            ["segmentation", "feature"],
            registry=self.registry,
        )
        self.policy_last_outcome = Gauge(
            "segmentation_policy_last_outcome",
            "Each retraining policy's last outcome: 1 on the label of its outcome (activated, held, failed, none)",
            ["segmentation", "outcome"],
            registry=self.registry,
        )
        self.policy_next_fire = Gauge(
            "segmentation_policy_next_fire_timestamp",
            "When each retraining policy's schedule fires next (Unix seconds; absent without a schedule)",
            ["segmentation"],
            registry=self.registry,
        )
        self.training_jobs = Counter(
            "segmentation_training_jobs",
            "Training jobs (wait=false) ended in this process, by outcome (succeeded, failed, cancelled) and "
            "segmentation",
            ["outcome", "segmentation"],
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
        self._prediction_children: dict[tuple[int, str, str, str], Any] = {}

    def set_policies(self, policies: list[tuple[str, str | None, float | None]]) -> None:
        """The policy gauges from every policy's (segmentation, last outcome, next fire timestamp)."""
        if not self.enabled:
            return
        self.policy_last_outcome.clear()
        self.policy_next_fire.clear()
        for segmentation, outcome, next_fire in policies:
            for label in ("activated", "held", "failed", "none"):
                self.policy_last_outcome.labels(segmentation, label).set(1 if (outcome or "none") == label else 0)
            if next_fire is not None:
                self.policy_next_fire.labels(segmentation).set(next_fire)

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

    def count_predictions(self, names: Sequence[str], labels: Any, kind: str, segmentation: str = "default") -> None:
        """Count assignments: `labels` is one cluster id or an array of them, `names` the model's names."""
        if not self.enabled:
            return
        if isinstance(labels, (int, np.integer)):
            self._prediction_child(int(labels), names, kind, segmentation).inc()
            return
        counts = np.bincount(np.atleast_1d(np.asarray(labels, dtype=np.int64)), minlength=len(names))
        for cluster, count in enumerate(counts):
            if count:
                self._prediction_child(cluster, names, kind, segmentation).inc(int(count))

    def _prediction_child(self, cluster: int, names: Sequence[str], kind: str, segmentation: str):
        name = names[cluster] if cluster < len(names) else ""
        key = (cluster, name, kind, segmentation)
        child = self._prediction_children.get(key)
        if child is None:
            child = self._prediction_children[key] = self.predictions.labels(str(cluster), name, kind, segmentation)
        return child

    def training_finished(self, outcome: str, seconds: float, segmentation: str = "default") -> None:
        if not self.enabled:
            return
        self.training_runs.labels(outcome, segmentation).inc()
        if outcome == "success":
            self.training_duration.labels(segmentation).observe(seconds)

    def drift_computed(self, segmentation: str, features: Sequence[dict[str, Any]]) -> None:
        """Set segmentation_feature_psi from a drift report's `features` (those with a PSI)."""
        if not self.enabled:
            return
        for feature in features:
            if feature.get("psi") is not None:
                self.feature_psi.labels(segmentation, feature["feature"]).set(feature["psi"])

    def training_job_finished(self, outcome: str, segmentation: str = "default") -> None:
        if self.enabled:
            self.training_jobs.labels(outcome, segmentation).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# --- request ids and route names, for app.core.middleware.ServiceMiddleware ----------------------
