"""Typed dependencies shared by the routes: settings, session, paging (the caller: app.auth.dependencies)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.config import Settings
from app.core.schemas import MAX_PAGE_SIZE


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.database.sessionmaker() as session:
        yield session


@dataclass(frozen=True)
class Page:
    skip: int
    limit: int


async def page_params(
    skip: Annotated[int, Query(ge=0, le=2**31 - 1, description="Rows to skip")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description=f"Rows to return, at most {MAX_PAGE_SIZE}")] = 50,
) -> Page:
    return Page(skip=skip, limit=limit)


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
PageDep = Annotated[Page, Depends(page_params)]
