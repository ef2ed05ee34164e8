"""Service statistics for admins."""

from __future__ import annotations

from collections import Counter

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.database import BatchPrediction, PredictionHistory
from app.schema import AdminStats
from app.services import users as user_service
from app.services.models import ModelStore


async def predictions_by_cluster(*, session: AsyncSession) -> tuple[dict[str, int], int]:
    """Counts per cluster id over single and batch predictions, and the batch row total."""
    counts: Counter[str] = Counter()
    rows = await session.execute(
        select(PredictionHistory.cluster, func.count(PredictionHistory.id)).group_by(PredictionHistory.cluster)
    )
    for cluster, count in rows.all():
        counts[str(cluster)] += count
    batch_rows = 0
    for cluster_counts, n_rows, n_failed in (
        await session.execute(select(BatchPrediction.cluster_counts, BatchPrediction.n_rows, BatchPrediction.n_failed))
    ).all():
        batch_rows += n_rows - n_failed
        for cluster, count in (cluster_counts or {}).items():
            counts[str(cluster)] += int(count)
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0]))), batch_rows


async def collect(*, session: AsyncSession, models: ModelStore) -> AdminStats:
    totals = await user_service.totals(session=session)
    by_cluster, batch_rows = await predictions_by_cluster(session=session)
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
    )
