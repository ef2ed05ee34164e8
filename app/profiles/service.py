"""Saved customer profiles: each user sees only their own."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.errors import InvalidInput, NotFound
from app.core.tables import CustomerProfile


async def create(*, session: AsyncSession, user_id: int, fields: dict[str, Any]) -> CustomerProfile:
    profile = CustomerProfile(user_id=user_id, **fields)
    session.add(profile)
    await session.commit()
    return profile


async def get_own(*, session: AsyncSession, user_id: int, profile_id: int) -> CustomerProfile:
    profile = await session.get(CustomerProfile, profile_id)
    # Another user's profile is reported exactly like a missing one.
    if profile is None or profile.user_id != user_id:
        raise NotFound("profile")
    return profile


async def list_own(*, session: AsyncSession, user_id: int, skip: int, limit: int) -> list[CustomerProfile]:
    query = (
        select(CustomerProfile)
        .where(CustomerProfile.user_id == user_id)
        .order_by(CustomerProfile.id.desc())
        .offset(skip)
        .limit(limit)
    )
    return list((await session.execute(query)).scalars().all())


async def update_own(
    *, session: AsyncSession, user_id: int, profile_id: int, changes: dict[str, Any]
) -> CustomerProfile:
    profile = await get_own(session=session, user_id=user_id, profile_id=profile_id)
    nullable = {"notes"}
    for field, value in changes.items():
        if value is None and field not in nullable:
            raise InvalidInput(f"{field} cannot be null")
        setattr(profile, field, value)
    await session.commit()
    return profile


async def delete_own(*, session: AsyncSession, user_id: int, profile_id: int) -> None:
    profile = await get_own(session=session, user_id=user_id, profile_id=profile_id)
    await session.delete(profile)
    await session.commit()


async def count_own(*, session: AsyncSession, user_id: int) -> int:
    query = select(func.count(CustomerProfile.id)).where(CustomerProfile.user_id == user_id)
    return (await session.execute(query)).scalar_one()
