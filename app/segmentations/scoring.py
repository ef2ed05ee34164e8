"""Segmentation work the routes ask for: training data, batch scoring, summaries, the elbow."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import io
import json
import math
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
from cachetools import LRUCache
from starlette.concurrency import run_in_threadpool

from app.core.config import Settings
from app.core.errors import Conflict
from app.ml import elbow as compute_elbow
from app.ml.preprocess import (
    FEATURE_RANGES,
    FEATURES,
    INTEGER_FEATURES,
    SEX_COLUMN,
    SEX_VALUES,
    DataValidationError,
    features_matrix,
    load_training_matrix,
    read_csv_frame,
    resolve_columns,
    score_frame,
)
from app.schema import ClusterSummary, ElbowResult, SegmentStats
from app.versions.observed import BatchObserver, ExplainColumns
from app.versions.served import ServedModel, data_uri

# How long the dataset file is taken as unchanged before it is looked at again.
DATASET_CHECK_SECONDS = 1.0
# Elbow figures kept: datasets x k ranges (a few kB each).
ELBOW_CACHE_ENTRIES = 64
NO_DATASET = "No training dataset at {path}: run generate_dataset.py, or train on an uploaded CSV"

SCORE_CHUNK_ROWS = 50_000
"""A batch CSV is read, checked and scored this many rows at a time, so memory stays flat."""
RESULT_COLUMNS = ("cluster", "cluster_name", "confidence", "error")
EXPLAIN_COLUMNS = ("top_feature", "margin")
_HEAD_BYTES = 64 * 1024
SPOOL_BYTES = 8 * 1024 * 1024
_KNOWN_SEXES = [value.lower() for value in SEX_VALUES]
MAX_LISTED_ROWS = 10


async def training_matrix(settings: Settings, upload: IO[bytes] | None) -> np.ndarray:
    """The validated feature matrix of the uploaded CSV, or of the default dataset."""
    if upload is not None:
        upload.seek(0)
        return await run_in_threadpool(load_training_matrix, upload)
    return await run_in_threadpool(_default_training_matrix, Path(settings.data_path))


OUT_OF_CORE_BYTES = 256 * 1024 * 1024
"""A customer CSV upload larger than this is trained out of core, read by the training process from disk."""
_PARQUET_MAGIC = b"PAR1"


def out_of_core_upload(fh: IO[bytes]) -> bool:
    """Whether an upload goes to the out-of-core trainer: a Parquet file, or a CSV above OUT_OF_CORE_BYTES."""
    fh.seek(0)
    magic = fh.read(len(_PARQUET_MAGIC))
    size = fh.seek(0, io.SEEK_END)
    fh.seek(0)
    return magic == _PARQUET_MAGIC or size > OUT_OF_CORE_BYTES


@contextlib.asynccontextmanager
async def upload_on_disk(settings: Settings, upload: IO[bytes]) -> AsyncIterator[Any]:
    """The upload copied to a named temporary file (the training process opens it), removed afterwards."""
    from app.ml.outofcore import TrainingFile

    def copy() -> Path:
        upload.seek(0)
        with tempfile.NamedTemporaryFile(prefix="train-", suffix=".upload", delete=False) as out:
            shutil.copyfileobj(upload, out, 1 << 20)
        return Path(out.name)

    path = await run_in_threadpool(copy)
    try:
        yield TrainingFile(path, in_memory_rows=settings.train_in_memory_rows, sample_rows=settings.train_sample_rows)
    finally:
        await run_in_threadpool(path.unlink, missing_ok=True)


def _default_training_matrix(path: Path) -> np.ndarray:
    if not path.is_file():
        raise Conflict(NO_DATASET.format(path=path))
    return load_training_matrix(path)


# A cell starting with one of these is run as a formula by spreadsheet programs (CSV injection).
_FORMULA_START = r"[=+\-@\t\r]"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _inert(cell: Any) -> Any:
    if not isinstance(cell, str):
        return cell
    if re.match(_FORMULA_START, cell) and not _is_number(cell):
        cell = "'" + cell
    # The writer ends lines with \n and so quotes cells holding one, but not a bare \r.
    return cell.replace("\r\n", "\n").replace("\r", "\n")


# In a column's cells joined by newlines (and one in front): a cell that may start a formula.
_SUSPECT_START = re.compile(r"\n" + _FORMULA_START)


def inert_column(values: pd.Series) -> list:
    """The column's cells made safe to open in a spreadsheet (see _inert); only suspects pay for it.

    One regular-expression pass over the joined column finds whether any cell needs a look, so a
    clean column costs no Python per cell.
    """
    cells = values.tolist()
    if not pd.api.types.is_string_dtype(values.dtype):  # numbers: nothing to run
        return cells
    try:
        joined = "\n" + "\n".join(cells)
    except TypeError:  # a missing cell among the text
        return [_inert(cell) for cell in cells]
    if "\r" not in joined and _SUSPECT_START.search(joined) is None:
        return cells
    return [_inert(cell) for cell in cells]


class CsvAnswer:
    """The CSV answer of a batch, written chunk by chunk to a temporary file (memory, then disk).

    Input cells are echoed back; any that a spreadsheet would evaluate is made inert first.
    """

    def __init__(self, input_columns: Sequence[str], names: Sequence[str], *, explain: bool = False) -> None:
        # An input column named like a result column is replaced by the result.
        results = (*RESULT_COLUMNS[:3], *EXPLAIN_COLUMNS, RESULT_COLUMNS[3]) if explain else RESULT_COLUMNS
        self.columns = [c for c in input_columns if str(c).strip().lower() not in results]
        self.names = np.array(list(names), dtype=object)
        self.explain = explain
        self.file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        self._write_rows([[*(_inert(str(c)) for c in self.columns), *results]])

    def _write_rows(self, rows) -> None:
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        self.file.write(text.getvalue().encode("utf-8"))

    def add(
        self,
        frame: pd.DataFrame,
        valid: np.ndarray,
        labels: np.ndarray,
        confidence: np.ndarray,
        errors: Sequence[str | None],
        explained: ExplainColumns | None = None,
    ) -> None:
        n = len(frame)
        cluster = np.full(n, "", dtype=object)
        cluster[valid] = labels.tolist()
        name = np.full(n, "", dtype=object)
        name[valid] = self.names[labels]
        score = np.full(n, "", dtype=object)
        score[valid] = np.round(confidence, 6).tolist()
        results = [cluster.tolist(), name.tolist(), score.tolist()]
        if self.explain:
            top = np.full(n, "", dtype=object)
            margin = np.full(n, "", dtype=object)
            if explained is not None:
                top[valid] = explained[0]
                margin[valid] = np.round(explained[1], 6).tolist()
            results += [inert_column(pd.Series(top.tolist(), dtype=str)), margin.tolist()]
        inputs = [inert_column(frame[c]) for c in self.columns]
        self._write_rows(zip(*inputs, *results, [e or "" for e in errors], strict=True))

    def finish(self) -> IO[bytes]:
        self.file.seek(0)
        return self.file


@dataclass
class ScoredBatch:
    """Predictions for a batch, in input order; rows that broke a rule carry an error instead.

    `labels` and `confidence` hold the scored rows only. `problems` lists the first failing
    rows (`row` is the 1-based data row). `csv_answer` is the whole answer as CSV when the
    caller asked for it: the input columns plus cluster, cluster_name, confidence, error.
    """

    model: ServedModel
    labels: np.ndarray
    confidence: np.ndarray
    n_rows: int
    problems: list[dict[str, Any]] = field(default_factory=list)
    csv_answer: IO[bytes] | None = None
    fields: pd.DataFrame | None = None
    """Per scored row, fields the JSON answer carries before its cluster (kind rfm: the RFM row)."""
    observer: BatchObserver | None = None
    """What went along with the scoring: explanation columns (`explain=true`) and drift counts."""

    @property
    def n_failed(self) -> int:
        return self.n_rows - len(self.labels)

    def json_chunks(self) -> Iterator[bytes]:
        """The BatchResult document, serialised without a model object per row."""
        prefixes = [
            json.dumps({"cluster": i, "cluster_name": name}, separators=(",", ":"))[:-1] + ',"confidence":'
            for i, name in enumerate(self.model.names)
        ]
        explained = self.observer is not None and self.observer.explain
        top = self.observer.top_feature if self.observer is not None and explained else None
        margin = self.observer.margin if self.observer is not None and explained else None
        yield b'{"predictions":['
        if self.fields is not None:
            yield from self._field_rows()
            yield ('],"model_version":' + json.dumps(self.model.version) + "}").encode("utf-8")
            return
        for lo in range(0, len(self.labels), SCORE_CHUNK_ROWS):
            hi = lo + SCORE_CHUNK_ROWS
            labels, scores = self.labels[lo:hi].tolist(), self.confidence[lo:hi].tolist()
            if top is not None and margin is not None:
                rows = ",".join(
                    prefixes[c] + repr(p) + ',"top_feature":' + json.dumps(t) + ',"margin":' + repr(m) + "}"
                    for c, p, t, m in zip(labels, scores, top[lo:hi].tolist(), margin[lo:hi].tolist(), strict=True)
                )
            else:
                rows = ",".join(prefixes[c] + repr(p) + "}" for c, p in zip(labels, scores, strict=True))
            yield (("," if lo else "") + rows).encode("utf-8")
        yield ('],"model_version":' + json.dumps(self.model.version) + "}").encode("utf-8")

    def _field_rows(self) -> Iterator[bytes]:
        assert self.fields is not None
        names = np.array(self.model.names, dtype=object)
        for lo in range(0, len(self.labels), SCORE_CHUNK_ROWS):
            hi = lo + SCORE_CHUNK_ROWS
            part = self.fields.iloc[lo:hi].reset_index(drop=True)
            labels = self.labels[lo:hi]
            part = part.assign(cluster=labels, cluster_name=names[labels], confidence=self.confidence[lo:hi])
            if self.observer is not None and self.observer.explain:
                part = part.assign(top_feature=self.observer.top_feature[lo:hi], margin=self.observer.margin[lo:hi])
            body = part.to_json(orient="records", double_precision=10)
            yield (("," if lo else "") + body[1:-1]).encode("utf-8")

    def csv_chunks(self) -> Iterator[bytes]:
        if self.csv_answer is None:
            raise RuntimeError("this batch was scored without a CSV answer")
        with self.csv_answer as answer:
            while block := answer.read(1 << 20):
                yield block


def score_records(
    model: ServedModel, customers: Sequence[Any], *, as_csv: bool, observer: BatchObserver | None = None
) -> ScoredBatch:
    """Score validated customers (API bodies); blocking, run it in a thread for big batches."""
    features = features_matrix(customers)
    labels, confidence = model.predict_matrix(features)
    explained = observer.observe(_customer_columns(features), labels) if observer is not None else None
    n = len(customers)
    csv_answer = None
    if as_csv:
        frame = pd.DataFrame([c.model_dump() for c in customers])
        answer = CsvAnswer(list(frame.columns), model.names, explain=explained is not None)
        answer.add(frame, np.ones(n, dtype=bool), labels, confidence, [None] * n, explained)
        csv_answer = answer.finish()
    return ScoredBatch(
        model=model, labels=labels, confidence=confidence, n_rows=n, csv_answer=csv_answer, observer=observer
    )


def _customer_columns(features: np.ndarray) -> dict[str, np.ndarray]:
    return {name: features[:, j] for j, name in enumerate(FEATURES)}


def _complete_lines(head: bytes) -> bytes:
    """`head` cut after its last whole record (a newline outside quotes)."""
    cut = len(head)
    while True:
        cut = head.rfind(b"\n", 0, cut)
        if cut < 0:
            return head
        if head.count(b'"', 0, cut) % 2 == 0:
            return head[: cut + 1]


def csv_frames(fh: IO[bytes], check_columns: Callable[[Any], Any] = resolve_columns) -> Iterator[pd.DataFrame]:
    """The CSV as text cells ("" when empty), SCORE_CHUNK_ROWS rows at a time.

    The opening of the file goes through read_csv_frame first, so an empty, binary or
    non-UTF-8 file and a missing column (`check_columns` of the header) are reported in
    preprocess's own words.
    """
    head = fh.read(_HEAD_BYTES)
    fh.seek(0)
    opening = read_csv_frame(head if len(head) < _HEAD_BYTES else _complete_lines(head))
    check_columns(opening.columns)
    reader = pd.read_csv(
        fh, dtype=str, keep_default_na=False, na_values=[], encoding="utf-8-sig", chunksize=SCORE_CHUNK_ROWS
    )
    try:
        with reader:
            yield from reader
    except UnicodeDecodeError:
        raise DataValidationError(
            "the file is not UTF-8 text (is it a CSV?)",
            [{"row": None, "line": None, "column": None, "reason": "not UTF-8 text"}],
        ) from None
    except (pd.errors.ParserError, ValueError) as exc:
        text = str(exc).replace("Error tokenizing data. C error: ", "").strip()
        raise DataValidationError(
            f"malformed CSV: {text}", [{"row": None, "line": None, "column": None, "reason": text}]
        ) from None


def _check_frame(frame: pd.DataFrame, columns: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """(features, valid, errors) for text rows, the same verdicts as preprocess.score_frame.

    Every rule is checked with whole-column operations; only the rows that fail one go through
    score_frame, which says in words what is wrong with them. Clean rows cost no Python.
    """
    n = len(frame)
    features = np.empty((n, len(FEATURES)), dtype=np.float64)
    clean = np.ones(n, dtype=bool)
    for j, feature in enumerate(FEATURES):
        column = frame[columns[feature]]
        if pd.api.types.is_float_dtype(column.dtype):  # numbers as read from Parquet; NaN where empty
            values = column.to_numpy()
        else:
            values = np.asarray(pd.to_numeric(column.astype(object), errors="coerce"), dtype=np.float64)
        low, high = FEATURE_RANGES[feature]
        with np.errstate(invalid="ignore"):
            ok = (values >= low) & (values <= high)  # False for NaN and infinities too
            if feature in INTEGER_FEATURES:
                ok &= np.floor(values) == values
        clean &= ok
        features[:, j] = values
    if SEX_COLUMN in columns:
        codes, spellings = pd.factorize(frame[columns[SEX_COLUMN]].astype(object))  # a handful of distinct cells
        sex = pd.Series(spellings, dtype=object).str.strip().str.lower()
        known = (sex.isin(_KNOWN_SEXES) | (sex == "")).to_numpy(dtype=bool)
        clean &= known[codes] & (codes >= 0)
    errors: list[str | None] = [None] * n
    doubtful = np.flatnonzero(~clean)
    if len(doubtful) == 0:
        return features, clean, errors
    checked = score_frame(frame.iloc[doubtful])
    valid = clean.copy()
    valid[doubtful] = checked.valid
    features[doubtful[checked.valid]] = checked.features
    for i, error in zip(doubtful.tolist(), checked.errors, strict=True):
        errors[i] = error
    return features, valid, errors


ChunkScores = tuple[np.ndarray, np.ndarray, np.ndarray, Sequence[str | None], Any]
"""A chunk's (valid rows, their cluster ids, their confidences, each row's error or None, the valid rows'
checked values per feature name, for explanations and drift, or None)."""


def score_customer_chunk(model: ServedModel, frame: pd.DataFrame) -> ChunkScores:
    features, valid, errors = _check_frame(frame, resolve_columns(frame.columns))
    scored = features[valid]
    labels, confidence = model.predict_matrix(scored)
    return valid, labels, confidence, errors, _customer_columns(scored)


def score_csv_file(
    model: ServedModel,
    fh: IO[bytes],
    *,
    as_csv: bool,
    score_chunk: Callable[[ServedModel, pd.DataFrame], ChunkScores] = score_customer_chunk,
    check_columns: Callable[[Any], Any] = resolve_columns,
    observer: BatchObserver | None = None,
) -> ScoredBatch:
    """A batch CSV chunk by chunk: each chunk scored by `score_chunk` (the customer features by
    default), bad rows marked, the first of them listed, the CSV answer written as it goes."""
    labels: list[np.ndarray] = []
    confidence: list[np.ndarray] = []
    problems: list[dict[str, Any]] = []
    answer: CsvAnswer | None = None
    seen = 0
    for frame in csv_frames(fh, check_columns):
        valid, chunk_labels, chunk_confidence, errors, values = score_chunk(model, frame)
        explained = observer.observe(values, chunk_labels) if observer is not None and values is not None else None
        if as_csv:
            if answer is None:
                answer = CsvAnswer(list(frame.columns), model.names, explain=observer is not None and observer.explain)
            answer.add(frame, valid, chunk_labels, chunk_confidence, errors, explained)
        labels.append(chunk_labels)
        confidence.append(chunk_confidence)
        if len(problems) < MAX_LISTED_ROWS:
            for i in np.flatnonzero(~valid)[: MAX_LISTED_ROWS - len(problems)].tolist():
                problems.append({"row": seen + i + 1, "line": seen + i + 2, "reason": errors[i]})
        seen += len(frame)
    if seen == 0:
        raise DataValidationError(
            "the CSV has a header but no data rows",
            [{"row": None, "line": None, "column": None, "reason": "no data rows"}],
        )
    return ScoredBatch(
        model=model,
        labels=np.concatenate(labels),
        confidence=np.concatenate(confidence),
        n_rows=seen,
        problems=problems,
        csv_answer=answer.finish() if answer is not None else None,
        observer=observer,
    )


async def score_csv(
    model: ServedModel, upload: IO[bytes], *, as_csv: bool, observer: BatchObserver | None = None
) -> ScoredBatch:
    """Score an uploaded CSV (already spooled to a temporary file) in a worker thread."""
    upload.seek(0)
    return await run_in_threadpool(lambda: score_csv_file(model, upload, as_csv=as_csv, observer=observer))


def cluster_summary(model: ServedModel) -> ClusterSummary:
    meta = model.metadata
    return ClusterSummary(
        total_customers=meta["total_customers"],
        n_clusters=meta["n_clusters"],
        model_version=model.version,
        clusters=[SegmentStats(**segment) for segment in model.segments],
    )


def cluster_summary_json(model: ServedModel) -> bytes:
    """GET /clusters as JSON, built once per model version."""
    return model.response_json("clusters", lambda: cluster_summary(model))


def _file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class _ElbowEntry:
    """One dataset content and k range: the figures, and their JSON and chart once asked for."""

    result: dict[str, Any]
    json: bytes | None = None
    chart: str | None = None


class ElbowCache:
    """Elbow figures of the default dataset, computed once per dataset content and k range.

    At most ELBOW_CACHE_ENTRIES (dataset, k range) entries are kept, the least recently used
    dropped first; entries are plain values (dicts, bytes, strings), shared safely by requests.
    """

    def __init__(self, settings: Settings, max_entries: int = ELBOW_CACHE_ENTRIES) -> None:
        self.settings = settings
        self._entries: LRUCache[tuple[str, int, int], _ElbowEntry] = LRUCache(maxsize=max_entries)
        # Only while a computation runs: the callers asking for the same key meanwhile wait for it.
        self._locks: dict[tuple[str, int, int], asyncio.Lock] = {}
        self._stat: tuple[float, int] | None = None
        self._fingerprint: str | None = None
        self._checked_at = -math.inf

    def _fresh_fingerprint(self) -> str | None:
        if self._fingerprint is not None and time.monotonic() - self._checked_at < DATASET_CHECK_SECONDS:
            return self._fingerprint
        return None

    async def _dataset_fingerprint(self) -> str:
        # The file is looked at no more than once a second, not on every request.
        fresh = self._fresh_fingerprint()
        if fresh is not None:
            return fresh
        path = Path(self.settings.data_path)
        try:
            stat = await run_in_threadpool(path.stat)
        except OSError:
            self._fingerprint = None
            raise Conflict(NO_DATASET.format(path=path)) from None
        key = (stat.st_mtime, stat.st_size)
        fingerprint = self._fingerprint
        if self._stat != key or fingerprint is None:
            fingerprint = await run_in_threadpool(_file_fingerprint, path)
            self._fingerprint, self._stat = fingerprint, key
        self._checked_at = time.monotonic()
        return fingerprint

    async def get(self, k_min: int = 2, k_max: int = 10) -> dict[str, Any]:
        return (await self._entry(k_min, k_max)).result

    def ready_json(self, k_min: int = 2, k_max: int = 10) -> bytes | None:
        """The answer of `get_json` when it is at hand without waiting for anything, else None."""
        fingerprint = self._fresh_fingerprint()
        entry = self._entries.get((fingerprint, k_min, k_max)) if fingerprint is not None else None
        return entry.json if entry is not None else None

    async def get_json(self, k_min: int = 2, k_max: int = 10) -> bytes:
        """GET /elbow as JSON, serialized once per dataset and k range."""
        entry = await self._entry(k_min, k_max)
        if entry.json is None:
            entry.json = ElbowResult(**entry.result).model_dump_json().encode()
        return entry.json

    async def chart(self, k_min: int = 2, k_max: int = 10) -> tuple[str, int]:
        entry = await self._entry(k_min, k_max)
        if entry.chart is None:
            from app.charts import render_elbow_chart

            entry.chart = data_uri(await run_in_threadpool(render_elbow_chart, entry.result))
        return entry.chart, int(entry.result["optimal_k"])

    async def _entry(self, k_min: int, k_max: int) -> _ElbowEntry:
        key = (await self._dataset_fingerprint(), k_min, k_max)
        entry = self._entries.get(key)
        if entry is not None:
            return entry
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                entry = self._entries.get(key)
                if entry is None:
                    entry = _ElbowEntry(await self._compute(k_min, k_max))
                    self._entries[key] = entry
        finally:
            if not lock.locked() and self._locks.get(key) is lock:
                del self._locks[key]
        return entry

    async def _compute(self, k_min: int, k_max: int) -> dict[str, Any]:
        features = await run_in_threadpool(load_training_matrix, Path(self.settings.data_path))
        k_max_fit = min(k_max, len(features) - 1)
        if k_max_fit < k_min:
            raise DataValidationError(f"The dataset has too few rows for k up to {k_max}", [])
        return await run_in_threadpool(compute_elbow, features, k_min=k_min, k_max=k_max_fit)
