"""Password hashing and access tokens: pure functions, no routes, no database."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, TypeVar

from jose import JWTError, jwt
from pwdlib import PasswordHash
from pwdlib.hashers.bcrypt import BcryptHasher

T = TypeVar("T")

# Only this algorithm is ever accepted, whatever a token's header says.
ALGORITHMS = ["HS256"]
# bcrypt reads at most this many bytes of a password.
BCRYPT_MAX_BYTES = 72


@lru_cache(maxsize=8)
def password_hasher(rounds: int = 12) -> PasswordHash:
    return PasswordHash((BcryptHasher(rounds=rounds),))


@lru_cache(maxsize=8)
def _dummy_hash(rounds: int) -> str:
    return password_hasher(rounds).hash("not-a-real-password-used-for-timing")


def _bcrypt_input(password: str) -> str:
    """What bcrypt is given: the password itself, or a digest of it when bcrypt could not read it all.

    Passwords may be 128 characters (up to 512 UTF-8 bytes); bcrypt refuses more than 72 bytes.
    A longer one is replaced by its base64 SHA-256 (44 bytes), so every character still counts.
    Lone surrogates (valid in JSON, not encodable as UTF-8) take the same path.
    """
    try:
        raw = password.encode("utf-8")
    except UnicodeEncodeError:
        raw = b"\xff" + password.encode("utf-8", "surrogatepass")  # never equal to a valid UTF-8 encoding
    else:
        if len(raw) <= BCRYPT_MAX_BYTES:
            return password
    return base64.b64encode(hashlib.sha256(raw).digest()).decode("ascii")


def hash_password(password: str, rounds: int = 12) -> str:
    return password_hasher(rounds).hash(_bcrypt_input(password))


def verify_password(password: str, hashed: str | None, rounds: int = 12) -> bool:
    """Check a password; with no hash (unknown user) spend the same time and fail."""
    hasher = password_hasher(rounds)
    password = _bcrypt_input(password)
    if hashed is None:
        hasher.verify(password, _dummy_hash(rounds))
        return False
    try:
        return hasher.verify(password, hashed)
    except Exception:  # a malformed stored hash must not turn into a 500
        return False


# --- where hashing runs --------------------------------------------------------------------

# Niceness of the hashing threads: bcrypt at 12 rounds is ~0.2 s of CPU per login, and at the
# default priority a burst of logins starves the event loop that serves everything else.
HASHING_NICENESS = 10


def _lower_priority() -> None:
    try:  # on Linux this applies to the calling thread alone
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASHING_NICENESS)
    except (AttributeError, OSError):
        pass


@lru_cache(maxsize=1)
def _hashing_pool() -> ThreadPoolExecutor:
    # One thread per core but one: more would only queue in the scheduler instead of here, and
    # one core is left to the event loop however many logins come at once.
    return ThreadPoolExecutor(
        max_workers=max(1, (os.cpu_count() or 1) - 1),
        thread_name_prefix="password-hashing",
        initializer=_lower_priority,
    )


async def in_hashing_thread(func: Callable[..., T], *args: Any) -> T:
    """Run a hash or verify on a low-priority thread: logins wait for the CPU, other requests do not."""
    return await asyncio.get_running_loop().run_in_executor(_hashing_pool(), func, *args)


@dataclass(frozen=True)
class TokenClaims:
    user_id: int
    jti: str
    issued_at: datetime
    expires_at: datetime
    token_version: int


class InvalidToken(Exception):
    pass


def create_access_token(
    user_id: int, token_version: int, secret_key: str, expires_minutes: int, algorithm: str = "HS256"
) -> tuple[str, TokenClaims]:
    now = datetime.now(UTC)
    claims = TokenClaims(
        user_id=user_id,
        jti=uuid.uuid4().hex,
        issued_at=now,
        expires_at=now + timedelta(minutes=expires_minutes),
        token_version=token_version,
    )
    payload = {
        "sub": str(user_id),
        "jti": claims.jti,
        "iat": int(now.timestamp()),
        "exp": int(claims.expires_at.timestamp()),
        "ver": token_version,
    }
    return jwt.encode(payload, secret_key, algorithm=algorithm), claims


def decode_access_token(token: str, secret_key: str) -> TokenClaims:
    try:
        payload = jwt.decode(
            token,
            secret_key,
            algorithms=ALGORITHMS,
            options={"require_sub": True, "require_exp": True, "require_iat": True, "require_jti": True},
        )
        return TokenClaims(
            user_id=int(payload["sub"]),
            jti=str(payload["jti"]),
            issued_at=datetime.fromtimestamp(int(payload["iat"]), UTC),
            expires_at=datetime.fromtimestamp(int(payload["exp"]), UTC),
            token_version=int(payload.get("ver", 0)),
        )
    except (JWTError, KeyError, TypeError, ValueError, OverflowError) as exc:
        raise InvalidToken(str(exc)) from None
