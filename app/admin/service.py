"""Service statistics for admins."""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.admin.schemas import AdminStats
from app.core.tables import DEFAULT_SEGMENTATION_ID, BatchPrediction, PredictionHistory
from app.policies.tables import RetrainingPolicy
from app.segmentations.registry import SegmentationRegistry
from app.users import service as user_service
from app.versions import drift as drift_service
from app.versions.drift import DriftCounter
from app.versions.store import ModelStore


async def predictions_by_cluster(*, session: AsyncSession) -> tuple[dict[str, int], int]:
    """The default segmentation's counts per cluster id over single and batch predictions, and the
    batch row total (of every segmentation)."""
    counts: Counter[str] = Counter()
    rows = await session.execute(
        select(PredictionHistory.cluster, func.count(PredictionHistory.id))
        .where(PredictionHistory.segmentation_id == DEFAULT_SEGMENTATION_ID)
        .group_by(PredictionHistory.cluster)
    )
    for cluster, count in rows.all():
        counts[str(cluster)] += count
    batch_rows = 0
    for cluster_counts, n_rows, n_failed, segmentation_id in (
        await session.execute(
            select(
                BatchPrediction.cluster_counts,
                BatchPrediction.n_rows,
                BatchPrediction.n_failed,
                BatchPrediction.segmentation_id,
            )
        )
    ).all():
        batch_rows += n_rows - n_failed
        if segmentation_id != DEFAULT_SEGMENTATION_ID:
            continue
        for cluster, count in (cluster_counts or {}).items():
            counts[str(cluster)] += int(count)
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0]))), batch_rows


async def predictions_by_segmentation(*, session: AsyncSession) -> Counter[int]:
    """Customers scored per segmentation id, single predictions and batch rows alike."""
    counts: Counter[int] = Counter()
    single = select(PredictionHistory.segmentation_id, func.count(PredictionHistory.id)).group_by(
        PredictionHistory.segmentation_id
    )
    for segmentation_id, count in (await session.execute(single)).all():
        counts[segmentation_id] += count
    batches = select(
        BatchPrediction.segmentation_id, func.sum(BatchPrediction.n_rows - BatchPrediction.n_failed)
    ).group_by(BatchPrediction.segmentation_id)
    for segmentation_id, count in (await session.execute(batches)).all():
        counts[segmentation_id] += int(count or 0)
    return counts


def _policy(row: RetrainingPolicy | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "source": row.source,
        "schedule": row.schedule,
        "next_fire_at": row.next_fire_at.isoformat() if row.next_fire_at else None,
        "last_outcome": row.last_outcome,
        "last_fired_at": row.last_fired_at.isoformat() if row.last_fired_at else None,
    }


async def collect(
    *,
    session: AsyncSession,
    models: ModelStore,
    registry: SegmentationRegistry | None = None,
    drift: DriftCounter | None = None,
) -> AdminStats:
    totals = await user_service.totals(session=session)
    by_cluster, batch_rows = await predictions_by_cluster(session=session)
    by_segmentation = await predictions_by_segmentation(session=session)
    policies = {row.segmentation_id: row for row in (await session.execute(select(RetrainingPolicy))).scalars()}
    segmentations = [
        {
            "name": store.segmentation.name,
            "kind": store.segmentation.kind,
            "active_version": store.current.version if store.current is not None else None,
            "predictions": by_segmentation.get(store.segmentation.id, 0),
            "drift_status": await drift_service.status(drift, store) if drift is not None else None,
            "policy": _policy(policies.get(store.segmentation.id)),
        }
        for store in (registry.stores() if registry is not None else [models])
    ]
    served = models.current
    model = None
    if served is not None:
        meta = served.metadata
        model = {
            "version": served.version,
            "n_clusters": meta.get("n_clusters"),
            "silhouette_score": meta.get("silhouette_score"),
            "n_samples": meta.get("n_samples"),
            "trained_at": meta.get("trained_at"),
            "cluster_names": {str(i): name for i, name in enumerate(served.names)},
        }
    return AdminStats(
        total_users=totals["total_users"],
        active_users=totals["active_users"],
        inactive_users=totals["inactive_users"],
        total_predictions=totals["total_predictions"] + batch_rows,
        total_profiles=totals["total_profiles"],
        users_by_role=totals["users_by_role"],
        predictions_by_cluster=by_cluster,
        model=model,
        segmentations=segmentations,
    )
