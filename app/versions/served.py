"""The model version a worker serves, with what is derived from it once (summaries, charts)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from app.core.tables import DEFAULT_SEGMENTATION_KIND
from app.ml import SegmentationModel
from app.ml.preprocess import features_matrix


class ServedModel:
    """One loaded model version, never changed once made: a request that took it sees one version."""

    def __init__(self, model: SegmentationModel) -> None:
        self.model = model
        self.version: str = model.version
        self.metadata: dict[str, Any] = model.metadata_
        self.kind: str = str(model.metadata_.get("kind") or DEFAULT_SEGMENTATION_KIND)
        self.segments: list[dict[str, Any]] = model.metadata_["segments"]
        self.names: tuple[str, ...] = model.cluster_names_
        self._charts: dict[str, str] | None = None
        self._charts_lock = asyncio.Lock()
        self._responses: dict[str, bytes] = {}
        self._drawn: dict[str, str] = {}

    def response_json(self, name: str, build: Callable[[], BaseModel], *, exclude_none: bool = False) -> bytes:
        """A response body that only depends on this version, serialized on first use."""
        body = self._responses.get(name)
        if body is None:
            body = self._responses[name] = build().model_dump_json(exclude_none=exclude_none).encode()
        return body

    def predict_matrix(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.model.predict_with_confidence(features)

    def assign(self, records: Sequence[Any]) -> list[tuple[int, str, float]]:
        """(cluster, cluster_name, confidence) for objects or dicts carrying the customer features."""
        if len(records) == 1:
            return [self.model.predict_one(records[0])]
        labels, confidence = self.model.predict_with_confidence(features_matrix(records))
        return [(int(c), self.names[int(c)], float(p)) for c, p in zip(labels, confidence, strict=True)]

    def assign_declared(self, records: Sequence[Mapping[str, Any]]) -> list[tuple[int, str, float, list[str]]]:
        """(cluster, cluster_name, confidence, warnings) for records of a declared (custom) schema."""
        if len(records) == 1:
            one = self.model.score_one(records[0])
            if one is not None:
                return [(one[0], self.names[one[0]], one[1], one[2])]
        scored = self.model.score_records(records)
        return [
            (int(c), self.names[int(c)], float(p), list(w))
            for c, p, w in zip(scored.labels.tolist(), scored.confidence.tolist(), scored.warnings, strict=True)
        ]

    def segment_details(self) -> list[dict[str, Any]]:
        """Each segment with `means`, `segment_key` and `generated_name`, also for versions saved without them."""
        details = []
        for segment in self.segments:
            entry = dict(segment)
            if "means" not in entry and "avg_age" in entry:
                entry["means"] = {
                    "age": entry["avg_age"],
                    "annual_income": entry["avg_income"],
                    "spending_score": entry["avg_spending_score"],
                    "purchase_frequency": entry["avg_purchase_frequency"],
                }
            entry.setdefault("segment_key", f"{self.version}-{entry['cluster_id']}")
            entry.setdefault("generated_name", entry["cluster_name"])
            details.append(entry)
        return details

    async def drawn(self, name: str, draw: Callable[[], str]) -> str:
        """A chart of this version (a data URI), drawn in a worker thread on first use and kept."""
        async with self._charts_lock:
            chart = self._drawn.get(name)
            if chart is None:
                chart = self._drawn[name] = await run_in_threadpool(draw)
        return chart

    async def charts(self) -> dict[str, str]:
        async with self._charts_lock:
            if self._charts is None:
                from app.charts import render_cluster_charts

                pngs = await run_in_threadpool(render_cluster_charts, self.model)
                self._charts = {name: data_uri(png) for name, png in pngs.items()}
        return self._charts


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
