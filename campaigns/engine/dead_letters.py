"""Ambiguity and dead letters: settling a message an event proves was sent, replaying failed
messages with the same key, deleting dead letters (docs/architecture.md, "Ambiguity")."""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from .. import effects
from ..contacts import valid_id
from ..db import utcnow
from ..errors import Conflict, NotFound
from ..models import Campaign, Enrollment, Message, Step
from .common import get_campaign, log


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
        # after the commit: a test send is queued again at once; bulk work waits for the dispatcher
        effects.after_commit(s, *((effects.SEND_TEST, m.id) if m.is_test else (effects.WAKE_DISPATCHER,)))
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
