"""Campaign statistics, computed from the ledger in one grouped query.

Counts are cumulative and never decrease: each is "messages that ever reached this state",
read from timestamps (``sent_at``, ``delivered_at``, ``opened_at``..., ``failed_at``) that the
engine and the event processor set and never clear. ``failed`` also counts the dead letters
deleted since (each step keeps their number). Only ``scheduled`` and ``dead_letters`` (failed
now: replayable or deletable) are current counts. Test sends are kept out.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session

from .models import Enrollment, Message, Step

T = TypeVar("T")

COUNT_KEYS = (
    "enrolled", "sent", "delivered", "opened", "clicked", "bounced", "dropped",
    "spam_reports", "replied", "unsubscribed", "failed", "ambiguous", "scheduled", "dead_letters",
)
RATE_KEYS = ("delivered", "opened", "clicked", "bounced", "replied", "unsubscribed")


def _flag(cond):
    return func.coalesce(func.sum(case((cond, 1), else_=0)), 0)


def _columns():
    m = Message
    return [
        _flag(m.sent_at.is_not(None)).label("sent"),
        _flag(m.delivered_at.is_not(None)).label("delivered"),
        _flag(m.opened_at.is_not(None)).label("opened"),
        _flag(m.clicked_at.is_not(None)).label("clicked"),
        _flag(m.status == "bounced").label("bounced"),
        _flag(m.status == "dropped").label("dropped"),
        _flag(m.spam_reported_at.is_not(None)).label("spam_reports"),
        _flag(m.replied_at.is_not(None)).label("replied"),
        _flag(m.unsubscribed_at.is_not(None)).label("unsubscribed"),
        _flag(m.failed_at.is_not(None)).label("failed"),
        _flag(m.status == "ambiguous").label("ambiguous"),
        _flag(m.status.in_(("scheduled", "queued"))).label("scheduled"),
        _flag(m.status == "failed").label("dead_letters"),
    ]


def with_rates(counts: dict) -> dict:
    sent = counts.get("sent") or 0
    counts["rates"] = {k: (round(counts.get(k, 0) / sent, 4) if sent else 0.0) for k in RATE_KEYS}
    return counts


def campaign_stats(session: Session, campaign_id: int) -> tuple[dict, dict[int, dict]]:
    """(campaign totals, {step_id: step totals}); each with ``rates`` as fractions of sent."""
    rows = session.execute(
        select(Message.step_id, *_columns())
        .where(Message.campaign_id == campaign_id, Message.is_test.is_(False))
        .group_by(Message.step_id)
    ).all()
    counts: dict[int, dict] = {}
    for row in rows:
        d = row._asdict()
        step_id = d.pop("step_id")
        counts[step_id] = {k: int(v) for k, v in d.items()}
    for step_id, deleted in session.execute(
        select(Step.id, Step.failed_deleted).where(Step.campaign_id == campaign_id, Step.failed_deleted > 0)
    ):
        d = counts.setdefault(step_id, {k: 0 for k in COUNT_KEYS if k != "enrolled"})
        d["failed"] += deleted
    per_step: dict[int, dict] = {}
    totals = dict.fromkeys(COUNT_KEYS, 0)
    for step_id, d in counts.items():
        for k, v in d.items():
            totals[k] += v
        per_step[step_id] = with_rates(d)
    totals["enrolled"] = session.scalar(
        select(func.count()).select_from(Enrollment).where(Enrollment.campaign_id == campaign_id)
    ) or 0
    totals["stopped"], totals["skipped"] = _stopped(session, campaign_id)
    return with_rates(totals), per_step


def _stopped(session: Session, campaign_id: int) -> tuple[int, int]:
    """(sequences that ended with emails left to send, how many emails they will not send): by a
    stop condition (a reply, an unsubscribe, a bounce, a suppression) or a dead letter (until it
    is replayed, which takes the sequence up again); a cancel of the whole campaign is neither."""
    ended = (Enrollment.campaign_id == campaign_id,
             or_(Enrollment.status == "failed",
                 and_(Enrollment.status == "stopped", Enrollment.stopped_reason.is_distinct_from("cancelled"))))
    if session.scalar(select(Enrollment.id).where(*ended).limit(1)) is None:
        return 0, 0
    email_steps = session.scalar(
        select(func.count()).select_from(Step).where(Step.campaign_id == campaign_id, Step.type == "email")
    ) or 0
    handled = and_(Message.enrollment_id == Enrollment.id, Message.is_test.is_(False),
                   or_(Message.sent_at.is_not(None), Message.status == "failed"))
    per_sequence = (
        select((email_steps - func.count(Message.id)).label("left"))
        .select_from(Enrollment).outerjoin(Message, handled).where(*ended).group_by(Enrollment.id)
        .subquery()
    )
    left = per_sequence.c.left
    count, skipped = session.execute(
        select(func.coalesce(func.sum(case((left > 0, 1), else_=0)), 0),
               func.coalesce(func.sum(case((left > 0, left), else_=0)), 0))
    ).one()
    return int(count), int(skipped)


def empty_step_stats() -> dict:
    return with_rates({k: 0 for k in COUNT_KEYS if k != "enrolled"})


# --------------------------------------------------------------------------- live views

# A live view (the progress stream, the campaign page's chart) asks again every second or two,
# and counting a campaign reads all of its messages: ~0.8 s for a million on PostgreSQL. Every
# viewer in a process shares one count per campaign, made by one thread at a time and reused
# for REUSE_FACTOR times what it cost (at least the viewer's interval), so a million-message
# campaign is counted about every 4 s however many people watch it, and a small one every
# interval as before.
REUSE_FACTOR = 5.0
clock = time.monotonic  # tests replace it
_shared: dict[tuple, tuple[float, float, object]] = {}  # key -> (made at, cost, value)
_locks: dict[tuple, threading.Lock] = {}
_locks_guard = threading.Lock()


def shared(key: tuple, compute: Callable[[], T], max_age: float = 1.0, fresh: bool = False) -> T:
    """``compute()``'s value, shared by every caller in this process that names the same
    ``key``: one at most ``max(max_age, REUSE_FACTOR x its cost)`` seconds old, or a new one
    (``fresh``: always). One computation per key at a time: callers asking meanwhile wait for
    it. Each caller gets its own copy."""
    with _locks_guard:
        lock = _locks.setdefault(key, threading.Lock())
        if len(_locks) > 10000:  # keys of long-gone campaigns: start afresh (a held lock is kept)
            for k in [k for k, lk in _locks.items() if k != key and not lk.locked()]:
                _locks.pop(k, None)
                _shared.pop(k, None)
    with lock:
        kept = _shared.get(key)
        if not fresh and kept is not None and clock() - kept[0] < max(max_age, REUSE_FACTOR * kept[1]):
            return copy.deepcopy(kept[2])
        started = clock()
        value = compute()
        _shared[key] = (clock(), clock() - started, value)
        return copy.deepcopy(value)


def clear_shared() -> None:
    """Forget every shared value (tests: ids come back after RESTART IDENTITY)."""
    with _locks_guard:
        _shared.clear()


def shared_campaign_stats(session: Session, campaign_id: int, max_age: float = 1.0,
                          fresh: bool = False) -> tuple[dict, dict[int, dict]]:
    """``campaign_stats`` for live views (``shared``; ``fresh`` for a campaign that has ended)."""
    return shared(("stats", campaign_id), lambda: campaign_stats(session, campaign_id), max_age, fresh)
