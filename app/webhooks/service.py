"""Webhook endpoints and their deliveries, in SQL: create, list, edit, delete, rotate, list deliveries, retry."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select, update

from app.core.config import Settings
from app.core.database import Database
from app.core.errors import Conflict, InvalidInput, NotFound
from app.core.tables import utcnow
from app.versions.lease import rows_updated
from app.webhooks.addresses import AddressRefused, resolve
from app.webhooks.crypto import SecretBox, new_secret
from app.webhooks.tables import WebhookDelivery, WebhookEndpoint, WebhookMessage

# How long the secret before a rotation keeps signing beside the new one.
ROTATION_OVERLAP = timedelta(hours=24)
RETRYABLE = ("failed", "delivered")


def endpoint_public(row: WebhookEndpoint) -> dict[str, Any]:
    return {
        "id": row.id,
        "url": row.url,
        "events": list(row.events or []),
        "description": row.description,
        "active": row.active,
        "created_at": row.created_at,
    }


def delivery_public(row: WebhookDelivery) -> dict[str, Any]:
    return {
        "message_id": row.message_id,
        "event": row.event,
        "status": row.status,
        "attempts": row.attempts,
        "last_status_code": row.last_status_code,
        "last_error": row.last_error,
        "next_attempt_at": row.next_attempt_at if row.status == "pending" else None,
        "created_at": row.created_at,
        "delivered_at": row.delivered_at,
    }


class WebhookService:
    def __init__(
        self, *, database: Database, settings: Settings, box: SecretBox, on_queued: Callable[[], None] | None = None
    ) -> None:
        self.database = database
        self.settings = settings
        self.box = box
        self.on_queued = on_queued

    async def check_url(self, url: str) -> None:
        """422 for a URL an endpoint may not have (checked again at each delivery)."""
        try:
            await resolve(url, allow_private=self.settings.webhook_allow_private)
        except AddressRefused as exc:
            raise InvalidInput(exc.message) from None

    async def create(
        self, *, url: str, events: list[str], description: str | None, created_by: str | None
    ) -> dict[str, Any]:
        await self.check_url(url)
        secret = new_secret()
        row = WebhookEndpoint(
            url=url,
            events=list(dict.fromkeys(events)),
            description=description,
            active=True,
            secret=self.box.seal(secret),
            created_by=created_by,
        )
        async with self.database.sessionmaker() as session:
            session.add(row)
            await session.commit()
        return {**endpoint_public(row), "secret": secret}

    async def page(self, *, skip: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        async with self.database.sessionmaker() as session:
            rows = (
                await session.execute(select(WebhookEndpoint).order_by(WebhookEndpoint.id).offset(skip).limit(limit))
            ).scalars()
            found = [endpoint_public(row) for row in rows]
            total = (await session.execute(select(func.count()).select_from(WebhookEndpoint))).scalar_one()
        return found, int(total)

    async def get(self, endpoint_id: int) -> dict[str, Any]:
        async with self.database.sessionmaker() as session:
            row = await session.get(WebhookEndpoint, endpoint_id)
        if row is None:
            raise NotFound("webhook")
        return endpoint_public(row)

    async def update(self, endpoint_id: int, changes: dict[str, Any]) -> dict[str, Any]:
        if "url" in changes:
            await self.check_url(changes["url"])
        if "events" in changes:
            changes["events"] = list(dict.fromkeys(changes["events"]))
        async with self.database.sessionmaker() as session:
            row = await session.get(WebhookEndpoint, endpoint_id)
            if row is None:
                raise NotFound("webhook")
            for field, value in changes.items():
                setattr(row, field, value)
            await session.commit()
        if changes.get("active") and self.on_queued is not None:
            self.on_queued()  # its pending deliveries are due again
        return endpoint_public(row)

    async def delete(self, endpoint_id: int) -> None:
        async with self.database.sessionmaker() as session:
            row = await session.get(WebhookEndpoint, endpoint_id)
            if row is None:
                raise NotFound("webhook")
            await session.delete(row)
            await session.flush()
            # Its deliveries went with it (a cascade); messages no endpoint is left to receive go too.
            sent_somewhere = select(WebhookDelivery.id).where(WebhookDelivery.message_id == WebhookMessage.id).exists()
            await session.execute(delete(WebhookMessage).where(~sent_somewhere))
            await session.commit()

    async def rotate(self, endpoint_id: int) -> dict[str, Any]:
        """A new secret; the one it replaces keeps signing too for ROTATION_OVERLAP."""
        secret = new_secret()
        async with self.database.sessionmaker() as session:
            row = await session.get(WebhookEndpoint, endpoint_id)
            if row is None:
                raise NotFound("webhook")
            row.previous_secret = row.secret
            row.previous_secret_until = utcnow() + ROTATION_OVERLAP
            row.secret = self.box.seal(secret)
            await session.commit()
        return {**endpoint_public(row), "secret": secret}

    async def deliveries(self, endpoint_id: int, *, skip: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        mine = WebhookDelivery.endpoint_id == endpoint_id
        async with self.database.sessionmaker() as session:
            if await session.get(WebhookEndpoint, endpoint_id) is None:
                raise NotFound("webhook")
            rows = (
                await session.execute(
                    select(WebhookDelivery)
                    .where(mine)
                    .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
                    .offset(skip)
                    .limit(limit)
                )
            ).scalars()
            found = [delivery_public(row) for row in rows]
            total = (await session.execute(select(func.count()).select_from(WebhookDelivery).where(mine))).scalar_one()
        return found, int(total)

    async def retry(self, endpoint_id: int, message_id: str) -> dict[str, Any]:
        """Queue a failed or delivered message again, due now, with the whole retry schedule ahead of it."""
        now = utcnow()
        which = (WebhookDelivery.endpoint_id == endpoint_id) & (WebhookDelivery.message_id == message_id)
        async with self.database.sessionmaker() as session:
            queued = await rows_updated(
                session,
                update(WebhookDelivery)
                .where(which, WebhookDelivery.status.in_(RETRYABLE))
                .values(status="pending", failures=0, next_attempt_at=now, lease_holder=None, lease_until=None),
            )
            row = (await session.execute(select(WebhookDelivery).where(which))).scalar_one_or_none()
            await session.commit()
        if row is None:
            raise NotFound("delivery")
        if not queued:
            raise Conflict("The message is still pending: only failed or delivered messages can be retried")
        if self.on_queued is not None:
            self.on_queued()
        return delivery_public(row)
