"""Secrets at rest (webhook signing secrets, SQL source passwords): Fernet under a key derived from
SECRET_KEY with HKDF-SHA256, one derived key per purpose, so no two uses share a key.

Changing SECRET_KEY makes what was sealed unreadable (`open` raises ValueError).
"""

from __future__ import annotations

import base64
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


@lru_cache(maxsize=8)
def _fernet(secret_key: str, purpose: bytes) -> Fernet:
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(secret_key.encode("utf-8"))
    return Fernet(base64.urlsafe_b64encode(derived))


class SecretBox:
    """Seals and opens text with the service's SECRET_KEY, for one `purpose` (the HKDF info)."""

    def __init__(self, secret_key: str, purpose: bytes) -> None:
        self._fernet = _fernet(secret_key, purpose)

    def seal(self, text: str) -> str:
        return self._fernet.encrypt(text.encode("utf-8")).decode("ascii")

    def open(self, sealed: str) -> str:
        try:
            return self._fernet.decrypt(sealed.encode("ascii")).decode("utf-8")
        except InvalidToken:
            raise ValueError("sealed under another SECRET_KEY") from None
