"""The delivery worker: sends the outbox's due deliveries, signed, and records each outcome.

Every worker process runs one. A delivery is claimed with an UPDATE that sets its lease (holder and
expiry) only while no live lease holds it, so one worker at a time sends a given message, on SQLite
and PostgreSQL alike; a worker killed mid-send leaves a lease that expires, and the message goes out
again (at least once). Each attempt resolves the host once, checks the addresses as at subscription,
and connects to the checked one: no redirect is followed and no proxy from the environment is used.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import Table, bindparam, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.addresses import RESOLVE_TIMEOUT_SECONDS, IPAddress
from app.core.config import Settings
from app.core.database import Database
from app.core.tables import utcnow
from app.versions.lease import HOST_ID
from app.webhooks.addresses import AddressRefused, Target, resolve
from app.webhooks.crypto import SecretBox
from app.webhooks.signing import signed_headers
from app.webhooks.tables import WebhookDelivery, WebhookEndpoint, WebhookMessage

logger = logging.getLogger("app.webhooks")

MAX_ERROR_LENGTH = 300
ENDPOINT_DISABLED = "endpoint disabled"
UNREADABLE_SECRET = "the endpoint's secret cannot be read (SECRET_KEY changed?): rotate it"
USER_AGENT = "customer-segmentation-webhooks/1"

# The table itself, for the one executemany UPDATE that records a round's outcomes.
DELIVERIES: Table = WebhookDelivery.__table__  # type: ignore[assignment]


@dataclass(frozen=True)
class Claimed:
    delivery_id: int
    endpoint_id: int
    message_id: str
    body: bytes
    url: str
    secrets: tuple[str, ...]
    failures: int


@dataclass(frozen=True)
class Outcome:
    claimed: Claimed
    status_code: int | None
    error: str | None
    refused: bool = False

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_LENGTH else text[: MAX_ERROR_LENGTH - 1] + "…"


def _process_gone(holder: str) -> bool:
    """True for a lease `<host>:<pid>:...` of this host whose process no longer exists."""
    rest = holder.removeprefix(f"{HOST_ID}:")
    pid = rest.split(":", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class DeliveryWorker:
    def __init__(self, *, database: Database, settings: Settings, box: SecretBox) -> None:
        self.database = database
        self.settings = settings
        self.box = box
        self.holder = f"{HOST_ID}:{os.getpid()}:{secrets.token_hex(4)}"
        self.batch = settings.webhook_concurrency
        # Long enough for a whole batch: one resolution and one request each, all at once.
        self.lease = timedelta(seconds=settings.webhook_timeout_seconds + RESOLVE_TIMEOUT_SECONDS + 30)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._client: httpx.AsyncClient | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            trust_env=False,
            follow_redirects=False,
            timeout=httpx.Timeout(self.settings.webhook_timeout_seconds),
            limits=httpx.Limits(max_connections=self.settings.webhook_concurrency, max_keepalive_connections=32),
        )
        await self._release_dead_holders()
        self._task = asyncio.create_task(self._run(), name="webhook-deliveries")

    async def _release_dead_holders(self) -> None:
        """Leases held by processes of this host that no longer exist (a killed server, restarted at once)
        are released now rather than when they expire: what they were sending goes out again."""
        now = utcnow()
        async with self.database.sessionmaker() as session:
            holders = (
                await session.execute(
                    select(WebhookDelivery.lease_holder)
                    .where(WebhookDelivery.lease_until > now, WebhookDelivery.lease_holder.like(f"{HOST_ID}:%"))
                    .distinct()
                )
            ).scalars()
            dead = [holder for holder in holders if holder is not None and _process_gone(holder)]
            if not dead:
                return
            await session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.lease_holder.in_(dead))
                .values(lease_holder=None, lease_until=None)
            )
            await session.commit()
        logger.warning("released the webhook deliveries of %d stopped workers", len(dead))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        try:  # what this worker had claimed is free for the next one at once
            async with self.database.sessionmaker() as session:
                await session.execute(
                    update(WebhookDelivery)
                    .where(WebhookDelivery.lease_holder.like(f"{self.holder}:%"))
                    .values(lease_holder=None, lease_until=None)
                )
                await session.commit()
        except Exception:  # noqa: BLE001 - a database gone at shutdown: the leases expire instead
            logger.warning("could not release the webhook leases at shutdown", exc_info=True)

    def wake(self) -> None:
        """Look for due deliveries now (this process queued one), not at the next poll."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                sent = await self.deliver_due()
            except asyncio.CancelledError:
                raise
            except Exception:  # a database hiccup: the next round tries again
                logger.warning("webhook deliveries failed this round", exc_info=True)
                sent = 0
            if sent >= self.batch:
                continue  # more may be due
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.webhook_poll_seconds)
            except TimeoutError:
                pass

    # --- one round -------------------------------------------------------------------------

    async def deliver_due(self) -> int:
        """Claim up to a batch of due deliveries, send them all at once, record how each went."""
        claim, claimed = await self._claim()
        if not claimed:
            return 0
        outcomes = await asyncio.gather(*(self._attempt(item) for item in claimed))
        await self._record(claim, outcomes)
        return len(claimed)

    async def _claim(self) -> tuple[str, list[Claimed]]:
        now = utcnow()
        claim = f"{self.holder}:{secrets.token_hex(4)}"
        free = or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until < now)
        due = (
            select(WebhookDelivery.id)
            .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
            .where(
                WebhookDelivery.status == "pending",
                WebhookDelivery.next_attempt_at <= now,
                free,
                WebhookEndpoint.active.is_(True),
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(self.batch)
            .with_for_update(skip_locked=True, of=WebhookDelivery)
        )
        async with self.database.sessionmaker() as session:
            await session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id.in_(due.scalar_subquery()), WebhookDelivery.status == "pending", free)
                .values(lease_holder=claim, lease_until=now + self.lease)
                .execution_options(synchronize_session=False)
            )
            await session.commit()
            rows = (
                await session.execute(
                    select(
                        WebhookDelivery.id,
                        WebhookDelivery.endpoint_id,
                        WebhookDelivery.message_id,
                        WebhookDelivery.failures,
                        WebhookMessage.body,
                        WebhookEndpoint.url,
                        WebhookEndpoint.secret,
                        WebhookEndpoint.previous_secret,
                        WebhookEndpoint.previous_secret_until,
                    )
                    .join(WebhookMessage, WebhookMessage.id == WebhookDelivery.message_id)
                    .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
                    .where(WebhookDelivery.lease_holder == claim)
                )
            ).all()
        claimed = []
        for row in rows:
            claimed.append(
                Claimed(
                    delivery_id=row.id,
                    endpoint_id=row.endpoint_id,
                    message_id=row.message_id,
                    body=row.body.encode("utf-8"),
                    url=row.url,
                    secrets=self._secrets(row.secret, row.previous_secret, row.previous_secret_until, now),
                    failures=row.failures,
                )
            )
        return claim, claimed

    def _secrets(
        self, sealed: str, previous: str | None, previous_until: datetime | None, now: datetime
    ) -> tuple[str, ...]:
        """The secrets that sign now; none when the current one cannot be read (the delivery then fails)."""
        try:
            found = [self.box.open(sealed)]
            if previous is not None and previous_until is not None and previous_until > now:
                found.append(self.box.open(previous))
        except ValueError:
            logger.warning("a webhook secret cannot be read with this SECRET_KEY")
            return ()
        return tuple(found)

    async def _attempt(self, item: Claimed) -> Outcome:
        if not item.secrets:
            return Outcome(item, None, UNREADABLE_SECRET, refused=True)
        try:
            target = await resolve(item.url, allow_private=self.settings.webhook_allow_private)
        except AddressRefused as exc:
            return Outcome(item, None, _short(exc.message), refused=True)
        try:
            async with asyncio.timeout(self.settings.webhook_timeout_seconds):
                for address in target.addresses[:-1]:
                    try:
                        return await self._send(item, target, address)
                    except httpx.ConnectError:
                        continue  # the next checked address of the same host
                return await self._send(item, target, target.addresses[-1])
        except TimeoutError:
            return Outcome(item, None, f"no answer within {self.settings.webhook_timeout_seconds:g} s")
        except httpx.HTTPError as exc:
            return Outcome(item, None, _short(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__))

    async def _send(self, item: Claimed, target: Target, address: IPAddress) -> Outcome:
        """One POST to `address`, as to the URL's host: its Host header and, for https, its TLS server name."""
        assert self._client is not None
        headers = {
            **signed_headers(item.secrets, item.message_id, int(time.time()), item.body),
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "host": target.host_header,
        }
        extensions: dict[str, Any] = {}
        if target.url.scheme == "https":
            extensions["sni_hostname"] = target.server_name
        request = self._client.build_request(
            "POST", target.connect_url(address), content=item.body, headers=headers, extensions=extensions
        )
        response = await self._client.send(request, stream=True)
        try:
            status = response.status_code
            if 200 <= status < 300:
                return Outcome(item, status, None)
            answer = b""
            async for chunk in response.aiter_bytes():
                answer += chunk
                if len(answer) >= MAX_ERROR_LENGTH:
                    break
        finally:
            await response.aclose()
        text = answer.decode("utf-8", "replace")
        reason = response.reason_phrase or ""
        return Outcome(item, status, _short(f"HTTP {status}{f' {reason}' if reason else ''}: {text}".rstrip(": ")))

    async def _record(self, claim: str, outcomes: list[Outcome]) -> None:
        now = utcnow()
        delays = self.settings.webhook_retry_delays
        changes: list[dict[str, Any]] = []
        gone: set[int] = set()
        for outcome in outcomes:
            item = outcome.claimed
            change: dict[str, Any] = {
                "status": "failed",
                "last_status_code": outcome.status_code,
                "last_error": outcome.error,
                "failures": item.failures + 1,
                "next_attempt_at": None,
                "delivered_at": None,
            }
            if outcome.delivered:
                change.update(status="delivered", failures=item.failures, delivered_at=now)
            elif outcome.status_code == 410:
                gone.add(item.endpoint_id)
                change.update(last_error=_short(f"{outcome.error}; {ENDPOINT_DISABLED}"))
            elif not outcome.refused and item.failures < len(delays):
                change.update(status="pending", next_attempt_at=now + timedelta(seconds=delays[item.failures]))
            changes.append({"b_id": item.delivery_id, **{f"b_{key}": value for key, value in change.items()}})
        async with self.database.sessionmaker() as session:
            await session.execute(
                update(DELIVERIES)
                .where(DELIVERIES.c.id == bindparam("b_id"), DELIVERIES.c.lease_holder == claim)
                .values(
                    status=bindparam("b_status"),
                    attempts=DELIVERIES.c.attempts + 1,
                    failures=bindparam("b_failures"),
                    last_status_code=bindparam("b_last_status_code"),
                    last_error=bindparam("b_last_error"),
                    next_attempt_at=bindparam("b_next_attempt_at"),
                    delivered_at=bindparam("b_delivered_at"),
                    lease_holder=None,
                    lease_until=None,
                ),
                changes,
            )
            if gone:
                await self._disable(session, gone, now)
            await session.commit()
        for endpoint_id in gone:
            logger.warning("webhook %s answered 410 Gone: disabled", endpoint_id)

    async def _disable(self, session: AsyncSession, endpoints: set[int], now: datetime) -> None:
        """A 410: the endpoints stop, and what was still pending for them fails."""
        await session.execute(
            update(WebhookEndpoint).where(WebhookEndpoint.id.in_(endpoints)).values(active=False, updated_at=now)
        )
        await session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.endpoint_id.in_(endpoints), WebhookDelivery.status == "pending")
            .values(
                status="failed", last_error=ENDPOINT_DISABLED, next_attempt_at=None, lease_holder=None, lease_until=None
            )
        )
