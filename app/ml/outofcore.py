"""Training beyond memory: a CSV or Parquet file read in chunks, k chosen on a bounded sample, and
Lloyd's iterations streamed over the chunks.

The first pass checks every row, fits the scaler incrementally, keeps a uniform random sample of
at most ``SAMPLE_ROWS`` rows and spills the checked features (float32) to a temporary file. A
file of at most ``IN_MEMORY_ROWS`` rows is then trained exactly as an upload is (in memory).
A larger one has k chosen and K-Means seeded on the sample (as in memory: silhouette over the
range, ``n_init`` starts), then refined by full Lloyd passes over the spilled rows until the
inertia improves by less than ``TOLERANCE`` (relative) or ``MAX_PASSES`` passes; a last pass
counts each segment's size and feature means. Memory holds a chunk, the sample and k x d sums,
whatever the file's size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.preprocessing import StandardScaler

from app.ml import selection
from app.ml.chunked import (
    CHUNK_ROWS,
    IN_MEMORY_ROWS,
    SAMPLE_ROWS,
    FrameSample,
    Reservoir,
    Spill,
    TrainingFile,
    lloyd,
    nearest,
)
from app.ml.drift import fit_reference
from app.ml.encoding import encode, fit_schema, level_indices
from app.ml.frames import concat_training_frames
from app.ml.kmeans import kmeans_with_centers
from app.ml.preprocess import FEATURES, DataValidationError
from app.ml.schema import FeatureSchema
from app.ml.training import (
    _INCOME,
    _SPENDING,
    TrainedParts,
    _finish_metadata,
    _metadata,
    custom_segments,
    customer_segments,
    decode_centroid,
    train_custom,
    train_customer,
)

_WIDTH = len(FEATURES)


def train_customer_file(
    source: TrainingFile,
    *,
    n_clusters: int | None,
    random_state: int,
    k_range: tuple[int, int],
) -> TrainedParts:
    """Fit the customer kind on a file of any size (see the module docstring)."""
    started = time.perf_counter()
    sample_rows, in_memory_rows = source.sample_rows, source.in_memory_rows
    rng = np.random.default_rng(random_state)
    scaler = StandardScaler()
    sample = Reservoir(sample_rows, rng)
    hasher = hashlib.sha256()
    spill = Spill()
    try:
        for block in source.customer_blocks():
            scaler.partial_fit(block.astype(np.float64))
            hasher.update(np.ascontiguousarray(block).tobytes())
            spill.write(block)
            sample.add(block)
        n = spill.rows
        if n <= in_memory_rows:
            arr = np.concatenate(list(spill.blocks(n))) if n else np.empty((0, _WIDTH), dtype=np.float32)
            spill.close()
            parts = train_customer(arr, n_clusters=n_clusters, random_state=random_state, k_range=k_range)
            columns = {name: arr[:, j] for j, name in enumerate(FEATURES)}
            parts.metadata["drift_reference"] = fit_reference(
                FeatureSchema.customer(), columns, parts.labels, len(parts.metadata["segments"])
            ).to_dict()
            return parts
        return _streamed(
            spill, scaler, sample.rows, hasher.hexdigest(), source, n_clusters, random_state, k_range, started
        )
    finally:
        spill.close()


def _streamed(
    spill: Spill,
    scaler: StandardScaler,
    sample: np.ndarray,
    fingerprint: str,
    source: TrainingFile,
    n_clusters: int | None,
    random_state: int,
    k_range: tuple[int, int],
    started: float,
) -> TrainedParts:
    n = spill.rows
    mean, scale = np.asarray(scaler.mean_, dtype=np.float64), np.asarray(scaler.scale_, dtype=np.float64)
    mean32, scale32 = mean.astype(np.float32), scale.astype(np.float32)
    sample_scaled = (sample.astype(np.float64) - mean) / scale
    fit = selection.fit_kmeans(sample, sample_scaled, n_clusters=n_clusters, random_state=random_state, k_range=k_range)
    centers = np.asarray(fit.kmeans.cluster_centers_, dtype=np.float64)
    k = len(centers)
    centers, passes = lloyd(lambda: ((block - mean32) / scale32 for block in spill.blocks(source.chunk_rows)), centers)

    # The last pass: sizes, feature means in original units and the inertia of the final centroids.
    sizes = np.zeros(k)
    raw_sums = np.zeros((k, _WIDTH))
    inertia = 0.0
    for block in spill.blocks(source.chunk_rows):
        raw = block.astype(np.float64)
        labels, d2 = nearest((block - mean32) / scale32, centers.astype(np.float32))
        sizes += np.bincount(labels, minlength=k)
        for j in range(_WIDTH):
            raw_sums[:, j] += np.bincount(labels, weights=raw[:, j], minlength=k)
        inertia += float(d2.sum(dtype=np.float64))
    _require_every_segment(sizes)

    original = scaler.inverse_transform(centers)
    order = np.lexsort((original[:, _SPENDING], original[:, _INCOME]))
    sizes, means = sizes[order], (raw_sums / sizes[:, None])[order]
    segments, centroids = customer_segments(centers[order], original[order], sizes.astype(np.int64), means, n)
    return _streamed_parts(
        _StreamedFit(fit, centers[order], inertia, passes, source, source.chunk_rows),
        scaler=scaler,
        schema=FeatureSchema.customer(),
        sample_x=sample_scaled,
        sample_columns={name: sample[:, j] for j, name in enumerate(FEATURES)},
        segments=segments,
        centroids=centroids,
        missing_shares=dict.fromkeys(FEATURES, 0.0),
        n=n,
        random_state=random_state,
        fingerprint=fingerprint,
        started=started,
    )


@dataclass(frozen=True)
class _StreamedFit:
    """How a streamed K-Means ended: the sample's fit, the final (ordered) centroids and their inertia
    over every row, the Lloyd passes made, the file and the rows per chunk read."""

    fit: selection.ClusterFit
    centers: np.ndarray
    inertia: float
    passes: int
    source: TrainingFile
    chunk_rows: int


def _require_every_segment(sizes: np.ndarray) -> None:
    if (sizes == 0).any():
        raise DataValidationError(
            f"could not form {len(sizes)} distinct segments from this data (too few distinct customers)"
        )


def _streamed_parts(
    streamed: _StreamedFit,
    *,
    scaler: StandardScaler | None,
    schema: FeatureSchema,
    sample_x: np.ndarray,
    sample_columns: dict[str, Any],
    segments: list[dict[str, Any]],
    centroids: list[dict[str, Any]],
    missing_shares: dict[str, float],
    n: int,
    random_state: int,
    fingerprint: str,
    started: float,
) -> TrainedParts:
    """The trained parts of a streamed fit (either kind): the estimator holding the final centroids,
    the metadata every kind shares, the drift reference and the out-of-core report from the sample."""
    kmeans = kmeans_with_centers(streamed.centers, like=streamed.fit.kmeans, inertia=streamed.inertia)
    sample_labels, _ = nearest(sample_x, streamed.centers)
    fit = dataclasses.replace(streamed.fit, algorithm="streamed_kmeans", known_silhouette=None)
    metadata = _metadata(fit, sample_x, sample_labels, n=n, random_state=random_state, fingerprint=fingerprint)
    metadata["segments"] = segments
    metadata["centroids"] = centroids
    metadata["drift_reference"] = fit_reference(schema, sample_columns, sample_labels, len(segments)).to_dict()
    metadata["out_of_core"] = {
        "source": "parquet" if streamed.source.is_parquet else "csv",
        "sample_rows": int(len(sample_x)),
        "chunk_rows": streamed.chunk_rows,
        "lloyd_passes": streamed.passes,
    }
    _finish_metadata(metadata, schema, missing_shares, fit.selection, started)
    return TrainedParts(scaler, kmeans, metadata, np.empty(0, dtype=np.int64))


def train_custom_file(
    source: TrainingFile,
    schema: FeatureSchema,
    *,
    n_clusters: int | None,
    random_state: int,
    k_range: tuple[int, int],
) -> TrainedParts:
    """Fit a declared schema on a file of any size.

    A file of at most ``in_memory_rows`` rows of four features' worth of cells is trained exactly as
    an upload is. A larger one learns its encoding (medians, logs, means and deviations, levels) and
    k on the sample, then spills the encoded rows (float32) and refines K-Means by Lloyd passes as
    the customer kind does; segment statistics count every row. Empty shares count every row too.
    """
    started = time.perf_counter()
    budget = max(1, source.in_memory_rows * _WIDTH // max(len(schema.features), _WIDTH))
    rng = np.random.default_rng(random_state)
    sample = FrameSample(source.sample_rows, rng, schema)
    empty = dict.fromkeys(schema.names, 0)
    held: list[pd.DataFrame] | None = []
    n = 0
    for chunk in source.declared_frames(schema):
        n += len(chunk)
        sample.add(chunk)
        for feature in schema.features:
            empty[feature.name] += int(chunk[feature.name].isna().sum())
        if held is not None:
            held.append(chunk)
            if n > budget:
                held = None  # too large to train in memory: the chunks are read again
    if held is not None:
        frame = concat_training_frames(schema, held)
        del held
        parts = train_custom(frame, schema, n_clusters=n_clusters, random_state=random_state, k_range=k_range)
        fitted = FeatureSchema.from_dict(parts.metadata["schema"])
        columns = {f.name: frame[f.name] for f in fitted.features}
        parts.metadata["drift_reference"] = fit_reference(
            fitted, columns, parts.labels, len(parts.metadata["segments"])
        ).to_dict()
        return parts

    sample_frame = sample.frame()
    fitted, _ = fit_schema(schema, sample_frame)
    missing_shares = {name: count / n for name, count in empty.items()}
    encoded, cells = Spill(fitted.width), Spill(len(fitted.features))
    hasher = hashlib.sha256()
    try:
        for chunk in source.declared_frames(schema):
            x = encode(fitted, chunk, np.float32)
            hasher.update(x.tobytes())
            encoded.write(x)
            cells.write(_cell_codes(fitted, chunk))
        return _streamed_custom(
            encoded,
            cells,
            fitted,
            sample_frame,
            missing_shares,
            hasher.hexdigest(),
            source,
            n_clusters,
            random_state,
            k_range,
            started,
        )
    finally:
        encoded.close()
        cells.close()


def _cell_codes(fitted: FeatureSchema, chunk: pd.DataFrame) -> np.ndarray:
    """What the segment statistics need of each row: a number as read (NaN when empty), a level's index."""
    out = np.empty((len(chunk), len(fitted.features)), dtype=np.float32)
    for j, feature in enumerate(fitted.features):
        if feature.numeric:
            out[:, j] = chunk[feature.name].to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            out[:, j] = level_indices(feature, chunk[feature.name])[0]
    return out


def _streamed_custom(
    encoded: Spill,
    cells: Spill,
    fitted: FeatureSchema,
    sample_frame: pd.DataFrame,
    missing_shares: dict[str, float],
    fingerprint: str,
    source: TrainingFile,
    n_clusters: int | None,
    random_state: int,
    k_range: tuple[int, int],
    started: float,
) -> TrainedParts:
    n = encoded.rows
    rows = max(1, source.chunk_rows * _WIDTH // max(fitted.width, _WIDTH))
    sample_x = encode(fitted, sample_frame)
    fit = selection.fit_kmeans(sample_x, sample_x, n_clusters=n_clusters, random_state=random_state, k_range=k_range)
    centers, passes = lloyd(lambda: encoded.blocks(rows), np.asarray(fit.kmeans.cluster_centers_, dtype=np.float64))
    k = len(centers)

    # The last pass: sizes, and per segment each number's sum and count of non-empty cells, each level's count.
    sizes = np.zeros(k)
    inertia = 0.0
    features = fitted.features
    sums = np.zeros((k, len(features)))
    seen = np.zeros((k, len(features)))
    levels = [np.zeros((k, len(f.levels_ or ()))) for f in features]
    for x, codes in zip(encoded.blocks(rows), cells.blocks(rows), strict=True):
        labels, d2 = nearest(x, centers.astype(np.float32))
        sizes += np.bincount(labels, minlength=k)
        inertia += float(d2.sum(dtype=np.float64))
        for j, feature in enumerate(features):
            values = codes[:, j].astype(np.float64)
            if feature.numeric:
                known = ~np.isnan(values)
                sums[:, j] += np.bincount(labels[known], weights=values[known], minlength=k)
                seen[:, j] += np.bincount(labels[known], minlength=k)
            elif levels[j].shape[1]:
                coded = values >= 0
                width = levels[j].shape[1]
                cells_of = labels[coded] * width + values[coded].astype(np.int64)
                levels[j] += np.bincount(cells_of, minlength=k * width).reshape(k, width)
    _require_every_segment(sizes)

    keys = [centers[:, j] for j in reversed(range(centers.shape[1]))]
    order = np.lexsort((*keys, -sizes))
    centers, sizes = centers[order], sizes[order]
    stats: list[dict[str, Any]] = [{} for _ in range(k)]
    for j, feature in enumerate(features):
        for i, old in enumerate(order.tolist()):
            if feature.numeric:
                mean = sums[old, j] / seen[old, j] if seen[old, j] else (feature.median_ or 0.0)
                stats[i][feature.name] = round(float(mean), 4)
            else:
                stats[i][feature.name] = {
                    level: round(float(c / sizes[i]), 4)
                    for level, c in zip(feature.levels_ or (), levels[j][old], strict=True)
                }
    return _streamed_parts(
        _StreamedFit(fit, centers, inertia, passes, source, rows),
        scaler=None,
        schema=fitted,
        sample_x=sample_x,
        sample_columns={f.name: sample_frame[f.name] for f in features},
        segments=custom_segments(fitted, centers, sizes.astype(np.int64), stats, n),
        centroids=[decode_centroid(fitted, center) for center in centers],
        missing_shares=missing_shares,
        n=n,
        random_state=random_state,
        fingerprint=fingerprint,
        started=started,
    )


__all__ = [
    "CHUNK_ROWS",
    "IN_MEMORY_ROWS",
    "SAMPLE_ROWS",
    "TrainingFile",
    "train_custom_file",
    "train_customer_file",
]
