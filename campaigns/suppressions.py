"""The suppression list: addresses a workspace must never mail, and the statuses they imply.

Suppressing an address sets its contact's status from the reason (:data:`STATUS_FOR_REASON`)
and stops every sequence to it; a contact created for a suppressed address starts with that
status (:func:`status_for_new_contact`). Only :func:`unsuppress` turns it back to ``active``.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql import Select

from .contact_rules import text_problem
from .db import chunks, dialect_insert, insert_many, one_of, utcnow
from .errors import NotFound
from .models import Contact, Suppression
from .sequences import stop_for_emails

# Contact status that a suppression reason implies; other reasons leave the status alone.
STATUS_FOR_REASON = {
    "unsubscribe": "unsubscribed",
    "bounce": "bounced",
    "dropped": "bounced",
    "spamreport": "complained",
}
SUPPRESSION_REASONS = ("manual", "unsubscribe", "bounce", "dropped", "spamreport", "import")


def suppression_reasons(session: Session, workspace_id: int, emails: Iterable[str]) -> dict[str, str]:
    """``{email: reason}`` for those of ``emails`` (already normalised) that are suppressed."""
    emails = sorted(set(emails))
    found: dict[str, str] = {}
    for chunk in chunks(emails):
        found.update(
            session.execute(
                select(Suppression.email, Suppression.reason).where(
                    Suppression.workspace_id == workspace_id, one_of(session, Suppression.email, chunk)
                )
            ).all()
        )
    return found


def suppressed_emails(session: Session, workspace_id: int, emails: Iterable[str]) -> set[str]:
    return set(suppression_reasons(session, workspace_id, emails))


def status_for_new_contact(reason: str | None) -> str:
    """The status a contact starts with when its address is suppressed for ``reason``."""
    return STATUS_FOR_REASON.get(reason or "", "active")


def suppress(session: Session, workspace_id: int, emails: Iterable[str], reason: str) -> int:
    """Add addresses to the workspace's suppression list; returns how many were new.

    Addresses are normalised (strip, lower-case); blanks are ignored; no syntax check here
    (the API checks what users send; provider events carry real addresses). Existing
    suppressions are kept as they are (``ON CONFLICT (workspace_id, email) DO NOTHING``).
    Matching contacts get the status the reason implies (:data:`STATUS_FOR_REASON`), and
    every sequence to these addresses is stopped (``sequences.stop_for_emails``). The caller
    commits.
    """
    addresses = sorted({e.strip().lower() for e in emails if isinstance(e, str) and e.strip()})
    if not addresses:
        return 0
    reason = (reason or "manual")[:40]
    status = STATUS_FOR_REASON.get(reason)
    now = utcnow()
    inserted = 0
    for chunk in chunks(addresses):
        rows = [{"workspace_id": workspace_id, "email": e, "reason": reason, "created_at": now} for e in chunk]
        t = Suppression.__table__
        inserted += len(
            insert_many(
                session,
                dialect_insert(session)(t)
                .on_conflict_do_nothing(index_elements=[t.c.workspace_id, t.c.email])
                .returning(t.c.id),
                rows,
            )
        )
        if status:
            session.execute(
                update(Contact)
                .where(Contact.workspace_id == workspace_id, one_of(session, Contact.email, chunk))
                .values(status=status, updated_at=now)
                .execution_options(synchronize_session=False)
            )
    stop_for_emails(session, workspace_id, addresses, reason)
    return inserted


def unsuppress(session: Session, workspace_id: int, email: str) -> None:
    """Remove an address from the suppression list (NotFound when it is not on it).

    An explicit decision to mail the address again, so its contact (if any) goes back to
    ``active``. Sequences stopped by the suppression stay stopped; campaigns that skipped it
    enroll it through ``engine.enroll_contact``, which the callers run in the same transaction.
    """
    email = (email or "").strip().lower()
    if text_problem(email):
        raise NotFound("that address is not suppressed")
    removed = session.execute(
        delete(Suppression)
        .where(Suppression.workspace_id == workspace_id, Suppression.email == email)
        .execution_options(synchronize_session=False)
    ).rowcount
    if not removed:
        raise NotFound(f"{email} is not suppressed")
    session.execute(
        update(Contact)
        .where(Contact.workspace_id == workspace_id, Contact.email == email, Contact.status != "active")
        .values(status="active", updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def is_suppressed(session: Session, workspace_id: int, email: str) -> bool:
    email = (email or "").strip().lower()
    if text_problem(email):
        return False
    return (
        session.scalar(
            select(Suppression.id).where(Suppression.workspace_id == workspace_id, Suppression.email == email)
        )
        is not None
    )


def suppressions_query(workspace_id: int) -> Select:
    return select(Suppression).where(Suppression.workspace_id == workspace_id)
