"""Campaign completion: a running campaign is completed once its list is enrolled and no
sequence is active. Below the engine and ``sequences``, which both finish campaigns."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .db import utcnow
from .models import Campaign, Enrollment, Message

UNSETTLED = ("scheduled", "queued", "sending", "ambiguous")


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
