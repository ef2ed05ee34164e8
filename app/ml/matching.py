"""Segment identity across versions: match a new model's centroids to the previous version's.

Both centroid sets are taken back to the features' own space (through each model's scaler,
or its fitted schema) and scaled by the *new* version's scaling, categoricals over the union
of their levels. An optimal assignment (:func:`scipy.optimize.linear_sum_assignment`, also for
different k) pairs them; a pair farther apart than :data:`MATCH_THRESHOLD` stays unmatched.
The new model is then renumbered so that its internal cluster index *is* its ``cluster_id``:
serving needs no mapping. Matched segments keep the previous ``cluster_id``, ``segment_key``
and analyst name; new ones take the free ids (always ``0..k-1``) and a fresh key.

Pure machine learning: no FastAPI, no database.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from app.ml.kmeans import kmeans_with_centers

if TYPE_CHECKING:
    from app.ml.estimator import SegmentationModel
    from app.ml.schema import Feature

MATCH_THRESHOLD = 1.0
"""Farthest a new centroid may be from its previous one and still be the same segment: a Euclidean
distance in the new version's scaled units (one unit = one standard deviation of one numeric
feature; a categorical feature as a whole weighs as much as one). Beyond it the pair is a retired
segment and a new one. Retrained on a 90% resample, matched centroids move by about 0.01-0.1;
with k one lower a merged segment moves by about 0.8 from its nearer parent; distinct segments of
one model lie about 1.1-4 apart."""

NAME_FIELDS = ("analyst_name", "analyst_description")
"""What an analyst set on a segment; carried to the matched segment of the next version."""


@dataclass(frozen=True)
class SegmentMatch:
    cluster_id: int
    previous_cluster_id: int | None
    shift: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "cluster_id": self.cluster_id,
            "previous_cluster_id": self.previous_cluster_id,
            "shift": None if self.shift is None else round(self.shift, 6),
        }


@dataclass(frozen=True)
class Matching:
    """How a new model's fitted clusters become its served ids.

    ``order[i]`` is the fitted cluster index that takes ``cluster_id`` i; ``matches`` lists
    every new segment by its id; ``retired_cluster_ids`` the previous ids left without a match.
    """

    previous_version: str | None
    order: np.ndarray
    matches: list[SegmentMatch]
    retired_cluster_ids: list[int]
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "previous_version": self.previous_version,
            "matching": [m.to_dict() for m in self.matches],
            "retired_cluster_ids": list(self.retired_cluster_ids),
            "match_threshold": self.threshold,
        }


# --------------------------------------------------------------------------- #
# Centroids in one space


def _scaler_space(new: SegmentationModel, previous: SegmentationModel) -> tuple[np.ndarray, np.ndarray]:
    """Models with a scaler (customer and any kind scaled by a StandardScaler): back through each one's
    own scaler to the space it sees, then through the new one's."""
    assert new.scaler_ is not None and previous.scaler_ is not None
    new_centers = np.asarray(new.kmeans_.cluster_centers_, dtype=np.float64)
    old_raw = previous.scaler_.inverse_transform(np.asarray(previous.kmeans_.cluster_centers_, dtype=np.float64))
    return new_centers, np.asarray(new.scaler_.transform(old_raw), dtype=np.float64)


def _numeric_original(feature: Feature, column: np.ndarray) -> np.ndarray:
    """A standardized (and maybe log1p'd) column back in the feature's own units."""
    assert feature.mean_ is not None and feature.std_ is not None
    values = column * feature.std_ + feature.mean_
    return np.expm1(values) if feature.log_ else values


def _numeric_scaled(feature: Feature, values: np.ndarray) -> np.ndarray:
    assert feature.mean_ is not None and feature.std_ is not None
    if feature.log_:
        values = np.log1p(np.maximum(values, 0.0))
    return (values - feature.mean_) / feature.std_


def _schema_space(new: SegmentationModel, previous: SegmentationModel) -> tuple[np.ndarray, np.ndarray]:
    """Models encoded by a fitted schema (kind custom): numeric features through their own units into
    the new scaling, categorical ones as level shares over the union of both versions' levels."""
    new_centers = np.asarray(new.kmeans_.cluster_centers_, dtype=np.float64)
    old_centers = np.asarray(previous.kmeans_.cluster_centers_, dtype=np.float64)
    old_columns = _columns_by_feature(previous)
    new_parts: list[np.ndarray] = []
    old_parts: list[np.ndarray] = []
    col = 0
    for feature in new.schema_.features:
        mine = new_centers[:, col : col + feature.width]
        col += feature.width
        old_feature, old_slice = old_columns[feature.name]
        theirs = old_centers[:, old_slice]
        if feature.numeric:
            new_parts.append(mine)
            original = _numeric_original(old_feature, theirs[:, 0])
            old_parts.append(_numeric_scaled(feature, original)[:, None])
            continue
        weight = feature.weight_ or 0.0
        new_levels = list(feature.levels_ or ())
        old_levels = list(old_feature.levels_ or ())
        union = new_levels + [level for level in old_levels if level not in new_levels]
        mine_shares = np.zeros((len(mine), len(union)))
        mine_shares[:, : len(new_levels)] = mine / weight if weight else 0.0
        old_weight = old_feature.weight_ or 0.0
        theirs_shares = np.zeros((len(theirs), len(union)))
        for j, level in enumerate(old_levels):
            theirs_shares[:, union.index(level)] = theirs[:, j] / old_weight if old_weight else 0.0
        new_parts.append(mine_shares * weight)
        old_parts.append(theirs_shares * weight)
    return np.hstack(new_parts), np.hstack(old_parts)


def _columns_by_feature(model: SegmentationModel) -> dict[str, tuple[Feature, slice]]:
    found = {}
    col = 0
    for feature in model.schema_.features:
        found[feature.name] = (feature, slice(col, col + feature.width))
        col += feature.width
    return found


def comparable(new: SegmentationModel, previous: SegmentationModel) -> bool:
    """Whether the two models cluster the same features the same way, so their centroids can be matched."""
    if new.schema_.names != previous.schema_.names or new.schema_.fixed != previous.schema_.fixed:
        return False
    if (new.scaler_ is None) != (previous.scaler_ is None):
        return False
    if new.scaler_ is None:
        old = {f.name: f for f in previous.schema_.features}
        return all(f.type == old[f.name].type and f.fitted and old[f.name].fitted for f in new.schema_.features)
    return True


def centroid_distances(new: SegmentationModel, previous: SegmentationModel) -> np.ndarray:
    """(k_new, k_previous) Euclidean distances between the centroids, in the new version's scaled space."""
    if new.scaler_ is not None:
        mine, theirs = _scaler_space(new, previous)
    else:
        mine, theirs = _schema_space(new, previous)
    diff = mine[:, None, :] - theirs[None, :, :]
    return np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))


# --------------------------------------------------------------------------- #
# Matching and renumbering


def match(new: SegmentationModel, previous: SegmentationModel | None, threshold: float = MATCH_THRESHOLD) -> Matching:
    """The ids a freshly fitted ``new`` model takes, given the active ``previous`` version (or none).

    Deterministic: the same two models always give the same matching. New segments (and matched
    ones whose previous id is not below the new k) take the free ids in the order of the new
    model's own ids.
    """
    k = new.n_clusters_
    if previous is None or not comparable(new, previous):
        order = np.arange(k)
        matches = [SegmentMatch(i, None, None) for i in range(k)]
        return Matching(previous.version if previous is not None else None, order, matches, [], threshold)
    distances = centroid_distances(new, previous)
    rows, cols = linear_sum_assignment(distances)
    paired: dict[int, tuple[int, float]] = {}
    for j, p in zip(rows.tolist(), cols.tolist(), strict=True):
        d = float(distances[j, p])
        if math.isfinite(d) and d <= threshold:
            paired[j] = (p, d)
    final = [-1] * k  # fitted index -> cluster_id
    for j, (p, _) in paired.items():
        if p < k:
            final[j] = p
    free = iter(sorted(set(range(k)) - set(final)))
    # Matched segments pushed out of 0..k-1 first (they keep their key), then the new ones.
    waiting = sorted((p, j) for j, (p, _) in paired.items() if p >= k)
    for _, j in waiting:
        final[j] = next(free)
    for j in range(k):
        if final[j] < 0:
            final[j] = next(free)
    order = np.empty(k, dtype=np.int64)
    for j, cluster_id in enumerate(final):
        order[cluster_id] = j
    matches = []
    for cluster_id in range(k):
        pair = paired.get(int(order[cluster_id]))
        matches.append(SegmentMatch(cluster_id, pair[0] if pair else None, pair[1] if pair else None))
    kept = {p for p, _ in paired.values()}
    retired = [p for p in range(previous.n_clusters_) if p not in kept]
    return Matching(previous.version, order, matches, retired, threshold)


def renumbered(new: SegmentationModel, matching: Matching, previous: SegmentationModel | None) -> dict[str, Any]:
    """The metadata of ``new`` under ``matching``'s ids, with keys and analyst names carried over.

    The caller permutes the estimator's centroids with ``matching.order`` (see
    :meth:`SegmentationModel.renumbered`); this only rewrites the description.
    """
    order = matching.order.tolist()
    meta = dict(new.metadata_)
    segments = [dict(meta["segments"][j]) for j in order]
    if isinstance(meta.get("centroids"), list) and len(meta["centroids"]) == len(order):
        meta["centroids"] = [meta["centroids"][j] for j in order]
    reference = meta.get("drift_reference")
    if isinstance(reference, dict) and len(reference.get("segment_mix") or ()) == len(order):
        # The training segment mix is per cluster id: it follows the new ids too.
        meta["drift_reference"] = reference | {"segment_mix": [reference["segment_mix"][j] for j in order]}
    previous_segments = previous.segments if previous is not None else []
    previous_version = matching.previous_version or ""
    for cluster_id, (segment, m) in enumerate(zip(segments, matching.matches, strict=True)):
        segment["cluster_id"] = cluster_id
        segment.setdefault("generated_name", segment["cluster_name"])
        segment.setdefault("generated_description", segment["description"])
        for field in NAME_FIELDS:
            segment.pop(field, None)
        if m.previous_cluster_id is not None:
            before = previous_segments[m.previous_cluster_id]
            segment["segment_key"] = segment_key_of(before, previous_version)
            for field in NAME_FIELDS:
                if before.get(field):
                    segment[field] = before[field]
        elif previous is not None:
            segment["segment_key"] = _fresh_key(meta.get("data_fingerprint") or "", previous_version, order[cluster_id])
    _unique_keys(segments, meta.get("data_fingerprint") or "")
    meta["segments"] = resolve_names(segments)
    meta["identity"] = matching.to_dict()
    return meta


def segment_key_of(segment: dict[str, Any], version: str) -> str:
    """A segment's key; versions saved before keys existed get the one their summaries showed."""
    return str(segment.get("segment_key") or f"{version}-{segment['cluster_id']}")


def _fresh_key(fingerprint: str, previous_version: str, index: int) -> str:
    return hashlib.sha256(f"{fingerprint}:{previous_version}:{index}".encode()).hexdigest()[:10]


def _unique_keys(segments: list[dict[str, Any]], fingerprint: str) -> None:
    seen: set[str] = set()
    for segment in segments:
        key = str(segment.get("segment_key") or "")
        salt = 0
        while not key or key in seen:
            salt += 1
            key = hashlib.sha256(f"{fingerprint}:{segment['cluster_id']}:{salt}".encode()).hexdigest()[:10]
        segment["segment_key"] = key
        seen.add(key)


# --------------------------------------------------------------------------- #
# Names: an analyst's, else the generated one, unique within the model


def name_key(name: str) -> str:
    """Names compare trimmed and case-insensitively: "Key accounts" and "key accounts " are one name."""
    return " ".join(name.split()).casefold()


def resolve_names(segments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each segment's ``cluster_name`` and ``description``: the analyst's when set, else the generated
    ones. A generated name that clashes with an analyst's (or another taken name) gets a further word."""
    taken = {name_key(s["analyst_name"]) for s in segments if s.get("analyst_name")}
    for segment in segments:
        generated_description = segment.get("generated_description", segment["description"])
        segment["description"] = segment.get("analyst_description") or generated_description
        if segment.get("analyst_name"):
            segment["cluster_name"] = segment["analyst_name"]
            continue
        generated = segment.get("generated_name", segment["cluster_name"])
        name = generated
        if name_key(name) in taken:
            name = f"{generated} (other)"
            number = 2
            while name_key(name) in taken:
                name = f"{generated} (other {number})"
                number += 1
        segment["cluster_name"] = name
        taken.add(name_key(name))
    return segments


def renumber(new: SegmentationModel, matching: Matching, previous: SegmentationModel | None) -> SegmentationModel:
    """``new`` with the ids of ``matching``: centroids permuted so the internal index is the cluster_id,
    metadata renumbered with keys and analyst names carried. ``new`` itself is left as it was."""
    from app.ml.estimator import SegmentationModel

    kmeans = kmeans_with_centers(np.asarray(new.kmeans_.cluster_centers_)[matching.order], like=new.kmeans_)
    return SegmentationModel.from_fitted(new.scaler_, kmeans, renumbered(new, matching, previous))


def with_segments(model: SegmentationModel, segments: list[dict[str, Any]], **metadata: Any) -> SegmentationModel:
    """The same fitted model with other segment descriptions (an analyst's names), as a new object."""
    from app.ml.estimator import SegmentationModel

    return SegmentationModel.from_fitted(
        model.scaler_, model.kmeans_, {**model.metadata_, **metadata, "segments": segments}
    )


def identify(new: SegmentationModel, previous: SegmentationModel | None) -> tuple[SegmentationModel, bytes]:
    """A freshly trained model matched to the active one and renumbered, with its artifact blob."""
    model = renumber(new, match(new, previous), previous)
    model.version = new.version
    return model, model.to_bytes()


def names_revision(metadata: Mapping[str, Any]) -> int:
    """How many renames a version has had, from its metadata."""
    return int(metadata.get("names_revision") or 0)


def renamed_since(version: str, metadata: Mapping[str, Any], marker: str | None) -> bool:
    """Whether ``marker`` (`{version}:{names_revision}` of the last rename) says ``version`` (loaded
    with ``metadata``) was renamed after it was loaded."""
    if not marker:
        return False
    renamed, _, revision = marker.rpartition(":")
    return renamed == version and revision.isdigit() and int(revision) > names_revision(metadata)


def identity_fields(details: dict[str, Any]) -> dict[str, Any]:
    """What a stored version says of its match to the version before it (empty for older versions)."""
    identity = details.get("identity")
    if not isinstance(identity, dict):
        return {}
    return {key: identity.get(key) for key in ("previous_version", "matching", "retired_cluster_ids")}


__all__ = [
    "MATCH_THRESHOLD",
    "Matching",
    "SegmentMatch",
    "centroid_distances",
    "identify",
    "identity_fields",
    "comparable",
    "match",
    "name_key",
    "names_revision",
    "renamed_since",
    "renumber",
    "renumbered",
    "resolve_names",
    "segment_key_of",
    "with_segments",
]
