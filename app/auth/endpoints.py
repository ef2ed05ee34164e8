"""Login, the current user and logout (registration: app.users.registration)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request

from app.auth import service as auth_service
from app.auth.dependencies import CurrentUser, PrincipalDep
from app.auth.schemas import LoginRequest, Message, Token, UserPublic
from app.core.deps import SessionDep, SettingsDep
from app.core.responses import errors
from app.core.routing import JsonOrFormRoute

router = APIRouter(prefix="/auth", tags=["auth"])


async def login(
    credentials: Annotated[LoginRequest, Form()], request: Request, session: SessionDep, settings: SettingsDep
) -> Token:
    user = await auth_service.login(
        session=session,
        settings=settings,
        username=credentials.username,
        password=credentials.password,
        client_ip=request.client.host if request.client else None,
    )
    token, expires_in = auth_service.issue_token(user, settings)
    return Token(access_token=token, expires_in=expires_in, user=UserPublic.model_validate(user))


router.add_api_route(
    "/login",
    endpoint=login,
    methods=["POST"],
    summary="Log in",
    description=(
        "OAuth2 password form (what Swagger's Authorize sends) or JSON `{username, password}`. "
        "`username` may also be the email. Repeated failures are throttled with 429 and `Retry-After`."
    ),
    route_class_override=JsonOrFormRoute,
    responses=errors(401, 403, 422, 429),
)


@router.get(
    "/me",
    summary="The current user",
    description="The account the bearer token belongs to; never carries the password hash.",
    responses=errors(401, 403),
)
async def me(user: CurrentUser) -> UserPublic:
    return UserPublic.model_validate(user)


@router.post(
    "/logout",
    summary="Log out",
    description="Revokes the token used for this request; it is rejected with 401 from then on.",
    responses=errors(401, 403),
)
async def logout(request: Request, principal: PrincipalDep, session: SessionDep) -> Message:
    await auth_service.revoke(session=session, cache=request.app.state.auth_cache, claims=principal.claims)
    return Message(message="Logged out")
