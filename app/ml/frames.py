"""Reading a training CSV for a declared schema into a typed DataFrame, in bounded memory."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pandas.api.types import union_categoricals

from app.preprocess import (
    MAX_LISTED_PROBLEMS,
    CsvSource,
    DataValidationError,
    _problem,
    _read_header,
    _shown,
    _sniff,
    read_source,
    resolve_columns,
)

if TYPE_CHECKING:
    from app.ml.schema import FeatureSchema

CHUNK_ROWS = 200_000


def match_columns(columns: Iterable[Any], wanted: Iterable[str], *, required: Iterable[str]) -> dict[str, Any]:
    """Map each wanted name to the raw header that means it: trimmed, case-insensitive.

    Raises one DataValidationError naming every missing required column, or a
    name that two columns claim.
    """
    required = tuple(required)
    optional = [name for name in wanted if name not in required]
    return resolve_columns(columns, required=required, optional=optional, key=_header_key)


def _header_key(name: Any) -> str:
    return str(name).strip().casefold()


def numeric_values(series: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float64 values, empty mask, bad mask) of one raw column; NaN where empty or bad.

    Empty means a blank cell; bad is text that is not a number, or an infinity.
    """
    if pd.api.types.is_bool_dtype(series.dtype):
        series = series.astype(object)  # True/False are not numbers here
    if pd.api.types.is_numeric_dtype(series.dtype):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        empty = np.isnan(values)
    else:
        text = series.astype(object)
        absent = text.isna()
        stripped = text.where(absent, text.astype(str)).str.strip()
        empty = (absent | (stripped == "")).to_numpy(dtype=bool)
        values = np.asarray(pd.to_numeric(stripped.where(~empty, None), errors="coerce"), dtype=np.float64)
    bad = ~np.isfinite(values) & ~empty
    values = np.where(bad, np.nan, values)
    return values, empty, bad


def categorical_values(series: pd.Series) -> pd.Categorical:
    """Trimmed text as a Categorical; blank cells become NaN (the level ``missing`` later)."""
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    level_of_unique, levels = pd.factorize(pd.Index(np.asarray(uniques, dtype=object).astype(str)).str.strip())
    blank = np.asarray(levels == "", dtype=bool)
    renumber = np.cumsum(~blank) - 1
    renumber[blank] = -1
    out = np.full(len(codes), -1, dtype=np.int64)
    known = codes >= 0
    out[known] = renumber[level_of_unique][codes[known]]
    return pd.Categorical.from_codes(out, categories=pd.Index(np.asarray(levels)[~blank], dtype=object))


def bad_number_reason(raw: Any) -> str:
    """Why a non-empty numeric cell was refused."""
    try:
        value = float(str(raw).strip())
    except ValueError:
        return f"not a number: {_shown(raw)}"
    return f"not a finite number: {_shown(raw)}" if math.isinf(value) else f"not a number: {_shown(raw)}"


def read_training_frame(source: CsvSource, schema: FeatureSchema) -> pd.DataFrame:
    """Parse a training CSV into one column per declared feature (plus the id column, if present).

    ``source`` is a path, raw bytes or a binary file object (read from its
    current position). The file is read in chunks with only the declared
    columns, so memory stays bounded by the result. Headers match trimmed
    and case-insensitively; other columns are ignored. Numeric columns are
    float64 with NaN for empty cells (imputed at training and counted as
    missing); categorical ones a pandas ``category`` with NaN for empty cells;
    the id column text. Raises DataValidationError, and nothing else, for
    an empty, binary, non-UTF-8 or malformed file, missing declared columns
    (all named at once), a header with no data rows, or numeric cells that
    hold text or an infinity (the first ten listed, every row counted).
    """
    return read_source(source, lambda fh: _read(fh, schema))


def _read(fh: IO[bytes], schema: FeatureSchema) -> pd.DataFrame:
    _sniff(fh)
    wanted = schema.names + ([schema.id_column] if schema.id_column else [])
    raw = match_columns(_read_header(fh), wanted, required=schema.names)
    text_columns = [f.name for f in schema.features if not f.numeric] + (
        [schema.id_column] if schema.id_column in raw else []
    )
    selected = set(raw.values())
    reader = pd.read_csv(
        fh,
        usecols=lambda c: c in selected,
        dtype={raw[name]: str for name in text_columns},
        chunksize=CHUNK_ROWS,
        encoding="utf-8-sig",
        keep_default_na=False,
        na_values={raw[f.name]: [""] for f in schema.features if f.numeric},
    )
    parts: dict[str, list[Any]] = {name: [] for name in raw}
    problems: list[dict[str, Any]] = []
    offending = 0
    seen = 0
    with reader:
        for chunk in reader:
            listing = len(problems) < MAX_LISTED_PROBLEMS
            bad_rows = np.zeros(len(chunk), dtype=bool)
            for feature in schema.features:
                column = chunk[raw[feature.name]]
                if not feature.numeric:
                    parts[feature.name].append(categorical_values(column))
                    continue
                values, _, bad = numeric_values(column)
                parts[feature.name].append(values)
                if bad.any():
                    bad_rows |= bad
                    if listing:  # earlier chunks' rows come first; once ten are listed, later ones never show
                        for i in np.flatnonzero(bad)[:MAX_LISTED_PROBLEMS].tolist():
                            reason = bad_number_reason(column.iloc[i])
                            problems.append(_problem(seen + i + 1, feature.name, reason))
            if schema.id_column in raw:
                parts[schema.id_column].append(chunk[raw[schema.id_column]].to_numpy(dtype=object))
            offending += int(bad_rows.sum())
            seen += len(chunk)
    if seen == 0:
        raise DataValidationError("the CSV has a header but no data rows", [_problem(None, None, "no data rows")])
    if offending:
        problems.sort(key=lambda p: (p["row"], schema.names.index(p["column"])))
        problems = problems[:MAX_LISTED_PROBLEMS]
        first = "; ".join(f"row {p['row']} {p['column']}: {p['reason']}" for p in problems[:3])
        raise DataValidationError(
            f"{offending} of {seen} rows have invalid values (first: {first})", problems, offending
        )
    frame: dict[str, Any] = {}
    if schema.id_column in raw:
        frame[schema.id_column] = pd.Series(np.concatenate(parts[schema.id_column]), dtype=object)
    for feature in schema.features:
        chunks = parts[feature.name]
        if feature.numeric:
            frame[feature.name] = np.concatenate(chunks)
        else:
            frame[feature.name] = pd.Series(chunks[0] if len(chunks) == 1 else union_categoricals(chunks))
    return pd.DataFrame(frame)
