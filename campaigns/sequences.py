"""Stopping sequences: the domain functions that suppression, replies and events call.

A stopped enrollment sends nothing more: its not-yet-sent messages (scheduled, queued) are
cancelled in the same transaction, and the send path re-checks suppression and enrollment
status when it claims a message, so a message already queued in Redis is not sent either.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from . import stopgen
from .completion import maybe_complete
from .db import utcnow
from .models import Contact, Enrollment, Message

PENDING = ("scheduled", "queued")


def stop_enrollments(session: Session, enrollment_ids: Iterable[int], reason: str) -> int:
    """Stop these enrollments and cancel what they had not sent yet. Returns how many stopped."""
    ids = list(enrollment_ids)
    if not ids:
        return 0
    stopgen.mark(session)
    now = utcnow()
    stopped = session.execute(
        update(Enrollment)
        .where(Enrollment.id.in_(ids), Enrollment.status == "active")
        .values(status="stopped", stopped_reason=reason, finished_at=now)
        .returning(Enrollment.campaign_id)
        .execution_options(synchronize_session=False)
    ).all()
    session.execute(
        update(Message)
        .where(Message.enrollment_id.in_(ids), Message.status.in_(PENDING))
        .values(status="cancelled", last_error=f"sequence stopped: {reason}", updated_at=now)
        .execution_options(synchronize_session=False)
    )
    # The last sequence of a campaign may have ended here: it is completed now, not at the
    # reconciler's next minute.
    for campaign_id in sorted({r.campaign_id for r in stopped}):
        maybe_complete(session, campaign_id)
    return len(stopped)


def stop_for_emails(session: Session, workspace_id: int, emails: Iterable[str], reason: str) -> int:
    """Stop every sequence, in every campaign of the workspace, to these addresses."""
    emails = sorted({e.strip().lower() for e in emails if e})
    if emails:
        stopgen.mark(session)
    total = 0
    for i in range(0, len(emails), 500):
        chunk = emails[i : i + 500]
        contact_ids = select(Contact.id).where(Contact.workspace_id == workspace_id, Contact.email.in_(chunk))
        ids = session.scalars(
            select(Enrollment.id).where(
                Enrollment.workspace_id == workspace_id,
                Enrollment.contact_id.in_(contact_ids),
                Enrollment.status == "active",
            )
        ).all()
        total += stop_enrollments(session, ids, reason)
        # Test sends and any message not tied to an enrollment.
        session.execute(
            update(Message)
            .where(Message.workspace_id == workspace_id, Message.email.in_(chunk), Message.status.in_(PENDING))
            .values(status="cancelled", last_error=f"address suppressed: {reason}", updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    return total


def stop_contact_in_campaign(session: Session, campaign_id: int, contact_id: int, reason: str) -> int:
    """Stop one contact's sequence in one campaign (a reply, or a click/open in ``stop_on``)."""
    ids = session.scalars(
        select(Enrollment.id).where(
            Enrollment.campaign_id == campaign_id, Enrollment.contact_id == contact_id, Enrollment.status == "active"
        )
    ).all()
    return stop_enrollments(session, ids, reason)
