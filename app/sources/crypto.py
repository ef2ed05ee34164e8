"""Source passwords at rest, sealed by app.core.crypto under their own derived key.

Changing SECRET_KEY makes the stored passwords unreadable: such a source must be created again.
"""

from __future__ import annotations

from app.core.crypto import SecretBox
from app.core.errors import InvalidInput

KEY_PURPOSE = b"customer-segmentation data source passwords"


def seal(password: str, *, secret_key: str) -> str:
    return SecretBox(secret_key, KEY_PURPOSE).seal(password)


def unseal(sealed: str, *, secret_key: str) -> str:
    try:
        return SecretBox(secret_key, KEY_PURPOSE).open(sealed)
    except ValueError:
        raise InvalidInput(
            "The source's password was stored under another SECRET_KEY: delete the source and create it again"
        ) from None
