"""Prediction history: one row per single prediction, newest first, and the JSON of its pages.

Reading and writing the rows is app.history.storage's (app.history.storage.history.HistoryRepository).
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.tables import PredictionHistory


async def count_for_user(*, session: AsyncSession, user_id: int) -> int:
    query = select(func.count(PredictionHistory.id)).where(PredictionHistory.user_id == user_id)
    return (await session.execute(query)).scalar_one()
