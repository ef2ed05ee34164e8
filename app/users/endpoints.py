"""The caller's own account, and the admin's /users door to the user service."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from app.auth.dependencies import AdminUser, CurrentUser, require_role
from app.auth.schemas import Message, PrimaryKey, RoleUpdate, UserList, UserPublic, UserUpdate, UserWithProfileStats
from app.core import security as auth
from app.core.deps import PageDep, SessionDep, SettingsDep
from app.core.errors import InvalidInput, Unauthorized
from app.core.responses import errors
from app.core.tables import Role
from app.history import service as history_service
from app.profiles import service as profile_service
from app.users import service as user_service

router = APIRouter(prefix="/users", tags=["users"])
admin_only = [Depends(require_role(Role.admin))]


@router.get(
    "/me/profile",
    summary="My account with activity counts",
    description="The caller's account plus `total_predictions` and `total_saved_profiles`.",
    responses=errors(401, 403),
)
async def my_profile(user: CurrentUser, session: SessionDep) -> UserWithProfileStats:
    predictions = await history_service.count_for_user(session=session, user_id=user.id)
    profiles = await profile_service.count_own(session=session, user_id=user.id)
    return UserWithProfileStats(
        **UserPublic.model_validate(user).model_dump(), total_predictions=predictions, total_saved_profiles=profiles
    )


@router.put(
    "/me",
    summary="Change my account",
    description=(
        "Change `username`, `email`, `full_name`. A new `password` needs the right `current_password` and "
        "ends every token issued before it, this one included. `role` and `is_active` cannot be set here."
    ),
    responses=errors(401, 403, 409, 422),
)
async def update_me(
    body: UserUpdate, user: CurrentUser, session: SessionDep, settings: SettingsDep, request: Request
) -> UserPublic:
    changes = body.model_dump(exclude_unset=True)
    hashed = None
    if body.password is not None:
        if not body.current_password:
            raise InvalidInput("current_password is required to change the password")
        current = await user_service.get(session=session, user_id=user.id)
        if not await auth.in_hashing_thread(
            auth.verify_password, body.current_password, current.hashed_password, settings.bcrypt_rounds
        ):
            raise Unauthorized("Current password is incorrect")
        hashed = await auth.in_hashing_thread(auth.hash_password, body.password, settings.bcrypt_rounds)
    updated = await user_service.update_profile(
        session=session,
        user_id=user.id,
        username=body.username,
        email=body.email,
        full_name=body.full_name,
        clear_full_name="full_name" in changes and body.full_name is None,
        hashed_password=hashed,
    )
    request.app.state.auth_cache.forget_user(user.id)
    return UserPublic.model_validate(updated)


@router.delete(
    "/me",
    summary="Delete my account",
    description="Deletes the account with its profiles and history. The last active admin cannot.",
    responses=errors(401, 403, 409),
)
async def delete_me(user: CurrentUser, session: SessionDep, request: Request) -> Message:
    await user_service.delete_user(session=session, user_id=user.id)
    request.app.state.auth_cache.forget_user(user.id)
    return Message(message="Account deleted")


@router.get(
    "/",
    summary="List users (admin)",
    dependencies=admin_only,
    description="Every account, oldest first, paged with `skip` and `limit`; `total` counts them all.",
    responses=errors(401, 403, 422),
)
async def list_users(session: SessionDep, page: PageDep) -> UserList:
    users, total = await user_service.list_users(session=session, skip=page.skip, limit=page.limit)
    return UserList(users=[UserPublic.model_validate(u) for u in users], total=total)


# `:int` keeps /users/me out of these routes: GET /users/me is a 405, not a malformed user id.
@router.get(
    "/{user_id:int}",
    summary="One user (admin)",
    dependencies=admin_only,
    description="One account by id; 404 when there is none.",
    responses=errors(401, 403, 404, 422),
)
async def get_user(user_id: PrimaryKey, session: SessionDep) -> UserPublic:
    return UserPublic.model_validate(await user_service.get(session=session, user_id=user_id))


@router.put(
    "/{user_id:int}/role",
    summary="Change a user's role (admin)",
    description="Admins cannot change their own role; the last active admin cannot be demoted.",
    responses=errors(401, 403, 404, 409, 422),
)
async def set_role(
    user_id: PrimaryKey, body: RoleUpdate, admin: AdminUser, session: SessionDep, request: Request
) -> UserPublic:
    user = await user_service.set_role(session=session, actor=admin, user_id=user_id, role=body.role)
    request.app.state.auth_cache.forget_user(user_id)
    return UserPublic.model_validate(user)


@router.delete(
    "/{user_id:int}",
    summary="Delete a user (admin)",
    description="Deletes the user with their profiles and history. Admins cannot delete themselves.",
    responses=errors(401, 403, 404, 409, 422),
)
async def delete_user(user_id: PrimaryKey, admin: AdminUser, session: SessionDep, request: Request) -> Message:
    await user_service.delete_user(session=session, user_id=user_id, actor=admin)
    request.app.state.auth_cache.forget_user(user_id)
    return Message(message="User deleted")
