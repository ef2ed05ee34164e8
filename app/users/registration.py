"""Registration: POST /auth/register creates an account (the rest of /auth: app.auth.endpoints)."""

from __future__ import annotations

from fastapi import APIRouter, status

from app.auth.schemas import UserCreate, UserPublic
from app.core import security as auth
from app.core.deps import SessionDep, SettingsDep
from app.core.responses import errors
from app.users import service as user_service

router = APIRouter(prefix="/auth", tags=["auth"])


@router.post(
    "/register",
    status_code=status.HTTP_201_CREATED,
    summary="Create an account",
    description="Creates a user with role `user`. Username and email must be unique (409 otherwise).",
    responses=errors(409, 422),
)
async def register(body: UserCreate, session: SessionDep, settings: SettingsDep) -> UserPublic:
    hashed = await auth.in_hashing_thread(auth.hash_password, body.password, settings.bcrypt_rounds)
    user = await user_service.create(
        session=session, email=body.email, username=body.username, full_name=body.full_name, hashed_password=hashed
    )
    return UserPublic.model_validate(user)
