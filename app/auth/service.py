"""Login, tokens, revocation and login throttling."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from sqlalchemy import case, delete, exists, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.core import security as auth
from app.core.config import Settings
from app.core.errors import Forbidden, TooManyRequests, Unauthorized
from app.core.tables import LoginFailure, RevokedToken, User

INVALID_CREDENTIALS = "Incorrect username or password"
# Entries in each table of the auth cache (tokens in use at once, per worker).
AUTH_CACHE_ENTRIES = 20_000


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated user as a plain, immutable value.

    It is what the auth cache keeps and what routes get as the current user: an ORM object
    would be tied to the session that loaded it, and sharing one across requests invites lazy
    loads and stale state. It carries no password hash.
    """

    id: int
    email: str
    username: str
    full_name: str | None
    role: str
    is_active: bool
    token_version: int
    created_at: datetime


# The columns a Caller is made of.
_CALLER_COLUMNS = (
    User.id,
    User.email,
    User.username,
    User.full_name,
    User.role,
    User.is_active,
    User.token_version,
    User.created_at,
)


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of a request: who they are and which token they used."""

    user: Caller
    claims: auth.TokenClaims


class _Passed(NamedTuple):
    checked_at: float
    caller: Caller
    jti: str
    expires_at: float


class AuthCache:
    """A short-lived per-process view of tokens, users and revoked tokens.

    Changes made by this process are applied to it at once; changes made by another
    worker process are seen when an entry expires, at most `ttl` seconds later.
    Decoded claims are kept per token string (verifying a signature costs more than the
    rest of a small request); expiry is still checked on every use.

    Each of its three tables (claims per token, user and revocation per token id, tokens that
    passed the whole check) holds at most `max_entries` plain values (AUTH_CACHE_ENTRIES by
    default); a full table is emptied and refills from the database.
    """

    def __init__(self, ttl: float, max_entries: int = AUTH_CACHE_ENTRIES) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Caller | None, bool]] = {}
        self._claims: dict[str, tuple[float, auth.TokenClaims]] = {}
        self._loading: dict[str, tuple[int, asyncio.Future]] = {}
        self._passed: dict[str, _Passed] = {}
        # Bumped by every local change: a lookup that started before it must not be cached.
        self._generation = 0

    def passed(self, token: str) -> Caller | None:
        """The caller when this token passed the whole check less than `ttl` seconds ago.

        None means: check it in full. Only a token that passed gets here, so a failing one
        always takes the full path and gets its precise answer.
        """
        entry = self._passed.get(token)
        if entry is None:
            return None
        if time.monotonic() - entry.checked_at > self.ttl or time.time() >= entry.expires_at:
            del self._passed[token]
            return None
        return entry.caller

    def remember_passed(self, token: str, principal: Principal, generation: int) -> None:
        if self.ttl <= 0 or generation != self._generation:
            return  # a local change (logout, role change) came in while this check ran
        loaded = self._entries.get(principal.claims.jti)
        if loaded is None:
            return
        if len(self._passed) >= self.max_entries:
            self._passed.clear()
        # It lasts as long as the user and revocation state it was checked against, no longer:
        # another worker's change is seen within `ttl` of when that state was read.
        self._passed[token] = _Passed(
            loaded[0], principal.user, principal.claims.jti, principal.claims.expires_at.timestamp()
        )

    @property
    def generation(self) -> int:
        return self._generation

    def claims(self, token: str, secret_key: str) -> auth.TokenClaims:
        """The verified claims of a token; raises auth.InvalidToken (expired included)."""
        entry = self._claims.get(token)
        if entry is None:
            claims = auth.decode_access_token(token, secret_key)
            if len(self._claims) >= self.max_entries:
                self._claims.clear()
            entry = self._claims[token] = (claims.expires_at.timestamp(), claims)
        if entry[0] < time.time():
            del self._claims[token]
            raise auth.InvalidToken("Signature has expired.")
        return entry[1]

    def get(self, jti: str) -> tuple[Caller | None, bool] | None:
        if self.ttl <= 0:
            return None
        entry = self._entries.get(jti)
        if entry is None or time.monotonic() - entry[0] > self.ttl:
            return None
        return entry[1], entry[2]

    def put(self, jti: str, user: Caller | None, revoked: bool, generation: int | None = None) -> None:
        if self.ttl <= 0 or (generation is not None and generation != self._generation):
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[jti] = (time.monotonic(), user, revoked)

    async def lookup(
        self, jti: str, load: Callable[[], Awaitable[tuple[Caller | None, bool]]]
    ) -> tuple[Caller | None, bool]:
        """The cached (user, revoked) of a token, else `await load()`, shared by all who ask meanwhile."""
        cached = self.get(jti)
        if cached is not None:
            return cached
        generation = self._generation
        pending = self._loading.get(jti)
        # A lookup that began before a local change (logout, role change) is not good enough.
        if pending is not None and pending[0] == generation:
            try:
                return await asyncio.shield(pending[1])
            except asyncio.CancelledError:
                if not pending[1].cancelled():
                    raise  # this request was cancelled, not the shared lookup
            generation = self._generation
        future = asyncio.get_running_loop().create_future()
        self._loading[jti] = (generation, future)
        try:
            user, revoked = await load()
        except asyncio.CancelledError:
            future.cancel()  # whoever waits on it looks up for themselves
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # mark it retrieved: with no one waiting asyncio would complain
            raise
        else:
            future.set_result((user, revoked))
            self.put(jti, user, revoked, generation)
            return user, revoked
        finally:
            if self._loading.get(jti, (None, None))[1] is future:
                del self._loading[jti]

    def revoke(self, jti: str) -> None:
        self._generation += 1
        self._entries[jti] = (time.monotonic(), None, True)
        for token in [t for t, entry in self._passed.items() if entry.jti == jti]:
            del self._passed[token]

    def forget_user(self, user_id: int) -> None:
        self._generation += 1
        for jti in [j for j, (_, u, _) in self._entries.items() if u is not None and u.id == user_id]:
            del self._entries[jti]
        for token in [t for t, entry in self._passed.items() if entry.caller.id == user_id]:
            del self._passed[token]


async def _load_token_state(
    sessionmaker: async_sessionmaker[AsyncSession], claims: auth.TokenClaims
) -> tuple[Caller | None, bool]:
    """The token's user and whether the token is revoked, in one query."""
    revoked = exists().where(RevokedToken.jti == claims.jti)
    async with sessionmaker() as session:
        row = (await session.execute(select(*_CALLER_COLUMNS, revoked).where(User.id == claims.user_id))).first()
    if row is None:
        return None, False
    caller = Caller(
        id=row.id,
        email=row.email,
        username=row.username,
        full_name=row.full_name,
        role=row.role,
        is_active=row.is_active,
        token_version=row.token_version,
        created_at=row.created_at,
    )
    return caller, bool(row[-1])


async def authenticate_token(
    *, sessionmaker: async_sessionmaker, settings: Settings, cache: AuthCache, token: str | None
) -> Principal:
    if not token:
        raise Unauthorized("Not authenticated")
    try:
        claims = cache.claims(token, settings.secret_key)
    except auth.InvalidToken:
        raise Unauthorized("Could not validate credentials") from None

    user, revoked = await cache.lookup(claims.jti, lambda: _load_token_state(sessionmaker, claims))
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
    await session.execute(delete(RevokedToken).where(RevokedToken.expires_at < datetime.now(UTC)))
    await session.commit()


def issue_token(user: User, settings: Settings) -> tuple[str, int]:
    token, _ = auth.create_access_token(
        user.id,
        user.token_version or 0,
        settings.secret_key,
        settings.access_token_expire_minutes,
        settings.algorithm,
    )
    return token, settings.access_token_expire_minutes * 60


# --- login throttling, kept in the database so every worker process shares it ---
#
# An attempt is counted before its password is checked, by one atomic upsert per key, so a
# burst of parallel guesses cannot slip past the limit while the first ones are still hashing.
# A successful login gives its attempt back: the account's count is cleared and the address's
# count loses the one attempt that succeeded.
# An attempt refused with 429 is not counted at all: no password was checked.


def _throttle_keys(user: User | None, login_name: str, client_ip: str | None) -> list[tuple[str, str]]:
    # The username and the email of one account share one budget; unknown names count by name.
    account = f"user:{user.id}" if user is not None else f"name:{login_name.lower()[:320]}"
    keys = [("user", account)]
    if client_ip:
        keys.append(("ip", f"ip:{client_ip}"))
    return keys


def _limit(scope: str, settings: Settings) -> int:
    return settings.login_max_failures_per_user if scope == "user" else settings.login_max_failures_per_ip


async def _count_attempt(session: AsyncSession, settings: Settings, keys: list[tuple[str, str]]) -> None:
    """Count one attempt on every key; 429 when any key is over its limit in the current window."""
    now = datetime.now(UTC)
    window = timedelta(seconds=settings.login_window_seconds)
    dialect_insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    expired = LoginFailure.window_start <= now - window
    blocked_for = 0.0
    for scope, key in keys:
        insert = dialect_insert(LoginFailure).values(key=key, window_start=now, failures=1)
        upsert = insert.on_conflict_do_update(
            index_elements=[LoginFailure.key],
            set_={
                "failures": case((expired, 1), else_=LoginFailure.failures + 1),
                "window_start": case((expired, now), else_=LoginFailure.window_start),
            },
        ).returning(LoginFailure.failures, LoginFailure.window_start)
        failures, window_start = (await session.execute(upsert)).one()
        if failures > _limit(scope, settings):
            blocked_for = max(blocked_for, (window_start + window - now).total_seconds())
    if blocked_for > 0:
        # A refused attempt checks no password, so it is no guess: it does not count. Counted,
        # a client retrying while throttled (or a burst of correct logins from one address
        # still hashing) would keep the address blocked long after the window that caused it.
        await session.rollback()
        raise TooManyRequests("Too many failed login attempts; try again later", retry_after=math.ceil(blocked_for))
    await session.commit()


async def _give_back_attempt(session: AsyncSession, keys: list[tuple[str, str]]) -> None:
    for scope, key in keys:
        if scope == "user":
            await session.execute(delete(LoginFailure).where(LoginFailure.key == key))
        else:
            await session.execute(
                update(LoginFailure)
                .where(LoginFailure.key == key, LoginFailure.failures > 0)
                .values(failures=LoginFailure.failures - 1)
            )
    await session.commit()


async def login(
    *, session: AsyncSession, settings: Settings, username: str, password: str, client_ip: str | None
) -> User:
    user = await find_by_login(session=session, login=username)
    keys = _throttle_keys(user, username, client_ip)
    await _count_attempt(session, settings, keys)
    ok = await auth.in_hashing_thread(
        auth.verify_password, password, user.hashed_password if user else None, settings.bcrypt_rounds
    )
    if not ok or user is None:
        raise Unauthorized(INVALID_CREDENTIALS)
    await _give_back_attempt(session, keys)
    if not user.is_active:
        raise Forbidden("Inactive user")
    return user


async def find_by_login(*, session: AsyncSession, login: str) -> User | None:
    """A user by username, or by email when the login names one (case-insensitive for email)."""
    if "@" in login:
        condition = func.lower(User.email) == login.lower()
    else:
        condition = User.username == login
    return (await session.execute(select(User).where(condition))).scalar_one_or_none()
