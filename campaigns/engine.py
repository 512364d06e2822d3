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

from sqlalchemy import and_, exists, func, literal, or_, select, update
from sqlalchemy.orm import Session

from . import leases
from .config import get_settings
from .db import is_postgres, session_factory, utcnow
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
SEND_BATCH = 20  # messages per send task
FETCH_PER_CAMPAIGN = 500  # due messages looked at per campaign per dispatch pass
FLUSH_EVERY = 10  # record outcomes after this many sends (or FLUSH_SECONDS)
FLUSH_SECONDS = 0.25
# Queued this long without a send task claiming it: the queue store lost the task.
STALE_QUEUED = timedelta(seconds=float(os.environ.get("HERALD_STALE_QUEUED_SECONDS", "90")))
CONSECUTIVE_FAILURES_PAUSE = 20
ACCOUNT_RULE_KEY = "account"


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
    return float(os.environ.get("HERALD_RETRY_BASE", "10"))


def retry_cap() -> float:
    return float(os.environ.get("HERALD_RETRY_CAP", "900"))


def backoff_delay(attempt: int, base: float | None = None, cap: float | None = None) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**(attempt-1))), at least 0.5 s."""
    base = retry_base() if base is None else base
    cap = retry_cap() if cap is None else cap
    ceiling = min(cap, base * (2 ** max(0, attempt - 1)))
    return max(0.5, random.uniform(0, ceiling))


# --------------------------------------------------------------------------- campaign lifecycle


def get_campaign(session: Session, workspace_id: int, campaign_id: int) -> Campaign:
    c = session.get(Campaign, campaign_id)
    if c is None or c.workspace_id != workspace_id:
        raise NotFound("no such campaign")
    return c


def _email_steps(campaign: Campaign) -> list[Step]:
    return [s for s in campaign.steps if s.type == "email"]


def launch(session: Session, workspace_id: int, campaign_id: int) -> Campaign:
    """Draft -> running (fan-out follows in a task). Launching a running campaign changes nothing."""
    c = get_campaign(session, workspace_id, campaign_id)
    if c.status in ("running", "paused"):
        return c
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
    c = get_campaign(session, workspace_id, campaign_id)
    if c.status == "cancelled":
        return c
    if c.status not in ("draft", "running", "paused"):
        raise Conflict(f"a {c.status} campaign cannot be cancelled")
    now = utcnow()
    c.status = "cancelled"
    c.finished_at = now
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


def _next_email(campaign: Campaign, after_position: int) -> tuple[Step | None, int]:
    wait = 0
    for s in campaign.steps:
        if s.position <= after_position:
            continue
        if s.type == "wait":
            wait += s.wait_seconds or 0
        elif s.type == "email":
            return s, wait
    return None, wait


def fanout(session: Session, campaign_id: int, since: datetime | None = None) -> int:
    """Enroll the campaign's list (set-based) and schedule each new enrollment's first email.

    Suppressed addresses and contacts that are not active are skipped. Safe to run again: the
    unique (campaign, contact) and (enrollment, step) constraints make repeats do nothing.
    ``since`` limits the look to list members added after that time (the reconciler's sweep).
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
    ins = _insert(session, Enrollment.__table__).from_select(
        ["workspace_id", "campaign_id", "contact_id", "status", "created_at"], members
    )
    enrolled = session.execute(ins.on_conflict_do_nothing()).rowcount or 0

    first = (
        select(
            Enrollment.workspace_id,
            Enrollment.campaign_id,
            Enrollment.id,
            literal(step.id),
            Enrollment.contact_id,
            Contact.email,
            _random_key_sql(session),
            literal("scheduled"),
            literal(now + timedelta(seconds=wait)),
            literal(c.max_attempts),
            literal(now),
            literal(now),
        )
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
    session.execute(
        _insert(session, Message.__table__)
        .from_select(
            ["workspace_id", "campaign_id", "enrollment_id", "step_id", "contact_id", "email", "message_key",
             "status", "due_at", "max_attempts", "created_at", "updated_at"],
            first,
        )
        .on_conflict_do_nothing()
    )
    if c.fanout_done_at is None:
        c.fanout_done_at = now
    return enrolled


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


# --------------------------------------------------------------------------- dispatch


@dataclass
class DispatchResult:
    queued: int = 0
    deferred_window: int = 0
    next_wake: datetime | None = None
    more_now: bool = False
    waits: dict[str, int] = field(default_factory=dict)  # rule key -> messages held back


def campaign_rules(c: Campaign, now: float | None = None) -> list[Rule]:
    """The campaign's own limits (per_minute smooth; per_day a UTC-day cap)."""
    from .config import parse_rate

    rules = []
    limits = c.limits or {}
    if limits.get("per_minute"):
        rules.append(Rule.from_rate(f"campaign:{c.id}:minute", parse_rate(f"{int(limits['per_minute'])}/minute")))
    if limits.get("per_day"):
        rules.append(Rule.per_day(f"campaign:{c.id}:day", int(limits["per_day"]), now))
    return rules


def sender_rules(c: Campaign, now: float | None = None) -> list[Rule]:
    """The sender's (from address) daily cap, with the warm-up ramp when one is set."""
    sender = (c.limits or {}).get("sender") or {}
    cap = sender.get("daily_cap")
    warm = sender.get("warmup")
    if warm:
        # Day 0 is the first day this sender address was used by any campaign in the workspace.
        started = c.launched_at or utcnow()
        days = max(0, (utcnow() - started).days)
        ramp = int(warm.get("start", 1)) + int(warm.get("increment", 0)) * days
        cap = min(cap, ramp) if cap else ramp
    if not cap:
        return []
    return [Rule.per_day(f"sender:{c.workspace_id}:{c.from_email.lower()}:day", int(cap), now)]


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


_rr_offset = 0


def dispatch_once(limiter: Limiter, hooks: Hooks, now: datetime | None = None, max_total: int = 2000) -> DispatchResult:
    """One pass: look at due work of every running campaign, queue what the budgets allow, fairly.

    Round-robin across workspaces, then across a workspace's campaigns (water-filling, so an
    idle share goes to whoever has work). Work outside its send window moves to the next opening.
    """
    global _rr_offset
    settings = get_settings()
    now = now or utcnow()
    result = DispatchResult()
    Session_ = session_factory()
    with Session_() as s:
        campaigns = s.scalars(select(Campaign).where(Campaign.status == "running")).all()
        if not campaigns:
            return result
        candidates: dict[int, list] = {}
        for c in campaigns:
            rows = s.execute(
                select(Message.id, Message.email, Contact.timezone)
                .outerjoin(Contact, Contact.id == Message.contact_id)
                .where(Message.campaign_id == c.id, Message.status == "scheduled", Message.due_at <= now)
                .order_by(Message.due_at, Message.id)
                .limit(FETCH_PER_CAMPAIGN)
            ).all()
            if len(rows) == FETCH_PER_CAMPAIGN:
                result.more_now = True
            if rows and c.send_window:
                inside, deferred = [], defaultdict(list)
                for r in rows:
                    opening = next_opening(c.send_window, r.timezone, now)
                    if opening <= now:
                        inside.append(r)
                    else:
                        deferred[opening].append(r.id)
                for opening, ids in deferred.items():
                    s.execute(
                        update(Message)
                        .where(Message.id.in_(ids), Message.status == "scheduled")
                        .values(due_at=opening)
                    )
                    result.deferred_window += len(ids)
                rows = inside
            if rows:
                candidates[c.id] = rows
        s.commit()
        by_id = {c.id: c for c in campaigns}

    if not candidates:
        result.next_wake = _next_due(now)
        return result

    # Campaign and sender caps first: each campaign takes what its own limits allow.
    ts = time.time()
    per_campaign_rules = {cid: campaign_rules(by_id[cid], ts) + sender_rules(by_id[cid], ts) for cid in candidates}
    demand: dict[int, int] = {}
    wake_in = None
    for cid, rows in candidates.items():
        want = min(len(rows), max_total)
        rules = per_campaign_rules[cid]
        if rules:
            g = limiter.take(rules, want)
            if g.granted < want:
                result.waits[g.blocked_by or "campaign"] = result.waits.get(g.blocked_by or "campaign", 0) + (
                    want - g.granted
                )
                wake_in = g.wait if wake_in is None else min(wake_in, g.wait)
            want = g.granted
        if want:
            demand[cid] = want

    # Then the account budget, divided fairly across workspaces and their campaigns.
    total = min(sum(demand.values()), max_total)
    account = [Rule.from_rate(ACCOUNT_RULE_KEY, settings.rate_limit)]
    grant = limiter.take(account, total) if total else None
    budget = grant.granted if grant else 0
    if grant and grant.granted < total:
        result.waits[ACCOUNT_RULE_KEY] = total - grant.granted
        wake_in = grant.wait if wake_in is None else min(wake_in, grant.wait)

    by_ws: dict[int, list[int]] = defaultdict(list)
    for cid in demand:
        by_ws[by_id[cid].workspace_id].append(cid)
    ws_order = sorted(by_ws)
    if ws_order:
        _rr_offset = (_rr_offset + 1) % len(ws_order)
        ws_order = ws_order[_rr_offset:] + ws_order[:_rr_offset]
    ws_demand = {ws: sum(demand[c] for c in cids) for ws, cids in by_ws.items()}
    ws_alloc = _fair_share(ws_demand, budget, ws_order)
    alloc: dict[int, int] = {}
    for ws, cids in by_ws.items():
        alloc.update(_fair_share({c: demand[c] for c in cids}, ws_alloc[ws], sorted(cids)))

    chosen: list[int] = []
    for cid, n in alloc.items():
        chosen += [r.id for r in candidates[cid][:n]]
    claimed: list[int] = []
    if chosen:
        with Session_() as s, s.begin():
            for i in range(0, len(chosen), 500):
                part = chosen[i : i + 500]
                claimed += s.scalars(
                    update(Message)
                    .where(Message.id.in_(part), Message.status == "scheduled")
                    .values(status="queued", queued_at=utcnow())
                    .returning(Message.id)
                ).all()
    # Units granted for messages that were not there (or were claimed by another dispatcher).
    unused_total = budget - len(claimed)
    if unused_total > 0:
        limiter.give_back(account, unused_total)
    claimed_set = set(claimed)
    for cid in demand:
        used = sum(1 for r in candidates[cid] if r.id in claimed_set)
        if demand[cid] - used > 0 and per_campaign_rules[cid]:
            limiter.give_back(per_campaign_rules[cid], demand[cid] - used)

    # Hand the claimed ids to the queue in small batches, one workspace per batch.
    ws_of = {}
    for cid, rows in candidates.items():
        for r in rows:
            ws_of[r.id] = by_id[cid].workspace_id
    batches: dict[int, list[int]] = defaultdict(list)
    for mid in claimed:
        batches[ws_of[mid]].append(mid)
    # Interleave workspaces so no tenant's batches all sit ahead of another's in the FIFO queue.
    queues = [[ids[i : i + SEND_BATCH] for i in range(0, len(ids), SEND_BATCH)] for ids in batches.values()]
    while any(queues):
        for q in queues:
            if q:
                hooks.enqueue_send(q.pop(0), 0)
    result.queued = len(claimed)

    if result.waits:
        try:
            for key, n in result.waits.items():
                limiter.incr(f"rate_limit_waits:{key.split(':')[0]}", n)
        except Exception:  # noqa: BLE001 - a counter must never stop dispatch
            log.exception("could not count rate-limit waits")
    if result.more_now or wake_in is not None:
        result.next_wake = now + timedelta(seconds=min(wake_in if wake_in is not None else 0.0, 60.0))
    else:
        result.next_wake = _next_due(now)
    return result


def _next_due(now: datetime) -> datetime | None:
    with session_factory()() as s:
        return s.scalar(
            select(func.min(Message.due_at))
            .join(Campaign, Campaign.id == Message.campaign_id)
            .where(Message.status == "scheduled", Campaign.status == "running")
        )


def run_dispatcher(hooks: Hooks, limiter: Limiter | None = None, budget_seconds: float = 5.0,
                   owner: str | None = None) -> DispatchResult | None:
    """Dispatch in a loop for up to ``budget_seconds`` under the ``dispatcher`` lease.

    Only one dispatcher loops at a time; a wake that finds the lease held asks the holder to
    run once more (so no wake is lost), and returns. Short waits for budget are slept here;
    longer ones become a delayed wake-up task.
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
            if elapsed + max(delay, 0) < budget_seconds and delay < 1.0:
                if delay > 0:
                    time.sleep(delay)
                leases.acquire(Session_, "dispatcher", owner, ttl=budget_seconds + 30)
                continue
            # Not worth holding a worker: come back later.
            if leases.release(Session_, "dispatcher", owner):
                hooks.wake_dispatcher(wake)
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


def _still_sendable(s: Session, message_id: int) -> bool:
    """Checked right before each call: paused, cancelled, suppressed or stopped since the claim?"""
    ok = s.scalar(select(literal(1)).where(Message.id == message_id, _claimable()))
    s.rollback()  # end the read transaction at once (SQLite: release the lock)
    return bool(ok)


def unsubscribe_url(workspace_id: int, email: str, message_key: str) -> str:
    from .tokens import unsubscribe_token

    settings = get_settings()
    return f"{settings.public_url}/u/{unsubscribe_token(workspace_id, email, message_key)}"


def build_email(msg: Message, step: Step, campaign: Campaign, contact: Contact | None) -> OutgoingEmail:
    from .templating import render_step
    from .tokens import reply_address

    settings = get_settings()
    contact_like = contact or {"email": msg.email, "first_name": None, "last_name": None, "timezone": None,
                               "fields": {}}
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


def send_batch(ids: list[int], hooks: Hooks, mailer=None, limiter: Limiter | None = None,
               owner: str | None = None) -> dict[str, int]:
    """Claim these messages under a lease, hand each to the provider, record the outcomes.

    The claim is one conditional UPDATE: a message already claimed (by a duplicate task, a
    re-queue after Redis loss, another consumer) is not claimed twice. Outcomes are recorded
    in small groups, so a consumer killed mid-batch leaves at most a few sends unrecorded;
    those, still ``sending`` when their lease runs out, become ``ambiguous``.
    """
    settings = get_settings()
    mailer = mailer or get_mailer()
    limiter = limiter or get_limiter()
    owner = owner or worker_id()
    Session_ = session_factory()
    now = utcnow()
    lease_until = now + timedelta(seconds=settings.lease_seconds)
    with Session_() as s, s.begin():
        claimed = s.scalars(
            update(Message)
            .where(Message.id.in_(ids), Message.status == "queued", _claimable())
            .values(status="sending", lease_owner=owner, lease_expires_at=lease_until,
                    attempts=Message.attempts + 1, updated_at=now)
            .returning(Message.id)
        ).all()
    counts: dict[str, int] = defaultdict(int)
    if not claimed:
        return dict(counts)
    with Session_() as s:
        rows = s.execute(
            select(Message, Step, Campaign, Contact)
            .join(Step, Step.id == Message.step_id)
            .join(Campaign, Campaign.id == Message.campaign_id)
            .outerjoin(Contact, Contact.id == Message.contact_id)
            .where(Message.id.in_(claimed))
            .order_by(Message.priority.desc(), Message.id)
        ).all()
        s.expunge_all()
        s.rollback()
    pending: list[Outcome] = []
    last_flush = time.monotonic()
    check = Session_()
    try:
        for msg, step, campaign, contact in rows:
            started = utcnow()
            base = dict(message_id=msg.id, campaign_id=msg.campaign_id, workspace_id=msg.workspace_id,
                        started=started, attempt=msg.attempts)
            if not _still_sendable(check, msg.id):
                pending.append(Outcome(kind="released", finished=utcnow(), **base))
                continue
            try:
                email = build_email(msg, step, campaign, contact)
            except Exception as exc:  # noqa: BLE001 - a template that cannot render fails the message
                pending.append(Outcome(kind="failed", finished=utcnow(), error=f"render: {exc}", **base))
                continue
            t0 = time.perf_counter()
            try:
                res = mailer.send(email)
                out = Outcome(kind="sent", status=res.status, provider_id=res.provider_message_id, **base,
                              finished=utcnow())
            except RetryableSendError as exc:
                kind = "rate_limited" if exc.status == 429 else "retry"
                out = Outcome(kind=kind, status=exc.status, error=str(exc), body=exc.body, retry_at=exc.retry_at,
                              finished=utcnow(), **base)
                if exc.status == 429:
                    until = exc.retry_at or (utcnow() + timedelta(seconds=1))
                    limiter.hold(ACCOUNT_RULE_KEY, until.timestamp() if until.tzinfo else _epoch(until))
            except AccountError as exc:
                out = Outcome(kind="account", status=exc.status, error=str(exc), body=exc.body,
                              finished=utcnow(), **base)
            except PermanentSendError as exc:
                out = Outcome(kind="failed", status=exc.status, error=str(exc), body=exc.body,
                              finished=utcnow(), **base)
            except AmbiguousSendError as exc:
                out = Outcome(kind="ambiguous", error=str(exc), finished=utcnow(), **base)
            out.finished = out.started + timedelta(seconds=time.perf_counter() - t0)
            pending.append(out)
            if len(pending) >= FLUSH_EVERY or time.monotonic() - last_flush > FLUSH_SECONDS:
                _record(pending, hooks, owner, counts)
                pending = []
                last_flush = time.monotonic()
    finally:
        check.close()
        if pending:
            _record(pending, hooks, owner, counts)
    return dict(counts)


def _epoch(naive_utc: datetime) -> float:

    return naive_utc.replace(tzinfo=UTC).timestamp()


def _record(outcomes: list[Outcome], hooks: Hooks, owner: str, counts: dict) -> None:
    """Record a group of outcomes in one transaction and advance the sequences that sent."""
    Session_ = session_factory()
    now = utcnow()
    wake_at: datetime | None = None
    pause: dict[int, str] = {}
    touched: set[int] = set()
    with Session_() as s, s.begin():
        attempts = []
        for o in outcomes:
            counts[o.kind] += 1
            mine = and_(Message.id == o.message_id, Message.status.in_(("sending", "ambiguous")))
            if o.kind == "released":
                s.execute(
                    update(Message).where(mine, Message.lease_owner == owner)
                    .values(status="scheduled", queued_at=None, lease_owner=None, lease_expires_at=None,
                            attempts=Message.attempts - 1)
                )
                continue
            attempts.append(dict(
                workspace_id=o.workspace_id, campaign_id=o.campaign_id, message_id=o.message_id,
                number=o.attempt, started_at=o.started, finished_at=o.finished,
                duration_ms=(o.finished - o.started).total_seconds() * 1000.0,
                outcome=o.kind, http_status=o.status, error=(o.error or None) and o.error[:2000],
                retry_at=o.retry_at,
            ))
            if o.kind == "sent":
                # A 202 is authoritative even if the lease ran out and the message was marked ambiguous.
                done = s.execute(
                    update(Message).where(mine)
                    .values(status="sent", sent_at=func.coalesce(Message.sent_at, o.finished),
                            provider_message_id=o.provider_id, lease_owner=None, lease_expires_at=None,
                            last_error=None, ambiguous_at=None, updated_at=now)
                ).rowcount
                if done:
                    nxt = _advance(s, o.message_id)
                    if nxt is not None:
                        wake_at = nxt if wake_at is None else min(wake_at, nxt)
                    touched.add(o.campaign_id)
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
                    touched.add(o.campaign_id)
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
                    touched.add(o.campaign_id)
            elif o.kind == "account":
                s.execute(
                    update(Message).where(mine)
                    .values(status="scheduled", queued_at=None, lease_owner=None, lease_expires_at=None,
                            attempts=Message.attempts - 1, last_error=o.error, last_response=o.body)
                )
                pause[o.campaign_id] = f"the provider refused the account: {o.error}"
            elif o.kind == "ambiguous":
                s.execute(
                    update(Message).where(mine)
                    .values(status="ambiguous", ambiguous_at=now, lease_owner=None, lease_expires_at=None,
                            last_error=o.error, updated_at=now)
                )
        if attempts:
            s.execute(MessageAttempt.__table__.insert(), attempts)
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
        for cid in touched:
            maybe_complete(s, cid)
    if wake_at is not None:
        hooks.wake_dispatcher(wake_at)


def _fail(s: Session, row: Message, o: Outcome, now: datetime) -> None:
    """The dead letter: kept with its error, attempts and last response, until replayed."""
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


def _advance(s: Session, message_id: int) -> datetime | None:
    """After a send: schedule the sequence's next email (after its waits), or complete it."""
    msg = s.get(Message, message_id)
    if msg is None or msg.enrollment_id is None:
        return None
    enrollment = s.get(Enrollment, msg.enrollment_id)
    if enrollment is None or enrollment.status != "active":
        return None
    campaign = s.get(Campaign, msg.campaign_id)
    step = s.get(Step, msg.step_id)
    nxt, wait = _next_email(campaign, step.position)
    now = utcnow()
    if nxt is None:
        enrollment.status = "completed"
        enrollment.finished_at = now
        return None
    due = (msg.sent_at or now) + timedelta(seconds=wait)
    s.execute(
        _insert(s, Message.__table__)
        .values(workspace_id=msg.workspace_id, campaign_id=msg.campaign_id, enrollment_id=msg.enrollment_id,
                step_id=nxt.id, contact_id=msg.contact_id, email=msg.email, message_key=new_message_key(),
                status="scheduled", due_at=due, max_attempts=campaign.max_attempts, created_at=now,
                updated_at=now, attempts=0, resends=0, priority=0, is_test=False)
        .on_conflict_do_nothing()
    )
    return due


def maybe_complete(s: Session, campaign_id: int) -> bool:
    """Mark a running campaign completed once its list is enrolled and no sequence is active."""
    c = s.get(Campaign, campaign_id)
    if c is None or c.status != "running" or c.fanout_done_at is None:
        return False
    busy = s.scalar(
        select(literal(1)).where(
            or_(
                exists().where(Enrollment.campaign_id == campaign_id, Enrollment.status == "active"),
                exists().where(Message.campaign_id == campaign_id, Message.status.in_(UNSETTLED),
                               Message.is_test.is_(False)),
            )
        )
    )
    if busy:
        return False
    c.status = "completed"
    c.finished_at = utcnow()
    return True


# --------------------------------------------------------------------------- ambiguity, replay


def settle_ambiguous(s: Session, message_ids: list[int]) -> int:
    """An event carrying the message's key arrived: the provider has it. Never resend it."""
    if not message_ids:
        return 0
    return s.execute(
        update(Message)
        .where(Message.id.in_(message_ids), Message.status.in_(("ambiguous", "sending")))
        .values(status="sent", sent_at=func.coalesce(Message.sent_at, utcnow()), lease_owner=None,
                lease_expires_at=None, ambiguous_at=None, last_error=None)
    ).rowcount


def replay_message(s: Session, workspace_id: int, message_id: int) -> Message:
    """Queue a dead letter again with the same message key."""
    msg = s.get(Message, message_id)
    if msg is None or msg.workspace_id != workspace_id:
        raise NotFound("no such message")
    if msg.status != "failed":
        raise Conflict(f"only failed messages can be replayed; this one is {msg.status}")
    _revive(s, [msg])
    return msg


def replay_failed(s: Session, workspace_id: int, campaign_id: int) -> int:
    get_campaign(s, workspace_id, campaign_id)
    rows = s.scalars(select(Message).where(Message.campaign_id == campaign_id, Message.status == "failed")).all()
    _revive(s, rows)
    return len(rows)


def _revive(s: Session, rows: list[Message]) -> None:
    now = utcnow()
    enrollment_ids = [m.enrollment_id for m in rows if m.enrollment_id]
    campaign_ids = {m.campaign_id for m in rows}
    for m in rows:
        m.status = "queued" if m.is_test else "scheduled"
        m.due_at = now
        m.attempts = 0
        m.failed_at = None
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
    from email_validator import EmailNotValidError, validate_email

    c = get_campaign(s, workspace_id, campaign_id)
    try:
        email = validate_email(email, check_deliverability=False).normalized.lower()
    except EmailNotValidError as exc:
        raise InvalidInput(f"{email!r} is not a valid address: {exc}") from None
    steps = _email_steps(c)
    if not steps:
        raise InvalidInput("the campaign has no email step")
    if position is None:
        step = steps[0]
    else:
        step = next((st for st in c.steps if st.position == position), None)
        if step is None or step.type != "email":
            raise InvalidInput(f"step {position} is not an email step of this campaign")
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
    due_now: int = 0


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
            report.requeued_stale = s.execute(
                update(Message)
                .where(Message.status == "queued", Message.queued_at < now - STALE_QUEUED, Message.is_test.is_(False))
                .values(status="scheduled", queued_at=None)
            ).rowcount
            # Test sends have no dispatcher: re-enqueue them directly below.
            stale_tests = s.scalars(
                select(Message.id).where(Message.status == "queued", Message.queued_at < now - STALE_QUEUED,
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
            report.resent_ambiguous = s.execute(
                update(Message)
                .where(Message.status == "ambiguous", Message.ambiguous_at < window_start, ~has_event)
                .values(status="scheduled", due_at=now, resends=Message.resends + 1, ambiguous_at=None,
                        queued_at=None, last_error="resent: no event arrived within the ambiguity window")
            ).rowcount
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
            running = s.scalars(select(Campaign.id).where(Campaign.status.in_(("running", "paused")))).all()
        sweep_from = (since - timedelta(minutes=5)) if since else None
        for cid in running:
            with Session_() as s, s.begin():
                c = s.get(Campaign, cid)
                report.enrolled += fanout(s, cid, since=None if c.fanout_done_at is None else sweep_from)
        with Session_() as s, s.begin():
            for cid in running:
                if maybe_complete(s, cid):
                    report.completed += 1
            from .models import JobLock

            row = s.get(JobLock, "reconciler")
            if row is not None:
                row.checkpoint = now
            report.due_now = s.scalar(
                select(func.count()).select_from(Message)
                .join(Campaign, Campaign.id == Message.campaign_id)
                .where(Message.status == "scheduled", Message.due_at <= now, Campaign.status == "running")
            ) or 0
        if report.due_now or report.enrolled or report.requeued_stale or report.resent_ambiguous:
            hooks.wake_dispatcher(None)
        else:
            nxt = _next_due(now)
            if nxt is not None:
                hooks.wake_dispatcher(nxt)
        return report
    finally:
        leases.release(Session_, "reconciler", owner)
