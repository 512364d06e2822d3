"""Parsing SendGrid Event Webhook batches into rows a database column can hold."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from datetime import UTC, datetime
from typing import Any

from ..db import utcnow
from ..errors import BadRequest

log = logging.getLogger("herald.events")


def _clean(value: Any, maxlen: int | None = None) -> str | None:
    """Text a database column can hold: no NUL, valid UTF-8, at most ``maxlen`` characters."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        value = str(value)
    elif not isinstance(value, str):
        return None
    if "\x00" in value:
        value = value.replace("\x00", "")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a \udxxx escape
            value = value.encode("utf-8", "replace").decode("utf-8")
    if maxlen is not None:
        value = value[:maxlen]
    return value or None


def _timestamp(raw: Any) -> datetime | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, str):
        try:
            raw = float(raw)
        except ValueError:
            return None
    if not isinstance(raw, int | float) or not math.isfinite(raw):
        return None
    try:
        return datetime.fromtimestamp(raw, UTC).replace(tzinfo=None)
    except (OverflowError, OSError, ValueError):
        return None


def _timestamp_text(raw: Any) -> str:
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return str(int(raw)) if math.isfinite(raw) else repr(raw)
    return repr(raw)


def message_key_of(event: dict) -> str | None:
    key = event.get("message_key")
    if isinstance(key, str) and 0 < len(key) <= 64 and key.isascii() and key.isprintable():
        return key
    return None


def provider_id_of(sg_message_id: str | None) -> str | None:
    """The mail-send call's X-Message-Id: the part of sg_message_id before the first '.'."""
    if not sg_message_id:
        return None
    return sg_message_id.split(".", 1)[0][:100] or None


def event_row(event: dict, received_at: datetime) -> dict:
    """The ``events`` row for one SendGrid event (not yet mapped to a message)."""
    kind = (_clean(event["event"], 40) or "").strip().lower()
    sg_event_id = _clean(event.get("sg_event_id"))
    if sg_event_id and len(sg_event_id) > 100:
        sg_event_id = "sha256:" + hashlib.sha256(sg_event_id.encode()).hexdigest()
    sg_message_id = _clean(event.get("sg_message_id"), 200)
    key = message_key_of(event)
    email = _clean(event.get("email"), 320)
    email = email.strip().lower() if email else None
    url = _clean(event.get("url"))
    raw_ts = event.get("timestamp")
    fallback = "\x1f".join((sg_message_id or "", key or "", email or "", kind, _timestamp_text(raw_ts), url or ""))
    return {
        "workspace_id": None,
        "message_id": None,
        "message_key": key,
        "dedupe_key": hashlib.sha256(fallback.encode("utf-8", "replace")).hexdigest(),
        "sg_event_id": sg_event_id,
        "sg_message_id": sg_message_id,
        "event": kind,
        "email": email,
        "timestamp": _timestamp(raw_ts),
        "url": url,
        "payload": event,
        "received_at": received_at,
    }


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _not_an_event(item: Any) -> str | None:
    """Why ``item`` of a batch is not an event, or None when it is one."""
    if not isinstance(item, dict):
        return f"not an object ({type(item).__name__})"
    if not isinstance(item.get("event"), str) or not item["event"].strip():
        return "no 'event' string"
    return None


def parse_batch(raw: bytes, received_at: datetime | None = None,
                rejected: list[tuple[int, str]] | None = None) -> list[dict]:
    """The rows for an Event Webhook body; BadRequest unless it is a JSON array.

    An item of the array that is not an event is skipped, logged with its index and reason, and
    appended to ``rejected`` as ``(index, reason)``: SendGrid retries a refused batch unchanged
    for 24 hours, so refusing it for one bad item would lose every good event beside it. With
    items skipped the rows no longer line up with the body's elements (see :func:`store_batch`).
    """
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadRequest(f"the body is not JSON: {str(exc)[:200]}") from None
    if not isinstance(data, list):
        raise BadRequest("expected a JSON array of events")
    received_at = received_at or utcnow()
    rows, skipped = [], []
    for i, item in enumerate(data):
        reason = _not_an_event(item)
        if reason:
            skipped.append((i, reason))
        else:
            rows.append(event_row(item, received_at))
    if skipped:
        # One line per batch (a batch holds up to thousands of items), the first few named.
        log.warning("skipped %d of %d items of an Event Webhook batch that are not events: %s%s",
                    len(skipped), len(data), "; ".join(f"item {i}: {why}" for i, why in skipped[:20]),
                    " ..." if len(skipped) > 20 else "")
        if rejected is not None:
            rejected.extend(skipped)
    return rows
