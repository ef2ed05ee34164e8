"""Customer data in, validated feature matrix out.

This module is the one place that knows the customer feature list and its
rules. The API, the command-line tools and the notebook all go through it.

Row numbers
-----------
Every row number reported here (``DataValidationError.problems[i]["row"]``,
the per-row errors of :func:`score_frame`) is the 1-based number of the *data*
row: the first record after the header is row 1. ``problems[i]["line"]`` is
the same row as a spreadsheet shows it, i.e. counting the header as line 1
(``line == row + 1``). Completely blank lines are skipped by the CSV reader
and not counted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import pandas as pd

from app.ml.errors import MAX_LISTED_PROBLEMS, DataValidationError
from app.ml.sources import CsvSource, _OpenedSource, _problem, _read_header, _sniff, _wrap_read_error, read_source

FEATURES: tuple[str, ...] = ("age", "annual_income", "spending_score", "purchase_frequency")
"""Clustering features, in the column order of every feature matrix."""

FEATURE_RANGES: dict[str, tuple[float, float]] = {
    "age": (18, 100),
    "annual_income": (0.0, 10000.0),
    "spending_score": (1, 100),
    "purchase_frequency": (0, 1000),
}
INTEGER_FEATURES: frozenset[str] = frozenset({"age", "spending_score", "purchase_frequency"})

SEX_COLUMN = "sex"
SEX_VALUES: tuple[str, ...] = ("Male", "Female", "Other")
_SEX_LOOKUP = {value.lower(): value for value in SEX_VALUES}


# --------------------------------------------------------------------------- #
# Single values


def canonical_sex(value: Any) -> str:
    """Return ``"Male"``, ``"Female"`` or ``"Other"`` for any casing/padding of them.

    Raises ValueError for anything else.
    """
    if isinstance(value, str):
        canonical = _SEX_LOOKUP.get(value.strip().lower())
        if canonical is not None:
            return canonical
    raise ValueError(f"sex must be one of {', '.join(SEX_VALUES)}, got {value!r}")


def normalize_header(name: Any) -> str:
    """``" Annual_Income "`` / ``"annual income"`` / ``"Annual-Income"`` -> ``"annual_income"``."""
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


def resolve_columns(
    columns: Iterable[Any],
    *,
    required: Iterable[str] = FEATURES,
    optional: Iterable[str] = (SEX_COLUMN,),
    key: Callable[[Any], str] = normalize_header,
) -> dict[str, Any]:
    """Map canonical feature names to the matching raw column names.

    A header means a name when both give the same ``key``: by default
    :func:`normalize_header`, so both the dataset's ``Annual_Income`` and
    ``annual_income`` work. Columns that are neither required nor optional
    are ignored. Raises DataValidationError naming every missing required
    column, or a name that two columns claim.
    """
    required = tuple(required)
    wanted = {key(name): name for name in (*required, *optional)}
    found: dict[str, Any] = {}
    raw_columns = list(columns)
    for raw in raw_columns:
        canonical = wanted.get(key(raw))
        if canonical is None:
            continue
        if canonical in found:
            raise DataValidationError(
                f"columns {found[canonical]!r} and {raw!r} both mean {canonical}; keep only one",
                [_problem(None, canonical, "duplicate column")],
            )
        found[canonical] = raw
    missing = [name for name in required if name not in found]
    if missing:
        shown = ", ".join(repr(str(c)) for c in raw_columns[:12]) or "none"
        hint = ""
        if len(raw_columns) == 1 and re.search(r"[;\t|]", str(raw_columns[0])):
            hint = " The file does not look comma-separated."
        raise DataValidationError(
            f"missing required column(s): {', '.join(missing)} (found: {shown}).{hint}",
            [_problem(None, name, "missing column") for name in missing],
        )
    return found


# --------------------------------------------------------------------------- #
# Column checks shared by training and scoring

_OK, _EMPTY, _NOT_NUMBER, _NOT_FINITE, _NOT_INTEGER, _OUT_OF_RANGE = range(6)


def _check_column(series: pd.Series, feature: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (float64 values, int8 issue codes) for one raw feature column."""
    if pd.api.types.is_bool_dtype(series.dtype):
        series = series.astype(object)  # True/False are not numbers here
    if pd.api.types.is_numeric_dtype(series.dtype):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        codes = np.where(np.isnan(values), _EMPTY, _OK).astype(np.int8)
    else:
        text = series.astype(object)
        is_blank = text.isna().to_numpy() | text.map(lambda v: isinstance(v, str) and not v.strip()).to_numpy(
            dtype=bool
        )
        is_bool = text.map(lambda v: isinstance(v, (bool, np.bool_))).to_numpy(dtype=bool)
        numeric = pd.to_numeric(text.where(~is_bool, None), errors="coerce")
        values = np.asarray(numeric, dtype=np.float64)
        codes = np.full(len(values), _OK, dtype=np.int8)
        codes[np.isnan(values)] = _NOT_NUMBER
        codes[is_blank] = _EMPTY
    lo, hi = FEATURE_RANGES[feature]
    finite = np.isfinite(values)
    codes[(codes == _OK) & ~finite] = _NOT_FINITE
    ok = codes == _OK
    if feature in INTEGER_FEATURES:
        codes[ok & (values != np.floor(np.where(ok, values, 0.0)))] = _NOT_INTEGER
        ok = codes == _OK
    with np.errstate(invalid="ignore"):
        codes[ok & ((values < lo) | (values > hi))] = _OUT_OF_RANGE
    return values, codes


def _shown(raw: Any) -> str:
    if isinstance(raw, np.generic):
        raw = raw.item()
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


def _reason(code: int, feature: str, raw: Any, value: float) -> str:
    if code == _EMPTY:
        return "empty value"
    if code == _NOT_NUMBER:
        return f"not a number: {_shown(raw)}"
    if code == _NOT_FINITE:
        return f"not a finite number: {_shown(raw)}"
    if code == _NOT_INTEGER:
        return f"not a whole number: {value:g}"
    lo, hi = FEATURE_RANGES[feature]
    return f"out of range {lo:g}..{hi:g}: {value:g}"


# --------------------------------------------------------------------------- #
# Reading CSV sources


def load_training_matrix(source: CsvSource, *, chunksize: int = 200_000) -> np.ndarray:
    """Parse a training CSV into a float32 matrix of shape (n, len(FEATURES)).

    ``source`` is a path, raw bytes or a binary file object (read from its
    current position; it is not closed). The file is parsed in chunks of
    ``chunksize`` rows reading only the feature columns, so memory stays
    bounded by the result plus one chunk. Headers follow :func:`resolve_columns`;
    ``sex`` and other columns are ignored.

    Raises DataValidationError, and nothing else, for any unusable input:
    an empty or binary file, malformed CSV, missing columns, a header with
    no data rows, and values that are empty, not numbers, NaN/infinite, not
    whole numbers where an integer is required, or out of range. Value
    problems are reported for the first ten offending cells, with
    ``offending_rows`` counting all rows concerned.
    """
    return read_source(source, lambda fh: _load_training_matrix(fh, chunksize))


def _load_training_matrix(fh: IO[bytes], chunksize: int) -> np.ndarray:
    blocks = list(iter_training_blocks(fh, chunksize))
    return np.concatenate(blocks, axis=0) if len(blocks) > 1 else blocks[0]


def iter_training_blocks(fh: IO[bytes], chunksize: int = 200_000) -> Iterator[np.ndarray]:
    """The training CSV's customer features, float32 (n, 4) in FEATURES order, block by block.

    Every block is checked as it is read. Blocks stop at the first one with a
    problem; once the file has been read to its end, one DataValidationError
    lists the first problems and counts every row concerned (as
    :func:`load_training_matrix` reports them).
    """
    _sniff(fh)
    columns = resolve_columns(_read_header(fh), optional=())
    raw_names = [columns[name] for name in FEATURES]
    wanted = set(raw_names)
    reader = pd.read_csv(
        fh,
        usecols=lambda c: c in wanted,
        chunksize=max(1, int(chunksize)),
        encoding="utf-8-sig",
        keep_default_na=False,
        na_values=[""],
    )
    with reader:
        yield from check_feature_blocks(chunk[raw_names] for chunk in reader)


def check_feature_blocks(frames: Iterable[pd.DataFrame]) -> Iterator[np.ndarray]:
    """Check frames holding the four customer features (in FEATURES order, any dtype), block by block;
    see :func:`iter_training_blocks`."""
    problems: list[dict[str, Any]] = []
    offending = 0
    seen = 0
    for chunk in frames:
        block = np.empty((len(chunk), len(FEATURES)), dtype=np.float32)
        codes = np.zeros((len(chunk), len(FEATURES)), dtype=np.int8)
        for j, feature in enumerate(FEATURES):
            values, codes[:, j] = _check_column(chunk.iloc[:, j], feature)
            block[:, j] = values
        bad_rows = np.flatnonzero(codes.any(axis=1))
        offending += len(bad_rows)
        for i in bad_rows:
            if len(problems) >= MAX_LISTED_PROBLEMS:
                break
            for col in np.flatnonzero(codes[i]).tolist():
                feature = FEATURES[col]
                raw = chunk.iloc[int(i), col]
                problems.append(
                    _problem(seen + int(i) + 1, feature, _reason(codes[i, col], feature, raw, float(block[i, col])))
                )
        if not offending:
            yield block
        seen += len(chunk)
    if seen == 0:
        raise DataValidationError("the CSV has a header but no data rows", [_problem(None, None, "no data rows")])
    if offending:
        problems = problems[:MAX_LISTED_PROBLEMS]
        first = "; ".join(f"row {p['row']} {p['column']}: {p['reason']}" for p in problems[:3])
        raise DataValidationError(
            f"{offending} of {seen} rows have invalid values (first: {first})", problems, offending
        )


def read_csv_frame(source: CsvSource, *, max_rows: int | None = None) -> pd.DataFrame:
    """Read a CSV for batch scoring as text, every cell a ``str`` ("" when empty).

    Keeps all columns as the client sent them, so results can be written
    back next to the input. Raises DataValidationError for an empty, binary
    or malformed file, or more than ``max_rows`` data rows.
    """
    try:
        with _OpenedSource(source) as fh:
            _sniff(fh)
            nrows = None if max_rows is None else max_rows + 1
            frame = pd.read_csv(fh, dtype=str, keep_default_na=False, na_values=[], encoding="utf-8-sig", nrows=nrows)
    except (DataValidationError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - contract: only DataValidationError escapes
        raise _wrap_read_error(exc) from exc
    if max_rows is not None and len(frame) > max_rows:
        raise DataValidationError(f"too many rows: at most {max_rows} can be scored at once")
    return frame


# --------------------------------------------------------------------------- #
# Batch scoring


@dataclass(frozen=True)
class ScoringBatch:
    """A batch of customers split into scoreable rows and rows with errors.

    ``features``  float64 array (n_valid, 4) for the valid rows, in input order.
    ``valid``     bool array (n,), True where the row can be scored.
    ``errors``    one entry per input row: None, or e.g.
                  ``"age: not a number: 'abc'; spending_score: out of range 1..100: 150"``.
    ``customers`` canonical DataFrame, one row per input row, columns ``sex``
                  (canonical or None) and FEATURES (float, NaN where unusable).
    """

    features: np.ndarray
    valid: np.ndarray
    errors: list[str | None]
    customers: pd.DataFrame

    def __len__(self) -> int:
        return len(self.errors)


def score_frame(frame: pd.DataFrame) -> ScoringBatch:
    """Validate a DataFrame of customers row by row for batch scoring.

    Unlike :func:`load_training_matrix`, a bad row does not fail the batch:
    it gets an error string instead. Headers follow :func:`resolve_columns`;
    ``sex`` is optional, but when present and non-empty it must be a valid
    value. A missing feature column still raises DataValidationError, since
    no row could be scored.
    """
    columns = resolve_columns(frame.columns)
    n = len(frame)
    reasons: list[list[str]] = [[] for _ in range(n)]
    customers = pd.DataFrame(index=range(n))

    if SEX_COLUMN in columns:
        sexes: list[str | None] = []
        for i, raw in enumerate(frame[columns[SEX_COLUMN]].tolist()):
            if raw is None or (isinstance(raw, float) and np.isnan(raw)) or (isinstance(raw, str) and not raw.strip()):
                sexes.append(None)
                continue
            try:
                sexes.append(canonical_sex(raw))
            except ValueError:
                sexes.append(None)
                reasons[i].append(f"sex: must be {', '.join(SEX_VALUES)}: {_shown(raw)}")
        customers[SEX_COLUMN] = pd.Series(sexes, dtype=object)
    else:
        customers[SEX_COLUMN] = pd.Series([None] * n, dtype=object)

    matrix = np.empty((n, len(FEATURES)), dtype=np.float64)
    for j, feature in enumerate(FEATURES):
        raw_series = frame[columns[feature]].reset_index(drop=True)
        values, codes = _check_column(raw_series, feature)
        for row in np.flatnonzero(codes).tolist():
            reasons[row].append(f"{feature}: {_reason(codes[row], feature, raw_series.iloc[row], values[row])}")
        matrix[:, j] = np.where(codes == _OK, values, np.nan)
        customers[feature] = matrix[:, j]

    errors = ["; ".join(r) if r else None for r in reasons]
    valid = np.array([e is None for e in errors], dtype=bool)
    return ScoringBatch(features=matrix[valid], valid=valid, errors=errors, customers=customers)


# --------------------------------------------------------------------------- #
# Records (already validated API bodies)


def features_matrix(records: Iterable[Any]) -> np.ndarray:
    """Stack customers into a float64 array (n, 4) in FEATURES order.

    Each record is a mapping or an object with attributes named like
    FEATURES (a pydantic model, an ORM row...). Range rules are not checked
    here (API schemas do that), but a missing, non-numeric or non-finite
    value raises DataValidationError naming the 1-based record and field.
    """
    rows: list[tuple[float, ...]] = []
    problems: list[dict[str, Any]] = []
    offending = 0
    for number, record in enumerate(records, start=1):
        getter = record.get if isinstance(record, Mapping) else (lambda name, r=record: getattr(r, name, None))
        row: list[float] = []
        bad = False
        for feature in FEATURES:
            raw = getter(feature)
            reason = None
            if raw is None:
                reason = "missing value"
            elif isinstance(raw, (bool, np.bool_)):
                reason = f"not a number: {_shown(raw)}"
            else:
                try:
                    value = float(raw)
                except (TypeError, ValueError):
                    reason = f"not a number: {_shown(raw)}"
                else:
                    if not np.isfinite(value):
                        reason = f"not a finite number: {_shown(raw)}"
            if reason is not None:
                bad = True
                problems.append(_problem(number, feature, reason))
                value = np.nan
            row.append(value)
        offending += bad
        rows.append(tuple(row))
    if offending:
        raise DataValidationError(
            f"{offending} customer record(s) are missing or have non-numeric features", problems, offending
        )
    if not rows:
        return np.empty((0, len(FEATURES)), dtype=np.float64)
    return np.asarray(rows, dtype=np.float64)


__all__ = [
    "FEATURES",
    "FEATURE_RANGES",
    "INTEGER_FEATURES",
    "SEX_COLUMN",
    "SEX_VALUES",
    "CsvSource",
    "DataValidationError",
    "ScoringBatch",
    "canonical_sex",
    "features_matrix",
    "load_training_matrix",
    "normalize_header",
    "read_csv_frame",
    "read_source",
    "resolve_columns",
    "score_frame",
]
