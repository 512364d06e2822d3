"""The dispatcher: moves due work (scheduled -> queued) within every limit's room for the next
dispatch horizon, fairly across workspaces and campaigns, and says when to look again."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache

from sqlalchemy import any_, bindparam, func, literal, select, update
from sqlalchemy.dialects.postgresql import array

from .. import leases
from ..config import get_settings
from ..db import is_postgres, session_factory, utcnow
from ..models import Campaign, Contact, Message
from ..ratelimit import Limiter, get_limiter
from ..windows import next_opening
from .common import _M, BULK_PRIORITY, SEND_BATCH, Hooks, _id_match, _memo, _not_by_index, _read_session, worker_id
from .ledger import _hand_back
from .limits import _read_limits, dispatch_horizon
from .planning import BATCH_SECONDS, INFLIGHT_POLL, _allocate, _jittered, _Limits, _Plan

FETCH_PER_CAMPAIGN = 500  # due messages looked at per campaign per dispatch pass
CLAIM_CHUNK = 500  # ids per claim statement
PASS_MAX = 2000  # messages one pass queues at most
MAX_WAKE = 60.0  # seconds: a pass held by limits looks again at least this often
LEASE_SLACK = 30  # seconds the dispatcher's lease outlives its budget (a pass in progress)
IDLE_PAUSE = 0.05  # seconds between passes that found due work but queued none


# Waits shorter than this are slept inside the dispatcher task. Longer ones become a delayed
# wake; tasks/engine.py starts those up to a second early (Huey's scheduler ticks once a
# second), so anything shorter would come straight back as a new task.
SLEEP_BELOW = 2.0


@dataclass
class DispatchResult:
    queued: int = 0
    next_wake: datetime | None = None
    more_now: bool = False
    waits: dict[str, int] = field(default_factory=dict)  # limit key -> due messages held back by it


@dataclass
class _Pass:
    """What one dispatch pass read: the running campaigns, every limit's room, and the due rows
    fetched per campaign (``fetched``: how many were asked for, to tell whether more wait)."""

    by_id: dict[int, Campaign]
    lim: _Limits
    candidates: dict[int, list]
    fetched: dict[int, int]


def dispatch_once(limiter: Limiter, hooks: Hooks, now: datetime | None = None,
                  max_total: int = PASS_MAX) -> DispatchResult:
    """One pass: queue the due work every limit lets into the next dispatch_horizon() seconds, fairly.

    Reads the limits (nothing is taken here: the sends take their units), fetches at most that
    much due work per campaign (oldest first), moves work outside its send window to the next
    opening, splits the room (``_allocate``), claims the rows (scheduled -> queued) and hands them
    to the queue in small batches, interleaved by workspace. Says when to look again.
    """
    now = now or utcnow()
    result = DispatchResult()
    p = _fetch(limiter, now, max_total)
    if p is None:
        return result
    _defer_outside_windows(p, now, result)
    plan = _allocate([p.by_id[cid] for cid in p.candidates], {cid: len(r) for cid, r in p.candidates.items()},
                     p.lim, max_total, _next_offset(limiter))
    for by_key in plan.held.values():
        for key, n in by_key.items():
            result.waits[key] = result.waits.get(key, 0) + n
    claimed = _claim(_chosen(p, plan, result))
    _enqueue(p, claimed, hooks)
    result.queued = len(claimed)
    result.next_wake = _next_wake(now, plan, p.lim, bool(claimed), result.more_now)
    return result


def _next_offset(limiter: Limiter) -> int:
    """The round-robin offset of this pass: one more than the last pass's in this process (kept
    with the limiter, like its other per-process memos)."""
    state = _memo(limiter, "dispatch")
    state["offset"] = state.get("offset", 0) + 1
    return state["offset"]


def _fetch(limiter: Limiter, now: datetime, max_total: int) -> _Pass | None:
    """The running campaigns, their limits' room, and each one's due rows, up to what its room
    could let go now plus one (which tells whether work waits behind a limit). None: no campaign
    is running."""
    with _read_session() as s:  # reads only: no lock held while the limiter is consulted
        campaigns = s.scalars(select(Campaign).where(Campaign.status == "running")).all()
        if not campaigns:
            return None
        lim = _read_limits(s, limiter, campaigns, dispatch_horizon())
        candidates: dict[int, list] = {}
        fetched: dict[int, int] = {}
        for c in campaigns:
            rooms = [r.room for r in lim.own[c.id] + lim.sender[c.id]]
            rooms += [lim.workspace[c.workspace_id].room, lim.account.room, max_total]
            limit = min(FETCH_PER_CAMPAIGN, max(0, min(rooms)) + 1)
            # In index order (ix_messages_campaign_status), so a pass reads only what it takes; the
            # contact's timezone (send windows only) is looked up for those rows alone.
            tz = (select(Contact.timezone).where(Contact.id == Message.contact_id).scalar_subquery()
                  if c.send_window else literal(None))
            rows = s.execute(
                select(Message.id, Message.email, tz.label("timezone"))
                .where(Message.campaign_id == c.id, Message.status == "scheduled", Message.due_at <= now)
                .order_by(Message.due_at, Message.id)
                .limit(limit)
            ).all()
            fetched[c.id] = limit
            if rows:
                candidates[c.id] = rows
        return _Pass({c.id: c for c in campaigns}, lim, candidates, fetched)


def _defer_outside_windows(p: _Pass, now: datetime, result: DispatchResult) -> None:
    """Move the fetched rows outside their campaign's send window to its next opening (in the
    contact's timezone), and keep only the others as candidates."""
    moves: dict[datetime, list[int]] = defaultdict(list)
    for cid, rows in list(p.candidates.items()):
        window = p.by_id[cid].send_window
        if not window:
            continue
        inside = []
        for r in rows:
            opening = next_opening(window, r.timezone, now)
            if opening <= now:
                inside.append(r)
            else:
                moves[opening].append(r.id)
        if len(inside) < len(rows):
            result.more_now = True  # what is behind the deferred rows is looked at next
        if inside:
            p.candidates[cid] = inside
        else:
            del p.candidates[cid]
    if moves:
        with session_factory()() as s, s.begin():
            for opening, ids in moves.items():
                s.execute(
                    update(Message)
                    .where(Message.id.in_(ids), Message.status == "scheduled")
                    .values(due_at=opening)
                )


def _chosen(p: _Pass, plan: _Plan, result: DispatchResult) -> list[int]:
    """The rows the plan lets go now, oldest first in each campaign."""
    chosen: list[int] = []
    for cid, n in plan.alloc.items():
        chosen += [r.id for r in p.candidates[cid][:n]]
        if n and n == len(p.candidates[cid]) and p.fetched[cid] >= FETCH_PER_CAMPAIGN:
            result.more_now = True  # all that was looked at goes: there may be more behind it
    return chosen


def _claim(chosen: list[int]) -> list[int]:
    """scheduled -> queued for the chosen rows still scheduled; the ids claimed."""
    claimed: list[int] = []
    if chosen:
        with session_factory()() as s, s.begin():
            stmt = _queue_stmt(is_postgres(s))
            for i in range(0, len(chosen), CLAIM_CHUNK):
                part = chosen[i : i + CLAIM_CHUNK]
                claimed += s.connection().execute(stmt, {"ids": part, "now": utcnow()}).scalars().all()
    return claimed


def _enqueue(p: _Pass, claimed: list[int], hooks: Hooks) -> None:
    """Hand the claimed ids to the queue in small batches (about BATCH_SECONDS of the account's
    budget each, so several workers share a slow budget), one workspace per batch, workspaces
    interleaved so no tenant's batches all sit ahead of another's in the FIFO queue."""
    ws_of = {r.id: p.by_id[cid].workspace_id for cid, rows in p.candidates.items() for r in rows}
    batches: dict[int, list[int]] = defaultdict(list)
    for mid in claimed:
        batches[ws_of[mid]].append(mid)
    size = max(1, min(SEND_BATCH, int(-(-get_settings().rate_limit.per_second * BATCH_SECONDS // 1))))
    queues = [[ids[i : i + size] for i in range(0, len(ids), size)] for ids in batches.values()]
    try:
        while any(queues):
            for q in queues:
                if q:
                    hooks.enqueue_send(q[0], BULK_PRIORITY)
                    q.pop(0)
    except Exception:
        # The queue store did not take them: back to the ledger now, not after the stale-queue sweep.
        _hand_back([mid for q in queues for ids in q for mid in ids])
        raise


def _next_wake(now: datetime, plan: _Plan, lim: _Limits, queued: bool, more_now: bool) -> datetime | None:
    """When to look again: now when more is due at once; when the first holding limit frees
    (jittered), or sooner while sends are in flight or work falls due; else the next due time."""
    if more_now:
        return now
    waits = [w for w in plan.waits if w is not None]
    if lim.outstanding or queued:
        waits.append(INFLIGHT_POLL)  # sends in flight free room (and may hand work back)
    if not waits:
        return _next_due(now)
    wake = now + timedelta(seconds=_jittered(min(max(min(waits), 0.01), MAX_WAKE)))
    # Work that falls due before then is looked at when it falls due, not at the next poll.
    upcoming = _next_due(now, after=now)
    return upcoming if upcoming is not None and upcoming < wake else wake


@lru_cache(maxsize=4)
def _queue_stmt(pg: bool):
    """The dispatcher's claim: scheduled -> queued, for the rows still scheduled."""
    return (update(_M).where(_id_match(_M.c.id, pg), _not_by_index(_M.c.status) == "scheduled")
            .values(status="queued", queued_at=bindparam("now")).returning(_M.c.id))


_EARLIEST = datetime(1970, 1, 1)


@lru_cache(maxsize=4)
def _next_due_stmt(pg: bool):
    """The earliest due time of scheduled work in running campaigns later than ``:after``: one
    index probe per campaign (a plain min over the join would read every scheduled row).

    On PostgreSQL the probe asks for its campaign's rows in ``(campaign_id, due_at)`` order, with
    the campaign named through a one-element array (``= ANY``): only ``ix_messages_campaign_status``
    gives that order, so the probe is a walk of that index from the campaign's first scheduled row
    after ``:after``, stopping at the first. Written as ``min(due_at) WHERE campaign_id = ... AND
    status = 'scheduled'``, the planner may walk ``ix_messages_status_due`` in due order instead,
    filtering on the campaign, betting that one of its rows comes soon: for a small campaign
    launched after a big one, that read every scheduled row of the big one on every dispatcher
    pass (96 ms a pass, 76 ms of it this probe, with 500,000 of the big campaign's messages due
    first; ``bench/dispatch_scale.py``).
    """
    after = bindparam("after", type_=Message.due_at.type)
    if pg:
        first = (select(Message.due_at)
                 .where(Message.campaign_id == any_(array([Campaign.id])), Message.status == "scheduled",
                        Message.due_at > after)
                 .order_by(Message.campaign_id, Message.due_at)
                 .limit(1))
    else:
        first = select(func.min(Message.due_at)).where(
            Message.campaign_id == Campaign.id, Message.status == "scheduled", Message.due_at > after)
    return select(func.min(first.scalar_subquery())).select_from(Campaign).where(Campaign.status == "running")


def _next_due(now: datetime, after: datetime | None = None) -> datetime | None:
    """The earliest due time of scheduled work in running campaigns (only later than ``after``,
    when given)."""
    with session_factory()() as s:
        return s.connection().execute(_next_due_stmt(is_postgres(s)), {"after": after or _EARLIEST}).scalar()


def run_dispatcher(hooks: Hooks, limiter: Limiter | None = None, budget_seconds: float = 5.0,
                   owner: str | None = None) -> DispatchResult | None:
    """Dispatch in a loop for up to ``budget_seconds`` under the ``dispatcher`` lease.

    Only one dispatcher loops at a time; a wake that finds the lease held asks the holder to
    run once more (so no wake is lost), and returns. Short waits (under SLEEP_BELOW: the steady
    flow of a budget) are slept here; longer ones become a delayed wake-up task, so no worker
    is held while work waits on a limit.
    """
    limiter = limiter or get_limiter()
    owner = owner or worker_id()
    Session_ = session_factory()
    if not leases.acquire(Session_, "dispatcher", owner, ttl=budget_seconds + LEASE_SLACK):
        if leases.request_rerun(Session_, "dispatcher") or not leases.acquire(
            Session_, "dispatcher", owner, ttl=budget_seconds + LEASE_SLACK
        ):
            return None
    started = time.monotonic()
    last = None
    try:
        while True:
            last = dispatch_once(limiter, hooks)
            wake = last.next_wake
            if wake is None:
                if leases.release(Session_, "dispatcher", owner):
                    return last
                continue
            delay = (wake - utcnow()).total_seconds()
            elapsed = time.monotonic() - started
            if delay <= 0 and last.queued == 0 and not last.more_now:
                delay = IDLE_PAUSE
            if elapsed + max(delay, 0) < budget_seconds and delay < SLEEP_BELOW:
                if delay > 0:
                    time.sleep(delay)
                leases.acquire(Session_, "dispatcher", owner, ttl=budget_seconds + LEASE_SLACK)
                continue
            # Not worth holding a worker: come back later. A steady flow (a short wait) continues
            # in a new task at once, which sleeps the rest (no second lost to Huey's scheduler).
            if leases.release(Session_, "dispatcher", owner):
                hooks.wake_dispatcher(None if delay < SLEEP_BELOW else wake)
                return last
    except BaseException:
        leases.release(Session_, "dispatcher", owner)
        raise
