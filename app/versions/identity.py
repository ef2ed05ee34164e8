"""Segment identity the routes ask for: an analyst's names for segments, and two versions compared.

Both doors call these: `PUT /clusters/{id}` and `POST /models/compare` for `default`, and
`/segmentations/{name}/segments/{id}` and `/segmentations/{name}/compare` for any segmentation.
Matching a new version to the active one happens as it is trained (app.ml.matching, called by
ModelStore.train).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from app.core.errors import AppError, Conflict, NotFound
from app.core.tables import ModelVersion, ServiceState, utcnow
from app.ml import SegmentationModel
from app.ml.matching import name_key, names_revision, resolve_names, segment_key_of, with_segments
from app.ml.scoring import CentroidScorer
from app.versions.lease import rows_updated
from app.versions.store import ModelStore, ServedModel

RENAME_ATTEMPTS = 5
"""A rename that loses a race with another one (either worker) reads the version again this often."""

UNSET: Any = object()


# --- analyst names ------------------------------------------------------------------------------


def _renamed_segments(
    segments: list[dict[str, Any]], cluster_id: int, cluster_name: Any, description: Any
) -> list[dict[str, Any]]:
    """The segments with one renamed; UNSET leaves a field as it is, None restores the generated one."""
    if not 0 <= cluster_id < len(segments):
        raise NotFound("segment")
    segments = [dict(s) for s in segments]
    segment = segments[cluster_id]
    segment.setdefault("generated_name", segment["cluster_name"])
    segment.setdefault("generated_description", segment["description"])
    if cluster_name is not UNSET:
        if cluster_name is None:
            segment.pop("analyst_name", None)
        else:
            for other in segments:
                if other["cluster_id"] != cluster_id and name_key(other["cluster_name"]) == name_key(cluster_name):
                    raise Conflict(f"Segment {other['cluster_id']} of this model is already named {cluster_name!r}")
            segment["analyst_name"] = cluster_name
    if description is not UNSET:
        if description is None:
            segment.pop("analyst_description", None)
        else:
            segment["analyst_description"] = description
    return resolve_names(segments)


async def rename_segment(
    store: ModelStore, cluster_id: int, *, cluster_name: Any = UNSET, description: Any = UNSET
) -> ServedModel:
    """Rename a segment of the active version (and/or its description) in the database; returns that
    version as renamed. Every worker serves the new names within MODEL_SYNC_SECONDS, this one at once.

    The names are written into the version itself (its artifact and its `details`), so a rollback
    shows each version's names; a marker under `store.names_key` tells the other workers, and
    serves as the compare-and-set that keeps two concurrent renames from losing one.
    """
    for _ in range(RENAME_ATTEMPTS):
        active, marker = await store.active_state()
        if active is None:  # no version, so no segment of that id
            raise AppError(store.serving.no_model_message, status_code=404)
        async with store.database.sessionmaker() as session:
            row = (
                await session.execute(
                    select(ModelVersion.artifact, ModelVersion.details).where(
                        ModelVersion.version == active, ModelVersion.segmentation_id == store.segmentation.id
                    )
                )
            ).one_or_none()
        if row is None:
            continue  # deleted or replaced meanwhile: read the active version again
        artifact, details = row
        model = await run_in_threadpool(SegmentationModel.from_bytes, artifact)
        model.version = active
        segments = _renamed_segments(model.segments, cluster_id, cluster_name, description)
        revision = names_revision(model.metadata_) + 1
        renamed = with_segments(model, segments, names_revision=revision)
        blob = await run_in_threadpool(renamed.to_bytes)
        new_details = {**(details or {}), "segments": segments, "names_revision": revision}
        if await _write_names(store, active, marker, f"{active}:{revision}", blob, new_details):
            await store.sync()
            return ServedModel(renamed)
    raise Conflict("The segment was renamed by someone else at the same moment: try again")


async def _write_names(
    store: ModelStore, version: str, marker: str | None, new_marker: str, blob: bytes, details: dict[str, Any]
) -> bool:
    """Store the renamed version if no other rename came first (the marker is still `marker`)."""
    async with store.database.sessionmaker() as session:
        try:
            if marker is None:
                session.add(ServiceState(key=store.names_key, value=new_marker))
                await session.flush()
            else:
                claimed = await rows_updated(
                    session,
                    update(ServiceState)
                    .where(ServiceState.key == store.names_key, ServiceState.value == marker)
                    .values(value=new_marker, updated_at=utcnow()),
                )
                if claimed == 0:
                    await session.rollback()
                    return False
            written = await rows_updated(
                session,
                update(ModelVersion)
                .where(ModelVersion.version == version, ModelVersion.segmentation_id == store.segmentation.id)
                .values(artifact=blob, details=details),
            )
            if written == 0:
                await session.rollback()
                return False
            await session.commit()
        except IntegrityError:  # another worker's first rename of this segmentation came first
            await session.rollback()
            return False
    return True


# --- comparing two versions ---------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    from_model: SegmentationModel
    to_model: SegmentationModel
    from_labels: np.ndarray
    to_labels: np.ndarray

    def result(self) -> dict[str, Any]:
        k_from, k_to = self.from_model.n_clusters_, self.to_model.n_clusters_
        n = len(self.from_labels)
        cells = np.bincount(self.from_labels * k_to + self.to_labels, minlength=k_from * k_to)
        matrix = cells.reshape(k_from, k_to)
        from_keys, to_keys = _keys(self.from_model), _keys(self.to_model)
        # The cells where both versions put the customer in the same segment, whatever its id in each.
        kept_key = sum(int(matrix[i, j]) for i in range(k_from) for j in range(k_to) if from_keys[i] == to_keys[j])
        return {
            "from_version": self.from_model.version,
            "to_version": self.to_model.version,
            "n_customers": n,
            "from_segments": _segments(self.from_model, matrix.sum(axis=1), n),
            "to_segments": _segments(self.to_model, matrix.sum(axis=0), n),
            "matrix": matrix.tolist(),
            "unchanged": float(np.count_nonzero(self.from_labels == self.to_labels) / n) if n else 0.0,
            "unchanged_segments": kept_key / n if n else 0.0,
        }


def _keys(model: SegmentationModel) -> dict[int, str]:
    """Each cluster id's `segment_key` in `model`."""
    return {segment["cluster_id"]: segment_key_of(segment, model.version) for segment in model.segments}


def _segments(model: SegmentationModel, sizes: np.ndarray, n: int) -> list[dict[str, Any]]:
    return [
        {
            "cluster_id": segment["cluster_id"],
            "cluster_name": segment["cluster_name"],
            "segment_key": segment_key_of(segment, model.version),
            "size": int(size),
            "percentage": round(100.0 * int(size) / n, 2) if n else 0.0,
        }
        for segment, size in zip(model.segments, sizes.tolist(), strict=True)
    ]


def _labels(model: SegmentationModel, data: Any) -> np.ndarray:
    """Each row's cluster id under `model`: its K-Means input through the nearest centroid."""
    centers = np.asarray(model.kmeans_.cluster_centers_, dtype=np.float64)
    labels, _ = CentroidScorer(centers).predict(model.encode(data))
    return np.asarray(labels, dtype=np.int64)


def score_both(from_model: SegmentationModel, to_model: SegmentationModel, data: Any) -> Comparison:
    """How the rows of one frame fall into the segments of two versions."""
    return Comparison(from_model, to_model, _labels(from_model, data), _labels(to_model, data))
