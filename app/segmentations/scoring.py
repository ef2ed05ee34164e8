"""Segmentation work the routes ask for: training data, batch scoring, summaries, the elbow."""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
from starlette.concurrency import run_in_threadpool

from app.core.config import Settings
from app.core.errors import Conflict
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
from app.segmentations.csv_answers import SCORE_CHUNK_ROWS, CsvAnswer, ScoredBatch
from app.segmentations.results import ClusterSummary
from app.versions.observed import BatchObserver
from app.versions.schemas import SegmentStats
from app.versions.served import ServedModel

# How long the dataset file is taken as unchanged before it is looked at again.
NO_DATASET = "No training dataset at {path}: run generate_dataset.py, or train on an uploaded CSV"

_HEAD_BYTES = 64 * 1024
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
