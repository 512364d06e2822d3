"""The ledger's guards on the send path: which messages may still be claimed or sent, and
handing refused or unsendable messages back (scheduled again, or cancelled for good)."""

from __future__ import annotations

import threading

from sqlalchemy import and_, case, exists, or_, select, update
from sqlalchemy.orm import Session

from .. import stopgen
from ..completion import maybe_complete
from ..config import get_settings
from ..db import retry_transient, session_factory, utcnow
from ..models import Campaign, Enrollment, Message, Suppression
from .common import PENDING, log


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
    except Exception:
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
