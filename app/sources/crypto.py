"""Source passwords at rest: Fernet under a key derived from SECRET_KEY with HKDF-SHA256.

The key is derived for this one use (its own HKDF `info`), so no other secret sealed under SECRET_KEY
shares it. Changing SECRET_KEY makes the stored passwords unreadable: such a source must be created again.
"""

from __future__ import annotations

import base64
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from app.core.errors import InvalidInput

KEY_PURPOSE = b"customer-segmentation data source passwords"


@lru_cache(maxsize=4)
def _fernet(secret_key: str) -> Fernet:
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=KEY_PURPOSE).derive(secret_key.encode("utf-8"))
    return Fernet(base64.urlsafe_b64encode(derived))


def seal(password: str, *, secret_key: str) -> str:
    return _fernet(secret_key).encrypt(password.encode("utf-8")).decode("ascii")


def unseal(sealed: str, *, secret_key: str) -> str:
    try:
        return _fernet(secret_key).decrypt(sealed.encode("ascii")).decode("utf-8")
    except InvalidToken:
        raise InvalidInput(
            "The source's password was stored under another SECRET_KEY: delete the source and create it again"
        ) from None
