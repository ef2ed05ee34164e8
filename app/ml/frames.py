"""Reading a training CSV for a declared schema into a typed DataFrame, in bounded memory."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pandas.api.types import union_categoricals

from app.ml.errors import MAX_LISTED_PROBLEMS, DataValidationError
from app.ml.preprocess import (
    CsvSource,
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
    return read_source(source, lambda fh: concat_training_frames(schema, iter_csv_training_frames(fh, schema)))


def iter_csv_training_frames(
    fh: IO[bytes], schema: FeatureSchema, chunk_rows: int = CHUNK_ROWS
) -> Iterator[pd.DataFrame]:
    """The chunks of :func:`read_training_frame`, each typed as its result; once every chunk is out,
    DataValidationError if the file had no data rows or bad numeric cells."""
    _sniff(fh)
    raw = match_columns(_read_header(fh), _wanted(schema), required=schema.names)
    text_columns = [f.name for f in schema.features if not f.numeric] + (
        [schema.id_column] if schema.id_column in raw else []
    )
    selected = set(raw.values())
    reader = pd.read_csv(
        fh,
        usecols=lambda c: c in selected,
        dtype={raw[name]: str for name in text_columns},
        chunksize=chunk_rows,
        encoding="utf-8-sig",
        keep_default_na=False,
        na_values={raw[f.name]: [""] for f in schema.features if f.numeric},
    )
    with reader:
        yield from _checked_frames(schema, raw, reader)


def iter_parquet_training_frames(
    path: str | os.PathLike, schema: FeatureSchema, chunk_rows: int = CHUNK_ROWS
) -> Iterator[pd.DataFrame]:
    """A Parquet file's row batches typed as :func:`iter_csv_training_frames` types a CSV's chunks.

    Integer and floating columns stay numbers (a null is an empty cell); any other column is read
    as its text, as the same table exported to CSV would be.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataValidationError(
            f"the file is not readable Parquet: {exc}", [_problem(None, None, "not Parquet")]
        ) from None
    raw = match_columns(parquet.schema_arrow.names, _wanted(schema), required=schema.names)
    numeric = {raw[f.name] for f in schema.features if f.numeric}

    def chunk(batch: pa.RecordBatch) -> pd.DataFrame:
        columns: dict[str, Any] = {}
        for name, column in zip(batch.schema.names, batch.columns, strict=True):
            values = arrow_numbers(column) if name in numeric else None
            columns[name] = arrow_text(column) if values is None else values
        return pd.DataFrame(columns)

    batches = parquet.iter_batches(batch_size=chunk_rows, columns=list(dict.fromkeys(raw.values())))
    yield from _checked_frames(schema, raw, (chunk(batch) for batch in batches))


def arrow_numbers(column: Any) -> np.ndarray | None:
    """An integer or floating Arrow column as float64, NaN where null (an empty cell); None for any other type."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        return None
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)


def arrow_text(column: Any) -> np.ndarray:
    """An Arrow column's cells as the text a CSV export of it holds ("" where null), as objects."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.fill_null(pc.cast(column, pa.string()), "").to_numpy(zero_copy_only=False).astype(object)


def _wanted(schema: FeatureSchema) -> list[str]:
    return schema.names + ([schema.id_column] if schema.id_column else [])


def _checked_frames(
    schema: FeatureSchema, raw: dict[str, Any], chunks: Iterable[pd.DataFrame]
) -> Iterator[pd.DataFrame]:
    problems: list[dict[str, Any]] = []
    offending = 0
    seen = 0
    for chunk in chunks:
        listing = len(problems) < MAX_LISTED_PROBLEMS
        bad_rows = np.zeros(len(chunk), dtype=bool)
        frame: dict[str, Any] = {}
        if schema.id_column in raw:
            frame[schema.id_column] = chunk[raw[schema.id_column]].to_numpy(dtype=object)
        for feature in schema.features:
            column = chunk[raw[feature.name]]
            if not feature.numeric:
                frame[feature.name] = categorical_values(column)
                continue
            values, _, bad = numeric_values(column)
            frame[feature.name] = values
            if bad.any():
                bad_rows |= bad
                if listing:  # earlier chunks' rows come first; once ten are listed, later ones never show
                    for i in np.flatnonzero(bad)[:MAX_LISTED_PROBLEMS].tolist():
                        reason = bad_number_reason(column.iloc[i])
                        problems.append(_problem(seen + i + 1, feature.name, reason))
        offending += int(bad_rows.sum())
        seen += len(chunk)
        yield pd.DataFrame(frame)
    if seen == 0:
        raise DataValidationError("the CSV has a header but no data rows", [_problem(None, None, "no data rows")])
    if offending:
        problems.sort(key=lambda p: (p["row"], schema.names.index(p["column"])))
        problems = problems[:MAX_LISTED_PROBLEMS]
        first = "; ".join(f"row {p['row']} {p['column']}: {p['reason']}" for p in problems[:3])
        raise DataValidationError(
            f"{offending} of {seen} rows have invalid values (first: {first})", problems, offending
        )


def concat_training_frames(schema: FeatureSchema, frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Typed chunks (as :func:`iter_csv_training_frames` yields them) as one frame, categories united."""
    parts = list(frames)
    frame: dict[str, Any] = {}
    id_column = schema.id_column
    if parts and id_column is not None and id_column in parts[0].columns:
        frame[id_column] = pd.Series(np.concatenate([p[id_column].to_numpy() for p in parts]), dtype=object)
    for feature in schema.features:
        if feature.numeric:
            frame[feature.name] = np.concatenate([p[feature.name].to_numpy() for p in parts])
        else:
            chunks = [p[feature.name].array for p in parts]
            frame[feature.name] = pd.Series(chunks[0] if len(chunks) == 1 else union_categoricals(chunks))
    return pd.DataFrame(frame)
