"""Signing secrets: new ones, their HMAC keys, and at rest sealed by app.core.crypto.

Changing SECRET_KEY makes the stored secrets unreadable: rotate each endpoint's secret afterwards.
"""

from __future__ import annotations

import base64
import secrets

from app.core.crypto import SecretBox as CoreBox

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 24


def new_secret() -> str:
    """`whsec_` and the base64 of 24 random bytes, as Standard Webhooks spells a symmetric secret."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def secret_key_bytes(secret: str) -> bytes:
    """The HMAC key of a secret: its base64 part, decoded."""
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


WEBHOOK_SECRETS = b"webhook-endpoint-secrets"


class SecretBox(CoreBox):
    """Encrypts and decrypts endpoint secrets with the service's SECRET_KEY (app.core.crypto)."""

    def __init__(self, secret_key: str) -> None:
        super().__init__(secret_key, WEBHOOK_SECRETS)

    def open(self, sealed: str) -> str:
        try:
            return super().open(sealed)
        except ValueError:
            raise ValueError("the endpoint's secret was sealed under another SECRET_KEY: rotate it") from None
