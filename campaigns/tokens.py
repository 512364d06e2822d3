"""Signed tokens: unsubscribe links (``/u/<token>``) and reply addresses (``reply+<token>@domain``).

Both are signed with ``SECRET_KEY`` (itsdangerous, HMAC-SHA256): not guessable, not expiring.
"""

from __future__ import annotations

from itsdangerous import BadSignature, Signer, URLSafeSerializer

from .config import get_settings


def _serializer(salt: str) -> URLSafeSerializer:
    return URLSafeSerializer(get_settings().secret_key, salt=salt)


def unsubscribe_token(workspace_id: int, email: str, message_key: str | None = None) -> str:
    return _serializer("herald.unsubscribe").dumps([workspace_id, email, message_key or ""])


def read_unsubscribe_token(token: str) -> tuple[int, str, str | None] | None:
    try:
        ws, email, key = _serializer("herald.unsubscribe").loads(token)
        return int(ws), str(email), (key or None)
    except (BadSignature, ValueError, TypeError):
        return None


def _reply_signer() -> Signer:
    # Local parts are matched case-insensitively by some servers: a lower-case hex key and a
    # base32-ish signature would survive that; itsdangerous' base64 signature may not, so the
    # comparison in read_reply_token is made on the exact token first, then case-folded.
    return Signer(get_settings().secret_key, salt="herald.reply", sep=".", digest_method=None)


def reply_address(message_key: str, domain: str) -> str:
    return f"reply+{_reply_signer().sign(message_key).decode()}@{domain}"


def read_reply_token(token: str) -> str | None:
    """The message key inside a reply token, or None when the signature does not hold."""
    try:
        return _reply_signer().unsign(token).decode()
    except BadSignature:
        return None
