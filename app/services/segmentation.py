"""Segmentation work the routes ask for: training data, batch scoring, summaries, the elbow."""
from __future__ import annotations

import asyncio
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from fastapi import UploadFile
from starlette.concurrency import run_in_threadpool

from app.config import Settings
from app.errors import Conflict
from app.model import elbow as compute_elbow
from app.preprocess import DataValidationError, features_matrix, load_training_matrix, read_csv_frame, score_frame
from app.schema import ClusterSummary, SegmentStats
from app.services.models import ServedModel, data_uri

NO_DATASET = "No training dataset at {path}: run generate_dataset.py, or train on an uploaded CSV"


async def training_matrix(settings: Settings, upload: UploadFile | None) -> np.ndarray:
    """The validated feature matrix of the uploaded CSV, or of the default dataset."""
    if upload is not None:
        upload.file.seek(0)
        return await run_in_threadpool(load_training_matrix, upload.file)
    path = Path(settings.data_path)
    if not path.is_file():
        raise Conflict(NO_DATASET.format(path=path))
    return await run_in_threadpool(load_training_matrix, path)


@dataclass
class ScoredBatch:
    """Predictions for a batch, in input order; rows that broke a rule carry an error instead."""

    model: ServedModel
    labels: np.ndarray  # for the valid rows only
    confidence: np.ndarray
    valid: np.ndarray  # bool per input row
    errors: list[str | None]
    frame: pd.DataFrame | None = None  # the input rows, for CSV output
    problems: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_failed(self) -> int:
        return int((~self.valid).sum())

    def assignments(self) -> list[tuple[int, str, float]]:
        names = self.model.names
        return [(int(c), names[int(c)], float(p)) for c, p in zip(self.labels, self.confidence)]

    def to_csv(self) -> bytes:
        frame = self.frame.copy() if self.frame is not None else pd.DataFrame(index=range(len(self.valid)))
        n = len(self.valid)
        cluster = pd.array([pd.NA] * n, dtype="Int64")
        cluster[self.valid] = self.labels
        names = np.array(self.model.names, dtype=object)
        frame["cluster"] = cluster
        name_column = np.full(n, "", dtype=object)
        name_column[self.valid] = names[self.labels]
        frame["cluster_name"] = name_column
        confidence = np.full(n, np.nan)
        confidence[self.valid] = np.round(self.confidence, 6)
        frame["confidence"] = confidence
        frame["error"] = [e or "" for e in self.errors]
        return frame.to_csv(index=False).encode("utf-8")


def score_records(model: ServedModel, customers: Sequence[Any]) -> ScoredBatch:
    labels, confidence = model.predict_matrix(features_matrix(customers))
    n = len(customers)
    frame = pd.DataFrame([c.model_dump() for c in customers])
    return ScoredBatch(model=model, labels=labels, confidence=confidence, valid=np.ones(n, dtype=bool),
                       errors=[None] * n, frame=frame)


def _score_csv_file(model: ServedModel, source) -> ScoredBatch:
    frame = read_csv_frame(source)
    batch = score_frame(frame)
    if len(batch.features):
        labels, confidence = model.predict_matrix(batch.features)
    else:
        labels, confidence = np.zeros(0, dtype=np.int64), np.zeros(0)
    problems = [{"row": i + 1, "reason": e} for i, e in enumerate(batch.errors) if e]
    return ScoredBatch(model=model, labels=labels, confidence=confidence, valid=batch.valid, errors=batch.errors,
                       frame=frame, problems=problems)


async def score_csv(model: ServedModel, upload: UploadFile, settings: Settings) -> ScoredBatch:
    upload.file.seek(0)
    return await run_in_threadpool(_score_csv_file, model, upload.file)


def cluster_summary(model: ServedModel) -> ClusterSummary:
    meta = model.metadata
    return ClusterSummary(
        total_customers=meta["total_customers"],
        n_clusters=meta["n_clusters"],
        model_version=model.version,
        clusters=[SegmentStats(**segment) for segment in model.segments],
    )


def _file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ElbowCache:
    """Elbow figures of the default dataset, computed once per dataset content and k range."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._results: dict[tuple[str, int, int], dict[str, Any]] = {}
        self._charts: dict[tuple[str, int, int], str] = {}
        self._locks: dict[tuple[str, int, int], asyncio.Lock] = {}
        self._stat: tuple[float, int] | None = None
        self._fingerprint: str | None = None

    async def _dataset_fingerprint(self) -> str:
        path = Path(self.settings.data_path)
        try:
            stat = path.stat()
        except OSError:
            raise Conflict(NO_DATASET.format(path=path)) from None
        key = (stat.st_mtime, stat.st_size)
        if self._stat != key or self._fingerprint is None:
            self._fingerprint = await run_in_threadpool(_file_fingerprint, path)
            self._stat = key
        return self._fingerprint

    async def get(self, k_min: int = 2, k_max: int = 10) -> dict[str, Any]:
        key = (await self._dataset_fingerprint(), k_min, k_max)
        if key in self._results:
            return self._results[key]
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key not in self._results:
                features = await run_in_threadpool(load_training_matrix, Path(self.settings.data_path))
                k_max_fit = min(k_max, len(features) - 1)
                if k_max_fit < k_min:
                    raise DataValidationError(f"The dataset has too few rows for k up to {k_max}", [])
                self._results[key] = await run_in_threadpool(
                    compute_elbow, features, k_min=k_min, k_max=k_max_fit)
        return self._results[key]

    async def chart(self, k_min: int = 2, k_max: int = 10) -> tuple[str, int]:
        result = await self.get(k_min, k_max)
        key = (self._fingerprint or "", k_min, k_max)
        if key not in self._charts:
            from app.charts import render_elbow_chart

            self._charts[key] = data_uri(await run_in_threadpool(render_elbow_chart, result))
        return self._charts[key], int(result["optimal_k"])
