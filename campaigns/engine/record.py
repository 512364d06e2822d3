"""Recording send outcomes: one transaction per group of outcomes (sent, retried, failed,
ambiguous, released), attempt rows, dead letters, and pausing a campaign that keeps failing."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache

from sqlalchemy import and_, bindparam, case, func, select, text, type_coerce, update
from sqlalchemy.orm import Session

from ..config import get_settings
from ..db import is_postgres, retry_transient, session_factory, utcnow
from ..models import Campaign, Enrollment, Message, MessageAttempt
from .common import _M, Hooks, _id_match, _not_by_index, log
from .ledger import _retire_unsendable
from .planning import backoff_delay
from .sequence import _ADVANCE_COLUMNS, _advance_rows

CONSECUTIVE_FAILURES_PAUSE = 20
RESET_SPREAD = 1.0  # seconds over which messages a 429 pushed back come due again


@dataclass
class Outcome:
    message_id: int
    campaign_id: int
    workspace_id: int
    kind: str  # sent | retry | rate_limited | failed | account | ambiguous | skipped | released
    started: datetime
    finished: datetime
    status: int | None = None
    error: str | None = None
    body: str | None = None
    provider_id: str | None = None
    retry_at: datetime | None = None
    attempt: int = 0


@lru_cache(maxsize=4)
def _release_stmt(pg: bool):
    return (
        update(_M)
        .where(_id_match(_M.c.id, pg), _not_by_index(_M.c.status).in_(("sending", "ambiguous")),
               _M.c.lease_owner == bindparam("owner"))
        .values(status="scheduled", queued_at=None, lease_owner=None, lease_expires_at=None,
                attempts=_M.c.attempts - 1)
    )


# The flush's statements on PostgreSQL take their rows as one JSON parameter: one string to
# send, where arrays of timestamps and texts cost psycopg a Python-level dump per element
# (measured: recording flushes of 20 sends, 0.104-0.121 -> 0.091-0.096 ms CPU per email).
_PG_RECORD_SENT = text(
    "UPDATE messages AS m SET status = 'sent', sent_at = COALESCE(m.sent_at, v.sent_at), provider_message_id = v.pid,"
    " lease_owner = NULL, lease_expires_at = NULL, last_error = NULL, ambiguous_at = NULL, updated_at = :now"
    " FROM json_to_recordset(CAST(:rows AS json)) AS v(id bigint, sent_at timestamp, pid text)"
    # The ids twice: as an array the planner sees the row count (a record set counts as 100 rows,
    # which made a hash join over a sequential scan of messages look cheaper); the status check
    # stays off its index (_not_by_index).
    " WHERE m.id = ANY(CAST(:ids AS bigint[])) AND m.id = v.id AND (m.status || '') IN ('sending', 'ambiguous')"
    " RETURNING m.id, m.enrollment_id, m.campaign_id, m.step_id, m.workspace_id, m.contact_id, m.email, m.sent_at"
)


_ATTEMPT_COLUMNS = {"workspace_id": "bigint", "campaign_id": "bigint", "message_id": "bigint", "number": "int",
                    "started_at": "timestamp", "finished_at": "timestamp", "duration_ms": "float8",
                    "outcome": "text", "http_status": "int", "error": "text", "retry_at": "timestamp"}


_PG_INSERT_ATTEMPTS = text(
    f"INSERT INTO message_attempts ({', '.join(_ATTEMPT_COLUMNS)}) SELECT {', '.join(_ATTEMPT_COLUMNS)}"
    " FROM json_to_recordset(CAST(:rows AS json)) AS v("
    + ", ".join(f"{c} {t}" for c, t in _ATTEMPT_COLUMNS.items()) + ")"
)


def _json_rows(rows: list[dict]) -> str:
    return json.dumps([{k: v.isoformat() if isinstance(v, datetime) else v for k, v in r.items()} for r in rows])


def _insert_attempts(s: Session, rows: list[dict]) -> None:
    if is_postgres(s):
        s.connection().execute(_PG_INSERT_ATTEMPTS, {"rows": _json_rows(rows)})
    else:
        s.connection().execute(MessageAttempt.__table__.insert(), rows)


def _outcome(r, kind: str, started: datetime | None = None, **extra) -> Outcome:
    t = started or utcnow()
    return Outcome(message_id=r.id, campaign_id=r.campaign_id, workspace_id=r.workspace_id, kind=kind,
                   started=t, finished=t, attempt=r.attempts, **extra)


def _record(outcomes: list[Outcome], hooks: Hooks, owner: str, counts: dict) -> set[int]:
    """Record a group of outcomes in one transaction and advance the sequences that sent.

    The outcomes exist only in this process until they are recorded: a sent message left
    unrecorded would become ambiguous and, with no event to settle it, be sent again. So a
    database that stops answering (a restart, a failover) is waited for, up to the lease.

    Returns the campaigns that may have finished (a sequence completed or failed): the caller
    checks them once its batch is done (``maybe_complete``; the reconciler checks them too).
    """
    finished, wake_at = retry_transient(lambda n: _record_once(outcomes, owner, again=n > 0),
                                        "recording send outcomes", get_settings().lease_seconds)
    for o in outcomes:
        counts[o.kind] += 1
    if wake_at is not None:
        hooks.wake_dispatcher(wake_at)
    return finished


def _new_attempts(s: Session, attempts: list[dict]) -> list[dict]:
    """The attempt rows not stored yet: after a try whose COMMIT went through unanswered."""
    stored = set(s.execute(
        select(MessageAttempt.message_id, MessageAttempt.number, MessageAttempt.started_at)
        .where(MessageAttempt.message_id.in_(sorted({a["message_id"] for a in attempts})))).all())
    return [a for a in attempts if (a["message_id"], a["number"], a["started_at"]) not in stored]


def _record_once(outcomes: list[Outcome], owner: str, again: bool = False) -> tuple[set[int], datetime | None]:
    """One try of ``_record``: the campaigns that may have finished, and when to wake the
    dispatcher. Safe to run again: each change is conditional on the message still being in
    flight, and ``again`` keeps attempt rows a lost answer hid from being stored twice."""
    now = utcnow()
    t = _Tally()
    with session_factory()() as s, s.begin():
        released = [o.message_id for o in outcomes if o.kind == "released"]
        attempts = [_attempt_row(o) for o in outcomes if o.kind != "released"]
        for o in outcomes:
            if o.kind not in ("released", "sent"):
                _apply(s, o, now, t)
        if released:  # handed back unspent: the dispatcher queues them again
            s.connection().execute(_release_stmt(is_postgres(s)), {"ids": released, "owner": owner})
        # Back to scheduled (released, retried, rate-limited, account pause) but stopped, suppressed
        # or cancelled meanwhile: cancelled now, or they would wait for ever.
        back = released + [o.message_id for o in outcomes if o.kind in ("retry", "rate_limited", "account")]
        t.finished |= _retire_unsendable(s, back)
        sent = [o for o in outcomes if o.kind == "sent"]
        if sent:
            t.wake(_record_sent(s, sent, now))
        if attempts and again:
            attempts = _new_attempts(s, attempts)
        if attempts:
            _insert_attempts(s, attempts)
        _pause_failing(s, outcomes, t.pause)
        # Only a completed or failed sequence can finish a campaign.
        if s.info.pop("herald_completed", False):
            t.finished |= {o.campaign_id for o in sent}
    return t.finished, t.wake_at


@dataclass
class _Tally:
    """What a recording found: campaigns that may have finished, campaigns to pause (and why),
    and the earliest time work it put back falls due."""

    finished: set[int] = field(default_factory=set)
    pause: dict[int, str] = field(default_factory=dict)
    wake_at: datetime | None = None

    def wake(self, at: datetime | None) -> None:
        if at is not None:
            self.wake_at = at if self.wake_at is None else min(self.wake_at, at)


def _attempt_row(o: Outcome) -> dict:
    return dict(
        workspace_id=o.workspace_id, campaign_id=o.campaign_id, message_id=o.message_id,
        number=o.attempt, started_at=o.started, finished_at=o.finished,
        duration_ms=(o.finished - o.started).total_seconds() * 1000.0,
        outcome=o.kind, http_status=o.status, error=(o.error or None) and o.error[:2000],
        retry_at=o.retry_at,
    )


def _apply(s: Session, o: Outcome, now: datetime, t: _Tally) -> None:
    """Record one outcome other than sent or released (those are recorded together)."""
    if o.kind in ("retry", "rate_limited"):
        row = s.get(Message, o.message_id)
        if row is None or row.status not in ("sending", "ambiguous"):
            return
        if o.kind == "rate_limited":
            # Provider pushback is not a failure of this message: no attempt spent.
            row.attempts = max(0, row.attempts - 1)
            due = o.retry_at or (now + timedelta(seconds=1))
            due = max(due, now) + timedelta(seconds=random.uniform(0, RESET_SPREAD))  # no herd at the reset
        elif row.attempts >= row.max_attempts:
            _fail(s, row, o, now)
            t.finished.add(o.campaign_id)
            return
        else:
            due = now + timedelta(seconds=backoff_delay(row.attempts))
        row.status = "scheduled"
        row.due_at = due
        row.queued_at = None
        row.lease_owner = None
        row.lease_expires_at = None
        row.last_error = o.error
        row.last_response = o.body
        row.updated_at = now
        t.wake(due)
    elif o.kind == "failed":
        row = s.get(Message, o.message_id)
        if row is not None and row.status in ("sending", "ambiguous"):
            _fail(s, row, o, now)
            t.finished.add(o.campaign_id)
    elif o.kind == "account":
        s.execute(
            update(Message).where(_mine(o))
            .values(status="scheduled", queued_at=None, lease_owner=None, lease_expires_at=None,
                    attempts=Message.attempts - 1, last_error=o.error, last_response=o.body)
        )
        t.pause[o.campaign_id] = f"the provider refused the account: {o.error}"
    elif o.kind == "ambiguous":
        s.execute(
            update(Message).where(_mine(o))
            .values(status="ambiguous", ambiguous_at=now, lease_owner=None, lease_expires_at=None,
                    last_error=o.error, updated_at=now)
        )


def _pause_failing(s: Session, outcomes: list[Outcome], pause: dict[int, str]) -> None:
    """Pause the running campaigns the provider refused the account for, or whose last
    CONSECUTIVE_FAILURES_PAUSE attempts all failed; their queued work goes back to the ledger."""
    failing = {o.campaign_id for o in outcomes if o.kind in ("retry", "failed", "ambiguous")}
    for cid in failing - set(pause):
        recent = s.scalars(
            select(MessageAttempt.outcome).where(MessageAttempt.campaign_id == cid)
            .order_by(MessageAttempt.id.desc()).limit(CONSECUTIVE_FAILURES_PAUSE)
        ).all()
        if len(recent) >= CONSECUTIVE_FAILURES_PAUSE and all(x in ("retry", "failed", "ambiguous") for x in recent):
            pause[cid] = f"{CONSECUTIVE_FAILURES_PAUSE} consecutive send failures; last: " + (
                next((o.error for o in outcomes if o.campaign_id == cid and o.error), "") or "")[:300]
    for cid, reason in pause.items():
        c = s.get(Campaign, cid)
        if c is not None and c.status == "running":
            c.status = "paused"
            c.status_reason = reason
            s.execute(
                update(Message)
                .where(Message.campaign_id == cid, Message.status == "queued", Message.is_test.is_(False))
                .values(status="scheduled", queued_at=None)
            )
            log.warning("campaign %s paused: %s", cid, reason)


def _mine(o: Outcome):
    """The outcome's message, while it is still this send's to record."""
    return and_(Message.id == o.message_id, Message.status.in_(("sending", "ambiguous")))


def _fail(s: Session, row: Message, o: Outcome, now: datetime) -> None:
    """The dead letter: kept with its error, attempts and last response, until replayed or deleted."""
    row.status = "failed"
    row.failed_at = now
    row.last_error = o.error
    row.last_response = o.body
    row.lease_owner = None
    row.lease_expires_at = None
    row.updated_at = now
    if row.enrollment_id is not None:
        s.execute(
            update(Enrollment)
            .where(Enrollment.id == row.enrollment_id, Enrollment.status == "active")
            .values(status="failed", stopped_reason="send failed", finished_at=now)
        )


def _record_sent(s: Session, sent: list[Outcome], now: datetime) -> datetime | None:
    """Mark accepted messages sent (one UPDATE) and advance their sequences; the earliest next due.

    A 202 is authoritative even if the lease ran out meanwhile and the message was marked
    ambiguous: it was sent. The UPDATE locks each row and re-checks its status, so a
    concurrent settle cannot interleave.
    """
    if is_postgres(s):
        values = [{"id": o.message_id, "sent_at": o.finished, "pid": o.provider_id} for o in sent]
        rows = s.connection().execute(_PG_RECORD_SENT, {
            "now": now, "ids": [o.message_id for o in sent], "rows": _json_rows(values)}).all()
        return _advance_rows(s, [r for r in rows if r.enrollment_id is not None], now, active_checked=False)
    sent_at = case({o.message_id: o.finished for o in sent}, value=_M.c.id)
    provider_id = case({o.message_id: o.provider_id for o in sent}, value=_M.c.id)
    rows = s.connection().execute(
        update(_M)
        .where(_M.c.id.in_([o.message_id for o in sent]), _not_by_index(_M.c.status).in_(("sending", "ambiguous")))
        .values(status="sent", sent_at=func.coalesce(_M.c.sent_at, type_coerce(sent_at, _M.c.sent_at.type)),
                provider_message_id=type_coerce(provider_id, _M.c.provider_message_id.type), lease_owner=None,
                lease_expires_at=None, last_error=None, ambiguous_at=None, updated_at=now)
        .returning(*_ADVANCE_COLUMNS)
    ).all()
    return _advance_rows(s, [r for r in rows if r.enrollment_id is not None], now, active_checked=False)
