"""Opening any CSV source (a path, bytes or a file object) as a seekable binary file, refusing
empty and binary files before pandas sees them, and turning whatever pandas raises into a
DataValidationError a user can act on."""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Callable
from typing import IO, Any, TypeVar

import pandas as pd

from app.ml.errors import DataValidationError

_BINARY_SNIFF_BYTES = 8192
_SPOOL_BYTES = 16 * 1024 * 1024

CsvSource = str | os.PathLike | bytes | IO[bytes]
_T = TypeVar("_T")


def _problem(row: int | None, column: str | None, reason: str) -> dict[str, Any]:
    return {"row": row, "line": None if row is None else row + 1, "column": column, "reason": reason}


class _OpenedSource:
    """Context manager yielding a seekable binary file for any CsvSource."""

    def __init__(self, source: CsvSource):
        self.source = source
        self._owned: IO[bytes] | None = None

    def __enter__(self) -> IO[bytes]:
        source = self.source
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._owned = io.BytesIO(bytes(source))
            return self._owned
        if isinstance(source, (str, os.PathLike)):
            try:
                self._owned = open(source, "rb")
            except OSError as exc:
                raise DataValidationError(f"cannot read {os.fspath(source)!s}: {exc.strerror or exc}") from exc
            return self._owned
        if not hasattr(source, "read"):
            raise DataValidationError(f"unsupported CSV source of type {type(source).__name__}")
        try:
            seekable = source.seekable()
        except Exception:  # noqa: BLE001 - a broken file object is bad input too
            seekable = False
        if seekable:
            return source
        spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)
        while True:
            block = source.read(1 << 20)
            if not block:
                break
            if isinstance(block, str):
                block = block.encode("utf-8")
            spool.write(block)
        spool.seek(0)
        self._owned = spool
        return spool

    def __exit__(self, *exc_info: Any) -> None:
        if self._owned is not None:
            self._owned.close()


def _sniff(fh: IO[bytes]) -> None:
    """Reject empty and binary files before pandas sees them."""
    start = fh.tell()
    head = fh.read(_BINARY_SNIFF_BYTES)
    fh.seek(start)
    if isinstance(head, str):
        raise DataValidationError("expected a binary file object, got a text stream")
    if not head or not head.strip():
        raise DataValidationError("the file is empty", [_problem(None, None, "empty file")])
    if b"\x00" in head:
        raise DataValidationError(
            "the file is not a CSV (it contains binary data)", [_problem(None, None, "binary content")]
        )


_LINE_RE = re.compile(r"line (\d+)")


def _wrap_read_error(exc: Exception) -> DataValidationError:
    """Turn whatever pandas raised into a DataValidationError a user can act on."""
    if isinstance(exc, DataValidationError):
        return exc
    if isinstance(exc, pd.errors.EmptyDataError):
        return DataValidationError("the file is empty", [_problem(None, None, "empty file")])
    if isinstance(exc, UnicodeDecodeError):
        return DataValidationError(
            "the file is not UTF-8 text (is it a CSV?)", [_problem(None, None, "not UTF-8 text")]
        )
    text = str(exc).replace("Error tokenizing data. C error: ", "").strip()
    match = _LINE_RE.search(text)
    row = int(match.group(1)) - 1 if match else None
    return DataValidationError(f"malformed CSV: {text}", [_problem(row, None, text)], 1 if row else 0)


def _read_header(fh: IO[bytes]) -> list[Any]:
    start = fh.tell()
    header = pd.read_csv(fh, nrows=0, encoding="utf-8-sig").columns.tolist()
    fh.seek(start)
    return header


def read_source(source: CsvSource, read: Callable[[IO[bytes]], _T]) -> _T:
    """``read(fh)`` on a seekable binary file for any CsvSource, whatever goes wrong a DataValidationError.

    Only DataValidationError (and MemoryError) escape: pandas' own errors
    become one a user can act on.
    """
    try:
        with _OpenedSource(source) as fh:
            return read(fh)
    except (DataValidationError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - contract: only DataValidationError escapes
        raise _wrap_read_error(exc) from exc
