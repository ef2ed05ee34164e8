"""Login, tokens, revocation and login throttling."""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.concurrency import run_in_threadpool

from app import auth
from app.config import Settings
from app.database import LoginFailure, RevokedToken, User
from app.errors import Forbidden, TooManyRequests, Unauthorized
from app.services import users as user_service

INVALID_CREDENTIALS = "Incorrect username or password"


@dataclass
class Principal:
    """The caller of a request: who they are and which token they used."""

    user: User
    claims: auth.TokenClaims


class AuthCache:
    """A short-lived per-process view of users and revoked tokens.

    Changes made by this process are applied to it at once; changes made by another
    worker process are seen when an entry expires, at most `ttl` seconds later.
    """

    def __init__(self, ttl: float, max_entries: int = 20_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, User | None, bool]] = {}
        self._revoked_here: set[str] = set()

    def get(self, jti: str) -> tuple[User | None, bool] | None:
        if self.ttl <= 0:
            return None
        entry = self._entries.get(jti)
        if entry is None or time.monotonic() - entry[0] > self.ttl:
            return None
        return entry[1], entry[2]

    def put(self, jti: str, user: User | None, revoked: bool) -> None:
        if self.ttl <= 0:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[jti] = (time.monotonic(), user, revoked)

    def revoke(self, jti: str) -> None:
        self._entries[jti] = (time.monotonic(), None, True)

    def forget_user(self, user_id: int) -> None:
        for jti in [j for j, (_, u, _) in self._entries.items() if u is not None and u.id == user_id]:
            del self._entries[jti]


async def authenticate_token(
    *, sessionmaker: async_sessionmaker, settings: Settings, cache: AuthCache, token: str | None
) -> Principal:
    if not token:
        raise Unauthorized("Not authenticated")
    try:
        claims = auth.decode_access_token(token, settings.secret_key)
    except auth.InvalidToken:
        raise Unauthorized("Could not validate credentials") from None

    cached = cache.get(claims.jti)
    if cached is None:
        async with sessionmaker() as session:
            user = await session.get(User, claims.user_id)
            revoked = (
                await session.execute(select(RevokedToken.jti).where(RevokedToken.jti == claims.jti))
            ).first() is not None
        cache.put(claims.jti, user, revoked)
    else:
        user, revoked = cached

    if revoked or user is None or user.id != claims.user_id:
        raise Unauthorized("Token has been revoked" if revoked else "Could not validate credentials")
    if claims.token_version != (user.token_version or 0):
        raise Unauthorized("Token is no longer valid: please log in again")
    if not user.is_active:
        raise Forbidden("Inactive user")
    return Principal(user=user, claims=claims)


async def revoke(*, session: AsyncSession, cache: AuthCache, claims: auth.TokenClaims) -> None:
    cache.revoke(claims.jti)
    session.add(RevokedToken(jti=claims.jti, user_id=claims.user_id, expires_at=claims.expires_at))
    try:
        await session.commit()
    except IntegrityError:  # already revoked by a concurrent logout
        await session.rollback()
    # Expired entries can never be presented again: keep the table small.
    await session.execute(delete(RevokedToken).where(RevokedToken.expires_at < datetime.now(timezone.utc)))
    await session.commit()


def issue_token(user: User, settings: Settings) -> tuple[str, int]:
    token, _ = auth.create_access_token(
        user.id, user.token_version or 0, settings.secret_key, settings.access_token_expire_minutes,
        settings.algorithm,
    )
    return token, settings.access_token_expire_minutes * 60


# --- login throttling, kept in the database so every worker process shares it ---

def _throttle_keys(username: str, client_ip: str | None) -> list[tuple[str, str]]:
    keys = [("user", f"user:{username.lower()[:320]}")]
    if client_ip:
        keys.append(("ip", f"ip:{client_ip}"))
    return keys


def _limit(kind: str, settings: Settings) -> int:
    return settings.login_max_failures_per_user if kind == "user" else settings.login_max_failures_per_ip


async def _check_throttle(session: AsyncSession, settings: Settings, keys: list[tuple[str, str]]) -> None:
    now = datetime.now(timezone.utc)
    window = timedelta(seconds=settings.login_window_seconds)
    rows = (await session.execute(select(LoginFailure).where(LoginFailure.key.in_([k for _, k in keys])))).scalars()
    by_key = {row.key: row for row in rows}
    for kind, key in keys:
        row = by_key.get(key)
        if row is not None and row.window_start + window > now and row.failures >= _limit(kind, settings):
            retry_after = (row.window_start + window - now).total_seconds()
            raise TooManyRequests("Too many failed login attempts; try again later", retry_after=int(retry_after) + 1)


async def _record_failure(session: AsyncSession, settings: Settings, keys: list[tuple[str, str]]) -> None:
    now = datetime.now(timezone.utc)
    window = timedelta(seconds=settings.login_window_seconds)
    for _, key in keys:
        row = await session.get(LoginFailure, key, with_for_update=True)
        if row is None:
            session.add(LoginFailure(key=key, window_start=now, failures=1))
        elif row.window_start + window <= now:
            row.window_start, row.failures = now, 1
        else:
            row.failures += 1
    try:
        await session.commit()
    except IntegrityError:  # a concurrent first failure created the row; count this one on it
        await session.rollback()
        await _record_failure(session, settings, keys)


async def login(
    *, session: AsyncSession, settings: Settings, username: str, password: str, client_ip: str | None
) -> User:
    keys = _throttle_keys(username, client_ip)
    await _check_throttle(session, settings, keys)
    user = await user_service.find_by_login(session=session, login=username)
    ok = await run_in_threadpool(
        auth.verify_password, password, user.hashed_password if user else None, settings.bcrypt_rounds
    )
    if not ok or user is None:
        await _record_failure(session, settings, keys)
        raise Unauthorized(INVALID_CREDENTIALS)
    await session.execute(delete(LoginFailure).where(LoginFailure.key == keys[0][1]))
    await session.commit()
    if not user.is_active:
        raise Forbidden("Inactive user")
    return user
