"""Webhooks: SendGrid's Event Webhook and Inbound Parse (CSRF-exempt; authenticated by signature).

``POST /webhooks/sendgrid/events``: with ``SENDGRID_WEBHOOK_PUBLIC_KEY`` set, the ECDSA
signature over the timestamp header followed by the raw body bytes is checked first (a missing,
malformed or wrong one is a 403, never a 500), then the timestamp's freshness: one further than
``SENDGRID_WEBHOOK_MAX_AGE`` seconds from now is a 403 too (a stolen old batch cannot be
replayed with new events; 0 turns the check off); without the key, posts are accepted unsigned and a
warning is logged once per process (development only). A body that is not a JSON array is a
400. Items of the array that are not events are skipped (logged, counted in ``rejected`` and the
``events_rejected`` counter); the events are stored durably in the request (one bulk insert,
deduplicated) and the answer is 2xx; if they could not be stored the answer is 503, so SendGrid
retries. Effects are applied by a task (``tasks.events``).

``POST /webhooks/sendgrid/inbound/<secret>``: 404 unless ``INBOUND_PARSE_SECRET`` is set and
matches (constant-time); a reply is stored and applied inline (replies are rare), idempotent
under Inbound Parse's retries. Inbound Parse posts each field in the reply's own encoding and
names it in the ``charsets`` field (``{"text": "iso-8859-1", ...}``): multipart fields are read
as bytes and decoded with that charset (else the part's own, else UTF-8; a charset that is not
a text encoding, such as base64, is ignored; undecodable bytes are replaced, never a 500). A
field may be as large as the body limit (MAX_CONTENT_LENGTH): the raw MIME option posts whole
messages, attachments included.
"""

from __future__ import annotations

import base64
import codecs
import functools
import hmac
import json
import logging
import re
import threading
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Blueprint, abort, current_app, jsonify, request
from sendgrid.helpers.eventwebhook import EventWebhook
from werkzeug.exceptions import HTTPException
from werkzeug.formparser import MultiPartParser
from werkzeug.http import parse_options_header

from campaigns import events, replies
from campaigns.errors import BadRequest

from .db import get_db
from .errors import error_response

bp = Blueprint("webhooks", __name__, url_prefix="/webhooks")
log = logging.getLogger("herald.webhooks")

SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"

_warned = threading.Event()


def _settings():
    return current_app.config["HERALD_SETTINGS"]


@functools.lru_cache(maxsize=4)
def _verifier(public_key: str) -> EventWebhook:
    return EventWebhook(public_key)


def signature_ok(public_key: str, body: bytes, signature: str | None, timestamp: str | None) -> bool:
    """True when ``signature`` is SendGrid's over ``timestamp + body`` for ``public_key``.

    Verified over the raw bytes (SendGrid signs bytes): the library's ``verify_signature`` takes
    text, and decoding first would refuse a correctly signed body that is not UTF-8 (403 where the
    answer is 400, once parsing finds it unreadable).
    """
    if not signature or not timestamp:
        return False
    try:
        key = _verifier(public_key).public_key
        key.verify(base64.b64decode(signature), timestamp.encode("utf-8") + body, ec.ECDSA(hashes.SHA256()))
        return True
    except Exception:  # a wrong signature, malformed base64 or DER, a bad key: refused
        return False


def stale_reason(timestamp: str, max_age: int, now: float | None = None) -> str | None:
    """Why a signed ``timestamp`` (Unix seconds) is refused, or None when it is within ``max_age``
    seconds of ``now`` either way (clocks drift; 0 turns the check off)."""
    if not max_age:
        return None
    if not re.fullmatch(r"[0-9]{1,12}", timestamp):
        return "the Event Webhook timestamp is not a number of seconds"
    skew = int(timestamp) - (time.time() if now is None else now)
    if abs(skew) <= max_age:
        return None
    when = "old" if skew < 0 else "in the future"
    return (f"the Event Webhook timestamp is {abs(skew):.0f} seconds {when}, more than "
            f"SENDGRID_WEBHOOK_MAX_AGE ({max_age} seconds)")


def _warn_unsigned() -> None:
    if not _warned.is_set():
        _warned.set()
        log.warning("SENDGRID_WEBHOOK_PUBLIC_KEY is not set: Event Webhook posts are accepted unsigned "
                    "(development only; set the key in production)")


@bp.post("/sendgrid/events")
def sendgrid_events():
    body = request.get_data(cache=False)
    settings = _settings()
    key = settings.webhook_public_key
    if key:
        timestamp = request.headers.get(TIMESTAMP_HEADER)
        if not signature_ok(key, body, request.headers.get(SIGNATURE_HEADER), timestamp):
            return error_response(403, "forbidden", "missing or invalid Event Webhook signature")
        reason = stale_reason(timestamp, settings.webhook_max_age)
        if reason:
            return error_response(403, "stale_timestamp", reason, {"timestamp": timestamp[:20],
                                                                   "max_age": settings.webhook_max_age})
    else:
        _warn_unsigned()
    rejected: list[tuple[int, str]] = []
    rows = events.parse_batch(body, rejected=rejected)  # BadRequest (400) unless a JSON array
    session = get_db()
    try:
        # The body's elements line up with the rows only when none was skipped.
        stored = events.store_batch(session, rows, None if rejected else body)
        session.commit()
    except Exception:  # not stored: answer 5xx so SendGrid retries the batch
        session.rollback()
        log.exception("could not store %d events", len(rows))
        return error_response(503, "not_stored", "the events could not be stored; retry later")
    if stored:
        from tasks.events import events_stored

        events_stored()
    if rejected:
        _count_rejected(len(rejected))
    return jsonify({"received": len(rows) + len(rejected), "stored": stored, "rejected": len(rejected)})


def _count_rejected(n: int) -> None:
    """Add to the shared ``events_rejected`` counter (the limiter's store, as for rate-limit waits)."""
    from campaigns.ratelimit import get_limiter

    try:
        get_limiter().incr("events_rejected", n)
    except Exception:  # the events are stored; a counter must not turn that into an error
        log.exception("could not count %d rejected events", n)


def _form_fields() -> dict[str, str]:
    try:
        form = request.form
    except HTTPException:  # e.g. 413: werkzeug's answer stands
        raise
    except Exception:  # a broken multipart body is bad input, not a 500
        raise BadRequest("the body is not a readable form post") from None
    return {k: form.get(k) or "" for k in form}


class _BytesFieldParser(MultiPartParser):
    """Werkzeug's multipart parser, but every field comes out as Latin-1 (one character per
    byte, so nothing is lost); ``declared`` keeps the charset a part's own header named."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.declared: dict[str, str] = {}

    def get_part_charset(self, headers) -> str:
        name = parse_options_header(headers.get("content-disposition", ""))[1].get("name")
        charset = parse_options_header(headers.get("content-type", ""))[1].get("charset")
        if name and charset:
            self.declared.setdefault(name, charset)
        return "latin-1"


def _decode(data: bytes, charset: str | None) -> str:
    """``data`` in the sender-chosen ``charset``, else UTF-8; undecodable bytes are replaced."""
    try:
        info = codecs.lookup(charset or "utf-8")
        # Only text encodings: a sender may name base64, rot13 or zlib, which are not.
        if info._is_text_encoding:
            return data.decode(info.name, "replace")
    except (LookupError, ValueError):  # unknown; or a codec without "replace" (idna, punycode, undefined)
        pass
    return data.decode("utf-8", "replace")


def _inbound_fields() -> dict[str, str]:
    """The Inbound Parse fields, each decoded with the charset the post names for it."""
    if request.mimetype != "multipart/form-data":
        return _form_fields()
    boundary = request.mimetype_params.get("boundary")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary")
    parser = _BytesFieldParser(max_form_memory_size=request.max_form_memory_size,
                               max_form_parts=request.max_form_parts)
    try:
        form, _files = parser.parse(request.stream, boundary.encode("latin-1"), request.content_length)
    except HTTPException:  # e.g. 413: werkzeug's answer stands
        raise
    except Exception:  # a broken multipart body is bad input, not a 500
        raise BadRequest("the body is not a readable form post") from None
    try:
        charsets = json.loads(form.get("charsets") or "{}")
    except (ValueError, RecursionError):  # deeply nested JSON is as unreadable as broken JSON
        charsets = {}
    if not isinstance(charsets, dict):
        charsets = {}
    out = {}
    for name in form:
        charset = charsets.get(name)
        charset = charset if isinstance(charset, str) else parser.declared.get(name)
        out[name] = _decode((form.get(name) or "").encode("latin-1"), charset)
    return out


@bp.post("/sendgrid/inbound/<secret>")
def sendgrid_inbound(secret: str):
    expected = _settings().inbound_parse_secret
    if not expected or not hmac.compare_digest(secret.encode("utf-8"), expected.encode("utf-8")):
        abort(404)
    if request.mimetype not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise BadRequest("Inbound Parse posts multipart/form-data")
    # A field may be the whole raw MIME message, attachments included, or a large html part:
    # Flask's per-field default (MAX_FORM_MEMORY_SIZE, 500 kB) would refuse it with a 413 and
    # Inbound Parse would drop the reply. The body as a whole stays under MAX_CONTENT_LENGTH.
    request.max_form_memory_size = request.max_content_length
    fields = _inbound_fields()
    session = get_db()
    try:
        result = replies.ingest(session, fields)
        session.commit()
    except BadRequest:
        session.rollback()
        raise
    except Exception:  # not stored: 5xx, Inbound Parse retries for up to 72 hours
        session.rollback()
        log.exception("could not store an inbound reply")
        return error_response(503, "not_stored", "the reply could not be stored; retry later")
    reply = result.reply
    return jsonify({
        "id": reply.id if reply else None,
        "duplicate": result.duplicate,
        "matched": reply.message_id is not None if reply else False,
        "auto": bool(reply.is_auto) if reply else False,
    })
