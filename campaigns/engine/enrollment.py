"""Fan-out: enrolling a campaign's list (set-based, in parts under a lease) and scheduling each
new enrollment's first email; enrolling members added later or taken off suppression."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import exists, literal, select, text
from sqlalchemy.orm import Session

from .. import leases
from ..config import get_settings
from ..db import is_postgres, session_factory, utcnow
from ..models import Campaign, Contact, Enrollment, ListMember, Message, Suppression
from ..suppressions import unsuppress as remove_suppression
from .common import Hooks, _insert, _random_key_sql, log, worker_id
from .sequence import _first_email

# A first message's columns: every one given (the Python-side defaults are not applied to an
# INSERT fed by a DML CTE).
_MESSAGE_COLUMNS = ["workspace_id", "campaign_id", "enrollment_id", "step_id", "contact_id", "email", "message_key",
                    "status", "due_at", "max_attempts", "created_at", "updated_at", "is_test", "priority", "attempts",
                    "resends"]


def _members(c: Campaign, now: datetime, since: datetime | None, after: int | None, upto: int | None):
    """The enrollment rows of the campaign's list members that may be enrolled: active, not
    suppressed, added since ``since``, contact ids in (after, upto] (None: open)."""
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
    if after is not None:
        members = members.where(ListMember.contact_id > after)
    if upto is not None:
        members = members.where(ListMember.contact_id <= upto)
    return members


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
    after, upto = contacts or (None, None)
    members = _members(c, now, since, after, upto)
    ins = _insert(session, Enrollment.__table__).from_select(
        ["workspace_id", "campaign_id", "contact_id", "status", "created_at"], members
    ).on_conflict_do_nothing()
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
            _insert(session, Message.__table__).from_select(_MESSAGE_COLUMNS, first).on_conflict_do_nothing(),
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
        _insert(session, Message.__table__).from_select(_MESSAGE_COLUMNS, first).on_conflict_do_nothing()
    )
    return _finish_fanout(c, now, enrolled, last=upto is None)


def _refresh_statistics(session: Session, added: int) -> None:
    """ANALYZE messages and enrollments after a fan-out that changed a good part of them.

    PostgreSQL plans from statistics that autovacuum refreshes about a minute after a bulk
    change; the sends start at once. The send path's statements do not depend on them any more
    (``_not_by_index``), but the dispatcher's reads and the joins plan better on fresh ones.
    Same threshold as autovacuum's: at least 1,000 rows and 10% of the table.
    """
    if added < ANALYZE_MIN_ROWS:
        return
    known = session.execute(text(
        "SELECT COALESCE(max(reltuples), 0) FROM pg_class WHERE oid = CAST('messages' AS regclass)")).scalar() or 0
    if added >= ANALYZE_SHARE * known:
        session.execute(text("ANALYZE messages, enrollments"))


def _finish_fanout(c: Campaign, now: datetime, enrolled: int, last: bool = True) -> int:
    if last and c.fanout_done_at is None:
        c.fanout_done_at = now
    return enrolled


FANOUT_FIRST_PART = 1000  # contacts in a fan-out's first part: the first sends start after it


FANOUT_PART = 20000  # contacts in each later part
ANALYZE_MIN_ROWS, ANALYZE_SHARE = 1000, 0.1  # autovacuum's own threshold (see _refresh_statistics)


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
