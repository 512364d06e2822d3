"""A sender's standing: paused or not (and why, and who lifted it), today's cap under its
warm-up, and its recent bounce and spam rates. Shared by the guardrails, the engine's limits
and the senders API, so all three say the same thing."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from .db import utcnow
from .models import Message, Sender, SenderAudit

RECENT_SENDS = 200  # the "recent sends" the bounce and spam rates are taken over
MIN_RECENT_SENDS = 50  # fewer than this: too few to judge a sender by


def sender_key(workspace_id: int, email: str) -> str:
    """The limiter's key prefix for a sender (by address, as before senders were rows, so the
    daily counts and warm-up marks kept in the limiter's store carry over)."""
    return f"sender:{workspace_id}:{email.strip().lower()}"


def cap_today(daily_cap: int | None, warmup: dict | None, day0: float | None, now: float) -> int | None:
    """Today's cap: ``daily_cap``, lowered by the warm-up ramp (``start + day * increment`` on day
    ``day`` counted in whole 24-hour periods from the first send ``day0``, epoch seconds; day 0
    before any send). None: no cap."""
    cap = int(daily_cap) if daily_cap else None
    if warmup:
        days = 0 if day0 is None else max(0, int((now - day0) // 86400))
        ramp = int(warmup.get("start", 1)) + int(warmup.get("increment", 0)) * days
        cap = min(cap, ramp) if cap else ramp
    return cap


@dataclass
class RecentRates:
    sends: int  # recent sends looked at (at most RECENT_SENDS)
    bounce_rate: float | None  # None: no sends yet
    spam_rate: float | None


def recent_rates(s: Session, sender_id: int) -> RecentRates:
    """Bounces and spam reports among the sender's last RECENT_SENDS sends (tests excluded)."""
    recent = (
        select(Message.status, Message.spam_reported_at)
        .where(Message.sender_id == sender_id, Message.sent_at.is_not(None), Message.is_test.is_(False))
        .order_by(Message.sent_at.desc())
        .limit(RECENT_SENDS)
        .subquery()
    )
    n, bounced, spam = s.execute(select(
        func.count(),
        func.coalesce(func.sum((recent.c.status == "bounced").cast(type_=Message.attempts.type)), 0),
        func.count(recent.c.spam_reported_at),
    )).one()
    if not n:
        return RecentRates(0, None, None)
    return RecentRates(int(n), int(bounced) / n, int(spam) / n)


def pause_sender(s: Session, sender_id: int, reason: str, actor: str = "guardrail") -> bool:
    """Pause a sender (its contacts wait; nothing is moved to another mailbox), with the reason
    on record. False when it was paused already (the first reason stays). The caller commits."""
    now = utcnow()
    row = s.execute(
        update(Sender).where(Sender.id == sender_id, Sender.status != "paused")
        .values(status="paused", status_reason=reason, paused_at=now, updated_at=now)
        .returning(Sender.workspace_id)
    ).first()
    if row is None:
        return False
    s.add(SenderAudit(workspace_id=row.workspace_id, sender_id=sender_id, action="paused", reason=reason,
                      actor=actor, at=now))
    return True


def resume_sender(s: Session, sender: Sender, actor: str) -> bool:
    """Lift a pause, recording who and when. False when it was not paused. The caller commits."""
    if sender.status != "paused":
        return False
    now = utcnow()
    s.add(SenderAudit(workspace_id=sender.workspace_id, sender_id=sender.id, action="resumed",
                      reason=sender.status_reason, actor=actor, at=now))
    sender.status = "ok"
    sender.status_reason = None
    sender.paused_at = None
    sender.updated_at = now
    return True


def audit_of(s: Session, sender_id: int, limit: int = 20) -> list[SenderAudit]:
    """The sender's pauses and resumes, newest first."""
    return list(s.scalars(select(SenderAudit).where(SenderAudit.sender_id == sender_id)
                          .order_by(SenderAudit.id.desc()).limit(limit)))
