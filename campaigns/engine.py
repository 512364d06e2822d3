"""The campaign engine: launch and fan-out, dispatch, idempotent sending, retries, reconciliation.

The database is the truth and Huey only carries ids. A message row moves::

    scheduled --(dispatcher claims, budget allows)--> queued --(send task claims, lease)--> sending
    sending --202--> sent          sending --timeout after the request left / lease ran out--> ambiguous
    sending --5xx/429/connect--> scheduled (backoff, later)      sending --4xx--> failed (dead letter)
    ambiguous --no event carrying its key within the window--> scheduled (same key, resends + 1)

Every transition is a conditional UPDATE on the current status, so a task that runs twice, or
two consumers that race, change a row once. SendGrid's mail send is not idempotent, so a message
whose call may have reached it is never resent blindly: it waits, ``ambiguous``, for an event
that settles it (``settle_ambiguous``, called by the event webhook) or for the window to pass.

``campaigns`` imports neither Flask nor Huey: ``tasks`` passes in how to enqueue (``Hooks``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from sqlalchemy import (
    BigInteger,
    and_,
    any_,
    bindparam,
    case,
    delete,
    exists,
    func,
    literal,
    or_,
    select,
    text,
    type_coerce,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, array
from sqlalchemy.orm import Session

from . import leases, stopgen
from .config import get_settings
from .contacts import is_suppressed, normalize_email, valid_id
from .contacts import unsuppress as remove_suppression
from .db import TRANSIENT_ERRORS, is_postgres, retry_transient, session_factory, utcnow
from .errors import Conflict, InvalidInput, NotFound
from .models import (
    Campaign,
    Contact,
    Enrollment,
    Event,
    ListMember,
    Message,
    MessageAttempt,
    Step,
    Suppression,
)
from .providers import (
    AccountError,
    AmbiguousSendError,
    OutgoingEmail,
    PermanentSendError,
    RetryableSendError,
    get_mailer,
)
from .ratelimit import Limiter, Rule, get_limiter
from .windows import next_opening

log = logging.getLogger("herald.engine")

PENDING = ("scheduled", "queued")
IN_FLIGHT = ("sending",)
UNSETTLED = ("scheduled", "queued", "sending", "ambiguous")
# Messages per send task, and outcomes recorded together: once per batch, or every FLUSH_SECONDS
# when it takes longer (a batch under a slow budget). Each batch and each record costs a dozen
# statements and a commit whatever its size: 40/20 -> 80/80 took 10,000 sends from 1.22 to
# 1.05 ms of CPU each, all processes (bench/RESULTS.md). Under a budget below 320/s a batch is
# smaller anyway (BATCH_SECONDS of the budget), and a consumer killed mid-batch leaves at most
# FLUSH_SECONDS of its sends unrecorded (they become ambiguous; events settle them).
SEND_BATCH = 80
FETCH_PER_CAMPAIGN = 500  # due messages looked at per campaign per dispatch pass
FLUSH_EVERY = 80
FLUSH_SECONDS = 0.25


def stale_queued() -> timedelta:
    """Queued this long without a send task claiming it: the queue store lost the task."""
    return timedelta(seconds=get_settings().stale_queued_seconds)  # HERALD_STALE_QUEUED_SECONDS


CONSECUTIVE_FAILURES_PAUSE = 20
DUE_NOW_CAP = 10000
ACCOUNT_RULE_KEY = "account"

_M = Message.__table__
_C = Contact.__table__


def _not_by_index(status_col):
    """``status_col`` in a form no index matches, for a statement whose rows are given by id.

    The send path names its rows by id and re-checks their status. PostgreSQL, planning from
    statistics older than the work (a fan-out that made ``scheduled`` messages and ``active``
    enrollments most of the table; ``queued``/``sending`` thought rare), drove these statements
    from the status index instead of the primary key, through bitmap scans, which do not skip
    the index entries of dead row versions: every message passes through ``queued`` and
    ``sending``, so each claim and each record read an entry for every message sent so far
    (10,000 messages: 4 M index entries read, ~40% of the database's time). Written this way,
    the ids are the only way in, whatever the statistics say.
    """
    return status_col.op("||")(literal(""))


def _id_match(col, pg: bool, name: str = "ids"):
    """``col`` is one of the list bound as ``name``: one array parameter on PostgreSQL (the same
    statement text for any length, prepared once), an expanding IN elsewhere."""
    if pg:
        return col == any_(bindparam(name, type_=ARRAY(BigInteger)))
    return col.in_(bindparam(name, expanding=True))


@dataclass
class Hooks:
    """How the engine hands work to the queue (``tasks`` fills these in)."""

    enqueue_send: Callable[[list[int], int], None]
    wake_dispatcher: Callable[[datetime | None], None]
    enqueue_fanout: Callable[[int], None] = lambda campaign_id: None


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def new_message_key() -> str:
    return uuid.uuid4().hex


def _random_key_sql(session: Session):
    if is_postgres(session):
        return func.replace(func.cast(func.gen_random_uuid(), _text_type()), "-", "")
    return func.lower(func.hex(func.randomblob(16)))


def _text_type():
    from sqlalchemy import Text

    return Text()


def _insert(session: Session, table):
    if is_postgres(session):
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)


def retry_base() -> float:
    return get_settings().retry_base  # HERALD_RETRY_BASE, validated with the other settings at start


def retry_cap() -> float:
    return get_settings().retry_cap  # HERALD_RETRY_CAP


def backoff_delay(attempt: int, base: float | None = None, cap: float | None = None) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**(attempt-1))), at least 0.5 s."""
    base = retry_base() if base is None else base
    cap = retry_cap() if cap is None else cap
    ceiling = min(cap, base * (2 ** max(0, attempt - 1)))
    return max(0.5, random.uniform(0, ceiling))


# --------------------------------------------------------------------------- campaign lifecycle


def get_campaign(session: Session, workspace_id: int, campaign_id: int) -> Campaign:
    c = session.get(Campaign, campaign_id) if valid_id(campaign_id) else None
    if c is None or c.workspace_id != workspace_id:
        raise NotFound("no such campaign")
    return c


def _email_steps(campaign: Campaign) -> list[Step]:
    return [s for s in campaign.steps if s.type == "email"]


def launch(session: Session, workspace_id: int, campaign_id: int) -> Campaign:
    """Draft -> running (fan-out follows in a task). Launching a running campaign changes nothing
    (launch twice = launched once); a paused one is refused, naming why it is paused: launch does
    not resume it (resume does), and answering as if it were sending would mislead."""
    c = get_campaign(session, workspace_id, campaign_id)
    if c.status == "running":
        return c
    if c.status == "paused":
        why = f" ({c.status_reason})" if c.status_reason else ""
        raise Conflict(f"the campaign was launched and is paused{why}: resume it to send again")
    if c.status != "draft":
        raise Conflict(f"a {c.status} campaign cannot be launched")
    if c.list_id is None:
        raise InvalidInput("the campaign has no list to send to")
    if not _email_steps(c):
        raise InvalidInput("the campaign has no email step")
    c.status = "running"
    c.status_reason = None
    c.launched_at = utcnow()
    return c


def pause(session: Session, workspace_id: int, campaign_id: int, reason: str | None = None) -> Campaign:
    """From the moment this commits no new send of the campaign starts (claims check the status)."""
    c = get_campaign(session, workspace_id, campaign_id)
    if c.status == "paused":
        return c
    if c.status != "running":
        raise Conflict(f"a {c.status} campaign cannot be paused")
    c.status = "paused"
    c.status_reason = reason
    stopgen.mark(session)
    # Hand queued work back to the ledger; a send task that still finds an id skips it.
    session.execute(
        update(Message)
        .where(Message.campaign_id == c.id, Message.status == "queued", Message.is_test.is_(False))
        .values(status="scheduled", queued_at=None)
    )
    return c


def resume(session: Session, workspace_id: int, campaign_id: int) -> Campaign:
    c = get_campaign(session, workspace_id, campaign_id)
    if c.status == "running":
        return c
    if c.status != "paused":
        raise Conflict(f"a {c.status} campaign cannot be resumed")
    c.status = "running"
    c.status_reason = None
    return c


def cancel(session: Session, workspace_id: int, campaign_id: int) -> Campaign:
    """Stop a running or paused campaign for good. A draft is not cancelled (it would then never
    launch; campaign status goes draft -> running -> ... -> cancelled): it is deleted instead."""
    c = get_campaign(session, workspace_id, campaign_id)
    if c.status == "cancelled":
        return c
    if c.status == "draft":
        raise Conflict("a draft has not been launched, so there is nothing to cancel: delete it instead")
    if c.status not in ("running", "paused"):
        raise Conflict(f"a {c.status} campaign cannot be cancelled")
    now = utcnow()
    c.status = "cancelled"
    c.finished_at = now
    stopgen.mark(session)
    session.execute(
        update(Message)
        .where(Message.campaign_id == c.id, Message.status.in_(PENDING), Message.is_test.is_(False))
        .values(status="cancelled", last_error="campaign cancelled", updated_at=now)
    )
    session.execute(
        update(Enrollment)
        .where(Enrollment.campaign_id == c.id, Enrollment.status == "active")
        .values(status="stopped", stopped_reason="cancelled", finished_at=now)
    )
    return c


# --------------------------------------------------------------------------- fan-out


def _first_email(campaign: Campaign) -> tuple[Step | None, int]:
    """The first email step and the seconds of waiting before it."""
    wait = 0
    for s in campaign.steps:
        if s.type == "wait":
            wait += s.wait_seconds or 0
        elif s.type == "email":
            return s, wait
    return None, wait


def _next_email(steps: list[Step], after_position: int) -> tuple[Step | None, int]:
    """The next email step after a position, and the seconds of waiting before it."""
    wait = 0
    for s in steps:
        if s.position <= after_position:
            continue
        if s.type == "wait":
            wait += s.wait_seconds or 0
        elif s.type == "email":
            return s, wait
    return None, wait


def fanout(session: Session, campaign_id: int, since: datetime | None = None,
           contacts: tuple[int | None, int | None] | None = None) -> int:
    """Enroll the campaign's list (set-based) and schedule each new enrollment's first email.

    Suppressed addresses and contacts that are not active are skipped. Safe to run again: the
    unique (campaign, contact) and (enrollment, step) constraints make repeats do nothing.
    ``since`` limits the look to list members added after that time (the reconciler's sweep).
    ``contacts`` = (after, upto) limits it to contact ids in that range (None: open), one part
    of a fan-out in parts (``fanout_in_parts``); the part with no upper end finishes it.
    Returns how many contacts were enrolled now.
    """
    c = session.get(Campaign, campaign_id)
    if c is None or c.status not in ("running", "paused") or c.list_id is None:
        return 0
    step, wait = _first_email(c)
    if step is None:
        return 0
    now = utcnow()
    members = (
        select(
            Contact.workspace_id,
            literal(c.id),
            ListMember.contact_id,
            literal("active"),
            literal(now),
        )
        .select_from(ListMember)
        .join(Contact, Contact.id == ListMember.contact_id)
        .where(
            ListMember.list_id == c.list_id,
            Contact.workspace_id == c.workspace_id,
            Contact.status == "active",
            ~exists().where(Suppression.workspace_id == Contact.workspace_id, Suppression.email == Contact.email),
        )
    )
    if since is not None:
        members = members.where(ListMember.added_at >= since)
    after, upto = contacts or (None, None)
    if after is not None:
        members = members.where(ListMember.contact_id > after)
    if upto is not None:
        members = members.where(ListMember.contact_id <= upto)
    ins = _insert(session, Enrollment.__table__).from_select(
        ["workspace_id", "campaign_id", "contact_id", "status", "created_at"], members
    ).on_conflict_do_nothing()
    message_columns = ["workspace_id", "campaign_id", "enrollment_id", "step_id", "contact_id", "email",
                       "message_key", "status", "due_at", "max_attempts", "created_at", "updated_at", "is_test",
                       "priority", "attempts", "resends"]
    # Every column given: the Python-side defaults are not applied to an INSERT fed by a DML CTE.
    rest = (_random_key_sql(session), literal("scheduled"), literal(now + timedelta(seconds=wait)),
            literal(c.max_attempts), literal(now), literal(now), literal(False), literal(0), literal(0), literal(0))
    if is_postgres(session):
        # One statement: the enrollments it creates (RETURNING) get their first message. No
        # anti-join against messages, whose plan on a young table (stale statistics, a table
        # growing under the statement) went quadratic: 10,000 contacts took 2.3 s, now 1.0 s.
        new = ins.returning(Enrollment.id, Enrollment.workspace_id, Enrollment.contact_id).cte("new_enrollments")
        first = (
            select(new.c.workspace_id, literal(c.id), new.c.id, literal(step.id), new.c.contact_id, Contact.email,
                   *rest)
            .select_from(new)
            .join(Contact, Contact.id == new.c.contact_id)
        )
        enrolled = session.execute(
            _insert(session, Message.__table__).from_select(message_columns, first).on_conflict_do_nothing(),
            execution_options={"preserve_rowcount": True},
        ).rowcount or 0
        _refresh_statistics(session, enrolled)
        return _finish_fanout(c, now, enrolled, last=upto is None)
    enrolled = session.execute(ins, execution_options={"preserve_rowcount": True}).rowcount or 0
    first = (
        select(Enrollment.workspace_id, Enrollment.campaign_id, Enrollment.id, literal(step.id), Enrollment.contact_id,
               Contact.email, *rest)
        .select_from(Enrollment)
        .join(Contact, Contact.id == Enrollment.contact_id)
        .where(
            Enrollment.campaign_id == c.id,
            Enrollment.status == "active",
            ~exists().where(Message.enrollment_id == Enrollment.id),
        )
    )
    if since is not None:
        first = first.where(Enrollment.created_at >= since)
    if after is not None:
        first = first.where(Enrollment.contact_id > after)
    if upto is not None:
        first = first.where(Enrollment.contact_id <= upto)
    session.execute(
        _insert(session, Message.__table__).from_select(message_columns, first).on_conflict_do_nothing()
    )
    return _finish_fanout(c, now, enrolled, last=upto is None)


def _refresh_statistics(session: Session, added: int) -> None:
    """ANALYZE messages and enrollments after a fan-out that changed a good part of them.

    PostgreSQL plans from statistics that autovacuum refreshes about a minute after a bulk
    change; the sends start at once. The send path's statements do not depend on them any more
    (``_not_by_index``), but the dispatcher's reads and the joins plan better on fresh ones.
    Same threshold as autovacuum's: at least 1,000 rows and 10% of the table.
    """
    if added < 1000:
        return
    known = session.execute(text(
        "SELECT COALESCE(max(reltuples), 0) FROM pg_class WHERE oid = CAST('messages' AS regclass)")).scalar() or 0
    if added >= 0.1 * known:
        session.execute(text("ANALYZE messages, enrollments"))


def _finish_fanout(c: Campaign, now: datetime, enrolled: int, last: bool = True) -> int:
    if last and c.fanout_done_at is None:
        c.fanout_done_at = now
    return enrolled


FANOUT_FIRST_PART = 1000  # contacts in a fan-out's first part: the first sends start after it
FANOUT_PART = 20000  # contacts in each later part


def fanout_lease(campaign_id: int) -> str:
    return f"fanout:{campaign_id}"


def fanout_in_parts(campaign_id: int, on_part: Callable[[int], None] | None = None, owner: str | None = None,
                    first_part: int | None = None, part: int | None = None) -> int | None:
    """The launch fan-out, in parts of the list in contact-id order, each its own transaction.

    The first part is small, so the first emails go out while the rest of a large list is
    enrolled (a million contacts take about a minute; their first sends no longer wait for it).
    ``on_part(n)`` runs after each part that enrolled someone (the task wakes the dispatcher).
    The run holds the lease ``fanout:<campaign>``, renewed with every part, so the reconciler
    does not start a second fan-out beside it; a run that died is finished by the reconciler
    once the lease runs out (parts already committed are skipped: the unique constraints make
    them cost a look each). Returns how many contacts were enrolled; None when another run
    holds the lease.
    """
    Session_ = session_factory()
    owner = owner or worker_id()
    ttl = get_settings().lease_seconds
    if not leases.acquire(Session_, fanout_lease(campaign_id), owner, ttl=ttl):
        return None
    total, after, size = 0, None, first_part or FANOUT_FIRST_PART
    try:
        while True:
            with Session_() as s, s.begin():
                c = s.execute(select(Campaign.status, Campaign.list_id).where(Campaign.id == campaign_id)).first()
                if c is None or c.status not in ("running", "paused") or c.list_id is None:
                    return total  # cancelled meanwhile (or nothing to enroll)
                bound = select(ListMember.contact_id).where(ListMember.list_id == c.list_id)
                if after is not None:
                    bound = bound.where(ListMember.contact_id > after)
                upto = s.scalar(bound.order_by(ListMember.contact_id).offset(size - 1).limit(1))
                n = fanout(s, campaign_id, contacts=(after, upto))
            total += n
            if n and on_part is not None:
                on_part(n)
            if upto is None:
                return total
            after, size = upto, part or FANOUT_PART
            if not leases.acquire(Session_, fanout_lease(campaign_id), owner, ttl=ttl):
                log.warning("campaign %s: the fan-out lease was taken over; this run stops", campaign_id)
                return total
    finally:
        leases.release(Session_, fanout_lease(campaign_id), owner)


def enroll_new_members_of_list(list_id: int, hooks: Hooks | None = None) -> int:
    """Members were added to a list: enroll them in every running campaign of that list."""
    total = 0
    Session_ = session_factory()
    with Session_() as s:
        ids = s.scalars(
            select(Campaign.id).where(Campaign.list_id == list_id, Campaign.status.in_(("running", "paused")))
        ).all()
    for cid in ids:
        with Session_() as s, s.begin():
            total += fanout(s, cid)
    if total and hooks:
        hooks.wake_dispatcher(None)
    return total


def unsuppress(session: Session, workspace_id: int, email: str) -> int:
    """Take an address off the workspace's suppression list (NotFound when it is not on it) and
    enroll its contact where the suppression made a campaign skip it (``enroll_contact``), in the
    caller's transaction. Returns how many campaigns enrolled the contact; after the commit the
    caller wakes the dispatcher (``tasks.jobs.notify_enrolled``)."""
    remove_suppression(session, workspace_id, email)
    return enroll_contact(session, workspace_id, email)


def enroll_contact(session: Session, workspace_id: int, email: str) -> int:
    """An address came off the suppression list: enroll its contact in every running or paused
    campaign of the workspace whose list holds it, as a member added now would be (it was
    skipped while suppressed). Sequences the suppression stopped stay stopped: a contact already
    enrolled in a campaign is not enrolled again. In the caller's transaction (a few rows: one
    contact); the caller wakes the dispatcher after the commit. Returns how many campaigns
    enrolled the contact."""
    contact_id = session.scalar(
        select(Contact.id).where(Contact.workspace_id == workspace_id, Contact.email == (email or "").strip().lower())
    )
    if contact_id is None:
        return 0
    ids = session.scalars(
        select(Campaign.id)
        .join(ListMember, ListMember.list_id == Campaign.list_id)
        .where(Campaign.workspace_id == workspace_id, Campaign.status.in_(("running", "paused")),
               ListMember.contact_id == contact_id)
        .order_by(Campaign.id)
    ).all()
    return sum(1 for cid in ids if fanout(session, cid, contacts=(contact_id - 1, contact_id)))


# --------------------------------------------------------------------------- dispatch
#
# Limits are enforced where the sends happen, and planned where work is queued; both use the
# one shared limiter (campaigns/ratelimit.py):
#
# - right before each provider call (``pace``) a message takes one unit of every limit it is
#   under (the account budget, its campaign's, its sender's) in one atomic take, waits a moment
#   for it, or goes back to the ledger when the wait is long. What reaches the provider never
#   exceeds a limit, however many consumers and threads send, whatever the queue's jitter.
# - the dispatcher only *reads* the limits (``peek``): it queues at most what every limit allows
#   within the next dispatch_horizon() seconds, minus what is queued or sending already, and
#   divides that round-robin across workspaces with work ready, then across their campaigns.
#   Huey's queue is first in, first out within a priority, so it never holds more than about a
#   second of bulk work: another tenant's batches are never behind minutes of someone else's.
#
# Work that meets a limit stays ``scheduled`` in the ledger (no task waits on it, no attempt is
# spent); the dispatcher comes back when the limit frees (with jitter), or sooner while sends are
# in flight.



def dispatch_horizon() -> float:
    """Seconds of work the dispatcher queues at a time (HERALD_DISPATCH_HORIZON)."""
    return get_settings().dispatch_horizon


BATCH_SECONDS = 0.25  # a send task carries about this much of the account budget; also the pace of passes
PACE_MAX_WAIT = 2.0  # a send waits at most this long for its turn; a longer wait: back to the ledger
CONCURRENCY_POLL = 0.1  # a workspace at its concurrency budget: look again this soon
SEND_LATENESS = 0.05  # seconds a granted call may take to reach the provider; kept out of bursts
PRIORITY_GATE = "priority"  # held while a priority send waits for the account budget: bulk steps aside
PACE_EARLY = 0.002  # a waiting send wakes this much before its unit frees, and asks again
INFLIGHT_POLL = 2.5  # while sends are in flight, look again at least this often (a safety net: not slept)
# Waits shorter than this are slept inside the dispatcher task. Longer ones become a delayed
# wake; tasks/engine.py starts those up to a second early (Huey's scheduler ticks once a
# second), so anything shorter would come straight back as a new task.
SLEEP_BELOW = 2.0


@dataclass
class DispatchResult:
    queued: int = 0
    deferred_window: int = 0
    next_wake: datetime | None = None
    more_now: bool = False
    waits: dict[str, int] = field(default_factory=dict)  # limit key -> due messages held back by it


def account_rule() -> Rule:
    """The provider account's budget (``SENDGRID_RATE_LIMIT``), shared by every send."""
    return Rule.from_rate(ACCOUNT_RULE_KEY, get_settings().rate_limit, allowance=SEND_LATENESS)


def workspace_slots(concurrency: int) -> int:
    """A workspace's concurrency budget in messages queued or sending at once.

    ``Workspace.concurrency`` counts send tasks (consumer workers a tenant may occupy at once);
    each carries at most SEND_BATCH messages. Counting single messages instead would cap one
    workspace at about ``concurrency`` messages per dispatcher round trip, below the default
    account budget (measured: see bench/RESULTS.md).
    """
    return max(1, int(concurrency)) * SEND_BATCH


def campaign_rules(c: Campaign, now: float | None = None) -> list[Rule]:
    """The campaign's own limits: ``per_minute`` smooth (GCRA, burst max(1, n/10)) and
    ``per_day`` at most n in any 24 hours (rolling)."""
    from .config import parse_rate

    rules = []
    limits = c.limits or {}
    if limits.get("per_minute"):
        rules.append(Rule.from_rate(f"campaign:{c.id}:minute", parse_rate(f"{int(limits['per_minute'])}/minute"),
                                    allowance=SEND_LATENESS))
    if limits.get("per_day"):
        rules.append(Rule.per_day(f"campaign:{c.id}:day", int(limits["per_day"])))
    return rules


def sender_key(c: Campaign) -> str:
    return f"sender:{c.workspace_id}:{c.from_email.strip().lower()}"


def sender_rules(c: Campaign, limiter: Limiter | None = None, now: float | None = None) -> list[Rule]:
    """The sender's (from address, per workspace) limits, shared by every campaign using it.

    - ``daily_cap``: at most n in any 24 hours;
    - ``warmup {start, increment}``: on day d of the sender the cap is start + d * increment (and
      never above ``daily_cap``); day 0 begins at the sender's first send in the workspace
      (``sender_day0``), day d is d whole 24-hour periods later;
    - ``min_gap_seconds``/``max_gap_seconds``: one message at a time, each followed by a pause
      drawn uniformly between the two (a fresh draw per send).
    """
    sender = (c.limits or {}).get("sender") or {}
    key = sender_key(c)
    rules = []
    cap = sender.get("daily_cap")
    warm = sender.get("warmup")
    if warm:
        now = time.time() if now is None else now
        day0 = sender_day0(limiter or get_limiter(), c.workspace_id, c.from_email)
        days = 0 if day0 is None else max(0, int((now - day0) // 86400))
        ramp = int(warm.get("start", 1)) + int(warm.get("increment", 0)) * days
        cap = min(int(cap), ramp) if cap else ramp
    if cap:
        rules.append(Rule.per_day(key + ":day", int(cap)))
    lo, hi = sender.get("min_gap_seconds"), sender.get("max_gap_seconds")
    if lo or hi:
        lo = float(lo or 0)
        hi = max(lo, float(hi if hi is not None else lo))
        rules.append(Rule.gap(key + ":gap", random.uniform(lo, hi)))
    return rules


def _memo(limiter: Limiter, name: str) -> dict:
    """A dict kept with the limiter, this process only (forgotten with it)."""
    return limiter.local.setdefault(name, {})


def _read_session() -> Session:
    """A session for reads that takes no lock (SQLite: no BEGIN IMMEDIATE), so it may run while
    the caller's own transaction holds the write lock."""
    engine = session_factory().kw["bind"]
    return Session(engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False)


def sender_day0(limiter: Limiter, workspace_id: int, from_email: str) -> float | None:
    """Epoch seconds of the first send from this address in the workspace (warm-up day 0).

    Kept in the limiter's shared store (``mark``), written at the sender's first send. When the
    store has no mark (a sender used before its warm-up was set, Redis flushed) the ledger
    answers: min(sent_at) of the workspace's messages from that address, one query per process
    (none at all once the mark exists). Cached in the process once known, so a send costs
    nothing extra. Reads only: it runs inside the dispatcher's and the web's transactions.
    """
    key = f"sender:{workspace_id}:{from_email.strip().lower()}:first"
    known, missed = _memo(limiter, "day0"), _memo(limiter, "day0_missed")
    hit = known.get(key)
    if hit is not None:
        return hit
    value = limiter.read_mark(key)
    if value is None:
        if time.monotonic() - missed.get(key, -60.0) < 5.0:
            return None
        with _read_session() as s:
            first = s.scalar(
                select(func.min(Message.sent_at))
                .join(Campaign, Campaign.id == Message.campaign_id)
                .where(Campaign.workspace_id == workspace_id,
                       func.lower(Campaign.from_email) == from_email.strip().lower(),
                       Message.sent_at.is_not(None), Message.is_test.is_(False))
            )
        if first is None:
            missed[key] = time.monotonic()
            return None
        value = _epoch(first)
    known[key] = value
    return value


def _note_first_send(limiter: Limiter, c: Campaign, now: float) -> None:
    warm = ((c.limits or {}).get("sender") or {}).get("warmup")
    key = f"{sender_key(c)}:first"
    known = _memo(limiter, "day0")
    if warm and key not in known:
        known[key] = limiter.mark(key, now)
        _memo(limiter, "day0_missed").pop(key, None)


def _fair_share(demands: dict, budget: int, order: list) -> dict:
    """Water-filling: split ``budget`` across keys round-robin, none above its demand."""
    alloc = dict.fromkeys(demands, 0)
    active = [k for k in order if demands.get(k, 0) > 0]
    while budget > 0 and active:
        share = max(1, budget // len(active))
        nxt = []
        for k in active:
            if budget <= 0:
                break
            give = min(share, demands[k] - alloc[k], budget)
            alloc[k] += give
            budget -= give
            if alloc[k] < demands[k]:
                nxt.append(k)
        active = nxt
    return alloc


# ----- pacing at send time


class _WaitCounter:
    """Counts sends that waited on a limit, by kind, and adds them to the shared counters at
    most once a second (a counter write per send would cost a transaction on SQLite)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.pending: dict[str, int] = defaultdict(int)
        self.flushed = time.monotonic()

    def add(self, limiter: Limiter, name: str, n: int = 1) -> None:
        with self.lock:
            self.pending[name] += n
            if time.monotonic() - self.flushed < 1.0:
                return
            pending, self.pending, self.flushed = dict(self.pending), defaultdict(int), time.monotonic()
        try:
            for k, n in pending.items():
                limiter.incr(k, n)
        except Exception:  # noqa: BLE001 - a counter must never stop a send
            log.exception("could not count rate-limit waits")


_wait_counter = _WaitCounter()


def _limit_kind(key: str | None) -> str:
    if not key:
        return "unknown"
    parts = key.split(":")
    if parts[0] == "campaign":
        return f"campaign_{parts[-1]}"
    if parts[0] == "sender":
        return f"sender_{parts[-1]}"
    return parts[0]


# ----- planning: how much of each limit's room the queue may take, and who gets it


@dataclass
class _Room:
    """One limit as the dispatcher sees it: messages it still lets into the horizon, and when
    (seconds from now) it lets in at least one more when it is full."""

    key: str
    room: int
    wait: float = 0.0


def _room(rule: Rule, allowed: int, next_free: float, outstanding: int) -> _Room:
    room = (min(allowed, 1) if rule.kind == "gap" else allowed) - outstanding
    if room > 0:
        return _Room(rule.key, room)
    if rule.kind == "gcra":  # sends already queued use the room up; then one unit per interval
        wait = next_free + (-room) * rule.interval
    elif allowed <= 0:  # a spent cap (a bucket must leave the window), a gap still running
        wait = next_free
    else:  # what is queued will use the rest: look again once it is sent
        wait = INFLIGHT_POLL
    return _Room(rule.key, room, max(wait, 0.0))


@dataclass
class _Limits:
    account: _Room
    own: dict[int, list[_Room]]  # campaign -> its own limits
    sender: dict[int, list[_Room]]  # campaign -> its sender's limits (shared with other campaigns)
    workspace: dict[int, _Room]
    outstanding: int


def _read_limits(s: Session, limiter: Limiter, campaigns: list[Campaign], horizon: float) -> _Limits:
    """Every limit's room for these campaigns: the limiter's state, less what is queued or sending."""
    from .models import DEFAULT_CONCURRENCY, Workspace

    out_campaign: dict[int, int] = defaultdict(int)
    out_ws: dict[int, int] = defaultdict(int)
    total = 0
    for ws, cid, is_test, n in s.execute(
        select(Message.workspace_id, Message.campaign_id, Message.is_test, func.count())
        .where(Message.status.in_(("queued", "sending")))
        .group_by(Message.workspace_id, Message.campaign_id, Message.is_test)
    ).all():
        total += n
        if not is_test:
            out_campaign[cid] += n
            out_ws[ws] += n
    senders = {c.id: sender_key(c) for c in campaigns}
    others = [cid for cid in out_campaign if cid not in senders]
    if others:
        for cid, ws, email in s.execute(
            select(Campaign.id, Campaign.workspace_id, Campaign.from_email).where(Campaign.id.in_(others))
        ).all():
            senders[cid] = f"sender:{ws}:{email.strip().lower()}"
    out_sender: dict[str, int] = defaultdict(int)
    for cid, n in out_campaign.items():
        out_sender[senders[cid]] += n
    ws_ids = {c.workspace_id for c in campaigns}
    concurrency = dict(s.execute(select(Workspace.id, Workspace.concurrency).where(Workspace.id.in_(ws_ids))).all())

    acc = account_rule()
    (cap,) = limiter.peek([acc], horizon)
    account = _room(acc, cap.allowed, cap.next_free, total)
    own: dict[int, list[_Room]] = {}
    sender: dict[int, list[_Room]] = {}
    for c in campaigns:
        mine, theirs = campaign_rules(c), sender_rules(c, limiter)
        caps = limiter.peek(mine + theirs, horizon) if (mine or theirs) else []
        own[c.id] = [_room(r, k.allowed, k.next_free, out_campaign[c.id]) for r, k in zip(mine, caps, strict=False)]
        sender[c.id] = [_room(r, k.allowed, k.next_free, out_sender[senders[c.id]])
                        for r, k in zip(theirs, caps[len(mine):], strict=True)]
    workspace = {}
    for ws in ws_ids:
        room = workspace_slots(concurrency.get(ws, DEFAULT_CONCURRENCY)) - out_ws[ws]
        workspace[ws] = _Room(f"workspace:{ws}:concurrency", room, 0.0 if room > 0 else CONCURRENCY_POLL)
    return _Limits(account, own, sender, workspace, total)


@dataclass
class _Plan:
    alloc: dict[int, int]  # campaign -> messages to queue now
    held: dict[int, dict[str, int]]  # campaign -> limit key -> due messages that limit holds back
    waits: list[float]  # seconds until each holding limit lets more in


def _allocate(campaigns: list[Campaign], due: dict[int, int], lim: _Limits, max_total: int, offset: int = 0) -> _Plan:
    """Who gets the room: each campaign up to its own limits; a sender's room shared fairly by its
    campaigns; a workspace's concurrency by its campaigns; the account's room round-robin across
    workspaces with work ready, then across their campaigns (water-filling: a share nobody needs
    goes to whoever has work). ``offset`` rotates the order from pass to pass."""
    held: dict[int, dict[str, int]] = defaultdict(dict)
    waits: list[float] = []

    def hold(cid: int, room: _Room, n: int, wait: float | None = None) -> None:
        if n > 0:
            held[cid][room.key] = held[cid].get(room.key, 0) + n
            waits.append(max(room.wait if wait is None else wait, 0.0) or BATCH_SECONDS)

    def rotate(items: list) -> list:
        if not items:
            return items
        k = offset % len(items)
        return items[k:] + items[:k]

    order = rotate(sorted((c for c in campaigns if due.get(c.id)), key=lambda c: c.id))
    want: dict[int, int] = {}
    for c in order:
        d = due[c.id]
        tight = min(lim.own.get(c.id) or [], key=lambda r: r.room, default=None)
        if tight is not None and tight.room < d:
            hold(c.id, tight, d - max(tight.room, 0))
            d = max(tight.room, 0)
        want[c.id] = d

    def squeeze(groups: dict, room_of) -> None:
        for key, cids in groups.items():
            room = room_of(key, cids)
            if room is None or sum(want[c] for c in cids) <= room.room:
                continue
            share = _fair_share({c: want[c] for c in cids}, max(room.room, 0), cids)
            for c in cids:
                hold(c, room, want[c] - share[c], room.wait if room.room <= 0 else BATCH_SECONDS)
                want[c] = share[c]

    by_sender: dict[str, list[int]] = defaultdict(list)
    for c in order:
        if lim.sender.get(c.id):
            by_sender[sender_key(c)].append(c.id)
    squeeze(by_sender, lambda key, cids: min((r for c in cids for r in lim.sender[c]), key=lambda r: r.room))
    by_ws: dict[int, list[int]] = defaultdict(list)
    for c in order:
        by_ws[c.workspace_id].append(c.id)
    squeeze(by_ws, lambda ws, cids: lim.workspace.get(ws))

    budget = min(max(lim.account.room, 0), max_total)
    ws_order = rotate(sorted(by_ws))
    ws_alloc = _fair_share({ws: sum(want[c] for c in cids) for ws, cids in by_ws.items()}, budget, ws_order)
    alloc: dict[int, int] = {}
    for ws, cids in by_ws.items():
        share = _fair_share({c: want[c] for c in cids}, ws_alloc[ws], cids)
        for c in cids:
            # Full now: the horizon moves on by itself, so come back in a moment for the next slice.
            hold(c, lim.account, want[c] - share[c],
                 lim.account.wait if lim.account.room <= 0 else max(BATCH_SECONDS, lim.account.wait))
            alloc[c] = share[c]
    return _Plan(alloc, held, waits)


def _jittered(wait: float) -> float:
    """Spread wake-ups over a little time, so campaigns held by limits do not all come back at
    the instant capacity returns (no jitter on the short waits of a steady flow)."""
    return wait + (random.uniform(0, min(1.0, 0.1 * wait)) if wait >= 1.0 else 0.0)


def waiting_on_limits(s: Session, limiter: Limiter | None = None, workspace_id: int | None = None) -> dict[str, int]:
    """Due messages of running campaigns held back, per limit (for /api/v1/queue and /metrics).

    Computed from shared state, as the dispatcher would see it now: the ledger's due counts and
    the limiter's store. ``workspace_id`` keeps one workspace's figures (the account's room is
    shared, so its share of ``account`` is what the fair split leaves it waiting for).
    """
    limiter = limiter or get_limiter()
    now = utcnow()
    due = dict(s.execute(
        select(Message.campaign_id, func.count())
        .join(Campaign, Campaign.id == Message.campaign_id)
        .where(Campaign.status == "running", Message.status == "scheduled", Message.due_at <= now)
        .group_by(Message.campaign_id)
    ).all())
    if not due:
        return {}
    campaigns = s.scalars(select(Campaign).where(Campaign.id.in_(list(due)))).all()
    plan = _allocate(campaigns, due, _read_limits(s, limiter, campaigns, dispatch_horizon()), max_total=10**9)
    ws_of = {c.id: c.workspace_id for c in campaigns}
    out: dict[str, int] = defaultdict(int)
    for cid, by_key in plan.held.items():
        if workspace_id is None or ws_of[cid] == workspace_id:
            for key, n in by_key.items():
                out[key] += n
    return dict(out)


_rr_offset = 0


def dispatch_once(limiter: Limiter, hooks: Hooks, now: datetime | None = None, max_total: int = 2000) -> DispatchResult:
    """One pass: queue the due work every limit lets into the next dispatch_horizon() seconds, fairly.

    Reads the limits (nothing is taken here: the sends take their units), fetches at most that
    much due work per campaign (oldest first), moves work outside its send window to the next
    opening, splits the room (``_allocate``), claims the rows (scheduled -> queued) and hands them
    to the queue in small batches, interleaved by workspace. Says when to look again.
    """
    global _rr_offset
    now = now or utcnow()
    result = DispatchResult()
    Session_ = session_factory()
    moves: dict[datetime, list[int]] = defaultdict(list)
    with _read_session() as s:  # reads only: no lock held while the limiter is consulted
        campaigns = s.scalars(select(Campaign).where(Campaign.status == "running")).all()
        if not campaigns:
            return result
        lim = _read_limits(s, limiter, campaigns, dispatch_horizon())
        candidates: dict[int, list] = {}
        limits_of: dict[int, int] = {}
        for c in campaigns:
            rooms = [r.room for r in lim.own[c.id] + lim.sender[c.id]]
            rooms += [lim.workspace[c.workspace_id].room, lim.account.room, max_total]
            # What could go now, and one row more: it tells whether work waits behind a limit.
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
            limits_of[c.id] = limit
            if rows and c.send_window:
                inside, deferred = [], defaultdict(list)
                for r in rows:
                    opening = next_opening(c.send_window, r.timezone, now)
                    if opening <= now:
                        inside.append(r)
                    else:
                        deferred[opening].append(r.id)
                for opening, ids in deferred.items():
                    moves[opening] += ids
                    result.deferred_window += len(ids)
                if deferred:
                    result.more_now = True  # what is behind the deferred rows is looked at next
                rows = inside
            if rows:
                candidates[c.id] = rows
        by_id = {c.id: c for c in campaigns}
    if moves:
        with Session_() as s, s.begin():
            for opening, ids in moves.items():
                s.execute(
                    update(Message)
                    .where(Message.id.in_(ids), Message.status == "scheduled")
                    .values(due_at=opening)
                )

    _rr_offset += 1
    plan = _allocate([by_id[cid] for cid in candidates], {cid: len(r) for cid, r in candidates.items()}, lim,
                     max_total, _rr_offset)
    for by_key in plan.held.values():
        for key, n in by_key.items():
            result.waits[key] = result.waits.get(key, 0) + n
    chosen: list[int] = []
    for cid, n in plan.alloc.items():
        chosen += [r.id for r in candidates[cid][:n]]
        if n and n == len(candidates[cid]) and limits_of[cid] >= FETCH_PER_CAMPAIGN:
            result.more_now = True  # all that was looked at goes: there may be more behind it
    claimed: list[int] = []
    if chosen:
        with Session_() as s, s.begin():
            stmt = _queue_stmt(is_postgres(s))
            for i in range(0, len(chosen), 500):
                part = chosen[i : i + 500]
                claimed += s.connection().execute(stmt, {"ids": part, "now": utcnow()}).scalars().all()

    # Hand the claimed ids to the queue in small batches (about BATCH_SECONDS of the account's
    # budget each, so several workers share a slow budget), one workspace per batch, workspaces
    # interleaved so no tenant's batches all sit ahead of another's in the FIFO queue.
    ws_of = {r.id: by_id[cid].workspace_id for cid, rows in candidates.items() for r in rows}
    batches: dict[int, list[int]] = defaultdict(list)
    for mid in claimed:
        batches[ws_of[mid]].append(mid)
    size = max(1, min(SEND_BATCH, int(-(-get_settings().rate_limit.per_second * BATCH_SECONDS // 1))))
    queues = [[ids[i : i + size] for i in range(0, len(ids), size)] for ids in batches.values()]
    try:
        while any(queues):
            for q in queues:
                if q:
                    hooks.enqueue_send(q[0], 0)
                    q.pop(0)
    except Exception:
        # The queue store did not take them: back to the ledger now, not after the stale-queue sweep.
        _hand_back([mid for q in queues for ids in q for mid in ids])
        raise
    result.queued = len(claimed)

    waits = [w for w in plan.waits if w is not None]
    if lim.outstanding or claimed:
        waits.append(INFLIGHT_POLL)  # sends in flight free room (and may hand work back)
    if result.more_now:
        result.next_wake = now
    elif waits:
        result.next_wake = now + timedelta(seconds=_jittered(min(max(min(waits), 0.01), 60.0)))
        # Work that falls due before then is looked at when it falls due, not at the next poll.
        upcoming = _next_due(now, after=now)
        if upcoming is not None and upcoming < result.next_wake:
            result.next_wake = upcoming
    else:
        result.next_wake = _next_due(now)
    return result


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
    if not leases.acquire(Session_, "dispatcher", owner, ttl=budget_seconds + 30):
        if leases.request_rerun(Session_, "dispatcher") or not leases.acquire(
            Session_, "dispatcher", owner, ttl=budget_seconds + 30
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
                delay = 0.05
            if elapsed + max(delay, 0) < budget_seconds and delay < SLEEP_BELOW:
                if delay > 0:
                    time.sleep(delay)
                leases.acquire(Session_, "dispatcher", owner, ttl=budget_seconds + 30)
                continue
            # Not worth holding a worker: come back later. A steady flow (a short wait) continues
            # in a new task at once, which sleeps the rest (no second lost to Huey's scheduler).
            if leases.release(Session_, "dispatcher", owner):
                hooks.wake_dispatcher(None if delay < SLEEP_BELOW else wake)
                return last
    except BaseException:
        leases.release(Session_, "dispatcher", owner)
        raise


# --------------------------------------------------------------------------- sending


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


def _claimable():
    running = exists().where(Campaign.id == Message.campaign_id, Campaign.status == "running")
    not_suppressed = ~exists().where(
        Suppression.workspace_id == Message.workspace_id, Suppression.email == Message.email
    )
    active = or_(
        Message.enrollment_id.is_(None),
        exists().where(Enrollment.id == Message.enrollment_id, Enrollment.status == "active"),
    )
    return and_(or_(Message.is_test, running), not_suppressed, active)


def _sendable(s: Session, message_ids: list[int]) -> set[int]:
    """Which of these are still sendable (not paused, cancelled, suppressed or stopped)?"""
    if not message_ids:
        return set()
    ok = set(s.scalars(select(Message.id).where(Message.id.in_(message_ids), _claimable())).all())
    s.rollback()  # end the read transaction at once (SQLite: release the lock)
    return ok


def _retire_unsendable(s: Session, message_ids: list[int]) -> set[int]:
    """Cancel the pending ones among these messages that can never be sent (their sequence
    stopped or ended, their address suppressed, their campaign cancelled); the campaigns touched.

    A paused campaign's messages wait; these would cycle for ever instead (scheduled, queued,
    refused by the claim, stale, scheduled again...), and their campaign never completed."""
    if not message_ids:
        return set()
    suppressed = exists().where(Suppression.workspace_id == Message.workspace_id, Suppression.email == Message.email)
    ended = and_(Message.enrollment_id.is_not(None),
                 ~exists().where(Enrollment.id == Message.enrollment_id, Enrollment.status == "active"))
    cancelled = exists().where(Campaign.id == Message.campaign_id, Campaign.status == "cancelled")
    reason = case((suppressed, "address is suppressed"), (cancelled, "campaign cancelled"),
                  else_="sequence stopped")
    rows = s.execute(
        update(Message)
        .where(Message.id.in_(sorted(message_ids)), Message.status.in_(PENDING), or_(suppressed, ended, cancelled))
        .values(status="cancelled", last_error=reason, queued_at=None, lease_owner=None, lease_expires_at=None,
                updated_at=utcnow())
        .returning(Message.campaign_id)
        .execution_options(synchronize_session=False)
    ).all()
    return {r.campaign_id for r in rows}


def _hand_back(message_ids: list[int]) -> None:
    """``_settle_refused``, tried again for a while if the database does not answer, and never
    raising: what it leaves ``queued``, the stale-queue sweep schedules again."""
    try:
        retry_transient(lambda _: _settle_refused(sorted(message_ids)), "handing messages back to the ledger", 10.0)
    except Exception:  # noqa: BLE001
        log.exception("could not hand %s messages back to the ledger; the reconciler will", len(message_ids))


def _settle_refused(message_ids: list[int]) -> None:
    """Messages a send task was handed but its claim refused: the ones that can never go are
    cancelled (and their campaigns checked for completion); the ones still ``queued`` (a pause
    committed between the dispatcher's read and its claim) are scheduled again, so a resume
    sends them at once, not after the stale-queue sweep."""
    with session_factory()() as s, s.begin():
        retired = _retire_unsendable(s, message_ids)
        s.execute(
            update(Message)
            .where(Message.id.in_(sorted(message_ids)), Message.status == "queued", Message.is_test.is_(False))
            .values(status="scheduled", queued_at=None)
            .execution_options(synchronize_session=False)
        )
        for cid in sorted(retired):
            maybe_complete(s, cid)


class _StopGuard:
    """Which claimed messages may still go.

    The claim itself checked them against the database (``_claimable``), after ``generation``
    was read. From then on only the stop generation is read, once per group of calls (in the
    same Redis round trip as the rate-limit take, see ``pace``); when it moved, the
    messages not yet handed over are checked against the database again.
    """

    def __init__(self, session: Session, ids: list[int], generation: int):
        self.session = session
        self.remaining = set(ids)
        self.ok = set(ids)
        self.generation = generation
        self.lock = threading.Lock()

    def observe(self, generation: int | None) -> None:
        if generation is None:
            generation = stopgen.current()
        with self.lock:
            if generation != self.generation:
                self.generation = generation  # read before the query: a later bump forces a re-check
                self.ok = retry_transient(self._sendable, "checking messages before sending them",
                                          get_settings().lease_seconds)

    def _sendable(self, tries: int) -> set[int]:
        if tries:
            self.session.rollback()  # the failed try's connection is gone: the session takes a new one
        return _sendable(self.session, sorted(self.remaining))

    def allows(self, message_id: int) -> bool:
        with self.lock:
            self.remaining.discard(message_id)
            return message_id in self.ok

    def withdraw(self) -> set[int]:
        """The messages not handed over yet, which from now on are not allowed to go."""
        with self.lock:
            rest, self.remaining = self.remaining, set()
            self.ok -= rest
            return rest


def unsubscribe_url(workspace_id: int, email: str, message_key: str) -> str:
    from .tokens import unsubscribe_token

    settings = get_settings()
    return f"{settings.public_url}/u/{unsubscribe_token(workspace_id, email, message_key)}"


def build_email(msg, step: Step, campaign: Campaign, contact) -> OutgoingEmail:
    """Render one message. ``msg`` and ``contact`` are rows or objects with the Message's and
    the Contact's attributes (``contact`` None: a test send to an address that is no contact)."""
    from .templating import SAMPLE_CONTACT, render_step
    from .tokens import reply_address

    settings = get_settings()
    if contact is not None:
        contact_like = contact
    elif msg.is_test:  # a test to an address that is no contact: the sample contact, as the preview shows
        contact_like = {**SAMPLE_CONTACT, "email": msg.email}
    else:
        contact_like = {"email": msg.email, "first_name": None, "last_name": None, "timezone": None, "fields": {}}
    unsub = unsubscribe_url(msg.workspace_id, msg.email, msg.message_key)
    rendered = render_step(step, contact_like, campaign, unsub)
    subject = ("[Test] " + rendered.subject) if msg.is_test else rendered.subject
    host = settings.public_url.split("://", 1)[-1].split("/")[0].split(":")[0] or "herald.local"
    headers = {
        "List-Unsubscribe": f"<{unsub}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        "Message-ID": f"<{msg.message_key}@{host}>",
    }
    reply_to = campaign.reply_to
    if settings.inbound_domain:
        reply_to = reply_address(msg.message_key, settings.inbound_domain)
    tracking = campaign.tracking or {}
    name = " ".join(x for x in ((contact.first_name, contact.last_name) if contact else ()) if x) or None
    return OutgoingEmail(
        message_key=msg.message_key,
        to_email=msg.email,
        to_name=name,
        from_email=campaign.from_email,
        from_name=campaign.from_name,
        subject=subject,
        html=rendered.html,
        text=rendered.text,
        reply_to=reply_to,
        headers=headers,
        custom_args={"herald_workspace": str(msg.workspace_id), "herald_campaign": str(msg.campaign_id)},
        track_opens=bool(tracking.get("opens", True)) and not msg.is_test,
        track_clicks=bool(tracking.get("clicks", True)) and not msg.is_test,
    )


# What a send needs of a claimed message, returned by the claim itself.
_CLAIMED_COLUMNS = (_M.c.id, _M.c.workspace_id, _M.c.campaign_id, _M.c.enrollment_id, _M.c.step_id,
                    _M.c.contact_id, _M.c.email, _M.c.message_key, _M.c.attempts, _M.c.is_test, _M.c.priority)
_CONTACT_COLUMNS = (_C.c.id, _C.c.email, _C.c.first_name, _C.c.last_name, _C.c.timezone, _C.c.fields)


# The send path's statements, built once per dialect (a batch runs each with new parameters).
@lru_cache(maxsize=4)
def _claim_stmt(pg: bool):
    return (
        update(_M)
        .where(_id_match(_M.c.id, pg), _not_by_index(_M.c.status) == "queued", _claimable())
        .values(status="sending", lease_owner=bindparam("owner"), lease_expires_at=bindparam("lease_until"),
                attempts=_M.c.attempts + 1, updated_at=bindparam("now"))
        .returning(*_CLAIMED_COLUMNS)
    )


@lru_cache(maxsize=4)
def _claimed_before_stmt(pg: bool):
    """The messages a claim with these very parameters took (its lease ends at that instant)."""
    return select(*_CLAIMED_COLUMNS).where(
        _id_match(_M.c.id, pg), _not_by_index(_M.c.status) == "sending", _M.c.lease_owner == bindparam("owner"),
        _M.c.lease_expires_at == bindparam("lease_until"))


@lru_cache(maxsize=4)
def _contacts_stmt(pg: bool):
    return select(*_CONTACT_COLUMNS).where(_id_match(_C.c.id, pg))


@lru_cache(maxsize=4)
def _release_stmt(pg: bool):
    return (
        update(_M)
        .where(_id_match(_M.c.id, pg), _not_by_index(_M.c.status).in_(("sending", "ambiguous")),
               _M.c.lease_owner == bindparam("owner"))
        .values(status="scheduled", queued_at=None, lease_owner=None, lease_expires_at=None,
                attempts=_M.c.attempts - 1)
    )


@lru_cache(maxsize=4)
def _complete_enrollments_stmt(pg: bool):
    e = Enrollment.__table__
    return (update(e).where(_id_match(e.c.id, pg), _not_by_index(e.c.status) == "active")
            .values(status="completed", finished_at=bindparam("now")))


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


def send_batch(ids: list[int], hooks: Hooks, mailer=None, limiter: Limiter | None = None,
               owner: str | None = None) -> dict[str, int]:
    """Claim these messages under a lease, hand each to the provider, record the outcomes.

    The claim is one conditional UPDATE: a message already claimed (by a duplicate task, a
    re-queue after Redis loss, another consumer) is not claimed twice. The batch is rendered,
    then handed to the provider in groups: each group takes its rate-limit units (and reads
    the stop generation) in one step right before its calls, which run in a per-process pool
    only as far as the pool has idle threads (a granted unit never waits for a thread).
    Outcomes are recorded in small groups, so a consumer killed mid-batch leaves at most a few
    sends unrecorded; those, still ``sending`` when their lease runs out, become ``ambiguous``.
    """
    settings = get_settings()
    mailer = mailer or get_mailer()
    limiter = limiter or get_limiter()
    owner = owner or worker_id()
    Session_ = session_factory()
    now = utcnow()
    lease_until = now + timedelta(seconds=settings.lease_seconds)
    try:
        generation = stopgen.current()  # before the claim: a stop committed after the claim's check bumps it
    except Exception:
        # The shared store (the stop generation, the limits) does not answer: nothing can be sent
        # safely. Back to the ledger now, for the dispatcher, rather than after the stale-queue sweep.
        _hand_back(list(ids))
        raise
    params = {"ids": list(ids), "owner": owner, "lease_until": lease_until, "now": now}

    def claim(tries: int) -> tuple[bool, list]:
        with Session_() as s, s.begin():
            pg = is_postgres(s)
            # an earlier try's COMMIT may have gone through unanswered: what it claimed is ours
            before = s.connection().execute(_claimed_before_stmt(pg), params).all() if tries else []
            return pg, before + s.connection().execute(_claim_stmt(pg), params).all()

    # A database that stops answering is waited for (a while): what it did not claim stays
    # queued for the reconciler, but what it claimed would wait for its lease, then be resent.
    pg, claimed = retry_transient(claim, "claiming messages to send", settings.lease_seconds / 2)
    counts: dict[str, int] = defaultdict(int)
    refused = set(ids) - {r.id for r in claimed}
    if refused:
        _hand_back(sorted(refused))
    if not claimed:
        return dict(counts)
    claimed.sort(key=lambda r: (-r.priority, r.id))

    def read(_tries: int) -> tuple[dict, dict, dict]:
        with Session_() as s:
            contact_ids = sorted({r.contact_id for r in claimed if r.contact_id is not None})
            contacts = {c.id: c for c in s.connection().execute(_contacts_stmt(pg), {"ids": contact_ids})}
            campaigns = {c.id: c for c in s.scalars(select(Campaign).where(
                Campaign.id.in_(sorted({r.campaign_id for r in claimed}))))}
            steps = _steps_of(s, claimed, campaigns)
            s.expunge_all()
            s.rollback()
            return contacts, campaigns, steps

    contacts, campaigns, steps = retry_transient(read, "reading what the claimed messages need",
                                                 settings.lease_seconds / 2)
    check = Session_()
    run = _BatchRun(hooks, owner, counts)
    guard = _StopGuard(check, [r.id for r in claimed], generation)
    try:
        emails: dict[int, OutgoingEmail] = {}
        for r in claimed:
            if r.step_id is None:  # a test send whose step was edited away while it waited
                guard.allows(r.id)
                run.add(_outcome(r, "failed", error="its step was removed from the draft before it was sent"))
                continue
            try:
                emails[r.id] = build_email(r, steps[r.step_id], campaigns[r.campaign_id], contacts.get(r.contact_id))
            except Exception as exc:  # noqa: BLE001 - a template that cannot render fails the message
                guard.allows(r.id)
                run.add(_outcome(r, "failed", error=f"render: {exc}"))
        for r in claimed:
            if r.is_test and r.id in emails:  # the priority lane: one at a time, ahead of bulk
                run.submit(_send_one, r, emails.pop(r.id), campaigns[r.campaign_id], guard, mailer, limiter)
        group: list = []
        for r in claimed:
            if r.id not in emails:
                continue
            if group and group[0].campaign_id != r.campaign_id:
                _send_group(group, campaigns[group[0].campaign_id], emails, guard, mailer, limiter, run)
                group = []
            group.append(r)
        if group:
            _send_group(group, campaigns[group[0].campaign_id], emails, guard, mailer, limiter, run)
    except BaseException:
        # (the limiter's store or the database gone for good, a SIGKILL-less shutdown...): what had
        # not reached the provider goes back to the ledger now, not once its lease has run out
        rest = guard.withdraw()
        for r in claimed:
            if r.id in rest:
                run.add(_outcome(r, "released"))
        raise
    finally:
        try:
            run.finish()
        finally:
            check.close()
    return dict(counts)


def _outcome(r, kind: str, started: datetime | None = None, **extra) -> Outcome:
    t = started or utcnow()
    return Outcome(message_id=r.id, campaign_id=r.campaign_id, workspace_id=r.workspace_id, kind=kind,
                   started=t, finished=t, attempt=r.attempts, **extra)


class _BatchRun:
    """A batch's calls in flight and its outcomes: recorded every FLUSH_EVERY outcomes or
    FLUSH_SECONDS; campaigns whose last sequence may have ended are checked once at the end."""

    def __init__(self, hooks: Hooks, owner: str, counts: dict):
        self.hooks, self.owner, self.counts = hooks, owner, counts
        self.inflight: list = []
        self.pending: list[Outcome] = []
        self.last_flush = time.monotonic()
        self.check_complete: set[int] = set()

    def add(self, outcome: Outcome) -> None:
        self.pending.append(outcome)

    def submit(self, fn, r, *args) -> None:
        self.inflight.append((_send_pool().submit(fn, r, *args), r))

    @staticmethod
    def _result(fut, r) -> Outcome:
        try:
            return fut.result()
        except Exception:  # noqa: BLE001 - a call itself never raises: this failed before it, so nothing was sent
            log.exception("message %s was not sent; it goes back to the ledger", r.id)
            return _outcome(r, "released")

    def collect(self) -> None:
        """Take the finished calls' outcomes, and record them when a flush is due."""
        still = []
        for fut, r in self.inflight:
            if fut.done():
                self.pending.append(self._result(fut, r))
            else:
                still.append((fut, r))
        self.inflight = still
        if self.pending and (len(self.pending) >= FLUSH_EVERY or time.monotonic() - self.last_flush > FLUSH_SECONDS):
            self.flush()

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        self.last_flush = time.monotonic()
        if pending:
            self.check_complete |= _record(pending, self.hooks, self.owner, self.counts)

    def finish(self) -> None:
        for fut, r in self.inflight:
            self.pending.append(self._result(fut, r))
            if len(self.pending) >= FLUSH_EVERY:
                self.flush()
        self.inflight = []
        self.flush()
        if self.check_complete:
            try:
                retry_transient(lambda _: self._complete(sorted(self.check_complete)),
                                "checking campaigns for completion", 10.0)
            except TRANSIENT_ERRORS:  # the reconciler checks running campaigns too
                log.warning("could not check campaigns %s for completion; the reconciler will", self.check_complete)

    @staticmethod
    def _complete(campaign_ids: list[int]) -> None:
        with session_factory()() as s, s.begin():
            for cid in campaign_ids:
                maybe_complete(s, cid)


class _Slots:
    """Idle threads of the send pool: a group takes only as many units as it can start at once."""

    def __init__(self, n: int):
        self.free = n
        self.cond = threading.Condition()

    def take_up_to(self, n: int, timeout: float = 0.05) -> int:
        """At least one slot (0 when none frees within ``timeout``), at most ``n``."""
        with self.cond:
            if not self.free:
                self.cond.wait(timeout)
            k = min(n, self.free)
            self.free -= k
            return k

    def give(self, n: int = 1) -> None:
        with self.cond:
            self.free += n
            self.cond.notify(n)


_pool = None
_pool_lock = threading.Lock()
SEND_GROUP = 8  # calls started together after one limiter take


def _send_pool():
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                from concurrent.futures import ThreadPoolExecutor

                size = get_settings().send_concurrency
                _pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="herald-send")
    return _pool


def _pool_slots(pool) -> _Slots:
    """The idle threads of ``pool`` (kept with it, so a pool swapped in has slots of its size)."""
    slots = getattr(pool, "herald_slots", None)
    if slots is None:
        with _pool_lock:
            slots = getattr(pool, "herald_slots", None)
            if slots is None:
                slots = pool.herald_slots = _Slots(getattr(pool, "_max_workers", 16))
    return slots


def _send_group(group: list, campaign: Campaign, emails: dict, guard: _StopGuard, mailer, limiter: Limiter,
                run: _BatchRun) -> None:
    """Hand one campaign's part of a batch to the provider, a few calls at a time, each few
    under one limiter take (which also reads the stop generation)."""
    slots = _pool_slots(_send_pool())
    i = 0
    while i < len(group):
        run.collect()
        k = slots.take_up_to(min(SEND_GROUP, len(group) - i))
        if not k:
            continue
        granted = pace(limiter, campaign, k, guard)
        if granted < k:
            slots.give(k - granted)
        if not granted:  # a long wait: the rest of this campaign's part goes back to the ledger
            for r in group[i:]:
                guard.allows(r.id)
                run.add(_outcome(r, "released"))
            return
        stopped = 0
        for r in group[i : i + granted]:
            if guard.allows(r.id):
                run.submit(_deliver, r, emails.pop(r.id), mailer, limiter, slots)
            else:
                stopped += 1
                slots.give(1)
                run.add(_outcome(r, "released"))
        if stopped:
            _give_back(limiter, campaign, stopped)
        i += granted


def _bulk_rules(limiter: Limiter, campaign: Campaign) -> list[Rule]:
    return [account_rule(), Rule.gate(PRIORITY_GATE)] + campaign_rules(campaign) + sender_rules(campaign, limiter)


def _give_back(limiter: Limiter, campaign: Campaign, n: int) -> None:
    try:
        limiter.give_back(_bulk_rules(limiter, campaign), n)
    except Exception:  # noqa: BLE001 - a unit lost is a unit lost, not a reason to stop
        log.exception("could not give back %s limiter units", n)


def pace(limiter: Limiter, campaign: Campaign, n: int, guard: _StopGuard | None = None, urgent: bool = False) -> int:
    """Wait for the turn of up to ``n`` sends of this campaign under every limit they are under,
    right before the calls; how many units were taken (0: the wait is long, a 429 hold, a spent
    daily cap, a campaign's per-minute pace: the messages go back to the ledger, unspent, and the
    dispatcher queues them again when the limit frees).

    ``guard``: the same limiter round trip reads the stop generation, and the guard re-checks the
    batch when it moved, before any of these is sent.

    ``urgent`` (test sends, the priority lane) is under the account budget only, and while it waits
    for it it holds PRIORITY_GATE, which every bulk send also passes: the next unit is the test
    send's, not the first of the many bulk sends waiting beside it.
    """
    max_wait = min(PACE_MAX_WAIT, get_settings().lease_seconds / 4)
    deadline = time.monotonic() + 1.5 * max_wait
    shut = _memo(limiter, "shut")  # limit key -> monotonic time until which a send need not ask
    watch = stopgen.watch_key() if guard is not None else None
    waited = None
    while True:
        rules = [account_rule()] if urgent else _bulk_rules(limiter, campaign)
        mono = time.monotonic()
        blocked = next((r.key for r in rules if shut.get(r.key, 0.0) > mono), None)
        if blocked:
            _wait_counter.add(limiter, f"rate_limit_released:{_limit_kind(blocked)}", n)
            return 0
        try:
            g = limiter.take(rules, n, watch=watch)
        except Exception:  # noqa: BLE001 - no limiter, no send: the ledger keeps the messages
            log.exception("the limiter did not answer; %s messages go back to the ledger", n)
            return 0
        if guard is not None:
            guard.observe(g.watched)
        if g.granted:
            if waited:
                _wait_counter.add(limiter, f"rate_limit_waits:{_limit_kind(waited)}", g.granted)
            if urgent and waited:
                limiter.release(PRIORITY_GATE)
            if not urgent:
                _note_first_send(limiter, campaign, time.time())
            return g.granted
        waited = waited or g.blocked_by
        if g.wait > max_wait or mono + g.wait > deadline:
            if g.blocked_by and g.wait > max_wait:
                shut[g.blocked_by] = mono + min(g.wait, 5.0) - 0.05
            _wait_counter.add(limiter, f"rate_limit_released:{_limit_kind(g.blocked_by)}", n)
            return 0
        if urgent:
            limiter.hold(PRIORITY_GATE, time.time() + g.wait + 0.1)
        # Wake a moment early and ask again: with a burst of one, every millisecond a unit waits
        # for its taker is lost for good. Spread only the longer waits (many senders at once).
        time.sleep(max(0.0, g.wait - PACE_EARLY) + (random.uniform(0, 0.01) if g.wait > 0.2 else 0.0))


def _send_one(r, email: OutgoingEmail, campaign: Campaign, guard: _StopGuard, mailer, limiter: Limiter) -> Outcome:
    """A test send (the priority lane): its own stop check and pace, then the call; never raises."""
    guard.observe(None)
    if not guard.allows(r.id):
        return _outcome(r, "released")
    if not pace(limiter, campaign, 1, urgent=True):
        return _outcome(r, "released")
    return _call(r, email, mailer, limiter)


def _deliver(r, email: OutgoingEmail, mailer, limiter: Limiter, slots: _Slots) -> Outcome:
    """A bulk call whose unit was taken and whose stop check passed; frees its pool slot."""
    try:
        return _call(r, email, mailer, limiter)
    finally:
        slots.give(1)


def _call(r, email: OutgoingEmail, mailer, limiter: Limiter) -> Outcome:
    """Hand one email to the provider and classify the answer; never raises."""
    started = utcnow()
    t0 = time.perf_counter()
    try:
        res = mailer.send(email)
        out = _outcome(r, "sent", started=started, status=res.status, provider_id=res.provider_message_id)
    except RetryableSendError as exc:
        out = _outcome(r, "rate_limited" if exc.status == 429 else "retry", started=started, status=exc.status,
                       error=str(exc), body=exc.body, retry_at=exc.retry_at)
        if exc.status == 429:
            until = exc.retry_at or (utcnow() + timedelta(seconds=1))
            try:
                limiter.hold(ACCOUNT_RULE_KEY, _epoch(until))
            except Exception:  # noqa: BLE001 - the message is rescheduled either way
                log.exception("could not hold the account budget after a 429")
    except AccountError as exc:
        out = _outcome(r, "account", started=started, status=exc.status, error=str(exc), body=exc.body)
    except PermanentSendError as exc:
        out = _outcome(r, "failed", started=started, status=exc.status, error=str(exc), body=exc.body)
    except AmbiguousSendError as exc:
        out = _outcome(r, "ambiguous", started=started, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - an unexpected client error: the request may have left
        out = _outcome(r, "ambiguous", started=started, error=f"unexpected: {exc!r}")
    out.finished = started + timedelta(seconds=time.perf_counter() - t0)
    return out


def _epoch(naive_utc: datetime) -> float:

    return naive_utc.replace(tzinfo=UTC).timestamp()


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
    Session_ = session_factory()
    now = utcnow()
    wake_at: datetime | None = None
    pause: dict[int, str] = {}
    touched: set[int] = set()
    finished: set[int] = set()
    with Session_() as s, s.begin():
        attempts = []
        released = []
        for o in outcomes:
            if o.kind == "released":
                released.append(o.message_id)
                continue
            attempts.append(dict(
                workspace_id=o.workspace_id, campaign_id=o.campaign_id, message_id=o.message_id,
                number=o.attempt, started_at=o.started, finished_at=o.finished,
                duration_ms=(o.finished - o.started).total_seconds() * 1000.0,
                outcome=o.kind, http_status=o.status, error=(o.error or None) and o.error[:2000],
                retry_at=o.retry_at,
            ))
            if o.kind == "sent":
                continue  # recorded together below
            elif o.kind in ("retry", "rate_limited"):
                row = s.get(Message, o.message_id)
                if row is None or row.status not in ("sending", "ambiguous"):
                    continue
                if o.kind == "rate_limited":
                    # Provider pushback is not a failure of this message: no attempt spent.
                    row.attempts = max(0, row.attempts - 1)
                    due = o.retry_at or (now + timedelta(seconds=1))
                    due = max(due, now) + timedelta(seconds=random.uniform(0, 1.0))  # no herd at the reset
                elif row.attempts >= row.max_attempts:
                    _fail(s, row, o, now)
                    finished.add(o.campaign_id)
                    continue
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
                wake_at = due if wake_at is None else min(wake_at, due)
            elif o.kind == "failed":
                row = s.get(Message, o.message_id)
                if row is not None and row.status in ("sending", "ambiguous"):
                    _fail(s, row, o, now)
                    finished.add(o.campaign_id)
            elif o.kind == "account":
                s.execute(
                    update(Message).where(_mine(o))
                    .values(status="scheduled", queued_at=None, lease_owner=None, lease_expires_at=None,
                            attempts=Message.attempts - 1, last_error=o.error, last_response=o.body)
                )
                pause[o.campaign_id] = f"the provider refused the account: {o.error}"
            elif o.kind == "ambiguous":
                s.execute(
                    update(Message).where(_mine(o))
                    .values(status="ambiguous", ambiguous_at=now, lease_owner=None, lease_expires_at=None,
                            last_error=o.error, updated_at=now)
                )
        if released:  # handed back unspent: the dispatcher queues them again
            s.connection().execute(_release_stmt(is_postgres(s)), {"ids": released, "owner": owner})
        # Back to scheduled (released, retried, rate-limited, account pause) but stopped, suppressed
        # or cancelled meanwhile: cancelled now, or they would wait for ever.
        back = released + [o.message_id for o in outcomes if o.kind in ("retry", "rate_limited", "account")]
        finished |= _retire_unsendable(s, back)
        sent = [o for o in outcomes if o.kind == "sent"]
        if sent:
            nxt = _record_sent(s, sent, now)
            if nxt is not None:
                wake_at = nxt if wake_at is None else min(wake_at, nxt)
            touched.update(o.campaign_id for o in sent)
        if attempts and again:
            attempts = _new_attempts(s, attempts)
        if attempts:
            _insert_attempts(s, attempts)
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
        # Only a completed or failed sequence can finish a campaign.
        if s.info.pop("herald_completed", False):
            finished |= touched
    return finished, wake_at


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


_ADVANCE_COLUMNS = (_M.c.id, _M.c.enrollment_id, _M.c.campaign_id, _M.c.step_id, _M.c.workspace_id,
                    _M.c.contact_id, _M.c.email, _M.c.sent_at)


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


def _advance(s: Session, message_ids: list[int], now: datetime) -> datetime | None:
    """After sends: schedule each active sequence's next email (after its waits), or complete it."""
    rows = s.execute(
        select(*_ADVANCE_COLUMNS)
        .join(Enrollment, Enrollment.id == _M.c.enrollment_id)
        .where(_M.c.id.in_(message_ids), Enrollment.status == "active")
    ).all()
    return _advance_rows(s, rows, now, active_checked=True)


def _advance_rows(s: Session, rows: list, now: datetime, active_checked: bool) -> datetime | None:
    """Schedule the next email of each of these sent messages' sequences, or complete it.

    ``active_checked``: the rows' enrollments are known to be active; else only active ones
    advance (one query, only when some sequence has a next email).
    """
    if not rows:
        return None
    plans = {cid: _sequence_plan(s, cid) for cid in {r.campaign_id for r in rows}}
    steps = [(r, plans[r.campaign_id].get(r.step_id, (None, 0, 5))) for r in rows]
    active = None
    if not active_checked and any(p[0] is not None for _, p in steps):
        active = set(s.scalars(select(Enrollment.id).where(
            Enrollment.id.in_(sorted({r.enrollment_id for r, p in steps if p[0] is not None})),
            Enrollment.status == "active")))
    # The next email goes to the contact's address now (corrected since the last one was sent?).
    moving = sorted({r.contact_id for r, p in steps if p[0] is not None and r.contact_id is not None})
    emails = dict(s.execute(select(Contact.id, Contact.email).where(Contact.id.in_(moving))).all()) if moving else {}
    new_rows, completed = [], []
    earliest: datetime | None = None
    for r, (nxt_id, wait, max_attempts) in steps:
        if nxt_id is None:
            completed.append(r.enrollment_id)
            continue
        if active is not None and r.enrollment_id not in active:
            continue
        due = (r.sent_at or now) + timedelta(seconds=wait)
        earliest = due if earliest is None else min(earliest, due)
        new_rows.append(dict(
            workspace_id=r.workspace_id, campaign_id=r.campaign_id, enrollment_id=r.enrollment_id, step_id=nxt_id,
            contact_id=r.contact_id, email=emails.get(r.contact_id, r.email), message_key=new_message_key(),
            status="scheduled", due_at=due,
            max_attempts=max_attempts, created_at=now, updated_at=now, attempts=0, resends=0,
            priority=0, is_test=False,
        ))
    if new_rows:
        s.execute(_insert(s, Message.__table__).on_conflict_do_nothing(), new_rows)
    if completed:
        done = s.connection().execute(_complete_enrollments_stmt(is_postgres(s)),
                                      {"ids": completed, "now": now}).rowcount
        if done:
            s.info["herald_completed"] = True
    return earliest


_plans: dict[int, dict[int, tuple[int | None, int, int]]] = {}
_steps: dict[int, Step] = {}


def clear_caches() -> None:
    """Forget cached sequence plans and steps (ids are never reused in production; tests reset them)."""
    _plans.clear()
    _steps.clear()


def _steps_of(s: Session, claimed: list, campaigns: dict[int, Campaign]) -> dict[int, Step]:
    """The claimed messages' steps. A launched campaign's steps never change (only a draft can be
    edited), so they are kept per process, detached; a draft's (test sends) are read each time."""
    wanted = {r.step_id for r in claimed if r.step_id is not None}
    found = {i: _steps[i] for i in wanted if i in _steps}
    missing = sorted(wanted - found.keys())
    if missing:
        for st in s.scalars(select(Step).where(Step.id.in_(missing))):
            found[st.id] = st
            c = campaigns.get(st.campaign_id)
            if c is not None and c.status != "draft":
                if len(_steps) > 5000:
                    _steps.clear()
                _steps[st.id] = st
    return found


def _sequence_plan(s: Session, campaign_id: int) -> dict[int, tuple[int | None, int, int]]:
    """{email step id: (next email step id or None, seconds of waiting before it, max attempts)}.

    Steps cannot change once a campaign has left the draft state, so the plan is cached.
    """
    plan = _plans.get(campaign_id)
    if plan is None:
        steps = s.scalars(select(Step).where(Step.campaign_id == campaign_id).order_by(Step.position)).all()
        max_attempts = s.scalar(select(Campaign.max_attempts).where(Campaign.id == campaign_id)) or 5
        plan = {}
        for st in steps:
            if st.type == "email":
                nxt, wait = _next_email(steps, st.position)
                plan[st.id] = (nxt.id if nxt else None, wait, max_attempts)
        if len(_plans) > 1000:
            _plans.clear()
        _plans[campaign_id] = plan
    return plan


def maybe_complete(s: Session, campaign_id: int) -> bool:
    """Mark a running campaign completed once its list is enrolled and no sequence is active."""
    c = s.execute(select(Campaign.status, Campaign.fanout_done_at).where(Campaign.id == campaign_id)).first()
    if c is None or c.status != "running" or c.fanout_done_at is None:
        return False
    # Two probes that stop at the first row found (ix_enrollments_campaign_status,
    # ix_messages_campaign_status); one query OR-ing two EXISTS was planned as hashed subplans
    # that read every active enrollment and unsettled message of the campaign.
    if s.scalar(select(Enrollment.id).where(Enrollment.campaign_id == campaign_id, Enrollment.status == "active")
                .limit(1)) is not None:
        return False
    if s.scalar(select(Message.id).where(Message.campaign_id == campaign_id, Message.status.in_(UNSETTLED),
                                         Message.is_test.is_(False)).limit(1)) is not None:
        return False
    now = utcnow()
    return s.execute(
        update(Campaign).where(Campaign.id == campaign_id, Campaign.status == "running")
        .values(status="completed", finished_at=now, updated_at=now)
    ).rowcount > 0


# --------------------------------------------------------------------------- ambiguity, replay


def settle_ambiguous(s: Session, message_ids: list[int]) -> int:
    """An event carrying the message's key arrived: the provider has it. Never resend it.

    This covers a message still ``ambiguous`` (or ``sending`` under a lease), and one already put
    back in line for a resend after the window (``resends > 0``) that has not gone out again.
    The caller schedules the sequence's next step (``_advance``).
    """
    if not message_ids:
        return 0
    unsettled = or_(
        Message.status.in_(("ambiguous", "sending")),
        and_(Message.status.in_(("scheduled", "queued")), Message.resends > 0),
    )
    return s.execute(
        update(Message)
        .where(Message.id.in_(message_ids), unsettled)
        .values(status="sent", sent_at=func.coalesce(Message.sent_at, utcnow()), lease_owner=None,
                lease_expires_at=None, ambiguous_at=None, last_error=None)
    ).rowcount


def replay_message(s: Session, workspace_id: int, message_id: int) -> Message:
    """Queue a dead letter again with the same message key."""
    msg = s.get(Message, message_id) if valid_id(message_id) else None
    if msg is None or msg.workspace_id != workspace_id:
        raise NotFound("no such message")
    if msg.status != "failed":
        raise Conflict(f"only failed messages can be replayed; this one is {msg.status}")
    if msg.step_id is None:
        raise Conflict("this test's step was since removed from the draft: send a new test")
    if not msg.is_test:
        _replayable(s.get(Campaign, msg.campaign_id))
    _revive(s, [msg])
    return msg


def _replayable(c: Campaign) -> None:
    """A cancelled campaign sends nothing again: a replayed message would wait forever."""
    if c.status == "cancelled":
        raise Conflict("the campaign is cancelled: its dead letters cannot be replayed (they can be deleted)")


def replay_failed(s: Session, workspace_id: int, campaign_id: int) -> int:
    _replayable(get_campaign(s, workspace_id, campaign_id))
    # (a test of a step since removed from the draft has nothing to send again: left as it is)
    rows = s.scalars(select(Message).where(Message.campaign_id == campaign_id, Message.status == "failed",
                                           Message.step_id.is_not(None))).all()
    _revive(s, rows)
    return len(rows)


def delete_dead_letter(s: Session, workspace_id: int, message_id: int) -> dict:
    """Delete one dead letter for good, with its attempt history: it can no longer be replayed.

    Only a ``failed`` message is deleted, and the DELETE re-checks the status, so a replay that
    won the race keeps its message (Conflict). The contact's sequence stays stopped: its
    enrollment stays ``failed``. Returns what the message was (id, email, campaign_id).
    """
    msg = s.get(Message, message_id) if valid_id(message_id) else None
    if msg is None or msg.workspace_id != workspace_id:
        raise NotFound("no such message")
    if msg.status != "failed":
        raise Conflict(f"only dead letters (failed messages) can be deleted; this one is {msg.status}")
    gone = {"id": msg.id, "email": msg.email, "campaign_id": msg.campaign_id}
    s.expunge(msg)
    if not _delete_dead_letters(s, Message.id == gone["id"]):
        raise Conflict("the message is no longer a dead letter (it was replayed meanwhile)")
    log.info("dead letter %s (campaign %s) deleted", gone["id"], gone["campaign_id"])
    return gone


def delete_failed(s: Session, workspace_id: int, campaign_id: int) -> int:
    """Delete every dead letter of a campaign (test sends included), with their attempt history;
    how many. One set-based DELETE: a message replayed meanwhile is no longer ``failed`` and stays."""
    get_campaign(s, workspace_id, campaign_id)
    n = _delete_dead_letters(s, Message.campaign_id == campaign_id)
    if n:
        log.info("%s dead letters of campaign %s deleted", n, campaign_id)
    return n


def _delete_dead_letters(s: Session, which) -> int:
    """Delete the messages ``which`` names that are still ``failed``; how many. They stay in their
    steps' ``failed`` statistic (``Step.failed_deleted``; test sends are in no statistic)."""
    deleted = s.execute(
        delete(Message).where(which, Message.status == "failed")
        .returning(Message.step_id, Message.is_test).execution_options(synchronize_session=False)
    ).all()
    per_step: dict[int, int] = defaultdict(int)
    for step_id, is_test in deleted:
        if not is_test:
            per_step[step_id] += 1
    for step_id, n in sorted(per_step.items()):
        s.execute(update(Step).where(Step.id == step_id).values(failed_deleted=Step.failed_deleted + n))
    return len(deleted)


def _revive(s: Session, rows: list[Message]) -> None:
    now = utcnow()
    enrollment_ids = [m.enrollment_id for m in rows if m.enrollment_id]
    campaign_ids = {m.campaign_id for m in rows}
    for m in rows:
        m.status = "queued" if m.is_test else "scheduled"
        m.due_at = now
        m.attempts = 0  # failed_at stays: the ``failed`` statistic never decreases
        m.queued_at = now if m.is_test else None
        m.updated_at = now
    if enrollment_ids:
        s.execute(
            update(Enrollment)
            .where(Enrollment.id.in_(enrollment_ids), Enrollment.status == "failed")
            .values(status="active", stopped_reason=None, finished_at=None)
        )
    for cid in campaign_ids:
        c = s.get(Campaign, cid)
        if c is not None and c.status == "completed":
            c.status = "running"
            c.finished_at = None


# --------------------------------------------------------------------------- test sends


def test_send(s: Session, workspace_id: int, campaign_id: int, email: str, position: int | None = None) -> Message:
    """A step rendered for any address, sent first (priority lane) and kept out of statistics."""
    c = get_campaign(s, workspace_id, campaign_id)
    # The address as contacts and suppressions hold it (stripped, lower-cased), not email-validator's
    # normal form (an IDNA domain in Unicode, NFC): that one missed the contact and the suppression
    # of the very address given ('a@xn--bcher-kva.example').
    email = normalize_email(email)
    steps = _email_steps(c)
    if not steps:
        raise InvalidInput("the campaign has no email step")
    if position is None:
        step = steps[0]
    else:
        step = next((st for st in c.steps if st.position == position), None)
        if step is None or step.type != "email":
            raise InvalidInput(f"step {position} is not an email step of this campaign")
    if is_suppressed(s, workspace_id, email):
        # Never sent to, test or not: refused here, rather than queued and then refused by every claim.
        raise Conflict(f"{email} is on the suppression list: nothing is sent to it, test sends included",
                       details={"email": [email]})
    contact = s.scalar(select(Contact).where(Contact.workspace_id == workspace_id, Contact.email == email))
    now = utcnow()
    msg = Message(workspace_id=workspace_id, campaign_id=c.id, enrollment_id=None, step_id=step.id,
                  contact_id=contact.id if contact else None, email=email, message_key=new_message_key(),
                  status="queued", is_test=True, priority=10, due_at=now, queued_at=now, max_attempts=3)
    s.add(msg)
    s.flush()
    return msg


# --------------------------------------------------------------------------- reconciliation


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
    """The safety net, run every minute under a lease so it never overlaps itself.

    - ``sending`` whose lease ran out (the consumer died mid-call): ``ambiguous``;
    - ``queued`` for too long (the Redis task was lost): ``scheduled`` again;
    - ``ambiguous`` past the window with no event carrying its key: ``scheduled`` again (same key);
      with such an event: ``sent``;
    - running campaigns: enroll list members added since the last sweep; finish fan-outs that died;
      mark finished campaigns completed;
    - wake the dispatcher when work is due.
    """
    settings = get_settings()
    owner = owner or worker_id()
    Session_ = session_factory()
    if not leases.acquire(Session_, "reconciler", owner, ttl=300):
        return None
    report = ReconcileReport()
    try:
        now = utcnow()
        with Session_() as s, s.begin():
            report.ambiguous_marked = s.execute(
                update(Message)
                .where(Message.status == "sending", Message.lease_expires_at < now)
                .values(status="ambiguous", ambiguous_at=now, lease_owner=None, lease_expires_at=None,
                        last_error="lease expired mid-send (consumer stopped?)", updated_at=now)
            ).rowcount
            stale = s.scalars(
                update(Message)
                .where(Message.status == "queued", Message.queued_at < now - stale_queued(), Message.is_test.is_(False))
                .values(status="scheduled", queued_at=None)
                .returning(Message.id)
            ).all()
            report.requeued_stale = len(stale)
            _retire_unsendable(s, list(stale))
            # Test sends have no dispatcher: re-enqueue them directly below.
            stale_tests = s.scalars(
                select(Message.id).where(Message.status == "queued", Message.queued_at < now - stale_queued(),
                                         Message.is_test.is_(True))
            ).all()
            window_start = now - timedelta(seconds=settings.ambiguous_window)
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
                from .queue_health import add_totals

                add_totals(s, {"ambiguous_resends": len(resent)})  # /metrics' counter, in this transaction
            _retire_unsendable(s, list(resent))  # stopped or suppressed meanwhile (completion: below)
            test_resend = s.scalars(
                update(Message)
                .where(Message.status == "scheduled", Message.is_test.is_(True))
                .values(status="queued", queued_at=now)
                .returning(Message.id)
            ).all()
        for mid in list(stale_tests) + list(test_resend):
            hooks.enqueue_send([mid], 10)

        lock_row = None
        with Session_() as s:
            from .models import JobLock

            lock_row = s.get(JobLock, "reconciler")
            since = (lock_row.checkpoint if lock_row and lock_row.checkpoint else None)
            fanned_out = dict(s.execute(select(Campaign.id, Campaign.fanout_done_at.is_not(None))
                                        .where(Campaign.status.in_(("running", "paused")))).all())
            running = list(fanned_out)
        sweep_from = (since - timedelta(minutes=5)) if since else None
        for cid in running:
            if fanned_out[cid]:  # only list members added since the last sweep
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
        with Session_() as s, s.begin():
            for cid in running:
                if maybe_complete(s, cid):
                    report.completed += 1
            from .models import JobLock

            row = s.get(JobLock, "reconciler")
            if row is not None:
                row.checkpoint = now
            # Counted up to DUE_NOW_CAP: a count of a million due rows every minute says no more.
            due = (
                select(literal(1)).select_from(Message)
                .join(Campaign, Campaign.id == Message.campaign_id)
                .where(Message.status == "scheduled", Message.due_at <= now, Campaign.status == "running")
                .limit(DUE_NOW_CAP)
                .subquery()
            )
            report.due_now = s.scalar(select(func.count()).select_from(due)) or 0
        if report.due_now or report.enrolled or report.requeued_stale or report.resent_ambiguous:
            hooks.wake_dispatcher(None)
        else:
            nxt = _next_due(now)
            if nxt is not None:
                hooks.wake_dispatcher(nxt)
        return report
    finally:
        leases.release(Session_, "reconciler", owner)
