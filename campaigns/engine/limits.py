"""The limits as the dispatcher and the sends see them: the account budget, campaigns' and
senders' rules (caps, warm-up, gaps), workspaces' concurrency, and each limit's room now."""

from __future__ import annotations

import random
import time
from collections import defaultdict

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..config import get_settings, parse_rate
from ..db import utcnow
from ..models import DEFAULT_CONCURRENCY, Campaign, Message, Workspace
from ..ratelimit import Limiter, Rule, get_limiter
from .common import SEND_BATCH, _epoch, _memo, _read_session
from .planning import _allocate, _Limits, _Room, _room, sender_key

ACCOUNT_RULE_KEY = "account"


def dispatch_horizon() -> float:
    """Seconds of work the dispatcher queues at a time (HERALD_DISPATCH_HORIZON)."""
    return get_settings().dispatch_horizon


CONCURRENCY_POLL = 0.1  # a workspace at its concurrency budget: look again this soon


SEND_LATENESS = 0.05  # seconds a granted call may take to reach the provider; kept out of bursts


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
    rules = []
    limits = c.limits or {}
    if limits.get("per_minute"):
        rules.append(Rule.from_rate(f"campaign:{c.id}:minute", parse_rate(f"{int(limits['per_minute'])}/minute"),
                                    allowance=SEND_LATENESS))
    if limits.get("per_day"):
        rules.append(Rule.per_day(f"campaign:{c.id}:day", int(limits["per_day"])))
    return rules


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


def _read_limits(s: Session, limiter: Limiter, campaigns: list[Campaign], horizon: float) -> _Limits:
    """Every limit's room for these campaigns: the limiter's state, less what is queued or sending."""
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
