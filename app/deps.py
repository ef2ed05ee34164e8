"""Typed dependencies shared by the routes: session, caller, role gates, paging."""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import OAuth2PasswordBearer
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.database import Role, User
from app.errors import Forbidden
from app.services import auth as auth_service
from app.services.auth import Principal

oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/auth/login", auto_error=False)

MAX_PAGE_SIZE = 200


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.database.sessionmaker() as session:
        yield session


async def get_principal(request: Request, token: Annotated[str | None, Depends(oauth2_scheme)]) -> Principal:
    state = request.app.state
    principal = await auth_service.authenticate_token(
        sessionmaker=state.database.sessionmaker, settings=state.settings, cache=state.auth_cache, token=token
    )
    request.state.user_id = principal.user.id
    return principal


async def get_current_user(principal: Annotated[Principal, Depends(get_principal)]) -> User:
    return principal.user


def require_role(*roles: Role):
    allowed = {r.value for r in roles}

    async def check(user: Annotated[User, Depends(get_current_user)]) -> User:
        if user.role not in allowed:
            raise Forbidden("Not enough permissions")
        return user

    return check


@dataclass(frozen=True)
class Page:
    skip: int
    limit: int


def page_params(
    skip: Annotated[int, Query(ge=0, le=2**31 - 1, description="Rows to skip")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description=f"Rows to return, at most {MAX_PAGE_SIZE}")] = 50,
) -> Page:
    return Page(skip=skip, limit=limit)


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
CurrentUser = Annotated[User, Depends(get_current_user)]
AnalystUser = Annotated[User, Depends(require_role(Role.analyst, Role.admin))]
AdminUser = Annotated[User, Depends(require_role(Role.admin))]
PageDep = Annotated[Page, Depends(page_params)]
