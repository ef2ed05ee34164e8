"""The training lease: one training at a time per segmentation, across every worker process.

A lease is a row of service_state holding `<host>:<pid>:<token>`, renewed while the training
runs. It is free when released, when its holder stopped renewing it, or when its holder was a
process on this host that no longer exists (a killed server, restarted at once).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Delete, Update, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.database import Database
from app.core.errors import Conflict
from app.core.tables import ServiceState, utcnow

logger = logging.getLogger("app.models")

LEASE_HEARTBEAT_SECONDS = 5
LEASE_STALE_SECONDS = 30
TRAINING_RUNNING_MESSAGE = "A training is already running; try again when it has finished"


def _host_identity() -> str:
    """This host as lease holders are told apart: the hostname and, on Linux, the PID namespace,
    so two containers that happen to share a hostname never judge each other's process ids."""
    try:
        namespace = f"/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        namespace = ""
    return (socket.gethostname()[:80] + namespace).replace(":", "_")


HOST_ID = _host_identity()


def _lease_value(token: str) -> str:
    return f"{HOST_ID}:{os.getpid()}:{token}"


def _holder_is_dead(value: str | None) -> bool:
    """True when the lease was taken by a process on this host that no longer exists."""
    if not value:
        return False
    parts = value.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != HOST_ID or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False  # ours: the in-process lock decides
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


async def rows_updated(session: AsyncSession, statement: Update | Delete) -> int:
    """How many rows an UPDATE or a DELETE changed (its result is a cursor result, which has the count)."""
    result = cast(CursorResult[Any], await session.execute(statement))
    return result.rowcount


class TrainingLease:
    """The lease kept under service_state `key`: `acquire`, then `keep` it alive, then `release`."""

    def __init__(self, database: Database, key: str) -> None:
        self.database = database
        self.key = key

    async def acquire(self) -> str:
        """Take the lease, or raise 409 while another process holds it; returns the value held."""
        key = self.key
        value = _lease_value(secrets.token_hex(8))
        stale = utcnow() - timedelta(seconds=LEASE_STALE_SECONDS)
        async with self.database.sessionmaker() as session:
            held = (
                await session.execute(select(ServiceState.value).where(ServiceState.key == key))
            ).scalar_one_or_none()
        free = or_(ServiceState.value.is_(None), ServiceState.updated_at < stale)
        if _holder_is_dead(held):
            free = or_(free, ServiceState.value == held)
        async with self.database.sessionmaker() as session:
            taken = await rows_updated(
                session,
                update(ServiceState).where(ServiceState.key == key, free).values(value=value, updated_at=utcnow()),
            )
            if taken == 1:
                await session.commit()
                return value
            await session.rollback()
        if held is None:  # no lease row yet: the first training ever
            async with self.database.sessionmaker() as session:
                session.add(ServiceState(key=key, value=value))
                try:
                    await session.commit()
                    return value
                except IntegrityError:
                    await session.rollback()
        raise Conflict(TRAINING_RUNNING_MESSAGE)

    async def keep(self, value: str) -> None:
        """Renew the lease until cancelled."""
        while True:
            await asyncio.sleep(LEASE_HEARTBEAT_SECONDS)
            try:
                async with self.database.sessionmaker() as session:
                    await session.execute(
                        update(ServiceState)
                        .where(ServiceState.key == self.key, ServiceState.value == value)
                        .values(updated_at=utcnow())
                    )
                    await session.commit()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("could not renew the training lease", exc_info=True)

    async def release(self, value: str) -> None:
        async with self.database.sessionmaker() as session:
            await session.execute(
                update(ServiceState)
                .where(ServiceState.key == self.key, ServiceState.value == value)
                .values(value=None, updated_at=utcnow())
            )
            await session.commit()
