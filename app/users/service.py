"""Users: the rules and the SQL. The /users and /admin/users doors both call these."""

from __future__ import annotations

from typing import Protocol, TypedDict

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.errors import Conflict, Forbidden, NotFound
from app.core.tables import CustomerProfile, HistoryCount, PredictionHistory, Role, User


class Actor(Protocol):
    """Who acts on an account: a User row or the request's caller; only their id is read."""

    @property
    def id(self) -> int: ...


async def get(*, session: AsyncSession, user_id: int) -> User:
    user = await session.get(User, user_id)
    if user is None:
        raise NotFound("user")
    return user


async def _ensure_unique(
    session: AsyncSession, *, username: str | None, email: str | None, exclude_id: int | None = None
) -> None:
    conditions = []
    if username is not None:
        conditions.append(User.username == username)
    if email is not None:
        conditions.append(func.lower(User.email) == email.lower())
    if not conditions:
        return
    query = select(User.username, User.email).where(or_(*conditions))
    if exclude_id is not None:
        query = query.where(User.id != exclude_id)
    for existing_username, _existing_email in (await session.execute(query)).all():
        if username is not None and existing_username == username:
            raise Conflict("Username already registered")
        raise Conflict("Email already registered")


async def _commit_unique(session: AsyncSession) -> None:
    """Commit; a unique constraint hit by a concurrent writer becomes a 409."""
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise Conflict("Username or email already registered") from None


async def create(
    *,
    session: AsyncSession,
    email: str,
    username: str,
    full_name: str | None,
    hashed_password: str,
    role: Role = Role.user,
) -> User:
    await _ensure_unique(session, username=username, email=email)
    user = User(
        email=email.lower(),
        username=username,
        full_name=full_name,
        hashed_password=hashed_password,
        role=role.value,
        is_active=True,
    )
    session.add(user)
    await _commit_unique(session)
    return user


async def update_profile(
    *,
    session: AsyncSession,
    user_id: int,
    username: str | None = None,
    email: str | None = None,
    full_name: str | None = None,
    clear_full_name: bool = False,
    hashed_password: str | None = None,
) -> User:
    user = await get(session=session, user_id=user_id)
    await _ensure_unique(
        session,
        username=username if username not in (None, user.username) else None,
        email=email if email is not None and email.lower() != user.email.lower() else None,
        exclude_id=user.id,
    )
    if username is not None:
        user.username = username
    if email is not None:
        user.email = email.lower()
    if full_name is not None or clear_full_name:
        user.full_name = full_name
    if hashed_password is not None:
        user.hashed_password = hashed_password
        # Every token issued before this change stops working.
        user.token_version = (user.token_version or 0) + 1
    await _commit_unique(session)
    return user


async def list_users(*, session: AsyncSession, skip: int, limit: int) -> tuple[list[User], int]:
    total = (await session.execute(select(func.count(User.id)))).scalar_one()
    users = (await session.execute(select(User).order_by(User.id).offset(skip).limit(limit))).scalars().all()
    return list(users), total


async def _lock_active_admins(session: AsyncSession) -> set[int]:
    # FOR UPDATE serialises concurrent admin changes on PostgreSQL; SQLite serialises writers itself.
    query = select(User.id).where(User.role == Role.admin.value, User.is_active.is_(True)).with_for_update()
    return set((await session.execute(query)).scalars().all())


async def _guard_last_admin(session: AsyncSession, target: User, *, removes_admin: bool) -> None:
    if not removes_admin:
        return
    admins = await _lock_active_admins(session)
    if target.id in admins and not (admins - {target.id}):
        raise Conflict("The last active admin cannot be demoted, deactivated or deleted")


async def set_role(*, session: AsyncSession, actor: Actor, user_id: int, role: Role) -> User:
    target = await get(session=session, user_id=user_id)
    if target.id == actor.id:
        raise Forbidden("Admins cannot change their own role")
    await _guard_last_admin(session, target, removes_admin=role != Role.admin)
    target.role = role.value
    await session.commit()
    return target


async def toggle_active(*, session: AsyncSession, actor: Actor, user_id: int) -> User:
    target = await get(session=session, user_id=user_id)
    if target.id == actor.id:
        raise Forbidden("Admins cannot deactivate themselves")
    await _guard_last_admin(session, target, removes_admin=target.is_active)
    target.is_active = not target.is_active
    await session.commit()
    return target


async def delete_user(*, session: AsyncSession, user_id: int, actor: Actor | None = None) -> None:
    """Delete a user with their profiles and history. `actor` is the admin doing it, None for oneself."""
    target = await get(session=session, user_id=user_id)
    if actor is not None and target.id == actor.id:
        raise Forbidden("Admins cannot delete themselves")
    await _guard_last_admin(session, target, removes_admin=True)
    # Explicit deletes so no row is left behind even where the database skips ON DELETE CASCADE.
    await session.execute(delete(PredictionHistory).where(PredictionHistory.user_id == target.id))
    await session.execute(delete(CustomerProfile).where(CustomerProfile.user_id == target.id))
    await session.execute(delete(User).where(User.id == target.id))
    await session.commit()


async def activity_counts(*, session: AsyncSession, user_ids: list[int]) -> dict[int, tuple[int, int]]:
    """{user_id: (predictions, profiles)} for the given users."""
    if not user_ids:
        return {}
    predictions = dict(
        (
            await session.execute(
                select(HistoryCount.user_id, HistoryCount.total).where(HistoryCount.user_id.in_(user_ids))
            )
        ).all()
    )
    profiles = dict(
        (
            await session.execute(
                select(CustomerProfile.user_id, func.count(CustomerProfile.id))
                .where(CustomerProfile.user_id.in_(user_ids))
                .group_by(CustomerProfile.user_id)
            )
        ).all()
    )
    return {uid: (predictions.get(uid, 0), profiles.get(uid, 0)) for uid in user_ids}


class UserTotals(TypedDict):
    total_users: int
    active_users: int
    inactive_users: int
    total_predictions: int
    total_profiles: int
    users_by_role: dict[str, int]


async def totals(*, session: AsyncSession) -> UserTotals:
    """Counts of users by state and role, predictions and profiles."""
    by_role = dict((await session.execute(select(User.role, func.count(User.id)).group_by(User.role))).all())
    active = (await session.execute(select(func.count(User.id)).where(User.is_active.is_(True)))).scalar_one()
    total_users = sum(by_role.values())
    total_predictions = (await session.execute(select(func.coalesce(func.sum(HistoryCount.total), 0)))).scalar_one()
    total_profiles = (await session.execute(select(func.count(CustomerProfile.id)))).scalar_one()
    return {
        "total_users": total_users,
        "active_users": active,
        "inactive_users": total_users - active,
        "total_predictions": total_predictions,
        "total_profiles": total_profiles,
        "users_by_role": {role.value: by_role.get(role.value, 0) for role in Role},
    }


async def bump_token_version(*, session: AsyncSession, user_id: int) -> None:
    await session.execute(update(User).where(User.id == user_id).values(token_version=User.token_version + 1))
    await session.commit()
