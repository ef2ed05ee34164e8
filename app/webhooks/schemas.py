"""Webhook schemas: an endpoint as created, shown and edited; its secret (shown twice only); its deliveries."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.core.events import Event
from app.core.schemas import NotNull, omittable

DeliveryStatus = Literal["pending", "delivered", "failed"]

Url = Annotated[
    str,
    Field(
        min_length=1,
        max_length=2000,
        description="http(s); every address its host resolves to must be global (WEBHOOK_ALLOW_PRIVATE=true "
        "lifts that)",
        examples=["https://hooks.example.com/segmentation"],
    ),
]
Events = Annotated[
    list[Event],
    Field(min_length=1, max_length=10, description="The events to receive", examples=[["model.activated"]]),
]

ENDPOINT_EXAMPLE: dict[str, Any] = {
    "id": 1,
    "url": "https://hooks.example.com/segmentation",
    "events": ["model.activated", "drift.changed"],
    "description": "CRM sync",
    "active": True,
    "created_at": "2026-12-09T10:00:00Z",
}
SECRET_EXAMPLE = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class WebhookCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "url": "https://hooks.example.com/segmentation",
                    "events": ["model.activated", "drift.changed"],
                    "description": "CRM sync",
                }
            ]
        },
    )

    url: Url
    events: Events
    description: str | None = Field(None, max_length=500)


class WebhookUpdate(BaseModel):
    """A field left out stays as it is."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"events": ["model.activated"], "active": True}]}
    )

    url: Annotated[Url | None, NotNull] = Field(None, json_schema_extra=omittable)
    events: Annotated[Events | None, NotNull] = Field(None, json_schema_extra=omittable)
    active: Annotated[bool | None, NotNull] = Field(None, json_schema_extra=omittable)
    description: str | None = Field(None, max_length=500)


class WebhookPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [ENDPOINT_EXAMPLE]})

    id: int
    url: str
    events: list[str]
    description: str | None
    active: bool
    created_at: datetime


class WebhookWithSecret(WebhookPublic):
    """The endpoint with its signing secret: shown when it is created and when it is rotated, never again."""

    model_config = ConfigDict(json_schema_extra={"examples": [{**ENDPOINT_EXAMPLE, "secret": SECRET_EXAMPLE}]})

    secret: str = Field(description="`whsec_` and base64 of 24 random bytes; sign-checks every delivery")


class WebhookList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"webhooks": [ENDPOINT_EXAMPLE], "total": 1}]})

    webhooks: list[WebhookPublic]
    total: int


DELIVERY_EXAMPLE: dict[str, Any] = {
    "message_id": "msg_0193a1b2c3d4e5f6a7b8c9d0e1f2",
    "event": "model.activated",
    "status": "pending",
    "attempts": 1,
    "last_status_code": 503,
    "last_error": "HTTP 503 Service Unavailable: try later",
    "next_attempt_at": "2026-12-09T10:05:00Z",
    "created_at": "2026-12-09T10:00:00Z",
    "delivered_at": None,
}


class Delivery(BaseModel):
    """One message's way to this endpoint."""

    model_config = ConfigDict(json_schema_extra={"examples": [DELIVERY_EXAMPLE]})

    message_id: str
    event: str
    status: DeliveryStatus
    attempts: int
    last_status_code: int | None
    last_error: str | None = Field(description="At most 300 characters")
    next_attempt_at: datetime | None
    created_at: datetime
    delivered_at: datetime | None


class DeliveryPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"deliveries": [DELIVERY_EXAMPLE], "total": 1, "skip": 0, "limit": 50}]}
    )

    deliveries: list[Delivery]
    total: int
    skip: int
    limit: int
