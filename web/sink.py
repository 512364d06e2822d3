"""Local SendGrid sink: a test double that speaks SendGrid's real v3 wire format.

``POST /v3/mail/send`` is checked the way SendGrid checks it (Bearer auth, the body's
required fields, the 1,000-personalization and 20 MB limits, string-only ``custom_args``)
and answered with SendGrid's status codes, error shape and ``X-Message-Id`` header. Every
call is recorded in memory, accepted or not, repeats included, so tests and benchmarks
can count what Herald really sent. Control endpoints under ``/_sink/`` inject failures
(429 with rate-limit headers, 5xx, slow answers, hung connections, refused addresses)
and post SendGrid-style signed Event Webhook batches back to Herald.

Standalone on purpose: it imports nothing from ``campaigns``, ``tasks`` or other ``web``
modules, and nothing connects or starts at import time (the event thread starts with
the first event to post).

Public API::

    create_sink_app(config=None) -> Flask      # app.extensions["sendgrid_sink"] is the SinkState
    run_sink(host="127.0.0.1", port=3030)      # blocking; prints one line with the URL
    make_sink_server(host, port=0, config=None) -> SinkServer   # .start() in a thread, .url, .shutdown()
    generate_key_pair() -> (private_key, public_key_b64)
    sign_events(private_key, body_bytes, timestamp) -> signature_b64
    public_key_b64(private_key) -> str

Endpoints (JSON unless noted)::

    POST   /v3/mail/send                 202 + X-Message-Id | 400/401/413/415 {"errors": [{message, field, help}]}
    GET    /_sink/messages               {"count", "messages"}; ?since=<seq> ?key=<message or idempotency key>
                                         ?status=202|dropped ?limit=N ?fields=summary (seq, time, key, to,
                                         subject, status, message_id, idempotency_key)
    GET    /_sink/messages/<seq>         one recorded call;  GET /_sink/messages/<seq>/html  an HTML view
    GET    /_sink/stats                  {"calls", "accepted", "by_status", "keys": {"distinct", "repeated",
                                         "max_repeats", "max_calls"}, "accepted_keys", "idempotency_keys",
                                         "behaviours", "fail_addresses", "events"}
    GET    /_sink/keys                   {message_key: calls}; ?accepted=1 (202 only), ?by=idempotency
    POST   /_sink/reset                  clears records, counters, behaviours, refused addresses, queued events
    GET|POST /_sink/behaviour            {"mode": "429"|"5xx"|"<status>"|"slow"|"hang"|"ok", "status"?, "count"?,
                                         "seconds"?, "delay"?, "reset_in"?, "limit"?} or a list (a queue);
                                         ?append=1 adds to the queue
    GET|POST|DELETE /_sink/fail-addresses  {"emails": [...], "status"?: 400}
    GET    /_sink/event-public-key       base64 DER (text/plain; ?format=json for {"public_key"})
    GET|POST /_sink/events-url           {"url": ...}: where events go (null: nowhere)
    POST   /_sink/events                 {"seq" | "key", "event", "email"?, "reason"?, "url"?, "timestamp"?,
                                         "extra"?, "signed"?, "bad_signature"?, "webhook_url"?} or
                                         {"events": [...]}: posts now, answers {"status", "events", "response"}
    GET    /  and  /_sink/outbox         HTML outbox, newest first (?limit=200 ?before=<seq>)

Configuration (``config`` dict keys; each falls back to the environment variable
``HERALD_<KEY>``, e.g. ``HERALD_SINK_EVENTS_URL``):

    SINK_EVENTS_URL               where to post signed events (unset: no automatic events)
    SINK_EVENT_PRIVATE_KEY_PEM    ECDSA P-256 private key (PEM); generated at start when unset
    SINK_EVENT_INTERVAL           seconds between background batches (0.5)
    SINK_EVENT_BATCH_SIZE         events per batch, at most (1000)
    SINK_EVENT_TIMEOUT            seconds to wait for the webhook (10)
    SINK_AUTO_EVENTS              events posted for each accepted message ("processed,delivered")
    SINK_API_KEY                  when set, only this Bearer key is accepted (else any non-empty one)
    SINK_MAX_STORED_BODIES        how many most recent calls keep every detail (10000); older
                                  ones keep only seq, time, status, message_id, idempotency_key,
                                  key(s), to, from, subject, custom_args (and "truncated": true)
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import os
import queue
import re
import secrets
import socket
import sys
import threading
import time
import traceback
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote_to_bytes

import urllib3
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask, Response, jsonify, request
from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

__all__ = [
    "MAX_BODY_BYTES",
    "SinkServer",
    "SinkState",
    "create_sink_app",
    "generate_key_pair",
    "make_sink_server",
    "public_key_b64",
    "run_sink",
    "sign_events",
]

MAX_BODY_BYTES = 20 * 1024 * 1024  # 20,971,520: SendGrid's limit for the whole request
MAX_PERSONALIZATIONS = 1000
MAX_RECIPIENTS = 1000
MAX_CUSTOM_ARGS_BYTES = 10_000
MAX_CATEGORIES = 10
SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
EXTENSION_KEY = "sendgrid_sink"

_HELP = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html"
_EMAIL_RE = re.compile(r"^[^\s@<>,;\"]+@[^\s@<>,;\".]+(?:\.[^\s@<>,;\".]+)+$")
_RESERVED_HEADERS = frozenset(
    h.lower()
    for h in (
        "x-sg-id", "x-sg-eid", "received", "dkim-signature", "Content-Type",
        "Content-Transfer-Encoding", "To", "From", "Subject", "Reply-To", "CC", "BCC",
    )
)
_JSON_HEADERS = [("Content-Type", "application/json")]
_ERR_AUTH_MISSING = "authorization required"
_ERR_AUTH_BAD = "The provided authorization grant is invalid, expired, or revoked"
_MSG_FROM = (
    "The from object must be provided for every email send. It is an object that requires "
    'the email parameter, but may also contain a name parameter.  e.g. {"email" : '
    '"example@example.com"}  or {"email" : "example@example.com", "name" : '
    '"Example Recipient"}.'
)
_MSG_SUBJECT = (
    "The subject is required. You can get around this requirement if you use a template "
    "with a subject defined or if every personalization has a subject defined."
)
_MSG_CONTENT = (
    "Unless a valid template_id is provided, the content parameter is required. There must "
    "be at least one defined content block. We typically suggest both text/plain and "
    "text/html blocks are included, but only one block is required."
)
_MSG_CONTENT_ORDER = (
    "Following RFC 1341, section 7.2, if either text/html or text/plain are to be sent in "
    "your email: text/plain needs to be first, followed by text/html, followed by any "
    "other content."
)
_MSG_TO = (
    "The to array is required for all personalization objects, and must have at least one "
    "email object with a valid email address."
)
_MSG_INVALID_ADDRESS = "Does not contain a valid address."


# --------------------------------------------------------------------------- signing


def generate_key_pair() -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A fresh ECDSA P-256 key pair: (private key, public key as base64 DER).

    The public key string is what SendGrid shows as the Signed Event Webhook
    verification key, and what ``EventWebhook.convert_public_key_to_ecdsa`` accepts.
    """
    private_key = ec.generate_private_key(ec.SECP256R1())
    return private_key, public_key_b64(private_key)


def public_key_b64(private_key: ec.EllipticCurvePrivateKey) -> str:
    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode("ascii")


def _load_private_key(key: Any) -> ec.EllipticCurvePrivateKey:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key
    if isinstance(key, str):
        key = key.encode("utf-8")
    if isinstance(key, (bytes, bytearray)):
        loaded = serialization.load_pem_private_key(bytes(key), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError("the sink's event key must be an ECDSA (P-256) private key")
        return loaded
    raise TypeError("private_key must be an EllipticCurvePrivateKey or a PEM string")


def sign_events(private_key: Any, body_bytes: bytes | str, timestamp: int | str) -> str:
    """Sign an Event Webhook body exactly as SendGrid does.

    Returns the base64 DER ECDSA signature over SHA-256 of ``timestamp + raw body``,
    the value of the ``X-Twilio-Email-Event-Webhook-Signature`` header.
    ``private_key`` may be a key object or a PEM string/bytes.
    """
    key = _load_private_key(private_key)
    if isinstance(body_bytes, str):
        body_bytes = body_bytes.encode("utf-8")
    signature = key.sign(str(timestamp).encode("utf-8") + bytes(body_bytes), ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(signature).decode("ascii")


def _encode_events(events: list[dict]) -> bytes:
    # SendGrid posts compact JSON followed by CRLF, and signs those exact bytes.
    return json.dumps(events, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\r\n"


# --------------------------------------------------------------------------- validation


def _err(message: str, field: str | None = None, help_anchor: str | None = None) -> dict:
    return {"message": message, "field": field, "help": f"{_HELP}#{help_anchor}" if help_anchor else None}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _valid_email(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 320 and _EMAIL_RE.match(value) is not None


def _check_custom_args(value: Any, field: str, anchor: str, errors: list) -> bool:
    if not isinstance(value, dict):
        errors.append(_err(f"Invalid type. Expected: object, given: {_type_name(value)}.", field, anchor))
        return False
    if not value:
        errors.append(_err("custom_args cannot be empty.", field, anchor))
        return False
    for name, arg in value.items():
        if not isinstance(arg, str):
            errors.append(_err("All values of custom arguments object must be strings", f"{field}.{name}", anchor))
            return False
    return True


def _check_headers(value: Any, field: str, anchor: str, errors: list) -> None:
    if not isinstance(value, dict):
        errors.append(_err(f"Invalid type. Expected: object, given: {_type_name(value)}.", field, anchor))
        return
    for name, header in value.items():
        if not isinstance(header, str):
            errors.append(_err("The header values must be strings.", f"{field}.{name}", anchor))
            return
        if name.lower() in _RESERVED_HEADERS:
            errors.append(_err("Header can not be one of the reserved keys.", f"{field}.{name}", anchor))
            return
        if not name or not name.isascii() or " " in name:
            errors.append(_err("Header keys cannot contain non-ASCII characters and empty spaces.", field, anchor))
            return


def validate_mail_send(body: Any) -> list[dict]:
    """SendGrid's checks of a v3 mail-send body; [] when it would be accepted."""
    errors: list[dict] = []
    if not isinstance(body, dict):
        return [_err(f"Invalid type. Expected: object, given: {_type_name(body)}.")]

    template_id = body.get("template_id")
    has_template = isinstance(template_id, str) and template_id != ""

    # personalizations
    pers = body.get("personalizations")
    all_subjects = True
    merged_args_top = body.get("custom_args") if isinstance(body.get("custom_args"), dict) else {}
    if not isinstance(pers, list) or not pers:
        errors.append(_err(
            "The personalizations field is required and must have at least one personalization.",
            "personalizations", "-Personalizations-Errors",
        ))
        all_subjects = False
    elif len(pers) > MAX_PERSONALIZATIONS:
        errors.append(_err(
            f"The personalization block is limited to {MAX_PERSONALIZATIONS} personalizations per "
            f"API request. You have provided {len(pers)} personalizations. Please consider "
            "splitting this into multiple requests and resending your request.",
            "personalizations", "message.personalizations",
        ))
        all_subjects = False
    else:
        total = 0
        for i, p in enumerate(pers):
            pfield = f"personalizations.{i}"
            if not isinstance(p, dict):
                errors.append(_err(f"Invalid type. Expected: object, given: {_type_name(p)}.", pfield))
                all_subjects = False
                continue
            seen: set[str] = set()
            for kind in ("to", "cc", "bcc"):
                lst = p.get(kind)
                anchor = f"message.personalizations.{kind}"
                if kind == "to" and (not isinstance(lst, list) or not lst):
                    errors.append(_err(_MSG_TO, f"{pfield}.to", anchor))
                    continue
                if lst is None:
                    continue
                if not isinstance(lst, list):
                    errors.append(_err(f"Invalid type. Expected: array, given: {_type_name(lst)}.",
                                       f"{pfield}.{kind}", anchor))
                    continue
                for j, rcpt in enumerate(lst):
                    rfield = f"{pfield}.{kind}.{j}"
                    if not isinstance(rcpt, dict):
                        errors.append(_err(f"Invalid type. Expected: object, given: {_type_name(rcpt)}.",
                                           rfield, anchor))
                        continue
                    email = rcpt.get("email")
                    if email is None or email == "":
                        errors.append(_err(f"The {kind} email parameter is required.", f"{rfield}.email", anchor))
                    elif not _valid_email(email):
                        errors.append(_err(_MSG_INVALID_ADDRESS, f"{rfield}.email", anchor))
                    else:
                        low = email.lower()
                        if low in seen:
                            errors.append(_err(
                                "Each email address in the personalization block should be unique between "
                                f"to, cc, and bcc. We found the first duplicate instance of [{email}] in the "
                                f"{pfield}.{kind} field.",
                                pfield, "message.personalizations",
                            ))
                        seen.add(low)
                    total += 1
            subject = p.get("subject")
            if subject is not None and (not isinstance(subject, str) or subject == ""):
                errors.append(_err(
                    "The subject of your email must be a string at least one character in length.",
                    f"{pfield}.subject", "message.personalizations.subject",
                ))
            if not (isinstance(subject, str) and subject):
                all_subjects = False
            if "custom_args" in p:
                if _check_custom_args(p["custom_args"], f"{pfield}.custom_args",
                                      "message.personalizations.custom_args", errors):
                    merged = {**merged_args_top, **p["custom_args"]}
                    size = len(json.dumps(merged, separators=(",", ":")).encode("utf-8"))
                    if size > MAX_CUSTOM_ARGS_BYTES:
                        errors.append(_err(
                            "The combined size of both global and personalization custom arguments may "
                            "not exceed 10,000 bytes per personalization.",
                            f"{pfield}.custom_args", "message.personalizations.custom_args",
                        ))
            if "headers" in p:
                _check_headers(p["headers"], f"{pfield}.headers", "message.personalizations.headers", errors)
            send_at = p.get("send_at")
            if send_at is not None and (not isinstance(send_at, int) or isinstance(send_at, bool)):
                errors.append(_err(
                    "The send_at parameter is expecting a Unix timestamp as an integer. We will send "
                    "immediately if you include a send_at timestamp that is in the past.",
                    f"{pfield}.send_at", "message.personalizations.send_at",
                ))
        if total > MAX_RECIPIENTS:
            errors.append(_err(
                "There is a limit of 1000 total recipients (to + cc + bcc) per request.",
                "personalizations", "message.personalizations",
            ))

    # from
    sender = body.get("from")
    if not isinstance(sender, dict) or sender.get("email") in (None, ""):
        errors.append(_err(_MSG_FROM, "from.email", "message.from"))
    elif not _valid_email(sender.get("email")):
        errors.append(_err("The from email does not contain a valid address.", "from.email", "message.from"))

    # reply_to / reply_to_list
    reply_to = body.get("reply_to")
    if reply_to is not None and (not isinstance(reply_to, dict) or not _valid_email(reply_to.get("email"))):
        errors.append(_err("The reply_to email does not contain a valid address.", "reply_to.email",
                           "message.reply_to"))
    reply_list = body.get("reply_to_list")
    if reply_list is not None:
        if not isinstance(reply_list, list):
            errors.append(_err(f"Invalid type. Expected: array, given: {_type_name(reply_list)}.", "reply_to_list"))
        else:
            for j, item in enumerate(reply_list):
                if not isinstance(item, dict) or not _valid_email(item.get("email")):
                    errors.append(_err(_MSG_INVALID_ADDRESS, f"reply_to_list.{j}.email", "message.reply_to"))

    # subject
    subject = body.get("subject")
    if subject is not None and not isinstance(subject, str):
        errors.append(_err(
            "The subject of your email must be a string at least one character in length.",
            "subject", "message.subject",
        ))
    elif not has_template and not subject and not all_subjects and isinstance(pers, list) and pers:
        errors.append(_err(_MSG_SUBJECT, "subject", "message.subject"))

    # content
    content = body.get("content")
    if content is None or content == []:
        if not has_template:
            errors.append(_err(_MSG_CONTENT, "content", "message.content"))
    elif not isinstance(content, list):
        errors.append(_err(f"Invalid type. Expected: array, given: {_type_name(content)}.", "content",
                           "message.content"))
    else:
        types: list[str] = []
        for k, part in enumerate(content):
            if not isinstance(part, dict):
                errors.append(_err(f"Invalid type. Expected: object, given: {_type_name(part)}.", f"content.{k}"))
                continue
            ctype = part.get("type")
            if not isinstance(ctype, str) or not ctype:
                errors.append(_err(
                    "Your content type must be a string with length of at least one character.",
                    f"content.{k}.type", "message.content.type",
                ))
            else:
                types.append(ctype.lower())
            value = part.get("value")
            if not isinstance(value, str) or value == "":
                errors.append(_err(
                    "The content value must be a string at least one character in length.",
                    f"content.{k}.value", "message.content.value",
                ))
        expected_first = [t for t in ("text/plain", "text/html") if t in types]
        if types[: len(expected_first)] != expected_first:
            errors.append(_err(_MSG_CONTENT_ORDER, "content", "message.content.value"))

    # message-level custom_args, headers, categories, send_at
    if "custom_args" in body:
        _check_custom_args(body["custom_args"], "custom_args", "message.custom_args", errors)
    if "headers" in body:
        _check_headers(body["headers"], "headers", "message.headers", errors)
    categories = body.get("categories")
    if categories is not None:
        if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
            errors.append(_err("Categories must be an array of strings.", "categories", "message.categories"))
        elif len(categories) > MAX_CATEGORIES:
            errors.append(_err(
                f"There is a limit of 10 categories for each email that is sent. You provided "
                f"{len(categories)} categories.", "categories", "message.categories",
            ))
    send_at = body.get("send_at")
    if send_at is not None and (not isinstance(send_at, int) or isinstance(send_at, bool)):
        errors.append(_err(
            "The send_at parameter is expecting a Unix timestamp as an integer. We will send "
            "immediately if you include a send_at timestamp that is in the past.",
            "send_at", "message.send_at",
        ))
    return errors


# --------------------------------------------------------------------------- recording


def _emails(value: Any) -> list[str]:
    if not isinstance(value, list):
        return []
    return [r["email"] for r in value if isinstance(r, dict) and isinstance(r.get("email"), str)]


def _as_dict(value: Any) -> dict | None:
    return value if isinstance(value, dict) else None


def _extract(body: Any) -> dict:
    """The recorded view of a mail-send body; tolerant of any shape (invalid bodies too)."""
    if not isinstance(body, dict):
        body = {}
    top_args = body.get("custom_args") if isinstance(body.get("custom_args"), dict) else {}
    top_subject = body.get("subject") if isinstance(body.get("subject"), str) else None
    personalizations = []
    raw_pers = body.get("personalizations")
    for p in raw_pers if isinstance(raw_pers, list) else []:
        if not isinstance(p, dict):
            continue
        p_args = p.get("custom_args") if isinstance(p.get("custom_args"), dict) else {}
        entry = {
            "to": _emails(p.get("to")),
            "cc": _emails(p.get("cc")),
            "bcc": _emails(p.get("bcc")),
            "subject": p["subject"] if isinstance(p.get("subject"), str) and p["subject"] else top_subject,
            "custom_args": {**top_args, **p_args},
            "headers": _as_dict(p.get("headers")),
        }
        for optional in ("send_at", "substitutions", "dynamic_template_data"):
            if optional in p:
                entry[optional] = p[optional]
        personalizations.append(entry)
    html_part = text_part = None
    content_types = []
    content = body.get("content")
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            ctype = part.get("type")
            content_types.append(ctype)
            if ctype == "text/html" and html_part is None:
                html_part = part.get("value")
            elif ctype == "text/plain" and text_part is None:
                text_part = part.get("value")
    attachments = []
    if isinstance(body.get("attachments"), list):
        for a in body["attachments"]:
            if isinstance(a, dict):
                attachments.append({
                    "filename": a.get("filename"), "type": a.get("type"),
                    "disposition": a.get("disposition"), "content_id": a.get("content_id"),
                    "size": len(a["content"]) if isinstance(a.get("content"), str) else None,
                })
    first = personalizations[0] if personalizations else None
    keys = []
    for entry in personalizations:
        k = entry["custom_args"].get("message_key")
        if isinstance(k, str) and k not in keys:
            keys.append(k)
    if not personalizations and isinstance(top_args.get("message_key"), str):
        keys.append(top_args["message_key"])
    return {
        "key": keys[0] if keys else None,
        "keys": keys,
        "custom_args": first["custom_args"] if first else dict(top_args),
        "to": [e for entry in personalizations for e in entry["to"]],
        "cc": [e for entry in personalizations for e in entry["cc"]],
        "bcc": [e for entry in personalizations for e in entry["bcc"]],
        "from": _as_dict(body.get("from")),
        "reply_to": _as_dict(body.get("reply_to")),
        "reply_to_list": body.get("reply_to_list") if isinstance(body.get("reply_to_list"), list) else None,
        "subject": first["subject"] if first else top_subject,
        "html": html_part,
        "text": text_part,
        "content_types": content_types,
        "headers": _as_dict(body.get("headers")),
        "tracking_settings": _as_dict(body.get("tracking_settings")),
        "mail_settings": _as_dict(body.get("mail_settings")),
        "categories": body.get("categories") if isinstance(body.get("categories"), list) else None,
        "template_id": body.get("template_id"),
        "asm": _as_dict(body.get("asm")),
        "send_at": body.get("send_at"),
        "batch_id": body.get("batch_id"),
        "attachments": attachments,
        "personalizations": personalizations,
    }


# All that calls older than SINK_MAX_STORED_BODIES keep, to bound memory in long benchmarks.
_SLIM_FIELDS = (
    "seq", "time", "status", "message_id", "idempotency_key", "key", "keys", "to", "from",
    "subject", "custom_args", "behaviour", "size", "truncated",
)


class _KeyCounter:
    """Calls per key, with the repeat figures kept up to date in O(1)."""

    __slots__ = ("counts", "repeated", "max")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.repeated = 0
        self.max = 0

    def add(self, key: str) -> None:
        n = self.counts.get(key, 0) + 1
        self.counts[key] = n
        if n == 2:
            self.repeated += 1
        if n > self.max:
            self.max = n

    def summary(self) -> dict:
        return {
            "distinct": len(self.counts),
            "repeated": self.repeated,
            "max_repeats": max(0, self.max - 1),
            "max_calls": self.max,
        }


class _Behaviour:
    __slots__ = ("mode", "status", "count", "until", "delay", "reset_in", "limit", "seconds")

    def __init__(self, spec: dict, now: float) -> None:
        mode = str(spec.get("mode", "ok")).lower()
        status = spec.get("status")
        if mode.isdigit():
            status = int(mode)
            mode = "429" if status == 429 else "error"
        elif mode in ("5xx", "error"):
            mode = "error"
            status = int(status) if status is not None else 500
        elif mode in ("429", "rate_limit", "ratelimit"):
            mode, status = "429", 429
        elif mode not in ("ok", "slow", "hang"):
            raise ValueError(f"unknown mode {mode!r}: use 429, 5xx, slow, hang or ok")
        if mode == "error" and not 400 <= int(status) <= 599:
            raise ValueError("status must be a 4xx or 5xx code")
        self.mode = mode
        self.status = int(status) if status is not None else None
        count = spec.get("count")
        self.count = int(count) if count is not None else None
        seconds = spec.get("seconds")
        self.seconds = float(seconds) if seconds is not None else None
        self.until: float | None = None  # set when this behaviour becomes the current one
        default_delay = 60.0 if mode == "hang" else 1.0
        self.delay = float(spec["delay"]) if spec.get("delay") is not None else default_delay
        self.reset_in = float(spec["reset_in"]) if spec.get("reset_in") is not None else 1.0
        self.limit = int(spec["limit"]) if spec.get("limit") is not None else 600
        if self.count is not None and self.count < 0:
            raise ValueError("count must be >= 0")

    def expired(self, now: float) -> bool:
        return (self.count is not None and self.count <= 0) or (self.until is not None and now >= self.until)

    def describe(self, now: float) -> dict:
        return {
            "mode": self.mode if self.mode != "error" else "5xx" if self.status >= 500 else "error",
            "status": self.status,
            "remaining_count": self.count,
            "remaining_seconds": (self.seconds if self.until is None
                                  else max(0.0, round(self.until - now, 3))),
            "delay": self.delay,
            "reset_in": self.reset_in,
        }


class SinkConfigError(ValueError):
    """A sink setting is malformed; the message is one line naming the variable."""


class SinkState:
    """Everything the sink remembers; shared by all request threads."""

    def __init__(self, config: dict | None = None) -> None:
        config = dict(config or {})

        def setting(name: str, default: Any = None) -> Any:
            if config.get(name) not in (None, ""):
                return config[name]
            env = os.environ.get(f"HERALD_{name}")
            return env if env not in (None, "") else default

        def number(name: str, default: Any, kind: type, low: float) -> Any:
            value = setting(name, default)
            try:
                number = kind(value)
            except (TypeError, ValueError):
                number = None
            if number is None or number != number or number < low or number > 1e9:
                raise SinkConfigError(f"HERALD_{name}: must be a {'whole ' if kind is int else ''}number of at least "
                                      f"{low:g}, got {value!r}")
            return number

        self.api_key: str | None = setting("SINK_API_KEY")
        self.max_stored_bodies = number("SINK_MAX_STORED_BODIES", 10_000, int, 0)
        pem = setting("SINK_EVENT_PRIVATE_KEY_PEM")
        if pem:
            try:
                self.private_key = _load_private_key(pem)
            except (TypeError, ValueError) as exc:
                raise SinkConfigError(f"HERALD_SINK_EVENT_PRIVATE_KEY_PEM: not a usable key ({exc})") from None
            self.public_key = public_key_b64(self.private_key)
        else:
            self.private_key, self.public_key = generate_key_pair()
        self.events_url: str | None = setting("SINK_EVENTS_URL")
        if self.events_url is not None and not re.match(r"https?://[^/\s]+", str(self.events_url)):
            raise SinkConfigError(f"HERALD_SINK_EVENTS_URL: {self.events_url!r} is not an http(s) URL")
        self.event_interval = number("SINK_EVENT_INTERVAL", 0.5, float, 0.01)
        self.event_batch_size = number("SINK_EVENT_BATCH_SIZE", 1000, int, 1)
        self.event_timeout = number("SINK_EVENT_TIMEOUT", 10.0, float, 0.01)
        auto = setting("SINK_AUTO_EVENTS", "processed,delivered")
        if isinstance(auto, str):
            auto = [a.strip() for a in auto.split(",") if a.strip()]
        self.auto_events: list[str] = list(auto)

        self.lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._event_lock = threading.Lock()
        self._event_thread: threading.Thread | None = None
        self._event_ids = itertools.count(1)
        self._http: urllib3.PoolManager | None = None
        self.generation = 0
        self._clear()

    # ----- state

    def _clear(self) -> None:
        self.records: list[dict] = []
        self.calls = 0
        self.accepted = 0
        self.by_status: dict[str, int] = {}
        self.key_calls = _KeyCounter()
        self.key_accepted = _KeyCounter()
        self.idem_calls = _KeyCounter()
        self.key_index: dict[str, list[int]] = {}
        self.idem_index: dict[str, list[int]] = {}
        self.behaviours: deque[_Behaviour] = deque()
        self.fail_addresses: dict[str, int] = {}
        self.event_queue: deque[dict] = deque()
        self.event_stats = {"queued": 0, "posted": 0, "posts": 0, "failed_posts": 0,
                            "last_status": None, "last_error": None}

    def reset(self) -> None:
        with self.lock:
            self.generation += 1
            self._clear()
            old, self._wake = self._wake, threading.Event()
        old.set()  # wake held (hang/slow) requests so they finish now

    def close(self) -> None:
        """Stop the event thread and release held requests (used when a server stops)."""
        self._stop.set()
        self._wake.set()
        thread = self._event_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        if self._http is not None:
            self._http.clear()

    def set_behaviours(self, specs: list[dict], append: bool = False) -> list[dict]:
        """Replace (or extend) the queue of behaviours; each applies until its count or
        seconds run out (seconds counted from when it becomes the current one), then the
        next one applies, then normal answers. A bare {"mode": "ok"} means normal."""
        now = time.time()
        parsed = [_Behaviour(s, now) for s in specs]
        with self.lock:
            if not append:
                self.behaviours.clear()
            for b in parsed:
                if b.mode != "ok" or b.count is not None or b.seconds is not None:
                    self.behaviours.append(b)
            return self._describe_behaviours(now)

    def _current(self, now: float) -> _Behaviour | None:
        q = self.behaviours
        while q:
            b = q[0]
            if b.until is None and b.seconds is not None:
                b.until = now + b.seconds
            if not b.expired(now):
                return b
            q.popleft()
        return None

    def _describe_behaviours(self, now: float) -> list[dict]:
        self._current(now)
        return [b.describe(now) for b in self.behaviours]

    def describe_behaviours(self) -> list[dict]:
        with self.lock:
            return self._describe_behaviours(time.time())

    def _take_behaviour(self, now: float) -> _Behaviour | None:
        b = self._current(now)
        if b is not None and b.count is not None:
            b.count -= 1
        return b

    def wait(self, seconds: float) -> None:
        """Sleep, but wake early on reset or shutdown."""
        if seconds > 0:
            self._wake.wait(seconds)

    # ----- mail send

    def record_call(self, rec: dict, authed: bool) -> tuple[dict, _Behaviour | None]:
        """Decide the final answer (behaviours, refused addresses), number and store the call.

        ``rec["status"]`` holds the validation verdict on entry; it is final on return.
        """
        now = rec["time"]
        with self.lock:
            behaviour = self._take_behaviour(now) if authed else None
            if behaviour is not None and behaviour.mode == "ok":
                behaviour = None
            if behaviour is not None:
                rec["behaviour"] = behaviour.mode
                if behaviour.mode == "429":
                    rec["status"] = 429
                    rec["errors"] = [_err("too many requests")]
                elif behaviour.mode == "error":
                    rec["status"] = behaviour.status
                    rec["errors"] = [_err(_status_message(behaviour.status))]
                elif behaviour.mode == "hang":
                    rec["status"] = None
                    rec["errors"] = None
            if rec["status"] == 202 and self.fail_addresses:
                bad = self._refused(rec)
                if bad:
                    rec["status"], rec["errors"] = bad
            self.calls += 1
            seq = self.calls
            rec["seq"] = seq
            if rec["status"] == 202:
                rec["message_id"] = secrets.token_urlsafe(16)
                self.accepted += 1
            status_key = "dropped" if rec["status"] is None else str(rec["status"])
            self.by_status[status_key] = self.by_status.get(status_key, 0) + 1
            self.records.append(rec)
            for k in rec["keys"]:
                self.key_calls.add(k)
                if rec["status"] == 202:
                    self.key_accepted.add(k)
                self.key_index.setdefault(k, []).append(seq)
            idem = rec["idempotency_key"]
            if idem:
                self.idem_calls.add(idem)
                self.idem_index.setdefault(idem, []).append(seq)
            old = seq - self.max_stored_bodies
            if old >= 1:
                stale = self.records[old - 1]
                if not stale["truncated"]:  # swap in a slim copy; readers of the old dict are unaffected
                    slim = {name: stale[name] for name in _SLIM_FIELDS}
                    slim["truncated"] = True
                    self.records[old - 1] = slim
            queue_events = rec["status"] == 202 and bool(self.events_url) and bool(self.auto_events)
            generation = self.generation
        if queue_events:
            events = self.build_events(rec, self.auto_events)
            self.enqueue_events(events, generation)
        return rec, behaviour

    def _refused(self, rec: dict) -> tuple[int, list[dict]] | None:
        for i, p in enumerate(rec["personalizations"]):
            for kind in ("to", "cc", "bcc"):
                for j, email in enumerate(p[kind]):
                    status = self.fail_addresses.get(email.lower())
                    if status is not None:
                        field = f"personalizations.{i}.{kind}.{j}.email"
                        if status == 400:
                            return 400, [_err(_MSG_INVALID_ADDRESS, field, f"message.personalizations.{kind}")]
                        return status, [_err(_status_message(status), field)]
        return None

    # ----- queries

    def get(self, seq: int) -> dict | None:
        with self.lock:
            if 1 <= seq <= len(self.records):
                return self.records[seq - 1]
        return None

    def select(self, since: int = 0, key: str | None = None, status: str | None = None,
               limit: int | None = None) -> list[dict]:
        with self.lock:
            if key is not None:
                seqs = sorted(set(self.key_index.get(key, ())) | set(self.idem_index.get(key, ())))
                recs = [self.records[s - 1] for s in seqs if s > since]
            else:
                recs = self.records[max(0, since):]
        if status is not None:
            recs = [r for r in recs if ("dropped" if r["status"] is None else str(r["status"])) == status]
        if limit is not None:
            recs = recs[:limit]
        return recs

    def latest(self, limit: int, before: int | None = None) -> list[dict]:
        with self.lock:
            end = len(self.records) if before is None else max(0, min(len(self.records), before - 1))
            return self.records[max(0, end - limit):end][::-1]

    def find_for_key(self, key: str) -> dict | None:
        with self.lock:
            seqs = self.key_index.get(key) or self.idem_index.get(key) or []
            recs = [self.records[s - 1] for s in seqs]
        for rec in reversed(recs):
            if rec["status"] == 202:
                return rec
        return recs[-1] if recs else None

    def stats(self) -> dict:
        with self.lock:
            out = {
                "calls": self.calls,
                "accepted": self.accepted,
                "by_status": dict(self.by_status),
                "keys": self.key_calls.summary(),
                "accepted_keys": self.key_accepted.summary(),
                "idempotency_keys": self.idem_calls.summary(),
                "behaviours": self._describe_behaviours(time.time()),
                "fail_addresses": sorted(self.fail_addresses),
                "events": {"url": self.events_url, "pending": len(self.event_queue), **self.event_stats},
            }
        return out

    def key_counts(self, accepted: bool = False, idempotency: bool = False) -> dict[str, int]:
        with self.lock:
            counter = self.idem_calls if idempotency else self.key_accepted if accepted else self.key_calls
            return dict(counter.counts)

    # ----- events

    def build_events(self, rec: dict, kinds: Iterable[str], email: str | None = None,
                     options: dict | None = None, timestamp: int | None = None) -> list[dict]:
        """SendGrid-shaped events for each recipient of a recorded message."""
        options = options or {}
        mid = rec.get("message_id") or f"sink{rec['seq']}"
        ts = int(timestamp if timestamp is not None else time.time())
        # SendGrid names a recipient's copy when it accepts the message: every event for that copy
        # carries the same sg_message_id, whenever the event happens.
        accepted = int(rec.get("time") or 0)
        categories = rec.get("categories")
        out = []
        n = 0
        for p in rec.get("personalizations") or [{"to": rec["to"], "cc": [], "bcc": [],
                                                   "custom_args": rec["custom_args"]}]:
            for rcpt in p["to"] + p["cc"] + p["bcc"]:
                n += 1
                if email is not None and rcpt.lower() != email.lower():
                    continue
                base = dict(p["custom_args"])  # custom_args come flattened, below SendGrid's own fields
                base.update({
                    "email": rcpt,
                    "timestamp": ts,
                    "smtp-id": f"<{mid}@ismtpd0001p1sink.sendgrid.net>",
                    "sg_message_id": f"{mid}.filterdrecv-sink-{os.getpid():x}-{rec['seq']}-{accepted:X}-{n - 1}.0",
                })
                if categories:
                    base["category"] = categories
                for kind in kinds:
                    event = dict(base)
                    event["event"] = kind
                    event.update(_event_details(kind, options))
                    event["sg_event_id"] = self._event_id(kind, mid, n)
                    extra = options.get("extra")
                    if isinstance(extra, dict):
                        event.update(extra)
                    out.append(event)
        return out

    def _event_id(self, kind: str, mid: str, n: int) -> str:
        raw = f"{kind[:5]}-{next(self._event_ids)}-{mid}-{n - 1}".encode()
        return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    def enqueue_events(self, events: list[dict], generation: int) -> None:
        if not events:
            return
        with self._event_lock:
            if generation != self.generation:
                return
            self.event_queue.extend(events)
            self.event_stats["queued"] += len(events)
            if self._event_thread is None or not self._event_thread.is_alive():
                self._stop.clear()
                self._event_thread = threading.Thread(target=self._event_loop, name="sink-events", daemon=True)
                self._event_thread.start()

    def post_events(self, events: list[dict], url: str | None = None, signed: bool = True,
                    bad_signature: bool = False) -> tuple[int, bytes]:
        """POST one signed batch; returns (status, body). Raises on connection errors."""
        url = url or self.events_url
        if not url:
            raise RuntimeError("no events URL configured (SINK_EVENTS_URL)")
        body = _encode_events(events)
        headers = {"Content-Type": "application/json", "User-Agent": "SendGrid Event API"}
        if signed:
            ts = str(int(time.time()))
            sig = sign_events(self.private_key, body, ts)
            if bad_signature:
                sig = sign_events(self.private_key, body + b" ", ts)
            headers[SIGNATURE_HEADER] = sig
            headers[TIMESTAMP_HEADER] = ts
        with self._event_lock:
            if self._http is None:
                self._http = urllib3.PoolManager(num_pools=4, maxsize=4, retries=False)
            http = self._http
        resp = http.request(
            "POST", url, body=body, headers=headers,
            timeout=urllib3.Timeout(connect=min(5.0, self.event_timeout), read=self.event_timeout),
        )
        return resp.status, resp.data

    def _event_loop(self) -> None:
        pending: list[dict] | None = None
        pending_gen = -1
        backoff = self.event_interval
        while not self._stop.is_set():
            if pending is None:
                q = self.event_queue
                batch: list[dict] = []
                while q and len(batch) < self.event_batch_size:
                    try:
                        batch.append(q.popleft())
                    except IndexError:
                        break
                if not batch:
                    self._stop.wait(self.event_interval)
                    continue
                pending, pending_gen = batch, self.generation
            if pending_gen != self.generation or not self.events_url:
                pending = None
                continue
            try:
                status, _ = self.post_events(pending)
                error = None if 200 <= status < 300 else f"HTTP {status}"
            except Exception as exc:  # the webhook is down or unreachable: retry like SendGrid
                status, error = None, f"{type(exc).__name__}: {exc}"
            with self.lock:
                if pending_gen == self.generation:
                    self.event_stats["posts"] += 1
                    self.event_stats["last_status"] = status
                    if error is None:
                        self.event_stats["posted"] += len(pending)
                    else:
                        self.event_stats["failed_posts"] += 1
                        self.event_stats["last_error"] = error
            if error is None:
                pending = None
                backoff = self.event_interval
                if len(self.event_queue) < self.event_batch_size:
                    self._stop.wait(self.event_interval)
            else:
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)


def _status_message(status: int) -> str:
    return {
        400: "Bad Request", 401: _ERR_AUTH_BAD, 403: "access forbidden", 404: "not found",
        413: "The JSON payload you have included in your request is too large.",
        429: "too many requests", 500: "internal error", 502: "bad gateway",
        503: "service unavailable", 504: "gateway timeout",
    }.get(status, "error")


def _event_details(kind: str, options: dict) -> dict:
    reason = options.get("reason")
    url = options.get("url")
    if kind == "bounce":
        return {"reason": reason or "550 5.1.1 The email account that you tried to reach does not exist.",
                "status": options.get("status", "5.1.1"), "type": options.get("type", "bounce"),
                "bounce_classification": options.get("bounce_classification", "Invalid Address"),
                "ip": "127.0.0.1", "tls": 1}
    if kind == "dropped":
        return {"reason": reason or "Bounced Address", "status": options.get("status", "5.0.0")}
    if kind == "deferred":
        return {"response": reason or "451 4.7.1 Try again later", "attempt": str(options.get("attempt", 1)),
                "ip": "127.0.0.1", "tls": 1}
    if kind == "delivered":
        return {"response": "250 2.0.0 OK", "ip": "127.0.0.1", "tls": 1}
    if kind == "open":
        return {"useragent": "Mozilla/5.0 (sink)", "ip": "127.0.0.1", "sg_machine_open": False}
    if kind == "click":
        return {"url": url or "https://example.com/", "url_offset": {"index": 0, "type": "html"},
                "useragent": "Mozilla/5.0 (sink)", "ip": "127.0.0.1"}
    if kind in ("group_unsubscribe", "group_resubscribe"):
        return {"asm_group_id": int(options.get("asm_group_id", 1)), "useragent": "Mozilla/5.0 (sink)",
                "ip": "127.0.0.1"}
    out = {}
    if reason:
        out["reason"] = reason
    if url:
        out["url"] = url
    return out


# --------------------------------------------------------------------------- WSGI mail-send


def _error_body(errors: list[dict]) -> bytes:
    return json.dumps({"errors": errors}).encode("utf-8")


def _read_body(environ: dict) -> tuple[bytes | None, int]:
    """(body, declared length); body None when it exceeds the limit (the rest is drained)."""
    stream = environ.get("wsgi.input")
    length_header = environ.get("CONTENT_LENGTH") or ""
    try:
        length = int(length_header) if length_header else -1
    except ValueError:
        length = -1
    if stream is None:
        return b"", length
    if length > MAX_BODY_BYTES:
        remaining = min(length, 4 * MAX_BODY_BYTES)  # let the client finish sending, then answer 413
        while remaining > 0:
            chunk = stream.read(min(remaining, 1 << 20))
            if not chunk:
                break
            remaining -= len(chunk)
        return None, length
    if length >= 0:
        parts = []
        remaining = length
        while remaining > 0:
            chunk = stream.read(remaining)
            if not chunk:
                break
            parts.append(chunk)
            remaining -= len(chunk)
        return b"".join(parts), length
    if environ.get("wsgi.input_terminated") or environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked":
        data = stream.read(MAX_BODY_BYTES + 1)
        if len(data) > MAX_BODY_BYTES:
            return None, len(data)
        return data, len(data)
    return b"", length


def _drop_connection(environ: dict) -> bool:
    sock = environ.get("herald_sink.socket") or environ.get("werkzeug.socket") or environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    return True


class _MailSend:
    """WSGI handler for POST /v3/mail/send, in front of the Flask app (the hot path)."""

    def __init__(self, flask_wsgi: Callable, state: SinkState) -> None:
        self.flask_wsgi = flask_wsgi
        self.state = state

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path != "/v3/mail/send" and path != "/v3/mail/send/":
            return self.flask_wsgi(environ, start_response)
        if environ.get("REQUEST_METHOD") != "POST":
            start_response("405 METHOD NOT ALLOWED", [*_JSON_HEADERS, ("Allow", "POST")])
            return [_error_body([_err("method not allowed")])]
        return self.mail_send(environ, start_response)

    def mail_send(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        state = self.state
        now = time.time()
        body_bytes, size = _read_body(environ)
        auth = environ.get("HTTP_AUTHORIZATION")
        rec: dict = {
            "seq": None, "time": now, "status": 202, "message_id": None,
            "idempotency_key": environ.get("HTTP_IDEMPOTENCY_KEY"),
            "errors": None, "behaviour": None, "truncated": False, "size": size,
            "user_agent": sys.intern(environ.get("HTTP_USER_AGENT") or "") or None,
        }
        parsed: Any = None
        authed = False
        if body_bytes is None:
            rec["status"] = 413
            rec["errors"] = [_err(_status_message(413))]
        elif not auth:
            rec["status"] = 401
            rec["errors"] = [_err(_ERR_AUTH_MISSING)]
        else:
            scheme, _, token = auth.partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token or (state.api_key and token != state.api_key):
                rec["status"] = 401
                rec["errors"] = [_err(_ERR_AUTH_BAD)]
            else:
                authed = True
        if body_bytes:
            try:
                if environ.get("HTTP_CONTENT_ENCODING", "").lower() == "gzip":
                    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    body_bytes = inflater.decompress(body_bytes, MAX_BODY_BYTES + 1)
                    if len(body_bytes) > MAX_BODY_BYTES:
                        raise OverflowError
                text = body_bytes.decode("utf-8")
                try:
                    parsed = json.loads(text)
                except ValueError:
                    if rec["status"] == 202:
                        rec["status"] = 400
                        rec["errors"] = [_err("Bad Request")]
            except OverflowError:
                if rec["status"] == 202:
                    rec["status"], rec["errors"] = 413, [_err(_status_message(413))]
            except (UnicodeDecodeError, zlib.error):
                if rec["status"] == 202:
                    rec["status"], rec["errors"] = 415, [_err("Invalid UTF8 in request")]
        elif rec["status"] == 202:
            rec["status"], rec["errors"] = 400, [_err("Bad Request")]
        if rec["status"] == 202:
            errors = validate_mail_send(parsed)
            if errors:
                rec["status"], rec["errors"] = 400, errors
        rec.update(_extract(parsed))
        rec, behaviour = state.record_call(rec, authed)

        if behaviour is not None and behaviour.mode == "hang":
            state.wait(behaviour.delay)
            if _drop_connection(environ):
                start_response("504 GATEWAY TIMEOUT", [*_JSON_HEADERS])
                return [b""]
            start_response("504 GATEWAY TIMEOUT", [*_JSON_HEADERS])
            return [_error_body([_err("the sink held this request and dropped it (hang)")])]
        if behaviour is not None and behaviour.mode == "slow":
            state.wait(behaviour.delay)

        status = rec["status"]
        if status == 202:
            start_response("202 ACCEPTED", [("Content-Length", "0"), ("X-Message-Id", rec["message_id"])])
            return [b""]
        headers = list(_JSON_HEADERS)
        if status == 429:
            limit = behaviour.limit if behaviour is not None else 600
            reset_in = behaviour.reset_in if behaviour is not None else 1.0
            headers += [
                ("X-RateLimit-Limit", str(limit)),
                ("X-RateLimit-Remaining", "0"),
                ("X-RateLimit-Reset", str(int(time.time() + reset_in))),
            ]
        payload = _error_body(rec["errors"] or [_err(_status_message(status))])
        headers.append(("Content-Length", str(len(payload))))
        start_response(f"{status} {_REASONS.get(status, 'ERROR')}", headers)
        return [payload]


_REASONS = {
    400: "BAD REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT FOUND",
    405: "METHOD NOT ALLOWED", 413: "PAYLOAD TOO LARGE", 415: "UNSUPPORTED MEDIA TYPE",
    429: "TOO MANY REQUESTS", 500: "INTERNAL SERVER ERROR", 502: "BAD GATEWAY",
    503: "SERVICE UNAVAILABLE", 504: "GATEWAY TIMEOUT",
}


# --------------------------------------------------------------------------- Flask app


_SUMMARY_FIELDS = ("seq", "time", "key", "to", "subject", "status", "message_id", "idempotency_key")


def _summary(rec: dict) -> dict:
    return {f: rec[f] for f in _SUMMARY_FIELDS}


def _int_arg(name: str, default: int | None = None) -> int | None:
    raw = request.args.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise _BadInput(f"{name} must be an integer") from None


class _BadInput(Exception):
    pass


def _json_body() -> Any:
    data = request.get_json(silent=True)
    if data is None and request.get_data():
        raise _BadInput("the body must be JSON")
    return data


def create_sink_app(config: dict | None = None) -> Flask:
    """The sink as a Flask app; ``app.extensions["sendgrid_sink"]`` is its SinkState."""
    app = Flask("herald_sendgrid_sink")
    app.config.update(config or {})
    state = SinkState(config)
    app.extensions[EXTENSION_KEY] = state
    app.wsgi_app = _MailSend(app.wsgi_app, state)  # type: ignore[method-assign]

    @app.errorhandler(_BadInput)
    def bad_input(exc: _BadInput):
        return jsonify({"error": str(exc)}), 400

    @app.errorhandler(404)
    def not_found(_exc):
        return jsonify({"errors": [_err("not found")]}), 404

    @app.errorhandler(405)
    def not_allowed(_exc):
        return jsonify({"errors": [_err("method not allowed")]}), 405

    @app.get("/_sink/messages")
    def messages():
        since = _int_arg("since", 0) or 0
        recs = state.select(since=since, key=request.args.get("key"), status=request.args.get("status"),
                            limit=_int_arg("limit"))
        if request.args.get("fields") == "summary":
            out = [_summary(r) for r in recs]
        else:
            out = recs
        return jsonify({"count": len(out), "messages": out})

    @app.get("/_sink/messages/<int:seq>")
    def message(seq: int):
        rec = state.get(seq)
        if rec is None:
            return jsonify({"error": f"no message {seq}"}), 404
        return jsonify(rec)

    @app.get("/_sink/messages/<int:seq>/html")
    def message_html(seq: int):
        rec = state.get(seq)
        if rec is None:
            return _page("Not found", f"<p>No message {seq}.</p>"), 404
        return _page(f"#{seq} {rec.get('subject') or ''}", _render_message(rec))

    @app.get("/_sink/stats")
    def stats():
        return jsonify(state.stats())

    @app.get("/_sink/keys")
    def keys():
        accepted = request.args.get("accepted") in ("1", "true", "yes")
        idem = request.args.get("by") == "idempotency"
        return jsonify(state.key_counts(accepted=accepted, idempotency=idem))

    @app.post("/_sink/reset")
    def reset():
        state.reset()
        return jsonify({"ok": True})

    @app.get("/_sink/behaviour")
    def get_behaviour():
        return jsonify({"behaviours": state.describe_behaviours()})

    @app.post("/_sink/behaviour")
    def set_behaviour():
        data = _json_body()
        specs = data if isinstance(data, list) else [data] if isinstance(data, dict) else None
        if specs is None or not all(isinstance(s, dict) for s in specs):
            raise _BadInput('send {"mode": "429"|"5xx"|"slow"|"hang"|"ok", ...} or a list of them')
        try:
            current = state.set_behaviours(specs, append=request.args.get("append") in ("1", "true"))
        except (TypeError, ValueError) as exc:
            raise _BadInput(str(exc)) from None
        return jsonify({"ok": True, "behaviours": current})

    @app.route("/_sink/fail-addresses", methods=["GET", "POST", "DELETE"])
    def fail_addresses():
        if request.method == "DELETE":
            with state.lock:
                state.fail_addresses.clear()
            return jsonify({"ok": True, "emails": []})
        if request.method == "POST":
            data = _json_body()
            emails = data.get("emails") if isinstance(data, dict) else None
            if isinstance(emails, str):
                emails = [emails]
            if not isinstance(emails, list) or not all(isinstance(e, str) for e in emails):
                raise _BadInput('send {"emails": [...], "status"?: 400}')
            status = data.get("status", 400)
            if not isinstance(status, int) or not 400 <= status <= 599:
                raise _BadInput("status must be a 4xx or 5xx code")
            with state.lock:
                for email in emails:
                    state.fail_addresses[email.lower()] = status
        with state.lock:
            current = dict(state.fail_addresses)
        return jsonify({"ok": True, "emails": sorted(current), "statuses": current})

    @app.get("/_sink/event-public-key")
    def event_public_key():
        if request.args.get("format") == "json" or request.accept_mimetypes.best == "application/json":
            return jsonify({"public_key": state.public_key})
        return Response(state.public_key, mimetype="text/plain")

    @app.route("/_sink/events-url", methods=["GET", "POST"])
    def events_url():
        if request.method == "POST":
            data = _json_body()
            url = data.get("url") if isinstance(data, dict) else None
            if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
                raise _BadInput('send {"url": "http://..."} or {"url": null}')
            state.events_url = url or None
        return jsonify({"url": state.events_url})

    @app.post("/_sink/events")
    def post_event():
        data = _json_body()
        if not isinstance(data, dict):
            raise _BadInput('send {"seq": n | "key": k, "event": "bounce", ...} or {"events": [...]}')
        url = data.get("webhook_url") or state.events_url
        if not url:
            return jsonify({"error": "no events URL: set SINK_EVENTS_URL or POST /_sink/events-url"}), 409
        if isinstance(data.get("events"), list):
            events = data["events"]
        else:
            kind = data.get("event")
            if not isinstance(kind, str) or not kind:
                raise _BadInput("event is required")
            if data.get("seq") is not None:
                try:
                    rec = state.get(int(data["seq"]))
                except (TypeError, ValueError):
                    raise _BadInput("seq must be an integer") from None
            elif isinstance(data.get("key"), str):
                rec = state.find_for_key(data["key"])
            else:
                raise _BadInput("seq or key is required")
            if rec is None:
                return jsonify({"error": "no such message"}), 404
            events = state.build_events(rec, [kind], email=data.get("email"), options=data,
                                        timestamp=data.get("timestamp"))
            if not events:
                return jsonify({"error": "that message has no such recipient"}), 404
        try:
            status, body = state.post_events(events, url=url, signed=data.get("signed", True) is not False,
                                             bad_signature=bool(data.get("bad_signature")))
        except Exception as exc:
            return jsonify({"error": f"{type(exc).__name__}: {exc}", "events": events}), 502
        return jsonify({"status": status, "events": events,
                        "response": body[:2000].decode("utf-8", "replace")})

    @app.get("/")
    @app.get("/_sink/outbox")
    def outbox():
        limit = max(1, min(_int_arg("limit", 200) or 200, 1000))
        before = _int_arg("before")
        recs = state.latest(limit, before)
        return _page("Outbox", _render_outbox(state, recs, limit))

    return app


# --------------------------------------------------------------------------- HTML


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:10px 20px;display:flex;gap:20px;align-items:baseline}
header a{color:#cfd8ff}main{padding:16px 20px}table{border-collapse:collapse;width:100%;background:#fff}
th,td{padding:6px 10px;border-bottom:1px solid #e3e6eb;text-align:left;vertical-align:top}
th{font-weight:600;background:#eef0f4}.muted{color:#6b7385}.s202{color:#137333}.err{color:#b3261e}
iframe{width:100%;height:70vh;border:1px solid #d0d4dc;background:#fff}pre{white-space:pre-wrap;
background:#fff;border:1px solid #d0d4dc;padding:10px}dl{display:grid;grid-template-columns:max-content 1fr;
gap:4px 16px}dt{font-weight:600}code{font-size:12px}
"""


NEW_TAB = '<base target="_blank">'  # a framed email's links open in a new tab


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _page(title: str, body: str) -> Response:
    doc = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(title)} · SendGrid sink</title><style>{_CSS}</style></head><body>"
        "<header><strong>Herald · SendGrid sink</strong><a href=\"/\">Outbox</a>"
        "<a href=\"/_sink/stats\">Stats</a><a href=\"/_sink/messages?fields=summary\">JSON</a></header>"
        f"<main>{body}</main></body></html>"
    )
    resp = Response(doc, mimetype="text/html")
    resp.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data: http: https:; frame-src 'self'"
    )
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def _render_outbox(state: SinkState, recs: list[dict], limit: int) -> str:
    stats = state.stats()
    rows = []
    for r in recs:
        status = "dropped" if r["status"] is None else r["status"]
        cls = "s202" if status == 202 else "err"
        sender = (r.get("from") or {}).get("email")
        rows.append(
            f"<tr><td><a href=\"/_sink/messages/{r['seq']}/html\">#{r['seq']}</a></td>"
            f"<td class=muted>{_e(_when(r['time']))}</td><td class={cls}>{_e(status)}</td>"
            f"<td>{_e(sender)}</td><td>{_e(', '.join(r['to']))}</td>"
            f"<td><a href=\"/_sink/messages/{r['seq']}/html\">{_e(r.get('subject') or '(no subject)')}</a></td>"
            f"<td><code>{_e(r.get('key'))}</code></td></tr>"
        )
    older = ""
    if recs and recs[-1]["seq"] > 1:
        older = f"<p><a href=\"/?before={recs[-1]['seq']}&amp;limit={limit}\">Older →</a></p>"
    summary = (
        f"<p class=muted>{stats['calls']} calls, {stats['accepted']} accepted, "
        f"{stats['keys']['repeated']} message keys sent more than once. Newest first.</p>"
    )
    if not rows:
        return summary + "<p>No email received yet. POST /v3/mail/send to this host.</p>"
    return (
        summary + "<table><thead><tr><th>#</th><th>Received</th><th>Status</th><th>From</th>"
        "<th>To</th><th>Subject</th><th>message_key</th></tr></thead><tbody>"
        + "".join(rows) + "</tbody></table>" + older
    )


def _render_message(rec: dict) -> str:
    status = "dropped" if rec["status"] is None else rec["status"]
    sender = rec.get("from") or {}
    facts = [
        ("Status", status), ("Received", _when(rec["time"])), ("X-Message-Id", rec.get("message_id")),
        ("From", f"{sender.get('name') or ''} <{sender.get('email') or ''}>".strip()),
        ("To", ", ".join(rec["to"])), ("Subject", rec.get("subject")),
        ("Reply-To", (rec.get("reply_to") or {}).get("email")), ("message_key", rec.get("key")),
        ("Idempotency-Key", rec.get("idempotency_key")),
        ("custom_args", json.dumps(rec.get("custom_args") or {})),
        ("headers", json.dumps(rec.get("headers") or {})),
    ]
    parts = ["<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts) + "</dl>"]
    if rec.get("errors"):
        parts.append(f"<pre class=err>{_e(json.dumps(rec['errors'], indent=2))}</pre>")
    if rec.get("html"):
        parts.append(
            # links open in a new tab, as in a mail client (the unsubscribe link, say): no script
            # runs in the frame, and a page of another origin could not be framed here anyway
            "<h3>HTML</h3><iframe sandbox=\"allow-popups allow-popups-to-escape-sandbox\" "
            f"referrerpolicy=\"no-referrer\" srcdoc=\"{_e(NEW_TAB + rec['html'])}\" "
            "title=\"email HTML\"></iframe>"
        )
    if rec.get("text"):
        parts.append(f"<h3>Text</h3><pre>{_e(rec['text'])}</pre>")
    if rec.get("truncated"):
        parts.append("<p class=muted>Details no longer kept (SINK_MAX_STORED_BODIES).</p>")
    parts.append(f"<p><a href=\"/_sink/messages/{rec['seq']}\">JSON</a></p>")
    return "".join(parts)


# --------------------------------------------------------------------------- serving
#
# werkzeug's development server (and gunicorn's gthread worker, one process) top out near
# 1,700 requests/s here, CPU-bound in HTTP parsing and a thread per connection. The sink
# needs more for benchmarks, so it has a small HTTP/1.1 server of its own: keep-alive,
# pipelining, chunked request bodies, Expect: 100-continue, and a pool of reusable
# connection threads. werkzeug stays available (server="werkzeug").


class _FastHTTPServer:
    """Minimal threaded HTTP/1.1 WSGI server, enough for a local test double."""

    max_header_bytes = 65536
    min_workers = 8
    worker_idle_seconds = 30.0

    def __init__(self, host: str, port: int, app: Callable, keepalive_timeout: float = 60.0,
                 backlog: int = 4096) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
            self.socket.listen(backlog)
        except OSError:
            self.socket.close()
            raise
        self.socket.settimeout(0.25)
        self.app = app
        self.keepalive_timeout = keepalive_timeout
        self.port = self.socket.getsockname()[1]
        self._base_environ = {
            "SERVER_NAME": host, "SERVER_PORT": str(self.port), "SCRIPT_NAME": "",
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr,
            "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
        }
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._workers = 0
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._date = (0, "")

    # ----- lifecycle

    def serve_forever(self) -> None:
        self._stopped.clear()
        try:
            while not self._stopping.is_set():
                try:
                    conn, addr = self.socket.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self._stopping.is_set():
                        break
                    time.sleep(0.01)  # e.g. EMFILE: back off instead of spinning
                    continue
                self._dispatch(conn, addr)
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        self._stopping.set()
        self._stopped.wait(5)
        with self._lock:
            conns = list(self._conns)
            workers = self._workers
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _ in range(workers):
            self._jobs.put(None)

    def server_close(self) -> None:
        self.socket.close()

    # ----- workers

    def _dispatch(self, conn: socket.socket, addr: Any) -> None:
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
                spawn = False
            else:
                self._workers += 1
                spawn = True
        if spawn:
            threading.Thread(target=self._worker, args=((conn, addr),), name="sink-http", daemon=True).start()
        else:
            self._jobs.put((conn, addr))

    def _worker(self, job: tuple | None) -> None:
        while True:
            if job is not None:
                self._serve_connection(*job)
                with self._lock:
                    self._idle += 1
            try:
                job = self._jobs.get(timeout=self.worker_idle_seconds)
            except queue.Empty:
                job = None
                with self._lock:
                    if self._idle > 0 and self._workers > self.min_workers:
                        self._idle -= 1
                        self._workers -= 1
                        return
                continue
            if job is None:  # shutdown sentinel
                with self._lock:
                    self._idle -= 1
                    self._workers -= 1
                return

    # ----- one connection

    def _http_date(self) -> str:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True))
        return self._date[1]

    def _serve_connection(self, conn: socket.socket, addr: Any) -> None:
        with self._lock:
            self._conns.add(conn)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self.keepalive_timeout)
            buf = b""
            while not self._stopping.is_set():
                idx = buf.find(b"\r\n\r\n")
                while idx < 0:
                    if len(buf) > self.max_header_bytes:
                        self._send_simple(conn, "431 Request Header Fields Too Large")
                        return
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                    idx = buf.find(b"\r\n\r\n", max(0, len(buf) - len(chunk) - 3))
                head, buf = buf[:idx], buf[idx + 4:]
                keep_alive, buf = self._handle_one(conn, addr, head, buf)
                if not keep_alive:
                    return
        except OSError:  # includes timeouts and connections reset or dropped on purpose
            return
        except Exception:  # a bug here must not kill the worker thread
            traceback.print_exc()
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def _send_simple(self, conn: socket.socket, status: str) -> None:
        conn.sendall(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode("latin-1"))

    def _handle_one(self, conn: socket.socket, addr: Any, head: bytes, buf: bytes) -> tuple[bool, bytes]:
        lines = head.split(b"\r\n")
        try:
            method, target, version = lines[0].decode("latin-1").split(" ", 2)
        except ValueError:
            self._send_simple(conn, "400 Bad Request")
            return False, b""
        environ = dict(self._base_environ)
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            key = name.strip().decode("latin-1").upper().replace("-", "_")
            val = value.strip().decode("latin-1")
            if key == "CONTENT_TYPE" or key == "CONTENT_LENGTH":
                environ[key] = val
            else:
                key = "HTTP_" + key
                environ[key] = f"{environ[key]},{val}" if key in environ else val
        path, _, query = target.partition("?")
        if path.startswith(("http://", "https://")):
            path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
        environ["REQUEST_METHOD"] = method
        environ["PATH_INFO"] = unquote_to_bytes(path).decode("latin-1")
        environ["QUERY_STRING"] = query
        environ["SERVER_PROTOCOL"] = version
        environ["REMOTE_ADDR"] = str(addr[0]) if isinstance(addr, tuple) else ""
        environ["REMOTE_PORT"] = str(addr[1]) if isinstance(addr, tuple) else ""
        environ["herald_sink.socket"] = conn

        connection = environ.get("HTTP_CONNECTION", "").lower()
        keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection

        # request body
        if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            try:
                body, buf, too_big = self._read_chunked(conn, buf)
            except ValueError:
                self._send_simple(conn, "400 Bad Request")
                return False, b""
            environ.pop("HTTP_TRANSFER_ENCODING", None)
            environ["CONTENT_LENGTH"] = str(len(body)) if not too_big else str(MAX_BODY_BYTES + 1)
        else:
            try:
                length = int(environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                self._send_simple(conn, "400 Bad Request")
                return False, b""
            if length < 0:
                self._send_simple(conn, "400 Bad Request")
                return False, b""
            if length > len(buf) and environ.get("HTTP_EXPECT", "").lower() == "100-continue":
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            if length > MAX_BODY_BYTES:
                if length > 4 * MAX_BODY_BYTES:
                    keep_alive = False  # answer 413 without reading it all, then close
                    buf = b""
                else:
                    buf = self._discard(conn, buf, length)
                body = b""
            else:
                body, buf = self._read_exact(conn, buf, length)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["wsgi.input_terminated"] = True

        status_holder: list = []
        written: list[bytes] = []

        def start_response(status: str, headers: list, exc_info: Any = None) -> Callable:
            if exc_info and status_holder:
                raise exc_info[1].with_traceback(exc_info[2])
            status_holder[:] = [status, headers]
            return written.append

        try:
            result = self.app(environ, start_response)
            try:
                for data in result:
                    if data:
                        written.append(data)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except Exception:
            traceback.print_exc()
            status_holder[:] = ["500 INTERNAL SERVER ERROR", [("Content-Type", "text/plain")]]
            written[:] = [b"internal error"]
            keep_alive = False
        if not status_holder:
            return False, b""
        status, headers = status_holder
        payload = b"".join(written)
        out = [f"HTTP/1.1 {status}\r\n"]
        has_length = False
        for name, value in headers:
            if name.lower() == "content-length":
                has_length = True
            out.append(f"{name}: {value}\r\n")
        if not has_length:
            out.append(f"Content-Length: {len(payload)}\r\n")
        out.append(f"Date: {self._http_date()}\r\nServer: herald-sendgrid-sink\r\n")
        if not keep_alive:
            out.append("Connection: close\r\n")
        out.append("\r\n")
        data = "".join(out).encode("latin-1")
        conn.sendall(data if method == "HEAD" else data + payload)
        return keep_alive, buf

    @staticmethod
    def _read_exact(conn: socket.socket, buf: bytes, length: int) -> tuple[bytes, bytes]:
        if len(buf) >= length:
            return buf[:length], buf[length:]
        data = bytearray(buf)
        while len(data) < length:
            chunk = conn.recv(min(1 << 20, max(65536, length - len(data))))
            if not chunk:
                raise ConnectionError("client closed mid-body")
            data += chunk
        return bytes(data[:length]), bytes(data[length:])

    @staticmethod
    def _discard(conn: socket.socket, buf: bytes, length: int) -> bytes:
        if len(buf) >= length:
            return buf[length:]
        remaining = length - len(buf)
        while remaining > 0:
            chunk = conn.recv(min(1 << 20, remaining))
            if not chunk:
                raise ConnectionError("client closed mid-body")
            remaining -= len(chunk)
        return b""

    def _read_chunked(self, conn: socket.socket, buf: bytes) -> tuple[bytes, bytes, bool]:
        body = bytearray()
        too_big = False
        while True:
            while b"\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    raise ConnectionError("client closed mid-body")
                buf += chunk
            size_line, buf = buf.split(b"\r\n", 1)
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while b"\r\n\r\n" not in b"\r\n" + buf:  # optional trailers, then CRLF
                    chunk = conn.recv(65536)
                    if not chunk:
                        raise ConnectionError("client closed mid-body")
                    buf += chunk
                _, buf = (b"\r\n" + buf).split(b"\r\n\r\n", 1)
                return bytes(body), buf, too_big
            data, buf = self._read_exact(conn, buf, size + 2)
            if len(body) + size > MAX_BODY_BYTES:
                too_big = True
                body.clear()
            if not too_big:
                body += data[:size]


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # one log line per request would cost more than the request itself


class _SinkWSGIServer(ThreadedWSGIServer):
    request_queue_size = 4096


class SinkServer:
    """The sink served over HTTP, in the foreground or in a background thread.

    ``server="fast"`` (default) is the sink's own HTTP/1.1 server; ``"werkzeug"`` uses
    werkzeug's threaded development server instead.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, config: dict | None = None,
                 app: Flask | None = None, server: str = "fast") -> None:
        self.app = app if app is not None else create_sink_app(config)
        self.state: SinkState = self.app.extensions[EXTENSION_KEY]
        if server == "werkzeug":
            self.server: Any = _SinkWSGIServer(host, port, self.app, handler=_QuietHandler)
            self.port = self.server.socket.getsockname()[1]
        elif server == "fast":
            self.server = _FastHTTPServer(host, port, self.app)
            self.port = self.server.port
        else:
            raise SinkConfigError(f"HERALD_SINK_SERVER: {server!r} is not 'fast' or 'werkzeug'")
        self.host = host
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        if isinstance(self.server, _FastHTTPServer):
            self.server.serve_forever()
        else:
            self.server.serve_forever(poll_interval=0.2)

    def start(self) -> SinkServer:
        self._thread = threading.Thread(target=self.serve_forever, name="sendgrid-sink", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self.state.close()
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> SinkServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def make_sink_server(host: str = "127.0.0.1", port: int = 0, config: dict | None = None,
                     server: str = "fast") -> SinkServer:
    """Bind a sink server (port 0: a free port); call .start() or .serve_forever()."""
    return SinkServer(host, port, config, server=server)


def run_sink(host: str = "127.0.0.1", port: int = 3030, config: dict | None = None,
             on_ready: Callable[[SinkServer], None] | None = None, server: str | None = None) -> None:
    """Serve the sink until interrupted; prints one line with its URL.

    ``on_ready`` is called with the bound SinkServer before serving (handy with port 0).
    ``server`` defaults to $HERALD_SINK_SERVER, else "fast".
    """
    sink = SinkServer(host, port, config, server=server or os.environ.get("HERALD_SINK_SERVER") or "fast")
    events = f", events -> {sink.state.events_url}" if sink.state.events_url else ""
    print(f"SendGrid sink on {sink.url} (POST {sink.url}/v3/mail/send, outbox {sink.url}/{events})",
          flush=True)
    if on_ready is not None:
        on_ready(sink)
    try:
        sink.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        sink.state.close()
        sink.server.server_close()
