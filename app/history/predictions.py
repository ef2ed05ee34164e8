"""Recording predictions: a single one as a history row (stored by app.history.storage), a batch as one counted row."""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy.ext.asyncio import async_sessionmaker

from app.core.tables import DEFAULT_SEGMENTATION, DEFAULT_SEGMENTATION_ID, BatchPrediction, utcnow


def history_row(
    *,
    user_id: int,
    customer: dict[str, Any],
    cluster: int,
    cluster_name: str,
    confidence: float,
    model_version: str,
    segmentation_id: int = DEFAULT_SEGMENTATION_ID,
    segmentation: str = DEFAULT_SEGMENTATION,
) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "customer_data": customer,
        "cluster": cluster,
        "cluster_name": cluster_name,
        "confidence": confidence,
        "model_version": model_version,
        "created_at": utcnow(),
        "segmentation_id": segmentation_id,
        "segmentation": segmentation,
    }


async def record_batch(
    *,
    sessionmaker: async_sessionmaker,
    user_id: int,
    model_version: str,
    labels: np.ndarray,
    n_failed: int,
    segmentation_id: int = DEFAULT_SEGMENTATION_ID,
) -> None:
    counts = np.bincount(np.asarray(labels, dtype=np.int64)) if len(labels) else np.zeros(0, dtype=np.int64)
    async with sessionmaker() as session:
        session.add(
            BatchPrediction(
                user_id=user_id,
                model_version=model_version,
                segmentation_id=segmentation_id,
                n_rows=int(len(labels)) + n_failed,
                n_failed=n_failed,
                cluster_counts={str(k): int(v) for k, v in enumerate(counts) if v},
            )
        )
        await session.commit()
