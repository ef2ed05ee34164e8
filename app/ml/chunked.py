"""The building blocks of training beyond memory: a training file read in chunks, checked rows
spilled to disk and read back, uniform samples of a stream, and Lloyd's iterations over the chunks.

Memory holds a chunk, the sample and k x d sums, whatever the file's size; the trainers that put
these together are in :mod:`app.ml.outofcore`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from app.ml.frames import categorical_values, iter_csv_training_frames, iter_parquet_training_frames
from app.ml.preprocess import (
    FEATURES,
    DataValidationError,
    _wrap_read_error,
    check_feature_blocks,
    iter_training_blocks,
    resolve_columns,
)
from app.ml.schema import FeatureSchema

SAMPLE_ROWS = 200_000
"""k is chosen, and K-Means seeded, on a uniform random sample of at most this many rows."""
IN_MEMORY_ROWS = 5_000_000
"""Files of at most this many rows are trained in memory, exactly as an upload."""
CHUNK_ROWS = 1_000_000
MAX_PASSES = 30
TOLERANCE = 1e-5
"""Lloyd passes stop when the inertia improves by less than this share."""
_WIDTH = len(FEATURES)


@dataclass(frozen=True)
class TrainingFile:
    """A training file on disk: CSV, or Parquet (by its suffix or its PAR1 magic)."""

    path: Path
    chunk_rows: int = CHUNK_ROWS
    in_memory_rows: int = IN_MEMORY_ROWS
    sample_rows: int = SAMPLE_ROWS

    @property
    def is_parquet(self) -> bool:
        if self.path.suffix.lower() in (".parquet", ".pq"):
            return True
        with open(self.path, "rb") as fh:
            return fh.read(4) == b"PAR1"

    def customer_blocks(self) -> Iterator[np.ndarray]:
        """Checked float32 (n, 4) blocks of the customer features; DataValidationError for bad data."""
        try:
            if self.is_parquet:
                yield from self._parquet_blocks()
            else:
                with open(self.path, "rb") as fh:
                    yield from iter_training_blocks(fh, self.chunk_rows)
        except (DataValidationError, MemoryError, OSError):
            raise
        except Exception as exc:  # noqa: BLE001 - a reader's own errors become one a user can act on
            raise _wrap_read_error(exc) from exc

    def declared_frames(self, schema: FeatureSchema) -> Iterator[pd.DataFrame]:
        """Typed chunks of a declared schema's columns, as read_training_frame types a CSV; after the
        last one, DataValidationError for bad cells (every row counted, the first ten listed)."""
        rows = max(1, self.chunk_rows * _WIDTH // max(len(schema.features), _WIDTH))
        try:
            if self.is_parquet:
                yield from iter_parquet_training_frames(self.path, schema, rows)
            else:
                with open(self.path, "rb") as fh:
                    yield from iter_csv_training_frames(fh, schema, rows)
        except (DataValidationError, MemoryError, OSError):
            raise
        except Exception as exc:  # noqa: BLE001 - a reader's own errors become one a user can act on
            raise _wrap_read_error(exc) from exc

    def _parquet_blocks(self) -> Iterator[np.ndarray]:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(self.path)
        columns = resolve_columns(parquet.schema_arrow.names, optional=())
        raw = [columns[name] for name in FEATURES]
        batches = parquet.iter_batches(batch_size=self.chunk_rows, columns=raw)
        yield from check_feature_blocks(batch.to_pandas()[raw] for batch in batches)


class Spill:
    """Checked float32 rows of `width` columns written to an unnamed temporary file, read back chunk by chunk."""

    def __init__(self, width: int = _WIDTH) -> None:
        self.file: IO[bytes] = tempfile.TemporaryFile(dir=os.environ.get("TMPDIR"))
        self.width = width
        self.rows = 0

    def write(self, block: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())
        self.rows += len(block)

    def blocks(self, rows: int) -> Iterator[np.ndarray]:
        self.file.seek(0)
        left = self.rows
        while left:
            take = min(rows, left)
            data = self.file.read(take * self.width * 4)
            yield np.frombuffer(data, dtype=np.float32).reshape(take, self.width)
            left -= take

    def close(self) -> None:
        self.file.close()


class Reservoir:
    """A uniform random sample of at most `size` rows of a stream: the rows with the smallest random keys."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.rng = rng
        self.keys = np.empty(0)
        self.rows = np.empty((0, _WIDTH), dtype=np.float32)

    def add(self, block: np.ndarray) -> None:
        keys = np.concatenate([self.keys, self.rng.random(len(block))])
        rows = np.concatenate([self.rows, block])
        if len(keys) > self.size:
            keep = np.argpartition(keys, self.size - 1)[: self.size]
            keep.sort()
            keys, rows = keys[keep], rows[keep]
        self.keys, self.rows = keys, rows


class FrameSample:
    """A uniform random sample of at most `size` rows of a declared schema's typed chunks
    (numbers float64 with NaN, categories as text or NaN), by the same smallest-keys rule."""

    def __init__(self, size: int, rng: np.random.Generator, schema: FeatureSchema) -> None:
        self.size = size
        self.rng = rng
        self.schema = schema
        self.keys = np.empty(0)
        self.columns: dict[str, np.ndarray] = {
            f.name: np.empty(0, dtype=np.float64 if f.numeric else object) for f in schema.features
        }

    def add(self, chunk: pd.DataFrame) -> None:
        keys = np.concatenate([self.keys, self.rng.random(len(chunk))])
        columns = {
            f.name: np.concatenate(
                [self.columns[f.name], np.asarray(chunk[f.name].array, dtype=self.columns[f.name].dtype)]
            )
            for f in self.schema.features
        }
        if len(keys) > self.size:
            keep = np.argpartition(keys, self.size - 1)[: self.size]
            keep.sort()
            keys = keys[keep]
            columns = {name: values[keep] for name, values in columns.items()}
        self.keys, self.columns = keys, columns

    def frame(self) -> pd.DataFrame:
        """The sample as read_training_frame gives rows: numbers float64, categories a category column."""
        return pd.DataFrame(
            {
                f.name: self.columns[f.name] if f.numeric else categorical_values(pd.Series(self.columns[f.name]))
                for f in self.schema.features
            }
        )


def nearest(Xs: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest centroid and squared distance to it."""
    d2 = (Xs * Xs).sum(axis=1)[:, None] - 2.0 * (Xs @ centers.T) + (centers * centers).sum(axis=1)[None, :]
    labels = np.argmin(d2, axis=1)
    return labels, np.maximum(d2[np.arange(len(Xs)), labels], 0.0)


def lloyd(blocks: Callable[[], Iterator[np.ndarray]], centers: np.ndarray) -> tuple[np.ndarray, int]:
    """Full Lloyd passes over the rows `blocks()` yields (scaled float32) from `centers` on, until the
    inertia improves by less than TOLERANCE or MAX_PASSES passes: (the centroids, the passes made)."""
    k, width = centers.shape
    previous: float | None = None
    passes = 0
    while passes < MAX_PASSES:
        passes += 1
        sums = np.zeros((k, width))
        counts = np.zeros(k)
        inertia = 0.0
        for Xs in blocks():
            # float32 for the distances (half the memory traffic), float64 for every sum.
            labels, d2 = nearest(Xs, centers.astype(np.float32))
            counts += np.bincount(labels, minlength=k)
            for j in range(width):
                sums[:, j] += np.bincount(labels, weights=Xs[:, j], minlength=k)
            inertia += float(d2.sum(dtype=np.float64))
        centers = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centers)
        if previous is not None and previous - inertia <= TOLERANCE * previous:
            break
        previous = inertia
    return centers, passes


__all__ = [
    "CHUNK_ROWS",
    "IN_MEMORY_ROWS",
    "MAX_PASSES",
    "SAMPLE_ROWS",
    "TOLERANCE",
    "FrameSample",
    "Reservoir",
    "Spill",
    "TrainingFile",
    "lloyd",
    "nearest",
]
