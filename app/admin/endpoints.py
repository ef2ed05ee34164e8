"""Admin: users with their activity, the same user rules as /users, and service statistics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from app.admin import service as stats_service
from app.admin.schemas import AdminStats
from app.auth.dependencies import AdminUser, require_role
from app.auth.schemas import AdminUserList, AdminUserView, PrimaryKey, UserPublic
from app.core.deps import PageDep, SessionDep
from app.core.responses import errors
from app.core.tables import Role, User
from app.users import endpoints as user_routes
from app.users import service as user_service

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_role(Role.admin))])


async def _with_activity(session: AsyncSession, users: list[User]) -> list[AdminUserView]:
    counts = await user_service.activity_counts(session=session, user_ids=[u.id for u in users])
    return [
        AdminUserView(
            **UserPublic.model_validate(u).model_dump(),
            total_predictions=counts[u.id][0],
            total_profiles=counts[u.id][1],
        )
        for u in users
    ]


@router.get(
    "/users",
    summary="Users with their activity",
    description="Every account with its `total_predictions` and `total_profiles`, paged with `skip` and "
    "`limit`, plus service-wide totals.",
    responses=errors(401, 403, 422),
)
async def list_users(session: SessionDep, page: PageDep) -> AdminUserList:
    users, total = await user_service.list_users(session=session, skip=page.skip, limit=page.limit)
    totals = await user_service.totals(session=session)
    # The service's counts are plain values of a dict; validating them here checks they are counts.
    return AdminUserList.model_validate(
        {
            "users": await _with_activity(session, users),
            "total": total,
            "total_predictions": totals["total_predictions"],
            "total_profiles": totals["total_profiles"],
        }
    )


@router.get(
    "/users/{user_id}",
    summary="One user with their activity",
    description="One account with its prediction and profile counts; 404 when there is none.",
    responses=errors(401, 403, 404, 422),
)
async def get_user(user_id: PrimaryKey, session: SessionDep) -> AdminUserView:
    user = await user_service.get(session=session, user_id=user_id)
    return (await _with_activity(session, [user]))[0]


# The same handlers as /users/{user_id}/role and DELETE /users/{user_id}: one set of rules, two doors.
router.add_api_route(
    "/users/{user_id}/role",
    user_routes.set_role,
    methods=["PUT"],
    summary="Change a user's role",
    description="An admin cannot change their own role; the last active admin cannot be demoted.",
    responses=errors(401, 403, 404, 409, 422),
)
router.add_api_route(
    "/users/{user_id}",
    user_routes.delete_user,
    methods=["DELETE"],
    summary="Delete a user",
    description="Deletes the user with their profiles and history. An admin cannot delete themselves.",
    responses=errors(401, 403, 404, 409, 422),
)


@router.put(
    "/users/{user_id}/toggle-active",
    summary="Activate or deactivate a user",
    description="Flips `is_active`. An admin cannot deactivate themselves; the last active admin stays active.",
    responses=errors(401, 403, 404, 409, 422),
)
async def toggle_active(user_id: PrimaryKey, admin: AdminUser, session: SessionDep, request: Request) -> UserPublic:
    user = await user_service.toggle_active(session=session, actor=admin, user_id=user_id)
    request.app.state.auth_cache.forget_user(user_id)
    return UserPublic.model_validate(user)


@router.get(
    "/stats",
    summary="Service statistics",
    description="Users by state and role, predictions (single and batch rows) per cluster id, and the "
    "model being served.",
    responses=errors(401, 403),
)
async def stats(session: SessionDep, request: Request) -> AdminStats:
    state = request.app.state
    return await stats_service.collect(
        session=session, models=state.models, registry=state.segmentations, drift=state.drift
    )
