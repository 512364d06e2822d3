"""The event poster: SendGrid-shaped, signed Event Webhook batches posted back to Herald.

Events are signed as SendGrid signs them (ECDSA P-256 over ``timestamp + raw body``), queued, and
posted in batches by one background thread, started with the first event; a failed post is
retried with a doubling back-off, as SendGrid retries. ``/_sink/events`` posts one batch at once.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import urllib3
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"


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


def load_private_key(key: Any) -> ec.EllipticCurvePrivateKey:
    """A key object, or one loaded from a PEM string/bytes."""
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
    key = load_private_key(private_key)
    if isinstance(body_bytes, str):
        body_bytes = body_bytes.encode("utf-8")
    signature = key.sign(str(timestamp).encode("utf-8") + bytes(body_bytes), ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(signature).decode("ascii")


def _encode_events(events: list[dict]) -> bytes:
    # SendGrid posts compact JSON followed by CRLF, and signs those exact bytes.
    return json.dumps(events, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\r\n"


# --------------------------------------------------------------------------- building events


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


_event_ids = itertools.count(1)


def _event_id(kind: str, mid: str, n: int) -> str:
    raw = f"{kind[:5]}-{next(_event_ids)}-{mid}-{n - 1}".encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def build_events(rec: dict, kinds: Iterable[str], email: str | None = None,
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
                event["sg_event_id"] = _event_id(kind, mid, n)
                extra = options.get("extra")
                if isinstance(extra, dict):
                    event.update(extra)
                out.append(event)
    return out


# --------------------------------------------------------------------------- posting


def _fresh_stats() -> dict:
    return {"queued": 0, "posted": 0, "posts": 0, "failed_posts": 0, "last_status": None, "last_error": None}


class EventPoster:
    """Queues events and posts them, signed, in batches to ``url``.

    ``generation`` changes on reset: events queued, or a batch being posted, for an earlier
    generation are dropped, and its outcome is not counted.
    """

    def __init__(self, private_key: ec.EllipticCurvePrivateKey, url: str | None, interval: float,
                 batch_size: int, timeout: float) -> None:
        self.private_key = private_key
        self.url = url
        self.interval = interval
        self.batch_size = batch_size
        self.timeout = timeout
        self.generation = 0
        self.queue: deque[dict] = deque()
        self.stats = _fresh_stats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._http: urllib3.PoolManager | None = None

    def reset(self) -> None:
        with self._lock:
            self.generation += 1
            self.queue = deque()
            self.stats = _fresh_stats()

    def describe(self) -> dict:
        with self._lock:
            return {"url": self.url, "pending": len(self.queue), **self.stats}

    def close(self) -> None:
        """Stop the thread (used when a server stops)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        if self._http is not None:
            self._http.clear()

    def enqueue(self, events: list[dict], generation: int) -> None:
        if not events:
            return
        with self._lock:
            if generation != self.generation:
                return
            self.queue.extend(events)
            self.stats["queued"] += len(events)
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._loop, name="sink-events", daemon=True)
                self._thread.start()

    def post(self, events: list[dict], url: str | None = None, signed: bool = True,
             bad_signature: bool = False) -> tuple[int, bytes]:
        """POST one signed batch; returns (status, body). Raises on connection errors."""
        url = url or self.url
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
        with self._lock:
            if self._http is None:
                self._http = urllib3.PoolManager(num_pools=4, maxsize=4, retries=False)
            http = self._http
        resp = http.request(
            "POST", url, body=body, headers=headers,
            timeout=urllib3.Timeout(connect=min(5.0, self.timeout), read=self.timeout),
        )
        return resp.status, resp.data

    def _next_batch(self) -> list[dict]:
        q = self.queue
        batch: list[dict] = []
        while q and len(batch) < self.batch_size:
            try:
                batch.append(q.popleft())
            except IndexError:
                break
        return batch

    def _loop(self) -> None:
        pending: list[dict] | None = None
        pending_gen = -1
        backoff = self.interval
        while not self._stop.is_set():
            if pending is None:
                batch = self._next_batch()
                if not batch:
                    self._stop.wait(self.interval)
                    continue
                pending, pending_gen = batch, self.generation
            if pending_gen != self.generation or not self.url:
                pending = None
                continue
            try:
                status, _ = self.post(pending)
                error = None if 200 <= status < 300 else f"HTTP {status}"
            except Exception as exc:  # the webhook is down or unreachable: retry like SendGrid
                status, error = None, f"{type(exc).__name__}: {exc}"
            self._count(pending, pending_gen, status, error)
            if error is None:
                pending = None
                backoff = self.interval
                if len(self.queue) < self.batch_size:
                    self._stop.wait(self.interval)
            else:
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _count(self, batch: list[dict], generation: int, status: int | None, error: str | None) -> None:
        with self._lock:
            if generation != self.generation:
                return
            self.stats["posts"] += 1
            self.stats["last_status"] = status
            if error is None:
                self.stats["posted"] += len(batch)
            else:
                self.stats["failed_posts"] += 1
                self.stats["last_error"] = error
