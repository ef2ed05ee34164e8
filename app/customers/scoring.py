"""A run's upload scored into memberships: each customer's id, segment and confidence, sorted by id.

Blocking (run it in a worker thread). The rows are read and scored by the segmentation's kind, as a
batch of that kind is: kinds customer and custom chunk by chunk (CSV or Parquet), through
`score_chunk`; kind rfm as a transaction log, one row per customer. Every row must score, and every
id be present and unique: the first problems are the 422 a batch gives.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from typing import IO, Any

import numpy as np
import pandas as pd

from app.ml.frames import arrow_text
from app.ml.matching import segment_key_of
from app.ml.preprocess import DataValidationError
from app.segmentations import scoring as segmentation
from app.segmentations.kinds.base import Kind
from app.segmentations.kinds.registry import kind_of
from app.versions.store import ModelStore, ServedModel

CUSTOMER_ID_COLUMNS = ("customerid", "customer_id")
"""Kind customer: the id column, matched case-insensitively."""
RFM_ID_COLUMN = "customer_id"
MAX_ID_LENGTH = 200
MAX_LISTED = 10
PARQUET_MAGIC = b"PAR1"
PARQUET_BATCH_ROWS = 65_536


@dataclass
class ScoredCustomers:
    """A run's customers sorted by id (bytewise, as the database orders them), with their segments."""

    ids: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray
    segment_keys: list[str]
    """Each cluster id's segment_key in the version that scored them."""
    p_alive: np.ndarray | None = None
    clv: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, run_id: int, start: int, stop: int) -> list[tuple[Any, ...]]:
        """Staging rows `start:stop`: (run_id, customer_id, segment_key, cluster_id, confidence, p_alive, clv)."""
        keys = self.segment_keys
        labels = self.labels[start:stop].tolist()
        confidence = np.round(self.confidence[start:stop], 6).tolist()
        p_alive = _optional(self.p_alive, start, stop)
        clv = _optional(self.clv, start, stop)
        return [
            (run_id, cid, keys[label], label, conf, alive, value)
            for cid, label, conf, alive, value in zip(
                self.ids[start:stop].tolist(), labels, confidence, p_alive, clv, strict=True
            )
        ]


def _optional(values: np.ndarray | None, start: int, stop: int) -> list[float | None]:
    if values is None:
        return [None] * (stop - start)
    chunk = values[start:stop]
    return [None if not np.isfinite(v) else float(v) for v in chunk.tolist()]


def id_column_of(store: ModelStore) -> str | None:
    """The declared id column of a custom segmentation (None: it has none)."""
    return kind_of(store.segmentation).schema(store.segmentation).id_column


def _problem(row: int | None, line: int | None, column: str | None, reason: str) -> dict[str, Any]:
    return {"row": row, "line": line, "column": column, "reason": reason}


def _file_problem(message: str, reason: str) -> DataValidationError:
    return DataValidationError(message, [_problem(None, None, None, reason)])


def _id_column(kind: Kind, columns: list[str], id_column: str | None) -> str:
    if kind.name == "custom":
        assert id_column is not None  # the service refuses a run without one first
        wanted = id_column.casefold()
        found = [c for c in columns if str(c).strip().casefold() == wanted]
        if not found:
            raise _file_problem(f"the file has no id column {id_column!r}", f"missing column {id_column}")
        return found[0]
    found = [c for c in columns if str(c).strip().casefold() in CUSTOMER_ID_COLUMNS]
    if not found:
        raise _file_problem(
            "the file has no customer id column (CustomerID or customer_id)", "missing column CustomerID"
        )
    return found[0]


def _chunks(served: ServedModel, kind: Kind, upload: IO[bytes], id_column: str | None) -> Iterator[tuple[Any, ...]]:
    """(ids, scores, first line number or None) per chunk of a CSV or Parquet upload."""
    upload.seek(0)
    magic = upload.read(len(PARQUET_MAGIC))
    upload.seek(0)
    if magic == PARQUET_MAGIC:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from app.segmentations.batch_files import scoring_frame

        try:
            source = pq.ParquetFile(upload)
        except (pa.ArrowInvalid, OSError) as exc:
            raise _file_problem(f"the file is not readable Parquet: {exc}", "not Parquet") from None
        names = list(source.schema_arrow.names)
        column = _id_column(kind, names, id_column)
        for batch in source.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            ids = arrow_text(batch.column(names.index(column)))
            yield ids, kind.score_chunk(served, scoring_frame(served, batch)), None
        return
    found: str | None = None
    seen = 0
    for frame in segmentation.csv_frames(upload, kind.check_columns):
        if found is None:
            found = _id_column(kind, list(frame.columns), id_column)
        yield frame[found].to_numpy(dtype=object), kind.score_chunk(served, frame), seen + 2
        seen += len(frame)


def score_rows(served: ServedModel, store: ModelStore, upload: IO[bytes]) -> ScoredCustomers:
    """A customer or custom upload scored, row by row (every row must score)."""
    kind = kind_of(store.segmentation)
    id_column = id_column_of(store) if kind.name == "custom" else None
    ids: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    confidence: list[np.ndarray] = []
    problems: list[dict[str, Any]] = []
    n_rows = n_failed = 0
    for chunk_ids, (valid, chunk_labels, chunk_confidence, errors, _), first_line in _chunks(
        served, kind, upload, id_column
    ):
        bad = np.flatnonzero(~valid)
        n_failed += len(bad)
        for i in bad[: max(0, MAX_LISTED - len(problems))].tolist():
            line = first_line + i if first_line is not None else None
            problems.append(_problem(n_rows + i + 1, line, None, str(errors[i])))
        ids.append(chunk_ids[valid] if len(bad) else chunk_ids)
        labels.append(np.asarray(chunk_labels))
        confidence.append(np.asarray(chunk_confidence, dtype=np.float64))
        n_rows += len(valid)
    if n_rows == 0:
        raise _file_problem("the file has a header but no data rows", "no data rows")
    if n_failed:
        first = problems[0]
        raise DataValidationError(
            f"{n_failed} of {n_rows} rows break a rule (first: row {first['row']}: {first['reason']}); "
            "a run lands only whole",
            problems,
        )
    return _sorted(served, np.concatenate(ids), np.concatenate(labels), np.concatenate(confidence))


def score_log(served: ServedModel, store: ModelStore, upload: IO[bytes], as_of: date | None) -> ScoredCustomers:
    """A transaction log scored by kind rfm: one membership per customer, with p_alive and clv when scored."""
    from app.segmentations.kinds import rfm

    upload.seek(0)
    scored = rfm.score_log(served, upload, rfm.log_columns(store), as_of=as_of, as_csv=False)
    assert scored.fields is not None
    fields = scored.fields
    ids = fields[RFM_ID_COLUMN].astype(str).to_numpy(dtype=object)
    p_alive = fields["p_alive"].to_numpy(dtype=np.float64) if "p_alive" in fields.columns else None
    clv = fields["clv"].to_numpy(dtype=np.float64) if "clv" in fields.columns else None
    return _sorted(served, ids, np.asarray(scored.labels), np.asarray(scored.confidence), p_alive, clv)


def _sorted(
    served: ServedModel,
    ids: np.ndarray,
    labels: np.ndarray,
    confidence: np.ndarray,
    p_alive: np.ndarray | None = None,
    clv: np.ndarray | None = None,
) -> ScoredCustomers:
    _check_ids(ids)
    # Python orders str by code point, which is the order of their UTF-8 bytes.
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    if len(sorted_ids) > 1:
        repeated = sorted_ids[1:] == sorted_ids[:-1]
        if repeated.any():
            _duplicate(ids)
    keys = [segment_key_of(segment, served.version) for segment in served.segments]
    return ScoredCustomers(
        ids=sorted_ids,
        labels=labels[order].astype(np.int64),
        confidence=confidence[order],
        segment_keys=keys,
        p_alive=p_alive[order] if p_alive is not None else None,
        clv=clv[order] if clv is not None else None,
    )


def _check_ids(ids: np.ndarray) -> None:
    text = pd.Series(ids, dtype=object)
    lengths = text.str.len()
    empty = np.flatnonzero((lengths == 0).to_numpy())
    if len(empty):
        row = int(empty[0]) + 1
        raise DataValidationError(
            f"{len(empty)} rows have no customer id (first: row {row})",
            [_problem(int(i) + 1, None, None, "no customer id") for i in empty[:MAX_LISTED]],
        )
    long = np.flatnonzero((lengths > MAX_ID_LENGTH).to_numpy())
    if len(long):
        raise DataValidationError(
            f"customer ids are at most {MAX_ID_LENGTH} characters (first longer: row {int(long[0]) + 1})",
            [_problem(int(i) + 1, None, None, "customer id too long") for i in long[:MAX_LISTED]],
        )
    nul = np.flatnonzero(text.str.contains("\x00", regex=False).to_numpy(dtype=bool))
    if len(nul):
        raise DataValidationError(
            f"customer ids may not hold NUL characters (first: row {int(nul[0]) + 1})",
            [_problem(int(i) + 1, None, None, "NUL character in customer id") for i in nul[:MAX_LISTED]],
        )


def _duplicate(ids: np.ndarray) -> None:
    repeated = pd.Series(ids, dtype=object).duplicated(keep="first").to_numpy()
    second = int(np.flatnonzero(repeated)[0])
    customer = ids[second]
    first = int(np.flatnonzero(ids[:second] == customer)[0])
    raise DataValidationError(
        f"customer id {customer!r} appears more than once (rows {first + 1} and {second + 1}): "
        "a run's ids must be unique",
        [_problem(second + 1, None, None, f"duplicate customer id {customer!r} (first on row {first + 1})")],
    )
