"""Contacts, lists and list members, always within one workspace (suppressions: suppressions.py).

Every function takes the ``workspace_id`` it acts for and never touches another workspace's
rows: an id that belongs elsewhere is answered exactly like an id that does not exist
(:class:`~campaigns.errors.NotFound`), so nothing leaks across workspaces.

Addresses are normalised by ``strip().lower()`` once they pass ``email-validator`` (syntax
only, no DNS). That is the same normalisation ``campaigns.sequences.stop_for_emails`` and the
event handlers use, so a suppression always matches its contact.

Contact ``status`` is ``active | unsubscribed | bounced | complained``; a contact created for
an address that is already suppressed starts with the status its reason implies
(``suppressions.status_for_new_contact``).

Writes that take many addresses are set-based (``INSERT ... ON CONFLICT``), in chunks of
``db.CHUNK``, through ``db.dialect_insert``, so they behave the same on PostgreSQL and
SQLite; on PostgreSQL the hot paths (list members, lookups by address) pass one array
parameter instead of thousands of placeholders.

Ids that come from outside (URLs, bodies) are checked with :func:`valid_id` and strings with
:func:`text_problem` before they reach the database, so bad input is a 4xx, never a driver
error.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import delete, false, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql import Select

from .contact_rules import (  # noqa: F401  (the validation's names, as callers have always used them)
    EMAIL_MAX,
    FIELD_KEY_MAX,
    FIELD_VALUE_MAX,
    FIELDS_TOTAL_MAX,
    MAX_FIELDS,
    NAME_MAX,
    TIMEZONE_MAX,
    check_fields,
    check_name,
    check_timezone,
    contact_problems,
    email_problem,
    fields_problems,
    fields_size,
    is_timezone,
    normalize_email,
    sort_addresses,
    text_problem,
    timezone_problem,
)
from .db import chunks, dialect_insert, insert_many, is_postgres, one_of, utcnow
from .errors import Conflict, InvalidInput, NotFound
from .ids import MAX_ID, valid_id  # noqa: F401
from .models import Campaign, Contact, ContactList, Enrollment, ListMember, Message
from .suppressions import status_for_new_contact, suppression_reasons

MAX_BULK = 10_000  # addresses or ids per API call (suppressions, list members)


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()


# --- contacts ---------------------------------------------------------------------------------


def get_contact(session: Session, workspace_id: int, contact_id: int) -> Contact:
    contact = session.get(Contact, contact_id) if valid_id(contact_id) else None
    if contact is None or contact.workspace_id != workspace_id:
        raise NotFound(f"no contact with id {contact_id}")
    return contact


def find_contact(session: Session, workspace_id: int, email: str) -> Contact | None:
    return session.scalar(
        select(Contact).where(Contact.workspace_id == workspace_id, Contact.email == email.strip().lower())
    )


def _validated(first_name, last_name, timezone, fields) -> tuple:
    """Check the attributes given (``UNSET`` ones pass through), before anything is written."""
    return (
        first_name if first_name is UNSET else check_name(first_name, "first_name"),
        last_name if last_name is UNSET else check_name(last_name, "last_name"),
        timezone if timezone is UNSET else check_timezone(timezone),
        fields if fields is UNSET else check_fields(fields),
    )


def _apply(contact: Contact, first_name, last_name, timezone, fields) -> None:
    """Assign validated attributes; ``UNSET`` ones are kept."""
    if first_name is not UNSET:
        contact.first_name = first_name
    if last_name is not UNSET:
        contact.last_name = last_name
    if timezone is not UNSET:
        contact.timezone = timezone
    if fields is not UNSET and fields:
        # Merged key by key: a key given replaces its value, keys not given are kept.
        # A new dict, because the JSON column does not track changes made in place.
        merged = {**(contact.fields or {}), **fields}
        problems = fields_problems(merged)  # the limits hold for the stored fields with these
        if problems:
            raise InvalidInput((problems.get("_schema") or ["fields is not valid"])[0], {"fields": problems})
        contact.fields = merged


def upsert_contact(
    session: Session,
    workspace_id: int,
    email: str,
    *,
    first_name=UNSET,
    last_name=UNSET,
    timezone=UNSET,
    fields=UNSET,
) -> tuple[Contact, bool]:
    """Create the contact for ``email`` or update it; returns ``(contact, created)``.

    Attributes left ``UNSET`` are kept; ``None`` clears a name or the time zone; ``fields`` is
    merged into the stored fields key by key. The status is never reset: a contact created for
    a suppressed address starts unsubscribed/bounced/complained as the suppression says.
    """
    email = normalize_email(email)
    attrs = _validated(first_name, last_name, timezone, fields)

    contact = find_contact(session, workspace_id, email)
    created = False
    if contact is None:
        reason = suppression_reasons(session, workspace_id, [email]).get(email)
        now = utcnow()
        new_id = session.scalar(
            dialect_insert(session)(Contact)
            .values(
                workspace_id=workspace_id,
                email=email,
                fields={},
                status=status_for_new_contact(reason),
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=[Contact.workspace_id, Contact.email])
            .returning(Contact.id)
        )
        # None: a concurrent request created it first; then this call is an update.
        created = new_id is not None
        contact = find_contact(session, workspace_id, email)
    _apply(contact, *attrs)
    if not created:
        contact.updated_at = utcnow()
    session.flush()
    return contact, created


def update_contact(session: Session, workspace_id: int, contact_id: int, **changes) -> Contact:
    """Change some of email, first_name, last_name, timezone, fields (merged key by key)."""
    contact = get_contact(session, workspace_id, contact_id)
    unknown = set(changes) - {"email", "first_name", "last_name", "timezone", "fields"}
    if unknown:
        raise InvalidInput("unknown attributes", {k: ["Unknown field."] for k in sorted(unknown)})
    email = normalize_email(changes["email"]) if "email" in changes else contact.email
    attrs = _validated(*(changes.get(k, UNSET) for k in ("first_name", "last_name", "timezone", "fields")))
    if email != contact.email and find_contact(session, workspace_id, email) is not None:
        raise Conflict(f"another contact already has the address {email}", {"email": ["already used"]})
    old_email = contact.email
    try:
        with session.begin_nested():
            contact.email = email
            _apply(contact, *attrs)
            contact.updated_at = utcnow()
    except IntegrityError:  # the address was taken concurrently
        raise Conflict(f"another contact already has the address {email}", {"email": ["already used"]}) from None
    if email != old_email:
        # A corrected address reaches the emails still to come (not the test sends, not a call
        # already in flight); the sequence's later steps take the contact's address too.
        session.execute(
            update(Message)
            .where(Message.contact_id == contact.id, Message.status.in_(("scheduled", "queued")),
                   Message.is_test.is_(False))
            .values(email=email, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    return contact


def delete_contact(session: Session, workspace_id: int, contact_id: int) -> None:
    """Delete the contact (and its list memberships). A suppression of its address stays.

    A contact that was ever enrolled in a campaign is refused (Conflict): deleting it would
    delete its enrollments and ledger rows with it, and campaign statistics never decrease.
    Suppress the address instead.
    """
    contact = get_contact(session, workspace_id, contact_id)
    enrolled = session.scalar(select(func.count()).select_from(Enrollment).where(Enrollment.contact_id == contact.id))
    if enrolled:
        raise Conflict(
            f"contact {contact_id} has campaign history ({enrolled} enrollment(s)); deleting it would change "
            "campaign statistics. Suppress the address instead.",
            {"enrollments": enrolled},
        )
    session.delete(contact)
    session.flush()


def contacts_query(session: Session, workspace_id: int, email: str | None = None, list_id: int | None = None) -> Select:
    """The workspace's contacts, optionally one address or one list's members (the list must
    be the workspace's, else NotFound). Ordered and paged by the caller."""
    stmt = select(Contact).where(Contact.workspace_id == workspace_id)
    if email is not None:
        # An address that cannot be stored matches nothing (and never reaches the database).
        stmt = stmt.where(false()) if text_problem(email) else stmt.where(Contact.email == email.strip().lower())
    if list_id is not None:
        get_list(session, workspace_id, list_id)
        stmt = stmt.join(ListMember, ListMember.contact_id == Contact.id).where(ListMember.list_id == list_id)
    return stmt


# --- lists ------------------------------------------------------------------------------------


def _list_name(name) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidInput("a list needs a name", {"name": ["must be a non-empty string"]})
    problem = text_problem(name)
    if problem:
        raise InvalidInput(f"the list name {problem}", {"name": [problem]})
    name = name.strip()
    if len(name) > NAME_MAX:
        raise InvalidInput("the list name is too long", {"name": [f"at most {NAME_MAX} characters"]})
    return name


def _name_taken(session: Session, workspace_id: int, name: str, but: int | None = None) -> bool:
    stmt = select(ContactList.id).where(ContactList.workspace_id == workspace_id, ContactList.name == name)
    if but is not None:
        stmt = stmt.where(ContactList.id != but)
    return session.scalar(stmt) is not None


def create_list(session: Session, workspace_id: int, name: str) -> ContactList:
    """A new list; Conflict when the workspace already has a list of that name."""
    name = _list_name(name)
    if _name_taken(session, workspace_id, name):
        raise Conflict(f"a list named {name!r} already exists", {"name": ["already used"]})
    row = ContactList(workspace_id=workspace_id, name=name)
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:  # created concurrently
        raise Conflict(f"a list named {name!r} already exists", {"name": ["already used"]}) from None
    return row


def get_list(session: Session, workspace_id: int, list_id: int) -> ContactList:
    row = session.get(ContactList, list_id) if valid_id(list_id) else None
    if row is None or row.workspace_id != workspace_id:
        raise NotFound(f"no list with id {list_id}")
    return row


def find_list(session: Session, workspace_id: int, name: str) -> ContactList | None:
    return session.scalar(
        select(ContactList).where(ContactList.workspace_id == workspace_id, ContactList.name == name.strip())
    )


def get_or_create_list(session: Session, workspace_id: int, name: str) -> tuple[ContactList, bool]:
    row = find_list(session, workspace_id, _list_name(name))
    if row is not None:
        return row, False
    return create_list(session, workspace_id, name), True


def rename_list(session: Session, workspace_id: int, list_id: int, name: str) -> ContactList:
    row = get_list(session, workspace_id, list_id)
    name = _list_name(name)
    if name != row.name:
        if _name_taken(session, workspace_id, name, but=row.id):
            raise Conflict(f"a list named {name!r} already exists", {"name": ["already used"]})
        row.name = name
        try:
            with session.begin_nested():
                session.flush()
        except IntegrityError:
            raise Conflict(f"a list named {name!r} already exists", {"name": ["already used"]}) from None
    return row


def delete_list(session: Session, workspace_id: int, list_id: int) -> None:
    """Delete the list and its memberships (the contacts stay). Refused (Conflict) while a
    running or paused campaign sends to it; a draft's list is unset."""
    row = get_list(session, workspace_id, list_id)
    busy = session.scalars(
        select(Campaign.id).where(Campaign.list_id == row.id, Campaign.status.in_(("running", "paused")))
    ).all()
    if busy:
        raise Conflict(
            f"list {list_id} is used by running or paused campaigns ({', '.join(map(str, busy))}); "
            "cancel them first",
            {"campaigns": list(busy)},
        )
    session.execute(delete(ListMember).where(ListMember.list_id == row.id))
    session.delete(row)
    session.flush()


def lists_query(workspace_id: int) -> Select:
    return select(ContactList).where(ContactList.workspace_id == workspace_id)


def member_counts(session: Session, list_ids: Iterable[int]) -> dict[int, int]:
    ids = list(set(list_ids))
    if not ids:
        return {}
    rows = session.execute(
        select(ListMember.list_id, func.count()).where(ListMember.list_id.in_(ids)).group_by(ListMember.list_id)
    ).all()
    counts = dict.fromkeys(ids, 0)
    counts.update(rows)
    return counts


def members_query(session: Session, workspace_id: int, list_id: int) -> Select:
    return contacts_query(session, workspace_id, list_id=list_id)


def ensure_contacts(session: Session, workspace_id: int, emails: list[str]) -> tuple[dict[str, int], int]:
    """Contact ids for these normalised addresses, creating the missing contacts (no names);
    returns ``({email: id}, how many were created)``. Set-based, in chunks."""
    ids: dict[str, int] = {}
    created = 0
    for chunk in chunks(sorted(set(emails))):
        existing = dict(
            session.execute(
                select(Contact.email, Contact.id).where(
                    Contact.workspace_id == workspace_id, one_of(session, Contact.email, chunk)
                )
            ).all()
        )
        missing = [e for e in chunk if e not in existing]
        if missing:
            reasons = suppression_reasons(session, workspace_id, missing)
            now = utcnow()
            rows = [
                {
                    "workspace_id": workspace_id,
                    "email": e,
                    "fields": {},
                    "status": status_for_new_contact(reasons.get(e)),
                    "created_at": now,
                    "updated_at": now,
                }
                for e in missing
            ]
            t = Contact.__table__
            inserted = insert_many(
                session,
                dialect_insert(session)(t)
                .on_conflict_do_nothing(index_elements=[t.c.workspace_id, t.c.email])
                .returning(t.c.email, t.c.id),
                rows,
            )
            created += len(inserted)
            existing.update(
                session.execute(
                    select(Contact.email, Contact.id).where(
                        Contact.workspace_id == workspace_id, one_of(session, Contact.email, missing)
                    )
                ).all()
            )
        ids.update(existing)
    return ids, created


_PG_ADD_MEMBERS = text(
    """
    INSERT INTO list_members (list_id, contact_id, workspace_id, added_at)
    SELECT :list_id, m.contact_id, :workspace_id, :now
    FROM unnest(CAST(:contact_ids AS bigint[])) AS m(contact_id)
    ON CONFLICT (list_id, contact_id) DO NOTHING
    RETURNING contact_id
    """
)


def add_list_members(session: Session, workspace_id: int, list_id: int, contact_ids: Iterable[int]) -> int:
    """Add contacts (ids already known to be the workspace's) to a list; returns how many were
    new members. Existing memberships are kept (ON CONFLICT DO NOTHING)."""
    ids = sorted(set(contact_ids))
    added = 0
    now = utcnow()
    t = ListMember.__table__
    for chunk in chunks(ids):
        if is_postgres(session):
            # One array parameter instead of 4,000 placeholders (the import adds 1,000 a batch).
            params = {"list_id": list_id, "workspace_id": workspace_id, "now": now, "contact_ids": chunk}
            added += len(session.execute(_PG_ADD_MEMBERS, params).all())
            continue
        rows = [{"list_id": list_id, "contact_id": cid, "workspace_id": workspace_id, "added_at": now} for cid in chunk]
        added += len(
            insert_many(
                session,
                dialect_insert(session)(t)
                .on_conflict_do_nothing(index_elements=[t.c.list_id, t.c.contact_id])
                .returning(t.c.contact_id),
                rows,
            )
        )
    return added


def add_members(
    session: Session,
    workspace_id: int,
    list_id: int,
    emails: list | None = None,
    contact_ids: list | None = None,
) -> dict:
    """Add members to a list by address (missing contacts are created) or by contact id.

    Returns ``{"added", "already", "contacts_created", "invalid": [{"email"|"contact_id",
    "reason"}]}``. An id that is unknown or belongs to another workspace is reported as
    invalid ("no such contact"), never added. The caller commits, then notifies the engine.
    """
    get_list(session, workspace_id, list_id)
    invalid: list[dict] = []
    wanted: set[int] = set()
    contacts_created = 0
    if emails:
        good, invalid = sort_addresses(emails)
        ids, contacts_created = ensure_contacts(session, workspace_id, good)
        wanted.update(ids.values())
    if contact_ids:
        asked = []
        for cid in contact_ids:
            if isinstance(cid, bool) or not isinstance(cid, int):
                invalid.append({"contact_id": cid, "reason": "not a contact id"})
            elif not valid_id(cid):
                invalid.append({"contact_id": cid, "reason": "no such contact"})
            else:
                asked.append(cid)
        found: set[int] = set()
        for chunk in chunks(sorted(set(asked))):
            found.update(
                session.scalars(
                    select(Contact.id).where(Contact.workspace_id == workspace_id, one_of(session, Contact.id, chunk))
                )
            )
        invalid.extend({"contact_id": cid, "reason": "no such contact"} for cid in asked if cid not in found)
        wanted.update(found)
    added = add_list_members(session, workspace_id, list_id, wanted)
    return {
        "added": added,
        "already": len(wanted) - added,
        "contacts_created": contacts_created,
        "invalid": invalid,
    }


def remove_member(session: Session, workspace_id: int, list_id: int, contact_id: int) -> None:
    get_list(session, workspace_id, list_id)
    if not valid_id(contact_id):
        raise NotFound(f"contact {contact_id} is not a member of list {list_id}")
    removed = session.execute(
        delete(ListMember)
        .where(
            ListMember.list_id == list_id,
            ListMember.contact_id == contact_id,
            ListMember.workspace_id == workspace_id,
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    if not removed:
        raise NotFound(f"contact {contact_id} is not a member of list {list_id}")
