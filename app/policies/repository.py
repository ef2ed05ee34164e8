"""What other domains do to a segmentation's policy rows (deleting a segmentation deletes them)."""

from __future__ import annotations

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession

from app.policies.tables import PolicyEvent, RetrainingPolicy


async def delete_policy(session: AsyncSession, segmentation_id: int) -> None:
    """The segmentation's policy and its events, in the caller's transaction."""
    await session.execute(delete(PolicyEvent).where(PolicyEvent.segmentation_id == segmentation_id))
    await session.execute(delete(RetrainingPolicy).where(RetrainingPolicy.segmentation_id == segmentation_id))
