"""Scored rows as a CSV answer: the input's columns and the result's, with no cell a spreadsheet would
run as a formula."""

from __future__ import annotations

import csv
import io
import json
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import pandas as pd

from app.versions.observed import BatchObserver, ExplainColumns
from app.versions.served import ServedModel

SPOOL_BYTES = 8 * 1024 * 1024
SCORE_CHUNK_ROWS = 50_000

# How long the dataset file is taken as unchanged before it is looked at again.


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


RESULT_COLUMNS = ("cluster", "cluster_name", "confidence", "error")


EXPLAIN_COLUMNS = ("top_feature", "margin")
"""A batch CSV is read, checked and scored this many rows at a time, so memory stays flat."""
