"""The sink's recorded state: every mail-send call, accepted or not, and the counters over them.

``SinkState`` is shared by all request threads (one lock). It reads its settings (``SINK_*``
config keys, else ``HERALD_SINK_*`` variables), records calls through the fault controls, answers
the ``/_sink/`` queries, and owns the event poster.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from collections.abc import Iterable
from typing import Any

from . import events as _events
from .faults import Behaviour, Faults

# All that calls older than SINK_MAX_STORED_BODIES keep, to bound memory in long benchmarks.
_SLIM_FIELDS = (
    "seq", "time", "status", "message_id", "idempotency_key", "key", "keys", "to", "from",
    "subject", "custom_args", "behaviour", "size", "truncated",
)


class SinkConfigError(ValueError):
    """A sink setting is malformed; the message is one line naming the variable."""


class _Settings:
    """``config[name]`` when set, else ``$HERALD_<name>``, else the default; numbers checked."""

    def __init__(self, config: dict | None) -> None:
        self.config = dict(config or {})

    def get(self, name: str, default: Any = None) -> Any:
        if self.config.get(name) not in (None, ""):
            return self.config[name]
        env = os.environ.get(f"HERALD_{name}")
        return env if env not in (None, "") else default

    def number(self, name: str, default: Any, kind: type, low: float) -> Any:
        value = self.get(name, default)
        try:
            number = kind(value)
        except (TypeError, ValueError):
            number = None
        if number is None or number != number or number < low or number > 1e9:
            raise SinkConfigError(f"HERALD_{name}: must be a {'whole ' if kind is int else ''}number of at least "
                                  f"{low:g}, got {value!r}")
        return number


def _event_poster(settings: _Settings) -> _events.EventPoster:
    pem = settings.get("SINK_EVENT_PRIVATE_KEY_PEM")
    if pem:
        try:
            private_key = _events.load_private_key(pem)
        except (TypeError, ValueError) as exc:
            raise SinkConfigError(f"HERALD_SINK_EVENT_PRIVATE_KEY_PEM: not a usable key ({exc})") from None
    else:
        private_key, _ = _events.generate_key_pair()
    url = settings.get("SINK_EVENTS_URL")
    if url is not None and not re.match(r"https?://[^/\s]+", str(url)):
        raise SinkConfigError(f"HERALD_SINK_EVENTS_URL: {url!r} is not an http(s) URL")
    return _events.EventPoster(
        private_key, url,
        interval=settings.number("SINK_EVENT_INTERVAL", 0.5, float, 0.01),
        batch_size=settings.number("SINK_EVENT_BATCH_SIZE", 1000, int, 1),
        timeout=settings.number("SINK_EVENT_TIMEOUT", 10.0, float, 0.01),
    )


def _emails(value: Any) -> list[str]:
    if not isinstance(value, list):
        return []
    return [r["email"] for r in value if isinstance(r, dict) and isinstance(r.get("email"), str)]


def _as_dict(value: Any) -> dict | None:
    return value if isinstance(value, dict) else None


def _list_or_none(value: Any) -> list | None:
    return value if isinstance(value, list) else None


def _personalizations(body: dict, top_args: dict, top_subject: str | None) -> list[dict]:
    out = []
    raw = body.get("personalizations")
    for p in raw if isinstance(raw, list) else []:
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
        out.append(entry)
    return out


def _content(content: Any) -> tuple[str | None, str | None, list]:
    """(the first text/html part, the first text/plain part, every part's type)."""
    html_part = text_part = None
    types = []
    for part in content if isinstance(content, list) else []:
        if not isinstance(part, dict):
            continue
        ctype = part.get("type")
        types.append(ctype)
        if ctype == "text/html" and html_part is None:
            html_part = part.get("value")
        elif ctype == "text/plain" and text_part is None:
            text_part = part.get("value")
    return html_part, text_part, types


def _attachments(value: Any) -> list[dict]:
    return [
        {"filename": a.get("filename"), "type": a.get("type"), "disposition": a.get("disposition"),
         "content_id": a.get("content_id"),
         "size": len(a["content"]) if isinstance(a.get("content"), str) else None}
        for a in (value if isinstance(value, list) else []) if isinstance(a, dict)
    ]


def extract(body: Any) -> dict:
    """The recorded view of a mail-send body; tolerant of any shape (invalid bodies too)."""
    if not isinstance(body, dict):
        body = {}
    top_args = body.get("custom_args") if isinstance(body.get("custom_args"), dict) else {}
    top_subject = body.get("subject") if isinstance(body.get("subject"), str) else None
    personalizations = _personalizations(body, top_args, top_subject)
    html_part, text_part, content_types = _content(body.get("content"))
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
        "reply_to_list": _list_or_none(body.get("reply_to_list")),
        "subject": first["subject"] if first else top_subject,
        "html": html_part,
        "text": text_part,
        "content_types": content_types,
        "headers": _as_dict(body.get("headers")),
        "tracking_settings": _as_dict(body.get("tracking_settings")),
        "mail_settings": _as_dict(body.get("mail_settings")),
        "categories": _list_or_none(body.get("categories")),
        "template_id": body.get("template_id"),
        "asm": _as_dict(body.get("asm")),
        "send_at": body.get("send_at"),
        "batch_id": body.get("batch_id"),
        "attachments": _attachments(body.get("attachments")),
        "personalizations": personalizations,
    }


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


class SinkState:
    """Everything the sink remembers; shared by all request threads."""

    def __init__(self, config: dict | None = None) -> None:
        settings = _Settings(config)
        self.api_key: str | None = settings.get("SINK_API_KEY")
        self.max_stored_bodies = settings.number("SINK_MAX_STORED_BODIES", 10_000, int, 0)
        self.events = _event_poster(settings)
        self.private_key = self.events.private_key
        self.public_key = _events.public_key_b64(self.private_key)
        auto = settings.get("SINK_AUTO_EVENTS", "processed,delivered")
        if isinstance(auto, str):
            auto = [a.strip() for a in auto.split(",") if a.strip()]
        self.auto_events: list[str] = list(auto)
        self.lock = threading.Lock()
        self._wake = threading.Event()
        self._clear()

    @property
    def events_url(self) -> str | None:
        """Where events go (None: nowhere); ``/_sink/events-url`` changes it."""
        return self.events.url

    @events_url.setter
    def events_url(self, url: str | None) -> None:
        self.events.url = url

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
        self.faults = Faults()

    def reset(self) -> None:
        """Forget every call, counter, behaviour, refused address and queued event."""
        with self.lock:
            self.events.reset()
            self._clear()
            old, self._wake = self._wake, threading.Event()
        old.set()  # wake held (hang/slow) requests so they finish now

    def close(self) -> None:
        """Stop the event thread and release held requests (used when a server stops)."""
        self._wake.set()
        self.events.close()

    def wait(self, seconds: float) -> None:
        """Sleep, but wake early on reset or shutdown."""
        if seconds > 0:
            self._wake.wait(seconds)

    # ----- fault controls

    def set_behaviours(self, specs: list[dict], append: bool = False) -> list[dict]:
        """Replace (or extend) the queue of behaviours; each applies until its count or
        seconds run out (seconds counted from when it becomes the current one), then the
        next one applies, then normal answers. A bare {"mode": "ok"} means normal."""
        with self.lock:
            return self.faults.set_behaviours(specs, append, time.time())

    def describe_behaviours(self) -> list[dict]:
        with self.lock:
            return self.faults.describe(time.time())

    def refuse_addresses(self, emails: list[str], status: int) -> None:
        with self.lock:
            for email in emails:
                self.faults.fail_addresses[email.lower()] = status

    def clear_fail_addresses(self) -> None:
        with self.lock:
            self.faults.fail_addresses.clear()

    def fail_addresses(self) -> dict[str, int]:
        with self.lock:
            return dict(self.faults.fail_addresses)

    # ----- mail send

    def record_call(self, rec: dict, authed: bool) -> tuple[dict, Behaviour | None]:
        """Decide the final answer (behaviours, refused addresses), number and store the call.

        ``rec["status"]`` holds the validation verdict on entry; it is final on return.
        """
        with self.lock:
            behaviour = self.faults.apply(rec, authed, rec["time"])
            self.calls += 1
            seq = rec["seq"] = self.calls
            if rec["status"] == 202:
                rec["message_id"] = secrets.token_urlsafe(16)
                self.accepted += 1
            status_key = "dropped" if rec["status"] is None else str(rec["status"])
            self.by_status[status_key] = self.by_status.get(status_key, 0) + 1
            self.records.append(rec)
            self._index(rec, seq)
            self._slim(seq - self.max_stored_bodies)
            queue_events = rec["status"] == 202 and bool(self.events.url) and bool(self.auto_events)
            generation = self.events.generation
        if queue_events:
            self.events.enqueue(self.build_events(rec, self.auto_events), generation)
        return rec, behaviour

    def _index(self, rec: dict, seq: int) -> None:
        for k in rec["keys"]:
            self.key_calls.add(k)
            if rec["status"] == 202:
                self.key_accepted.add(k)
            self.key_index.setdefault(k, []).append(seq)
        idem = rec["idempotency_key"]
        if idem:
            self.idem_calls.add(idem)
            self.idem_index.setdefault(idem, []).append(seq)

    def _slim(self, old: int) -> None:
        """Keep only the _SLIM_FIELDS of call ``old`` (when there is one)."""
        if old >= 1:
            stale = self.records[old - 1]
            if not stale["truncated"]:  # swap in a slim copy; readers of the old dict are unaffected
                slim = {name: stale[name] for name in _SLIM_FIELDS}
                slim["truncated"] = True
                self.records[old - 1] = slim

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
            return {
                "calls": self.calls,
                "accepted": self.accepted,
                "by_status": dict(self.by_status),
                "keys": self.key_calls.summary(),
                "accepted_keys": self.key_accepted.summary(),
                "idempotency_keys": self.idem_calls.summary(),
                "behaviours": self.faults.describe(time.time()),
                "fail_addresses": sorted(self.faults.fail_addresses),
                "events": self.events.describe(),
            }

    def key_counts(self, accepted: bool = False, idempotency: bool = False) -> dict[str, int]:
        with self.lock:
            counter = self.idem_calls if idempotency else self.key_accepted if accepted else self.key_calls
            return dict(counter.counts)

    # ----- events

    def build_events(self, rec: dict, kinds: Iterable[str], email: str | None = None,
                     options: dict | None = None, timestamp: int | None = None) -> list[dict]:
        """SendGrid-shaped events for each recipient of a recorded message."""
        return _events.build_events(rec, kinds, email, options, timestamp)

    def post_events(self, events: list[dict], url: str | None = None, signed: bool = True,
                    bad_signature: bool = False) -> tuple[int, bytes]:
        """POST one signed batch now; returns (status, body). Raises on connection errors."""
        return self.events.post(events, url, signed, bad_signature)
