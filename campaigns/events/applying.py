"""Applying stored events to messages, suppressions and sequences, under the ``events`` lease."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import DateTime, Integer, String, and_, bindparam, case, func, null, or_, select, text, update
from sqlalchemy.orm import Session

from .. import engine, leases
from ..db import TRANSIENT_ERRORS, is_postgres, one_of, session_factory, utcnow
from ..ids import valid_id
from ..models import Campaign, Event, Message, Workspace
from ..sequences import stop_enrollments
from ..suppressions import suppress
from .storing import map_rows

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
    return value if valid_id(value) else None


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
    events = _claim(s, limit, only_id)
    if not events:
        return 0
    now = utcnow()
    _remap(s, events)
    messages, stop_on = _load_messages(s, events)
    _settle(s, messages, now, report)
    effects = _Effects()
    for e in events:
        effects.add(e, messages.get(e["message_id"]), stop_on, now)
    effects.apply(s, now, report)
    _mark_processed(s, [e["id"] for e in events], now)
    report.events += len(events)
    report.batches += 1
    return len(events)


def _claim(s: Session, limit: int, only_id: int | None) -> list[dict]:
    """The oldest ``limit`` unprocessed events (skipping rows another processor has locked)."""
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
    return [r._asdict() for r in s.execute(stmt)]


def _remap(s: Session, events: list[dict]) -> None:
    """Events stored before their message's provider id was recorded: map them again."""
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


def _load_messages(s: Session, events: list[dict]) -> tuple[dict, dict]:
    """The events' messages by id, and each of their campaigns' ``stop_on`` events."""
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
    return messages, stop_on


def _settle(s: Session, messages: dict, now: datetime, report: ProcessReport) -> None:
    """Any event proves the provider has the message: settle it, never resend, move the sequence on."""
    settled = [m.id for m in messages.values()
               if m.status in ("ambiguous", "sending", "scheduled", "queued") and engine.settle_ambiguous(s, [m.id])]
    if settled:
        report.settled += len(settled)
        _advance_settled(s, settled, now, report)


@dataclass
class _Effects:
    """What a batch of events does, gathered event by event, then applied set-based."""

    firsts: dict[int, dict[str, datetime]] = field(default_factory=lambda: defaultdict(dict))
    target: dict[int, tuple[int, str]] = field(default_factory=dict)
    stops: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    to_suppress: dict[tuple[int, str], set[str]] = field(default_factory=lambda: defaultdict(set))

    def add(self, e: dict, m, stop_on: dict, now: datetime) -> None:
        kind = e["event"]
        payload = e["payload"] if isinstance(e["payload"], dict) else {}
        at = e["timestamp"] or e["received_at"] or now
        # A message never handed to the provider cannot have events: the event names it wrongly.
        if m is not None and (m.attempts or m.sent_at is not None or m.status in ("sending", "ambiguous")):
            seen = self.firsts[m.id]
            for col in ("sent_at", FIRST_SEEN.get(kind)):
                if col and (col not in seen or at < seen[col]):
                    seen[col] = at
            status = STATUS_FOR.get(kind)
            if status and (m.id not in self.target or RANK[status] > self.target[m.id][0]):
                self.target[m.id] = (RANK[status], status)
            if kind in ("open", "click") and m.enrollment_id and kind in stop_on.get(m.campaign_id, ()):
                if not (kind == "open" and payload.get("sg_machine_open") is True):
                    self.stops[kind].add(m.enrollment_id)
        reason = suppression_reason(kind, payload)
        if reason:
            ws = m.workspace_id if m is not None else (e["workspace_id"] or _workspace_arg(payload))
            email = m.email if m is not None else e["email"]
            if ws and email:
                self.to_suppress[(ws, reason)].add(email.strip().lower())

    def apply(self, s: Session, now: datetime, report: ProcessReport) -> None:
        if self.firsts:
            _update_messages(s, self.firsts, self.target, now)
        if self.to_suppress:
            workspaces = {ws for ws, _ in self.to_suppress}
            known = set(s.scalars(select(Workspace.id).where(Workspace.id.in_(sorted(workspaces)))))
            for (ws, reason), emails in sorted(self.to_suppress.items()):
                if ws in known:
                    report.suppressed += suppress(s, ws, sorted(emails), reason)
        for reason, enrollment_ids in self.stops.items():
            report.stopped += stop_enrollments(s, sorted(enrollment_ids), reason)


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
        except Exception:  # logged with its id; the event stays stored
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
                except Exception:
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
