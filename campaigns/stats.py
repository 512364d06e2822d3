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
    return campaigns_stats(session, [campaign_id])[campaign_id]


def campaigns_stats(session: Session, campaign_ids) -> dict[int, tuple[dict, dict[int, dict]]]:
    """``campaign_stats`` of several campaigns, ``{campaign_id: (totals, per step)}``: the same
    few queries however many campaigns (a page of the campaign list)."""
    ids = sorted(set(campaign_ids))
    if not ids:
        return {}
    counts: dict[int, dict[int, dict]] = {cid: {} for cid in ids}
    rows = session.execute(
        select(Message.campaign_id, Message.step_id, *_columns())
        .where(Message.campaign_id.in_(ids), Message.is_test.is_(False))
        .group_by(Message.campaign_id, Message.step_id)
    ).all()
    for row in rows:
        d = row._asdict()
        campaign_id, step_id = d.pop("campaign_id"), d.pop("step_id")
        counts[campaign_id][step_id] = {k: int(v) for k, v in d.items()}
    for campaign_id, step_id, deleted in session.execute(
        select(Step.campaign_id, Step.id, Step.failed_deleted).where(Step.campaign_id.in_(ids), Step.failed_deleted > 0)
    ):
        d = counts[campaign_id].setdefault(step_id, {k: 0 for k in COUNT_KEYS if k != "enrolled"})
        d["failed"] += deleted
    enrolled = dict(session.execute(
        select(Enrollment.campaign_id, func.count()).where(Enrollment.campaign_id.in_(ids))
        .group_by(Enrollment.campaign_id)
    ).all())
    stopped = _stopped(session, ids)
    out = {}
    for campaign_id, steps in counts.items():
        per_step: dict[int, dict] = {}
        totals = dict.fromkeys(COUNT_KEYS, 0)
        for step_id, d in steps.items():
            for k, v in d.items():
                totals[k] += v
            per_step[step_id] = with_rates(d)
        totals["enrolled"] = int(enrolled.get(campaign_id) or 0)
        totals["stopped"], totals["skipped"] = stopped.get(campaign_id, (0, 0))
        out[campaign_id] = (with_rates(totals), per_step)
    return out


def _stopped(session: Session, campaign_ids: list[int]) -> dict[int, tuple[int, int]]:
    """Per campaign: (sequences that ended with emails left to send, how many emails they will
    not send): by a stop condition (a reply, an unsubscribe, a bounce, a suppression) or a dead
    letter (until it is replayed, which takes the sequence up again); a cancel of the whole
    campaign is neither. Campaigns without such sequences are left out."""
    ended = (Enrollment.campaign_id.in_(campaign_ids),
             or_(Enrollment.status == "failed",
                 and_(Enrollment.status == "stopped", Enrollment.stopped_reason.is_distinct_from("cancelled"))))
    if session.scalar(select(Enrollment.id).where(*ended).limit(1)) is None:
        return {}
    email_steps = (
        select(Step.campaign_id, func.count().label("n"))
        .where(Step.campaign_id.in_(campaign_ids), Step.type == "email").group_by(Step.campaign_id)
        .subquery()
    )
    handled = and_(Message.enrollment_id == Enrollment.id, Message.is_test.is_(False),
                   or_(Message.sent_at.is_not(None), Message.status == "failed"))
    per_sequence = (
        select(Enrollment.campaign_id.label("campaign_id"),
               (func.coalesce(email_steps.c.n, 0) - func.count(Message.id)).label("left"))
        .select_from(Enrollment)
        .outerjoin(email_steps, email_steps.c.campaign_id == Enrollment.campaign_id)
        .outerjoin(Message, handled).where(*ended)
        .group_by(Enrollment.id, Enrollment.campaign_id, email_steps.c.n)
        .subquery()
    )
    left = per_sequence.c.left
    rows = session.execute(
        select(per_sequence.c.campaign_id,
               func.coalesce(func.sum(case((left > 0, 1), else_=0)), 0),
               func.coalesce(func.sum(case((left > 0, left), else_=0)), 0))
        .group_by(per_sequence.c.campaign_id)
    ).all()
    return {campaign_id: (int(count), int(skipped)) for campaign_id, count, skipped in rows}


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
# How old (seconds) the counts on a page of campaigns may be: each count reads all of a
# campaign's messages, so a list of big running campaigns is not counted afresh for every visit.
LIST_MAX_AGE = 5.0
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
        kept = _kept(key, max_age, fresh)
        if kept is not None:
            return kept
        started = clock()
        value = compute()
        _shared[key] = (clock(), clock() - started, value)
        return copy.deepcopy(value)


def _kept(key: tuple, max_age: float, fresh: bool = False):
    """A copy of the value kept for ``key`` if it is recent enough, else None."""
    kept = _shared.get(key)
    if not fresh and kept is not None and clock() - kept[0] < max(max_age, REUSE_FACTOR * kept[1]):
        return copy.deepcopy(kept[2])
    return None


def clear_shared() -> None:
    """Forget every shared value (tests: ids come back after RESTART IDENTITY)."""
    with _locks_guard:
        _shared.clear()


def shared_campaign_stats(session: Session, campaign_id: int, max_age: float = 1.0,
                          fresh: bool = False) -> tuple[dict, dict[int, dict]]:
    """``campaign_stats`` for live views (``shared``; ``fresh`` for a campaign that has ended)."""
    return shared(("stats", campaign_id), lambda: campaign_stats(session, campaign_id), max_age, fresh)


def shared_campaigns_stats(session: Session, campaign_ids, max_age: float = 1.0) -> dict[int, tuple[dict, dict]]:
    """``shared_campaign_stats`` of a page of campaigns: the ones not counted lately are counted
    together (``campaigns_stats``: a few queries, not a few per campaign) and kept for the others."""
    out, missing = {}, []
    for campaign_id in campaign_ids:
        kept = _kept(("stats", campaign_id), max_age)
        if kept is None:
            missing.append(campaign_id)
        else:
            out[campaign_id] = kept
    if missing:
        started = clock()
        counted = campaigns_stats(session, missing)
        made = clock()
        with _locks_guard:
            if len(_shared) > 10000:  # as in shared(): forget long-gone campaigns (none is being counted)
                for key in [k for k in _shared if not (k in _locks and _locks[k].locked())]:
                    _shared.pop(key, None)
            for campaign_id, value in counted.items():
                _shared[("stats", campaign_id)] = (made, made - started, value)
        out.update(copy.deepcopy(counted))
    return out
