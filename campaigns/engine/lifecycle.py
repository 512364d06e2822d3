"""A campaign's lifecycle: launch, pause, resume, cancel, and test sends. Each runs in the
caller's transaction; the work that must follow the commit is queued as an effect
(``campaigns.effects``): the launch's fan-out, the dispatcher's wake, the test send."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .. import effects, stopgen
from ..contacts import normalize_email
from ..db import utcnow
from ..errors import Conflict, InvalidInput
from ..models import Campaign, Contact, Enrollment, Message
from ..suppressions import is_suppressed
from .common import PENDING, TEST_PRIORITY, _email_steps, get_campaign, new_message_key

TEST_MAX_ATTEMPTS = 3  # a test send is tried this often before it becomes a dead letter


def launch(session: Session, workspace_id: int, campaign_id: int) -> Campaign:
    """Draft -> running (fan-out follows in a task). Launching a running campaign changes nothing
    (launch twice = launched once); a paused one is refused, naming why it is paused: launch does
    not resume it (resume does), and answering as if it were sending would mislead."""
    c = get_campaign(session, workspace_id, campaign_id)
    if c.status == "running":
        # Its fan-out again (idempotent): a launch whose task the queue store refused finishes.
        effects.after_commit(session, effects.FANOUT, c.id)
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
    effects.after_commit(session, effects.FANOUT, c.id)
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
    """Paused -> running; the dispatcher is woken once this commits."""
    c = get_campaign(session, workspace_id, campaign_id)
    effects.after_commit(session, effects.WAKE_DISPATCHER)
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
                  status="queued", is_test=True, priority=TEST_PRIORITY, due_at=now, queued_at=now,
                  max_attempts=TEST_MAX_ATTEMPTS)
    s.add(msg)
    s.flush()
    effects.after_commit(s, effects.SEND_TEST, msg.id)
    return msg
