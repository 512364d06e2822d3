"""Secrets kept in the database (senders' passwords), encrypted with a key derived from SECRET_KEY.

Fernet (AES-128-CBC with HMAC-SHA256, from ``cryptography``) under a key made by HKDF-SHA256
from ``SECRET_KEY`` with a fixed purpose label, so the same SECRET_KEY used elsewhere (session
signing, reply tokens) never serves as this key directly. Changing SECRET_KEY makes the stored
secrets unreadable: :func:`open_secret` then raises :class:`SecretUnreadable`, and the sender
says its credentials must be entered again (never a crash, never a silent empty password).
"""

from __future__ import annotations

import base64
import json
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .config import get_settings

PURPOSE = b"herald senders credentials v1"


class SecretUnreadable(Exception):
    """A stored secret that this SECRET_KEY cannot open (the key changed, or the value is damaged)."""


@lru_cache(maxsize=4)
def _fernet(secret_key: str) -> Fernet:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=PURPOSE).derive(secret_key.encode())
    return Fernet(base64.urlsafe_b64encode(key))


def seal(value: dict) -> str:
    """A JSON object, encrypted: the text to store."""
    return _fernet(get_settings().secret_key).encrypt(json.dumps(value, sort_keys=True).encode()).decode()


def open_secret(token: str | None) -> dict:
    """What :func:`seal` stored ({} for nothing stored)."""
    if not token:
        return {}
    try:
        value = json.loads(_fernet(get_settings().secret_key).decrypt(token.encode()))
    except (InvalidToken, ValueError) as exc:
        raise SecretUnreadable(
            "the stored credentials cannot be read with this SECRET_KEY (was it changed?): enter them again"
        ) from exc
    if not isinstance(value, dict):
        raise SecretUnreadable("the stored credentials are damaged: enter them again")
    return value
