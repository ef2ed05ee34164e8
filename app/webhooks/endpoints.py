"""The webhook routes (admin): endpoints, their secrets, their deliveries and a retry."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response

from app.auth.dependencies import AdminUser, require_role
from app.core.deps import PageDep
from app.core.responses import errors
from app.core.routing import FastRoute
from app.core.tables import Role
from app.webhooks.schemas import (
    Delivery,
    DeliveryPage,
    WebhookCreate,
    WebhookList,
    WebhookPublic,
    WebhookUpdate,
    WebhookWithSecret,
)
from app.webhooks.service import WebhookService

router = APIRouter(
    prefix="/webhooks",
    tags=["webhooks"],
    dependencies=[Depends(require_role(Role.admin))],
    route_class=FastRoute,
)

EndpointId = Annotated[int, Path(ge=1, le=2**31 - 1, description="The webhook's id")]
MessageId = Annotated[str, Path(min_length=1, max_length=40, description="The message id (webhook-id header)")]


async def webhook_service(request: Request) -> WebhookService:
    return request.app.state.webhooks


Webhooks = Annotated[WebhookService, Depends(webhook_service)]


@router.post(
    "",
    status_code=201,
    summary="Subscribe a URL to events (admin)",
    description="Answers with the signing `secret`, shown only here and on rotate. The URL must be http(s) and "
    "every address its host resolves to global (422 otherwise, unless WEBHOOK_ALLOW_PRIVATE=true).",
    responses=errors(401, 403, 422),
)
async def create_webhook(admin: AdminUser, webhooks: Webhooks, body: WebhookCreate) -> WebhookWithSecret:
    created = await webhooks.create(
        url=body.url, events=list(body.events), description=body.description, created_by=admin.username
    )
    return WebhookWithSecret(**created)


@router.get(
    "",
    summary="Every webhook (admin)",
    description="A page of webhooks (`skip`, `limit`) in the order they were created, with `total`; no secrets.",
    responses=errors(401, 403, 422),
)
async def list_webhooks(webhooks: Webhooks, page: PageDep) -> WebhookList:
    found, total = await webhooks.page(skip=page.skip, limit=page.limit)
    return WebhookList(webhooks=[WebhookPublic(**endpoint) for endpoint in found], total=total)


@router.get(
    "/{webhook_id}",
    summary="One webhook (admin)",
    description="Its URL, events, description and whether it is active; never its secret. Unknown: 404.",
    responses=errors(401, 403, 404, 422),
)
async def get_webhook(webhooks: Webhooks, webhook_id: EndpointId) -> WebhookPublic:
    return WebhookPublic(**await webhooks.get(webhook_id))


@router.patch(
    "/{webhook_id}",
    summary="Edit a webhook (admin)",
    description="`url`, `events`, `active`, `description`; a field left out stays as it is. A new URL is "
    "checked as at creation.",
    responses=errors(401, 403, 404, 422),
)
async def edit_webhook(webhooks: Webhooks, webhook_id: EndpointId, body: WebhookUpdate) -> WebhookPublic:
    changes = body.model_dump(include=body.model_fields_set)
    return WebhookPublic(**await webhooks.update(webhook_id, changes))


@router.delete(
    "/{webhook_id}",
    status_code=204,
    summary="Delete a webhook and its deliveries (admin)",
    description="Its pending messages are not sent. Unknown: 404.",
    responses=errors(401, 403, 404, 422),
)
async def delete_webhook(webhooks: Webhooks, webhook_id: EndpointId) -> Response:
    await webhooks.delete(webhook_id)
    return Response(status_code=204)


@router.post(
    "/{webhook_id}/rotate-secret",
    summary="A new signing secret (admin)",
    description="For 24 hours the old secret signs too: each delivery carries both signatures.",
    responses=errors(401, 403, 404, 422),
)
async def rotate_secret(webhooks: Webhooks, webhook_id: EndpointId) -> WebhookWithSecret:
    return WebhookWithSecret(**await webhooks.rotate(webhook_id))


@router.get(
    "/{webhook_id}/deliveries",
    summary="A webhook's deliveries, newest first (admin)",
    description="A page (`skip`, `limit`) with `total`: each message's status (pending, delivered, failed), "
    "attempts, the last answer's status code and error, and the next attempt's time while pending.",
    responses=errors(401, 403, 404, 422),
)
async def list_deliveries(webhooks: Webhooks, webhook_id: EndpointId, page: PageDep) -> DeliveryPage:
    found, total = await webhooks.deliveries(webhook_id, skip=page.skip, limit=page.limit)
    return DeliveryPage(
        deliveries=[Delivery(**delivery) for delivery in found], total=total, skip=page.skip, limit=page.limit
    )


@router.post(
    "/{webhook_id}/deliveries/{message_id}/retry",
    status_code=202,
    summary="Send a failed or delivered message again (admin)",
    description="Queued at once, with the whole retry schedule ahead of it; a pending one is a 409.",
    responses=errors(401, 403, 404, 409, 422),
)
async def retry_delivery(webhooks: Webhooks, webhook_id: EndpointId, message_id: MessageId) -> Delivery:
    return Delivery(**await webhooks.retry(webhook_id, message_id))
