"""Delivery events from SendGrid's Event Webhook: stored in the request (``parse_batch``,
``store_batch``: deduplicated, mapped to messages), applied by a task (``process_pending``,
under the ``events`` lease). What each event does: docs/architecture.md, "Delivery events"."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Integer, String, and_, bindparam, case, func, null, or_, select, text, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session

from . import engine, leases
from .db import TRANSIENT_ERRORS, is_postgres, one_of, session_factory, utcnow
from .errors import BadRequest
from .models import Campaign, Event, Message, Workspace
from .sequences import stop_enrollments
from .suppressions import suppress

log = logging.getLogger("herald.events")

LEASE = "events"
LEASE_TTL = 120.0
BATCH = 1000

# Event -> the first-seen column it sets.
FIRST_SEEN = {
    "delivered": "delivered_at",
    "open": "opened_at",
    "click": "clicked_at",
    "spamreport": "spam_reported_at",
    "unsubscribe": "unsubscribed_at",
    "group_unsubscribe": "unsubscribed_at",
}
# Status an event moves a message to, and the forward order of statuses.
STATUS_FOR = {"delivered": "delivered", "bounce": "bounced", "dropped": "dropped"}
RANK = {"sent": 1, "delivered": 2, "bounced": 3, "dropped": 3}
# Events that always suppress the address (suppression reason).
SUPPRESSING = {
    "bounce": "bounce",
    "spamreport": "spamreport",
    "unsubscribe": "unsubscribe",
    "group_unsubscribe": "unsubscribe",
}
# ``dropped`` reasons (lower-cased prefixes) that are about the address, and the suppression reason.
DROP_SUPPRESSION = (
    ("bounced address", "dropped"),
    ("invalid address", "dropped"),
    ("invalid email", "dropped"),
    ("unsubscribed address", "unsubscribe"),
    ("spam reporting address", "spamreport"),
)


# --------------------------------------------------------------------------- parsing


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


# --------------------------------------------------------------------------- storing


def _match(session: Session, keys: set[str], provider_ids: set[str]) -> tuple[dict, dict]:
    """({message_key: (id, workspace_id)}, {provider_message_id: (id, workspace_id, message_key)})."""
    by_key: dict[str, tuple[int, int]] = {}
    by_provider: dict[str, tuple[int, int, str]] = {}
    if keys:
        for mid, ws, key in session.execute(
            select(Message.id, Message.workspace_id, Message.message_key).where(
                one_of(session, Message.message_key, sorted(keys))
            )
        ):
            by_key[key] = (mid, ws)
    if provider_ids:
        for mid, ws, key, pid in session.execute(
            select(Message.id, Message.workspace_id, Message.message_key, Message.provider_message_id)
            .where(one_of(session, Message.provider_message_id, sorted(provider_ids)))
            .order_by(Message.id)
        ):
            by_provider.setdefault(pid, (mid, ws, key))
    return by_key, by_provider


def map_rows(session: Session, rows: list[dict]) -> int:
    """Fill ``message_id``/``workspace_id`` (and ``message_key``) of rows; returns how many matched."""
    keys = {r["message_key"] for r in rows if r["message_key"]}
    by_key, _ = _match(session, keys, set())
    rest = []
    for r in rows:
        hit = by_key.get(r["message_key"]) if r["message_key"] else None
        if hit:
            r["message_id"], r["workspace_id"] = hit
        else:
            rest.append(r)
    pids = {p for p in (provider_id_of(r["sg_message_id"]) for r in rest) if p}
    if pids:
        _, by_provider = _match(session, set(), pids)
        for r in rest:
            hit = by_provider.get(provider_id_of(r["sg_message_id"]) or "")
            if hit:
                r["message_id"], r["workspace_id"], key = hit
                r["message_key"] = r["message_key"] or key
    return sum(1 for r in rows if r["message_id"])


# PostgreSQL: one statement maps and inserts the whole batch. The rows' columns travel as one JSON
# array of arrays (cheaper to send and split than one array parameter per column); messages are
# found by message_key, else by the X-Message-Id prefix of sg_message_id.
_PG_INSERT_SQL = """
    INSERT INTO events (workspace_id, message_id, message_key, dedupe_key, sg_event_id, sg_message_id,
                        event, email, "timestamp", url, payload, received_at)
    SELECT COALESCE(m.workspace_id, m2.workspace_id), COALESCE(m.id, m2.id), COALESCE(e.message_key, m2.message_key),
           e.dedupe_key, e.sg_event_id, e.sg_message_id, e.event, e.email, e.ts, e.url, {payload}, :received_at
    FROM (
        SELECT r.n, r.x->>0 AS message_key, r.x->>1 AS dedupe_key, r.x->>2 AS sg_event_id,
               r.x->>3 AS sg_message_id, r.x->>4 AS event, r.x->>5 AS email, CAST(r.x->>6 AS timestamp) AS ts,
               r.x->>7 AS url, r.x->8 AS payload
        FROM json_array_elements(CAST(:rows AS json)) WITH ORDINALITY AS r(x, n)
    ) e
    {join}
    LEFT JOIN messages m ON m.message_key = e.message_key
    LEFT JOIN LATERAL (
        SELECT x.id, x.workspace_id, x.message_key FROM messages x
        WHERE m.id IS NULL AND x.provider_message_id = split_part(e.sg_message_id, '.', 1)
        ORDER BY x.id LIMIT 1
    ) m2 ON true
    ORDER BY e.n
    ON CONFLICT DO NOTHING
"""
# The payloads are the elements of the body itself, split by PostgreSQL's JSON parser, rather
# than sent a second time.
_PG_INSERT_FROM_BODY = text(_PG_INSERT_SQL.format(
    payload="p.payload",
    join="JOIN json_array_elements(CAST(:body AS json)) WITH ORDINALITY AS p(payload, n) ON p.n = e.n"))
_PG_INSERT = text(_PG_INSERT_SQL.format(payload="e.payload", join=""))


def _body_text(body: bytes | None) -> str | None:
    """The body as text PostgreSQL's json type reads exactly as Python did, or None."""
    if not body or body.startswith(b"\xef\xbb\xbf"):
        return None
    try:
        return body.decode("utf-8")  # strict: Python's own parse allowed surrogates and other encodings
    except UnicodeDecodeError:
        return None


def insert_rows(session: Session, rows: list[dict], body: bytes | None = None) -> int:
    """One bulk INSERT ... ON CONFLICT DO NOTHING; returns how many rows were new.

    On PostgreSQL the statement also maps each row to its message. On SQLite the rows must be
    mapped already (:func:`map_rows`). ``body``, when given, is the raw JSON array the rows were
    parsed from (same order): PostgreSQL then takes the payloads from it directly.
    """
    if not rows:
        return 0
    if is_postgres(session):
        text_body = _body_text(body)
        data = [
            [r["message_key"], r["dedupe_key"], r["sg_event_id"], r["sg_message_id"], r["event"], r["email"],
             r["timestamp"].isoformat() if r["timestamp"] else None, r["url"]]
            + ([] if text_body is not None else [r["payload"]])
            for r in rows
        ]
        # ensure_ascii: every string an escape PostgreSQL decodes (the columns are cleaned of NUL
        # and lone surrogates; a payload may hold them, and json keeps them as written).
        params = {"received_at": rows[0]["received_at"], "rows": json.dumps(data, separators=(",", ":"))}
        if text_body is not None:
            params["body"] = text_body
            return session.execute(_PG_INSERT_FROM_BODY, params).rowcount or 0
        return session.execute(_PG_INSERT, params).rowcount or 0
    stmt = sqlite.insert(Event.__table__).on_conflict_do_nothing()
    before = session.execute(text("SELECT total_changes()")).scalar_one()
    session.execute(stmt, rows)
    return session.execute(text("SELECT total_changes()")).scalar_one() - before


def store_batch(session: Session, rows: list[dict], body: bytes | None = None) -> int:
    """Map the rows to messages and insert them (deduplicated), in one statement on PostgreSQL.
    The caller commits. ``body``: the raw JSON array the rows came from, if at hand and only when
    its elements are the rows one for one (none skipped by :func:`parse_batch`)."""
    if not rows:
        return 0
    if not is_postgres(session):
        map_rows(session, rows)
    return insert_rows(session, rows, body)


# --------------------------------------------------------------------------- applying


def suppression_reason(kind: str, payload: dict) -> str | None:
    """The suppression reason an event implies for its address, or None."""
    if kind == "bounce":
        return None if str(payload.get("type") or "").lower() == "blocked" else "bounce"
    if kind == "dropped":
        reason = str(payload.get("reason") or "").strip().lower()
        if reason == "invalid":
            return "dropped"
        for prefix, why in DROP_SUPPRESSION:
            if reason.startswith(prefix):
                return why
        return None
    return SUPPRESSING.get(kind)


def _workspace_arg(payload: dict) -> int | None:
    raw = payload.get("herald_workspace")
    try:
        value = int(raw) if isinstance(raw, str | int) and not isinstance(raw, bool) else None
    except ValueError:
        return None
    return value if value and 0 < value < 2**63 else None


@dataclass
class ProcessReport:
    events: int = 0
    batches: int = 0
    settled: int = 0
    suppressed: int = 0
    stopped: int = 0
    failed: int = 0  # events that could not be applied (logged, marked processed)
    more: bool = False  # stopped at the time budget with work left
    wake_at: datetime | None = None  # the earliest next step that settling scheduled

    def wake(self, at: datetime | None) -> None:
        if at is not None:
            self.wake_at = at if self.wake_at is None else min(self.wake_at, at)


def _message_update():
    """One UPDATE for every touched message, run as an executemany (SQLite).

    First-seen columns are COALESCEd (set once, never cleared); the status moves only to a
    higher rank, decided in SQL against the row's current status.
    """
    t = Message.__table__
    current = case(dict(RANK), value=t.c.status, else_=99)
    values = {col: func.coalesce(t.c[col], bindparam(f"b_{col}", type_=DateTime())) for col in _STAMPS}
    values["status"] = case(
        (bindparam("b_rank", type_=Integer()) > current, bindparam("b_status", type_=String())),
        else_=t.c.status,
    )
    values["updated_at"] = bindparam("b_now", type_=DateTime())
    return update(t).where(t.c.id == bindparam("b_id")).values(**values)


_STAMPS = ("sent_at", *sorted(set(FIRST_SEEN.values())))
_RANK_SQL = " ".join(f"WHEN '{k}' THEN {v}" for k, v in RANK.items())
# The same as _message_update, as one statement over arrays (PostgreSQL).
_PG_MESSAGE_UPDATE = text(
    "UPDATE messages AS m SET "
    + ", ".join(f"{c} = COALESCE(m.{c}, v.{c})" for c in _STAMPS)
    + f", status = CASE WHEN v.rank > (CASE m.status {_RANK_SQL} ELSE 99 END) THEN v.status ELSE m.status END"
    + ", updated_at = :now FROM unnest(CAST(:id AS bigint[]), "
    + ", ".join(f"CAST(:{c} AS timestamp[])" for c in _STAMPS)
    + ", CAST(:rank AS int[]), CAST(:status AS text[])) AS v(id, "
    + ", ".join(_STAMPS)
    + ", rank, status) WHERE m.id = v.id"
)


def _update_messages(s: Session, firsts: dict[int, dict[str, datetime]], target: dict[int, tuple[int, str]],
                     now: datetime) -> None:
    ids = sorted(firsts)
    if is_postgres(s):
        params = {"id": ids, "now": now,
                  "rank": [target.get(i, (0, ""))[0] for i in ids],
                  "status": [target.get(i, (0, ""))[1] for i in ids]}
        params.update({c: [firsts[i].get(c) for i in ids] for c in _STAMPS})
        s.execute(_PG_MESSAGE_UPDATE, params)
        return
    params = []
    for mid in ids:
        rank, status = target.get(mid, (0, ""))
        row = {"b_id": mid, "b_rank": rank, "b_status": status, "b_now": now}
        row.update({f"b_{c}": firsts[mid].get(c) for c in _STAMPS})
        params.append(row)
    s.execute(_message_update(), params)


def _advance_settled(s: Session, message_ids: list[int], now: datetime, report: ProcessReport) -> None:
    """Schedule the next step of sequences whose message was just settled as sent.

    ``engine.settle_ambiguous`` only changes the status; the engine schedules a sequence's next
    email when it records a 202 (``engine._advance``, idempotent: one message per step), so a
    message settled by an event needs the same, or its sequence would stall.
    """
    report.wake(engine._advance(s, message_ids, now))
    if s.info.pop("herald_completed", False):  # the engine's flag: a sequence finished
        for cid in sorted(set(s.scalars(select(Message.campaign_id).where(Message.id.in_(message_ids))))):
            engine.maybe_complete(s, cid)


# The processor reads the payload only where it decides something (bounce type, drop reason,
# machine opens, the workspace of an unmatched suppressing event): loading every payload as a
# dict would cost more than the rest of a batch.
_PAYLOAD_NEEDED = or_(
    Event.event.in_(("bounce", "dropped", "open")),
    and_(Event.message_id.is_(None), Event.event.in_(tuple(SUPPRESSING))),
)


def process_batch(s: Session, report: ProcessReport, limit: int = BATCH, only_id: int | None = None) -> int:
    """Apply the oldest ``limit`` unprocessed events (or the one ``only_id``) and mark them
    processed. The caller commits."""
    stmt = (
        select(Event.id, Event.workspace_id, Event.message_id, Event.message_key, Event.sg_message_id,
               Event.event, Event.email, Event.timestamp, Event.received_at,
               case((_PAYLOAD_NEEDED, Event.payload), else_=null()).label("payload"))
        .where(Event.processed_at.is_(None))
        .order_by(Event.id)
        .limit(limit)
    )
    if only_id is not None:
        stmt = stmt.where(Event.id == only_id)
    if is_postgres(s):
        stmt = stmt.with_for_update(of=Event.__table__, skip_locked=True)
    events = [r._asdict() for r in s.execute(stmt)]
    if not events:
        return 0
    now = utcnow()

    # Events stored before their message's provider id was recorded: map them again.
    unmatched = [e for e in events if e["message_id"] is None]
    if unmatched and map_rows(s, unmatched):
        remapped = [{"b_id": e["id"], "b_mid": e["message_id"], "b_ws": e["workspace_id"], "b_key": e["message_key"]}
                    for e in unmatched if e["message_id"]]
        t = Event.__table__
        s.execute(
            update(t).where(t.c.id == bindparam("b_id"))
            .values(message_id=bindparam("b_mid"), workspace_id=bindparam("b_ws"), message_key=bindparam("b_key")),
            remapped,
        )

    mids = sorted({e["message_id"] for e in events if e["message_id"]})
    messages = {}
    if mids:
        messages = {
            m.id: m
            for m in s.execute(
                select(Message.id, Message.status, Message.workspace_id, Message.campaign_id,
                       Message.enrollment_id, Message.email, Message.attempts, Message.sent_at)
                .where(one_of(s, Message.id, mids))
            )
        }
    stop_on = {}
    if messages:
        cids = sorted({m.campaign_id for m in messages.values()})
        stop_on = {cid: (so if so is not None else ["reply"])
                   for cid, so in s.execute(select(Campaign.id, Campaign.stop_on).where(Campaign.id.in_(cids)))}

    # Any event proves the provider has the message: settle it, never resend, move the sequence on.
    settled = [m.id for m in messages.values()
               if m.status in ("ambiguous", "sending", "scheduled", "queued") and engine.settle_ambiguous(s, [m.id])]
    if settled:
        report.settled += len(settled)
        _advance_settled(s, settled, now, report)

    firsts: dict[int, dict[str, datetime]] = defaultdict(dict)
    target: dict[int, tuple[int, str]] = {}
    stops: dict[str, set[int]] = defaultdict(set)
    to_suppress: dict[tuple[int, str], set[str]] = defaultdict(set)
    for e in events:
        kind = e["event"]
        payload = e["payload"] if isinstance(e["payload"], dict) else {}
        at = e["timestamp"] or e["received_at"] or now
        m = messages.get(e["message_id"])
        # A message never handed to the provider cannot have events: the event names it wrongly.
        if m is not None and (m.attempts or m.sent_at is not None or m.status in ("sending", "ambiguous")):
            seen = firsts[m.id]
            for col in ("sent_at", FIRST_SEEN.get(kind)):
                if col and (col not in seen or at < seen[col]):
                    seen[col] = at
            status = STATUS_FOR.get(kind)
            if status and (m.id not in target or RANK[status] > target[m.id][0]):
                target[m.id] = (RANK[status], status)
            if kind in ("open", "click") and m.enrollment_id and kind in stop_on.get(m.campaign_id, ()):
                if not (kind == "open" and payload.get("sg_machine_open") is True):
                    stops[kind].add(m.enrollment_id)
        reason = suppression_reason(kind, payload)
        if reason:
            ws = m.workspace_id if m is not None else (e["workspace_id"] or _workspace_arg(payload))
            email = m.email if m is not None else e["email"]
            if ws and email:
                to_suppress[(ws, reason)].add(email.strip().lower())

    if firsts:
        _update_messages(s, firsts, target, now)
    if to_suppress:
        workspaces = {ws for ws, _ in to_suppress}
        known = set(s.scalars(select(Workspace.id).where(Workspace.id.in_(sorted(workspaces)))))
        for (ws, reason), emails in sorted(to_suppress.items()):
            if ws in known:
                report.suppressed += suppress(s, ws, sorted(emails), reason)
    for reason, enrollment_ids in stops.items():
        report.stopped += stop_enrollments(s, sorted(enrollment_ids), reason)

    _mark_processed(s, [e["id"] for e in events], now)
    report.events += len(events)
    report.batches += 1
    return len(events)


def _mark_processed(s: Session, ids: list[int], now: datetime) -> None:
    s.execute(update(Event.__table__).where(one_of(s, Event.__table__.c.id, ids)).values(processed_at=now))


def _one_by_one(Session_, report: ProcessReport, limit: int) -> int:
    """A batch failed on its data: apply its events one at a time; one that fails alone is marked
    processed and logged, so a single bad event never blocks the ones behind it."""
    with Session_() as s:
        ids = s.scalars(select(Event.id).where(Event.processed_at.is_(None)).order_by(Event.id).limit(limit)).all()
    for event_id in ids:
        try:
            with Session_() as s, s.begin():
                process_batch(s, report, 1, only_id=event_id)
        except TRANSIENT_ERRORS:  # says nothing about the events: the batch is retried as it is
            raise
        except Exception:  # noqa: BLE001 - logged with its id; the event stays stored
            log.exception("event %s could not be applied; marked processed without effect", event_id)
            with Session_() as s, s.begin():
                _mark_processed(s, [event_id], utcnow())
            report.failed += 1
    return len(ids)


def process_pending(owner: str | None = None, batch_size: int = BATCH, budget_seconds: float = 20.0,
                    ) -> ProcessReport | None:
    """Apply unprocessed events, oldest first, in batches, under the ``events`` lease.

    One processor at a time (so events are applied in order and batches do not contend for the
    same message rows). A caller that finds the lease held asks the holder to run once more and
    returns None, so no event waits for the next sweep. Stops after ``budget_seconds`` with
    ``more`` set when work is left, so the task can queue itself again rather than hold a worker.
    A database that is unavailable raises (the task retries); a batch that fails on its data
    is applied event by event (:func:`_one_by_one`).
    """
    Session_ = session_factory()
    owner = owner or engine.worker_id()
    if not leases.acquire(Session_, LEASE, owner, ttl=LEASE_TTL):
        if leases.request_rerun(Session_, LEASE) or not leases.acquire(Session_, LEASE, owner, ttl=LEASE_TTL):
            return None
    report = ProcessReport()
    started = time.monotonic()
    try:
        while True:
            while True:
                try:
                    with Session_() as s, s.begin():
                        n = process_batch(s, report, batch_size)
                except TRANSIENT_ERRORS:  # says nothing about the events: the batch is retried as it is
                    raise
                except Exception:  # noqa: BLE001
                    log.exception("a batch of events failed; applying them one by one")
                    n = _one_by_one(Session_, report, batch_size)
                if n < batch_size:
                    break
                if time.monotonic() - started > budget_seconds:
                    report.more = True
                    break
                leases.acquire(Session_, LEASE, owner, ttl=LEASE_TTL)
            if report.more:
                _let_go(Session_, owner)
                return report
            if leases.release(Session_, LEASE, owner):
                return report
            # Someone asked for another run while we worked: go round again.
    except BaseException:
        _let_go(Session_, owner)
        raise


def _let_go(Session_, owner: str) -> None:
    # release() keeps the lease when a rerun was requested (and clears the request): a second
    # call then lets it go.
    if not leases.release(Session_, LEASE, owner):
        leases.release(Session_, LEASE, owner)


def pending_count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Event).where(Event.processed_at.is_(None))) or 0
