"""File sources: a CSV or Parquet file, or a glob of them, relative to SOURCE_ROOT.

A path is checked when the source is created (relative, no `..`, a .csv or .parquet name) and again
at every read, when it is resolved: each match must be a regular file whose real path (every symlink
followed) lies inside SOURCE_ROOT. Several matches are read in sorted order, one after the other,
and must have the same columns. Reading is blocking: the callers run it in worker threads.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from app.core.errors import InvalidInput

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
MAX_PATH_LENGTH = 500
MAX_MATCHES = 10_000
NO_ROOT = "File sources are refused: SOURCE_ROOT is not set"


def check_relative_path(path: str, *, what: str = "path") -> str:
    """A path as a source may name it: relative, inside the root by construction (no `..`)."""
    text = path.strip()
    if not text:
        raise InvalidInput(f"{what}: give a path relative to SOURCE_ROOT")
    if len(text) > MAX_PATH_LENGTH:
        raise InvalidInput(f"{what}: at most {MAX_PATH_LENGTH} characters")
    if "\x00" in text or "\\" in text:
        raise InvalidInput(f"{what}: use `/` between folders, and no NUL characters")
    if PurePosixPath(text).is_absolute() or PureWindowsPath(text).drive:
        raise InvalidInput(f"{what}: must be relative to SOURCE_ROOT, not absolute")
    if ".." in PurePosixPath(text).parts:
        raise InvalidInput(f"{what}: may not contain `..`")
    return text


def check_file_path(path: str) -> str:
    """A file source's path or glob: relative, no `..`, naming .csv or .parquet files."""
    text = check_relative_path(path)
    if file_format(text) is None:
        raise InvalidInput("path: must name .csv or .parquet files (e.g. exports/customers.csv or exports/*.parquet)")
    return text


def file_format(name: str) -> str | None:
    return FORMATS.get(PurePosixPath(name).suffix.lower())


def source_root(root: Path | None) -> Path:
    """SOURCE_ROOT, resolved; 422 when it is not set or not a folder."""
    if root is None:
        raise InvalidInput(NO_ROOT)
    try:
        resolved = root.resolve(strict=True)
    except OSError:
        raise InvalidInput("SOURCE_ROOT does not exist: file sources cannot be read") from None
    if not resolved.is_dir():
        raise InvalidInput("SOURCE_ROOT is not a folder: file sources cannot be read")
    return resolved


def inside_root(root: Path, candidate: Path, shown: str) -> Path:
    try:
        real = candidate.resolve(strict=True)
    except OSError:
        raise InvalidInput(f"{shown}: cannot be read") from None
    if not real.is_relative_to(root):
        raise InvalidInput(f"{shown}: resolves outside SOURCE_ROOT (a symlink out of the root is refused)")
    if not real.is_file():
        raise InvalidInput(f"{shown}: is not a regular file")
    return real


def resolve_files(root: Path | None, path: str) -> list[tuple[str, Path]]:
    """Every file `path` names now, as (the name relative to the root, its real path), in sorted order."""
    base = source_root(root)
    pattern = check_relative_path(path)
    if glob.has_magic(pattern):
        names = sorted(
            str(match.relative_to(base)) for match in base.glob(pattern) if not match.is_dir() or match.is_symlink()
        )
    else:
        names = [pattern] if (base / pattern).exists() or (base / pattern).is_symlink() else []
    if not names:
        raise InvalidInput(f"path: no file under SOURCE_ROOT matches {pattern}")
    if len(names) > MAX_MATCHES:
        raise InvalidInput(f"path: {len(names)} files match {pattern}; at most {MAX_MATCHES}")
    found = [(name, inside_root(base, base / name, name)) for name in names]
    formats = {file_format(name) for name, _ in found}
    if len(formats) != 1 or None in formats:
        raise InvalidInput(f"path: the files matching {pattern} must all be .csv or all be .parquet")
    return found


def read_frames(files: list[tuple[str, Path]], *, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The files' rows, `chunk_rows` at a time (CSV cells as text, exactly as written; Parquet values as typed)."""
    columns: list[str] | None = None
    for name, real in files:
        for index, frame in enumerate(_file_frames(name, real, chunk_rows=chunk_rows)):
            if index == 0:
                found = [str(column) for column in frame.columns]
                if columns is None:
                    columns = found
                elif found != columns:
                    raise InvalidInput(
                        f"{name}: its columns ({', '.join(found)}) differ from the first file's ({', '.join(columns)})"
                    )
            yield frame


def _file_frames(name: str, real: Path, *, chunk_rows: int) -> Iterator[pd.DataFrame]:
    try:
        if file_format(name) == "parquet":
            yield from _parquet_frames(real, chunk_rows)
        else:
            yield from _csv_frames(real, chunk_rows)
    except InvalidInput:
        raise
    except (OSError, ValueError, pa.ArrowException, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{name}: cannot be read: {_first_line(exc)}") from None


def _csv_frames(real: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    try:
        reader = pd.read_csv(
            real, chunksize=chunk_rows, dtype=str, keep_default_na=False, encoding="utf-8-sig", skip_blank_lines=True
        )
    except pd.errors.EmptyDataError:
        raise ValueError("the file is empty (no header)") from None
    with reader:
        yielded = False
        for frame in reader:
            yielded = True
            yield frame
        if not yielded:
            # A header alone: no rows, but the columns.
            yield pd.read_csv(real, nrows=0, dtype=str, encoding="utf-8-sig")


def _parquet_frames(real: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    parquet = pq.ParquetFile(real)
    yielded = False
    for batch in parquet.iter_batches(batch_size=chunk_rows):
        yielded = True
        yield batch.to_pandas(types_mapper=pd.ArrowDtype)
    if not yielded:
        yield parquet.schema_arrow.empty_table().to_pandas(types_mapper=pd.ArrowDtype)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
