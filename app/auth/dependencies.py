"""The caller of a request as typed dependencies: bearer token, user, revocation and role, in one step."""

from __future__ import annotations

from functools import cache
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer
from fastapi.security.base import SecurityBase

from app.auth import service as auth_service
from app.auth.service import AuthCache, Caller, Principal
from app.core.errors import Forbidden
from app.core.tables import Role

SCHEME_NAME = "OAuth2PasswordBearer"


# Dependencies are `async def` even when they never await: FastAPI runs a plain `def`
# dependency in the thread pool, a hop that costs more than a small request.


class BearerAuth(SecurityBase):
    """The caller, checked in one dependency step: bearer token, user, revocation, role.

    It declares the OAuth2 password scheme Swagger's Authorize uses, so OpenAPI shows the same
    security; doing the whole check in it spares the chain of dependencies FastAPI would
    otherwise resolve one by one on every request, which costs more than the check.
    """

    def __init__(self, *roles: Role, principal: bool = False) -> None:
        self._bearer = OAuth2PasswordBearer(tokenUrl="/auth/login", auto_error=False, scheme_name=SCHEME_NAME)
        self.model = self._bearer.model
        self.scheme_name = SCHEME_NAME
        self.allowed = frozenset(role.value for role in roles)
        self.principal = principal

    async def __call__(self, request: Request) -> Principal | Caller:
        state = request.app.state
        cache: AuthCache = state.auth_cache
        token = await self._bearer(request)
        # A token that passed the whole check moments ago (within AUTH_CACHE_SECONDS) is
        # let through at once: this runs on every request and is most of a small one.
        caller = cache.passed(token) if token and not self.principal else None
        principal = None
        if caller is None:
            generation = cache.generation
            principal = await auth_service.authenticate_token(
                sessionmaker=state.database.sessionmaker,
                settings=state.settings,
                cache=cache,
                token=token,
            )
            if token:
                cache.remember_passed(token, principal, generation)
            caller = principal.user
        request.state.user_id = caller.id  # for the request's log line
        if self.allowed and caller.role not in self.allowed:
            raise Forbidden("Not enough permissions")
        return principal if self.principal and principal is not None else caller


get_principal = BearerAuth(principal=True)


get_current_user = BearerAuth()


@cache
def require_role(*roles: Role) -> BearerAuth:
    """A gate for these roles; the same object for the same roles, so FastAPI checks once per request."""
    return BearerAuth(*roles)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


CurrentUser = Annotated[Caller, Depends(get_current_user)]


AnalystUser = Annotated[Caller, Depends(require_role(Role.analyst, Role.admin))]


AdminUser = Annotated[Caller, Depends(require_role(Role.admin))]
