"""Prediction history: one row per single prediction, newest first."""
from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.database import PredictionHistory


async def page(
    *, session: AsyncSession, user_id: int, skip: int, limit: int
) -> tuple[list[PredictionHistory], int]:
    total = (
        await session.execute(select(func.count(PredictionHistory.id)).where(PredictionHistory.user_id == user_id))
    ).scalar_one()
    rows = (
        await session.execute(
            select(PredictionHistory)
            .where(PredictionHistory.user_id == user_id)
            .order_by(PredictionHistory.created_at.desc(), PredictionHistory.id.desc())
            .offset(skip)
            .limit(limit)
        )
    ).scalars().all()
    return list(rows), total


async def count_for_user(*, session: AsyncSession, user_id: int) -> int:
    query = select(func.count(PredictionHistory.id)).where(PredictionHistory.user_id == user_id)
    return (await session.execute(query)).scalar_one()
