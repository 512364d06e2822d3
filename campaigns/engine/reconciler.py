"""The reconciler: the safety net that runs every minute under a lease, one sweep per kind of
work left behind (docs/architecture.md, "Reconciliation")."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import exists, func, literal, select, update
from sqlalchemy.orm import Session

from .. import leases
from ..completion import maybe_complete
from ..config import get_settings
from ..counters import add_totals
from ..db import session_factory, utcnow
from ..models import Campaign, Event, JobLock, Message
from .common import TEST_PRIORITY, Hooks, worker_id
from .dispatch import _next_due
from .enrollment import fanout, fanout_lease
from .ledger import _retire_unsendable


def stale_queued() -> timedelta:
    """Queued this long without a send task claiming it: the queue store lost the task."""
    return timedelta(seconds=get_settings().stale_queued_seconds)  # HERALD_STALE_QUEUED_SECONDS


DUE_NOW_CAP = 10000
RECONCILER_LEASE = 300  # seconds: far longer than a sweep takes; released at its end
SWEEP_OVERLAP = timedelta(minutes=5)  # members added this long before the last sweep are looked at again


@dataclass
class ReconcileReport:
    ambiguous_marked: int = 0
    requeued_stale: int = 0
    resent_ambiguous: int = 0
    settled_ambiguous: int = 0
    enrolled: int = 0
    completed: int = 0
    due_now: int = 0  # at most DUE_NOW_CAP


def reconcile(hooks: Hooks, owner: str | None = None) -> ReconcileReport | None:
    """The safety net, run every minute under a lease so it never overlaps itself; one sweep each:

    - ``sending`` whose lease ran out (the consumer died mid-call): ``ambiguous``;
    - ``queued`` for too long (the Redis task was lost): ``scheduled`` again;
    - ``ambiguous`` past the window with no event carrying its key: ``scheduled`` again (same key);
      with such an event: ``sent``;
    - running campaigns: enroll list members added since the last sweep; finish fan-outs that died;
    - mark finished campaigns completed;
    - wake the dispatcher when work is due.
    """
    owner = owner or worker_id()
    Session_ = session_factory()
    if not leases.acquire(Session_, "reconciler", owner, ttl=RECONCILER_LEASE):
        return None
    report = ReconcileReport()
    try:
        now = utcnow()
        with Session_() as s, s.begin():
            _expired_leases(s, now, report)
            tests = _lost_queued_work(s, now, report)
            _ambiguous_settlement(s, now, report)
            tests += _waiting_test_sends(s, now)
        for mid in tests:
            hooks.enqueue_send([mid], TEST_PRIORITY)
        running = _late_members(Session_, owner, report)
        with Session_() as s, s.begin():
            _completion(s, running, report)
            row = s.get(JobLock, "reconciler")
            if row is not None:
                row.checkpoint = now
            report.due_now = _due_now(s, now)
        _wake(hooks, now, report)
        return report
    finally:
        leases.release(Session_, "reconciler", owner)


def _expired_leases(s: Session, now: datetime, report: ReconcileReport) -> None:
    """``sending`` whose lease ran out: the call may have reached the provider, so ``ambiguous``."""
    report.ambiguous_marked = s.execute(
        update(Message)
        .where(Message.status == "sending", Message.lease_expires_at < now)
        .values(status="ambiguous", ambiguous_at=now, lease_owner=None, lease_expires_at=None,
                last_error="lease expired mid-send (consumer stopped?)", updated_at=now)
    ).rowcount


def _lost_queued_work(s: Session, now: datetime, report: ReconcileReport) -> list[int]:
    """Bulk work queued too long (its task was lost) is ``scheduled`` again, for the dispatcher;
    the test sends queued too long, which have no dispatcher: their ids, to queue again."""
    stale = s.scalars(
        update(Message)
        .where(Message.status == "queued", Message.queued_at < now - stale_queued(), Message.is_test.is_(False))
        .values(status="scheduled", queued_at=None)
        .returning(Message.id)
    ).all()
    report.requeued_stale = len(stale)
    _retire_unsendable(s, list(stale))
    return list(s.scalars(
        select(Message.id).where(Message.status == "queued", Message.queued_at < now - stale_queued(),
                                 Message.is_test.is_(True))
    ).all())


def _ambiguous_settlement(s: Session, now: datetime, report: ReconcileReport) -> None:
    """``ambiguous`` with an event carrying its key: ``sent``. Past the window without one:
    ``scheduled`` again, same key (counted in /metrics' ``ambiguous_resends``)."""
    window_start = now - timedelta(seconds=get_settings().ambiguous_window)
    has_event = exists().where(Event.message_key == Message.message_key)
    report.settled_ambiguous = s.execute(
        update(Message)
        .where(Message.status == "ambiguous", has_event)
        .values(status="sent", sent_at=func.coalesce(Message.sent_at, now), ambiguous_at=None,
                last_error=None)
    ).rowcount
    resent = s.scalars(
        update(Message)
        .where(Message.status == "ambiguous", Message.ambiguous_at < window_start, ~has_event)
        .values(status="scheduled", due_at=now, resends=Message.resends + 1, ambiguous_at=None,
                queued_at=None, last_error="resent: no event arrived within the ambiguity window")
        .returning(Message.id)
    ).all()
    report.resent_ambiguous = len(resent)
    if resent:
        add_totals(s, {"ambiguous_resends": len(resent)})  # /metrics' counter, in this transaction
    _retire_unsendable(s, list(resent))  # stopped or suppressed meanwhile (completion: below)


def _waiting_test_sends(s: Session, now: datetime) -> list[int]:
    """Test sends back in ``scheduled`` (retried, resent) have no dispatcher: ``queued`` now, to
    queue again; their ids."""
    return list(s.scalars(
        update(Message)
        .where(Message.status == "scheduled", Message.is_test.is_(True))
        .values(status="queued", queued_at=now)
        .returning(Message.id)
    ).all())


def _late_members(Session_, owner: str, report: ReconcileReport) -> list[int]:
    """Running and paused campaigns: enroll list members added since the last sweep, or finish a
    fan-out that died (once its lease has run out). Returns those campaigns' ids."""
    with Session_() as s:
        lock_row = s.get(JobLock, "reconciler")
        since = lock_row.checkpoint if lock_row and lock_row.checkpoint else None
        fanned_out = dict(s.execute(select(Campaign.id, Campaign.fanout_done_at.is_not(None))
                                    .where(Campaign.status.in_(("running", "paused")))).all())
    sweep_from = (since - SWEEP_OVERLAP) if since else None
    for cid, done in fanned_out.items():
        if done:  # only list members added since the last sweep
            with Session_() as s, s.begin():
                report.enrolled += fanout(s, cid, since=sweep_from)
            continue
        # An unfinished fan-out: not beside a launch still running it in parts (that run
        # holds this lease); one that died is finished here once its lease runs out.
        if not leases.acquire(Session_, fanout_lease(cid), owner, ttl=get_settings().lease_seconds):
            continue
        try:
            with Session_() as s, s.begin():
                report.enrolled += fanout(s, cid)
        finally:
            leases.release(Session_, fanout_lease(cid), owner)
    return list(fanned_out)


def _completion(s: Session, campaign_ids: list[int], report: ReconcileReport) -> None:
    """Mark the finished ones among these campaigns completed."""
    for cid in campaign_ids:
        if maybe_complete(s, cid):
            report.completed += 1


def _due_now(s: Session, now: datetime) -> int:
    """Scheduled work of running campaigns due now, counted up to DUE_NOW_CAP (a count of a
    million due rows every minute says no more)."""
    due = (
        select(literal(1)).select_from(Message)
        .join(Campaign, Campaign.id == Message.campaign_id)
        .where(Message.status == "scheduled", Message.due_at <= now, Campaign.status == "running")
        .limit(DUE_NOW_CAP)
        .subquery()
    )
    return s.scalar(select(func.count()).select_from(due)) or 0


def _wake(hooks: Hooks, now: datetime, report: ReconcileReport) -> None:
    """Wake the dispatcher now when work is due or was put back; else at the next due time."""
    if report.due_now or report.enrolled or report.requeued_stale or report.resent_ambiguous:
        hooks.wake_dispatcher(None)
        return
    nxt = _next_due(now)
    if nxt is not None:
        hooks.wake_dispatcher(nxt)
