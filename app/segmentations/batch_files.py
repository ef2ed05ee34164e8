"""Batch scoring of a file to a file, out of core: Parquet or CSV in, Parquet or CSV out, chunk by chunk.

Each chunk is read as text and scored by the same functions as `/predict/batch` (the customer
checks of app.segmentations.scoring, a declared schema's `score_frame`), so a file gets the same
rows and answers here as it gets there: the input columns, then cluster, cluster_name,
confidence and error. Memory stays flat: one chunk is held at a time. Kind rfm reads a
transaction log and writes one row per customer, as `/predict/batch` does.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from app.ml.frames import arrow_numbers, arrow_text
from app.ml.preprocess import DataValidationError
from app.segmentations import csv_answers
from app.segmentations import scoring as segmentation
from app.segmentations.kinds.registry import KINDS
from app.versions.served import ServedModel

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
CHUNK_ROWS = csv_answers.SCORE_CHUNK_ROWS
FILE_CHUNK_ROWS = 4 * CHUNK_ROWS
"""Rows per Parquet batch read (and row group written): larger than an upload's chunks, as a file may be huge."""
RESULT_COLUMNS = csv_answers.RESULT_COLUMNS

Progress = Callable[[int], None]
"""Told how far the reading has got: bytes (CSV) or rows (Parquet)."""


class UnsupportedFile(ValueError):
    """A path whose suffix names no format this scorer reads or writes."""


def file_format(path: Path) -> str:
    found = FORMATS.get(path.suffix.lower())
    if found is None:
        raise UnsupportedFile(f"{path}: give a .parquet or .csv file (the suffix says the format)")
    return found


@dataclass
class ScoreReport:
    """What a scoring run did: rows in and out, how many carry an error, the version used."""

    rows: int
    failed: int
    model_version: str


def progress_total(path: Path, log: bool = False) -> tuple[int, str]:
    """(total, unit) of the progress bar for reading `path`: rows for Parquet, bytes for CSV and for a
    transaction ``log`` (read as a whole, then reported by how far into the file the reader has got)."""
    if file_format(path) == "parquet" and not log:
        return pq.ParquetFile(path).metadata.num_rows, "rows"
    return path.stat().st_size, "B"


# --- reading ----------------------------------------------------------------------------------


class _CountingFile(io.FileIO):
    """A file that reports how far into it the reader has got."""

    def __init__(self, path: Path, progress: Progress | None) -> None:
        super().__init__(path, "rb")
        self._progress = progress

    def readinto(self, buffer: Any) -> int | None:
        count = super().readinto(buffer)
        if self._progress is not None:
            self._progress(self.tell())
        return count


def text_frame(batch: pa.RecordBatch | pa.Table) -> pd.DataFrame:
    """A Parquet chunk as `/predict/batch` reads a CSV: every cell text, "" where empty."""
    return pd.DataFrame({name: _text(column) for name, column in zip(batch.schema.names, batch.columns, strict=True)})


def _text(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """arrow_text, and Python's own str() for a type Arrow cannot cast to text (a list, a struct)."""
    try:
        return arrow_text(column)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return arrow_text(pa.array([None if v is None else str(v) for v in column.to_pylist()], pa.string()))


def read_columns(served: ServedModel, names: Sequence[str]) -> tuple[list[str], set[str]]:
    """(the columns of `names` that `served` reads, those of them it reads as numbers).

    A column the model needs and `names` lacks is the DataValidationError `/predict/batch` gives
    such a CSV, naming every column found.
    """
    found, numeric = KINDS[served.kind].batch_columns(served, names)
    read = set(found.values())
    return [name for name in names if name in read], numeric


def scoring_frame(served: ServedModel, batch: pa.RecordBatch | pa.Table) -> pd.DataFrame:
    """A Parquet chunk as the scorer reads it, with the verdicts `/predict/batch` gives its CSV.

    Only the columns the model reads. Those it reads as numbers stay numbers where Arrow holds
    integers or floats (a null reads as an empty cell); every other cell is text, "" where empty.
    A number column holding a NaN or an infinity in this chunk is read as text, so that the
    message for such a cell is worded as it is for the CSV.
    """
    names = list(batch.schema.names)
    read, numeric = read_columns(served, names)
    columns: dict[str, Any] = {}
    for name in read:
        column = batch.column(names.index(name))
        values = arrow_numbers(column) if name in numeric and _finite(column) else None
        columns[name] = _text(column) if values is None else values
    return pd.DataFrame(columns)


def _finite(column: pa.Array | pa.ChunkedArray) -> bool:
    """No NaN or infinity where not null (true of any column that does not hold floats)."""
    return not pa.types.is_floating(column.type) or not pc.any(pc.invert(pc.is_finite(column))).as_py()


def _parquet_chunks(
    served: ServedModel, path: Path, progress: Progress | None
) -> Iterator[tuple[pd.DataFrame, pa.RecordBatch]]:
    try:
        source = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataValidationError(
            f"the file is not readable Parquet: {exc}",
            [{"row": None, "line": None, "column": None, "reason": "not Parquet"}],
        ) from None
    seen = 0
    for batch in source.iter_batches(batch_size=FILE_CHUNK_ROWS):
        seen += batch.num_rows
        yield scoring_frame(served, batch), batch
        if progress is not None:
            progress(seen)


def _csv_chunks(fh: IO[bytes], check_columns: Callable[[Any], Any]) -> Iterator[tuple[pd.DataFrame, None]]:
    for frame in segmentation.csv_frames(fh, check_columns):
        yield frame, None


# --- writing ----------------------------------------------------------------------------------


class _CsvOut:
    """The CSV answer of `/predict/batch`, chunk after chunk, into one file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: IO[bytes] | None = None

    def add(
        self, frame: pd.DataFrame, batch: pa.RecordBatch | None, served: ServedModel, scores: segmentation.ChunkScores
    ) -> None:
        valid, labels, confidence, errors, _ = scores
        if batch is not None:
            frame = text_frame(batch)  # every input column, as the CSV answer writes it
        answer = csv_answers.CsvAnswer(list(frame.columns), served.names)
        header_end = answer.file.tell()
        answer.add(frame, valid, labels, confidence, errors)
        with answer.finish() as chunk:
            if self.file is None:
                self.file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
            else:
                chunk.seek(header_end)  # the header once, at the top
            while block := chunk.read(1 << 20):
                self.file.write(block)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class _ParquetOut:
    """The same answer as Parquet: input columns as read (their own types), then the segment columns.

    `cluster` and `confidence` are null, and `error` set, on rows that break a rule. Each chunk is
    compressed and written by a background thread (Arrow releases the GIL) while the next one is
    scored; at most one chunk waits, so memory stays at two chunks.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer: pq.ParquetWriter | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet-out")
        self._pending: Future[None] | None = None

    def add(
        self, frame: pd.DataFrame, batch: pa.RecordBatch | None, served: ServedModel, scores: segmentation.ChunkScores
    ) -> None:
        source = pa.Table.from_pandas(frame, preserve_index=False) if batch is None else pa.Table.from_batches([batch])
        table = answer_table(served, source, scores)
        self._wait()
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        self._pending = self._thread.submit(self.writer.write_table, table)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # a write's error is raised here

    def close(self) -> None:
        try:
            self._wait()
        finally:
            self._thread.shutdown(wait=True)
            if self.writer is not None:
                self.writer.close()


def answer_table(served: ServedModel, source: pa.Table, scores: segmentation.ChunkScores) -> pa.Table:
    """The input columns as read, then cluster, cluster_name, confidence and error (null where they do not apply)."""
    valid, labels, confidence, errors, _ = scores
    n = source.num_rows
    kept = [c for c in source.column_names if str(c).strip().lower() not in RESULT_COLUMNS]
    cluster = np.zeros(n, dtype=np.int64)
    cluster[valid] = labels
    score = np.zeros(n, dtype=np.float64)
    score[valid] = np.round(confidence, 6)
    clusters = pa.array(cluster, mask=~valid)
    return (
        source.select(kept)
        .append_column("cluster", clusters)
        .append_column("cluster_name", pc.take(pa.array(served.names, pa.string()), clusters))
        .append_column("confidence", pa.array(score, mask=~valid))
        .append_column("error", pa.array(list(errors), pa.string()))
    )


def score_batch(served: ServedModel, batch: pa.RecordBatch) -> pa.RecordBatch:
    """One Arrow batch scored as `/predict/batch` scores its rows, with the answer columns appended."""
    scores = _chunk_scorer(served)(scoring_frame(served, batch))
    table = answer_table(served, pa.Table.from_batches([batch]), scores).combine_chunks()
    return table.to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], schema=table.schema)


# --- scoring ----------------------------------------------------------------------------------


def _chunk_scorer(served: ServedModel) -> Callable[[pd.DataFrame], segmentation.ChunkScores]:
    kind = KINDS[served.kind]
    return lambda frame: kind.score_chunk(served, frame)


def score_file(
    served: ServedModel,
    source: Path,
    target: Path,
    *,
    progress: Progress | None = None,
    rfm_columns: Any = None,
    as_of: date | None = None,
) -> ScoreReport:
    """Score `source` into `target` with `served` (blocking). Kind rfm needs the log's `rfm_columns`.

    Raises UnsupportedFile for a suffix that names no format, DataValidationError for a file that
    cannot be scored at all (unreadable, a declared column missing, no data rows), OSError for a path
    that cannot be opened. `target` is written next to itself and moved in place when complete.
    """
    in_format, out_format = file_format(source), file_format(target)
    partial = target.with_name(f".{target.name}.partial")
    try:
        if KINDS[served.kind].takes_as_of:  # a transaction log: one row per customer
            report = _score_log(served, source, partial, out_format, rfm_columns, as_of, progress)
        else:
            report = _score_rows(served, source, in_format, partial, out_format, progress)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return report


def _score_rows(
    served: ServedModel, source: Path, in_format: str, partial: Path, out_format: str, progress: Progress | None
) -> ScoreReport:
    score = _chunk_scorer(served)
    check = KINDS[served.kind].check_columns
    out: _CsvOut | _ParquetOut = _ParquetOut(partial) if out_format == "parquet" else _CsvOut(partial)
    rows = failed = 0
    try:
        if in_format == "parquet":
            chunks: Iterator[tuple[pd.DataFrame, Any]] = _parquet_chunks(served, source, progress)
            opened: IO[bytes] | None = None
        else:
            opened = io.BufferedReader(_CountingFile(source, progress), 1 << 20)
            chunks = _csv_chunks(opened, check)
        try:
            for frame, batch in chunks:
                scores = score(frame)
                out.add(frame, batch, served, scores)
                rows += len(frame)
                failed += int((~scores[0]).sum())
        finally:
            if opened is not None:
                opened.close()
    finally:
        out.close()
    if rows == 0:
        raise DataValidationError(
            "the file has no data rows", [{"row": None, "line": None, "column": None, "reason": "no data rows"}]
        )
    return ScoreReport(rows=rows, failed=failed, model_version=served.version)


def _score_log(
    served: ServedModel,
    source: Path,
    partial: Path,
    out_format: str,
    columns: Any,
    as_of: date | None,
    progress: Progress | None,
) -> ScoreReport:
    """A transaction log (CSV or Parquet) → one scored row per customer, as `/predict/batch` answers it."""
    from app.segmentations.kinds import rfm as rfm_service

    with io.BufferedReader(_CountingFile(source, progress), 1 << 20) as fh:
        scored = rfm_service.score_log(served, fh, columns, as_of=as_of, as_csv=out_format == "csv")
    if scored.csv_answer is not None:
        with scored.csv_answer as answer, open(partial, "wb") as out:
            while block := answer.read(1 << 20):
                out.write(block)
    else:
        pq.write_table(rfm_service.answer_table(served, scored), partial)
    return ScoreReport(rows=scored.n_rows, failed=0, model_version=served.version)
