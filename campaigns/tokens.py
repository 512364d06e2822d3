"""Signed tokens: unsubscribe links (``/u/<token>``) and reply addresses (``reply+<token>@domain``).

Both are signed with ``SECRET_KEY`` (HMAC-SHA256): not guessable, not expiring.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from functools import lru_cache

from itsdangerous import BadSignature, URLSafeSerializer
from itsdangerous.encoding import base64_encode

from .config import get_settings


def _serializer(salt: str) -> URLSafeSerializer:
    return _serializer_for(get_settings().secret_key, salt)


@lru_cache(maxsize=8)
def _serializer_for(secret: str, salt: str) -> URLSafeSerializer:
    return URLSafeSerializer(secret, salt=salt)


@lru_cache(maxsize=8)
def _unsubscribe_signer(secret: str):
    """itsdangerous' own signer for unsubscribe tokens and its derived key, computed once (its
    ``dumps`` derives the key and tries zlib on every call: ~38 us of a send's CPU)."""
    signer = _serializer_for(secret, "herald.unsubscribe").make_signer()
    return signer, signer.derive_key()


def unsubscribe_token(workspace_id: int, email: str, message_key: str | None = None) -> str:
    """The same token format as ``URLSafeSerializer.dumps`` (base64 of compact JSON, ``.``, the
    signature) and read by its ``loads``; the payload is never compressed (a link is at most a
    few characters longer than a compressed one would be)."""
    signer, key = _unsubscribe_signer(get_settings().secret_key)
    payload = base64_encode(json.dumps([workspace_id, email, message_key or ""], ensure_ascii=False,
                                       separators=(",", ":")).encode())
    return (payload + signer.sep + base64_encode(signer.algorithm.get_signature(key, payload))).decode()


def read_unsubscribe_token(token: str) -> tuple[int, str, str | None] | None:
    try:
        ws, email, key = _serializer("herald.unsubscribe").loads(token)
        return int(ws), str(email), (key or None)
    except (BadSignature, ValueError, TypeError):
        return None


def _reply_mac(message_key: str) -> str:
    secret = get_settings().secret_key.encode()
    return hmac.new(secret, b"herald.reply:" + message_key.encode(), hashlib.sha256).hexdigest()[:24]


def reply_address(message_key: str, domain: str) -> str:
    """``reply+<key>.<mac>@domain``: lower-case hex only, so a server that folds the case of
    local parts cannot break it."""
    return f"reply+{message_key}.{_reply_mac(message_key)}@{domain}"


def read_reply_token(token: str) -> str | None:
    """The message key inside a reply token, or None when the signature does not hold."""
    key, _, mac = (token or "").strip().lower().partition(".")
    if not key or not mac or not hmac.compare_digest(mac, _reply_mac(key)):
        return None
    return key
