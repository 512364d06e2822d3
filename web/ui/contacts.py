"""UI pages: contacts (search, add, edit, delete) and what the lists' pages share with them
(the search box, the menu of lists, telling the engine a list changed)."""

from __future__ import annotations

import json
import logging

from flask import flash, g, redirect, render_template, request, url_for
from sqlalchemy import func, select

from campaigns import contacts, suppressions
from campaigns.models import Campaign, Contact, ContactList, Enrollment, ListMember, Message, Suppression
from tasks import jobs

from ..auth import login_required
from ..db import get_db
from ..params import keyset_page, parse_id
from .blueprint import bp, form_action, refused

log = logging.getLogger(__name__)
CONTACT_STATUSES = ("active", "unsubscribed", "bounced", "complained")


def notify_list_changed(list_id: int) -> None:
    """After the commit: running campaigns of the list enroll the new members (a queue failure
    is logged; the members are stored either way and the reconciler finds them)."""
    try:
        jobs.notify_list_changed(list_id)
    except Exception:
        log.exception("could not notify the engine that list %s changed", list_id)


def all_lists(db) -> list[ContactList]:
    return list(db.scalars(contacts.lists_query(g.workspace_id).order_by(func.lower(ContactList.name))))


RECENT_ROWS = 20  # enrollments and messages shown on a contact's page
SEARCH_MAX = contacts.EMAIL_MAX  # no stored address is longer, so a longer search matches nothing


def search_text() -> tuple[str, str | None]:
    """The ``?q=`` search (trimmed, lower-cased, cut to SEARCH_MAX characters for the page)
    and why it can match nothing, if it cannot: over-long (SQLite refuses LIKE patterns over
    50,000 bytes) or unstorable text."""
    q = (request.args.get("q") or "").strip().lower()
    if len(q) > SEARCH_MAX:
        return q[:SEARCH_MAX], f"An address has at most {SEARCH_MAX} characters, so a longer search matches nothing."
    return q, (contacts.text_problem(q) if q else None)


def emails_from_text(raw: str) -> list[str]:
    """Addresses typed one per line, or separated by commas, semicolons or spaces."""
    for sep in (",", ";", "\t", " "):
        raw = raw.replace(sep, "\n")
    return [e.strip() for e in raw.splitlines() if e.strip()]


# --------------------------------------------------------------------------- contacts


@bp.get("/contacts")
@login_required
def contacts_page():
    db = get_db()
    q, problem = search_text()
    status = request.args.get("status") or ""
    stmt = select(Contact).where(Contact.workspace_id == g.workspace_id)
    if q and not problem:
        stmt = stmt.where(Contact.email.contains(q, autoescape=True))
    if status in CONTACT_STATUSES:
        stmt = stmt.where(Contact.status == status)
    rows, next_before = ([], None) if problem else keyset_page(db, stmt, Contact)
    suppressed = suppressions.suppressed_emails(db, g.workspace_id, (c.email for c in rows))
    total = db.scalar(select(func.count()).select_from(Contact).where(Contact.workspace_id == g.workspace_id))
    return render_template("contacts.html", rows=rows, next_before=next_before, q=q, status=status,
                           statuses=CONTACT_STATUSES, suppressed=suppressed, total=total, search_note=problem,
                           search_max=SEARCH_MAX)


def _one_line(text: str) -> bool:
    """True when ``text`` reads back the same from one ``name = value`` line: no line break
    (``str.splitlines`` also breaks at \\v, \\f, \\x1c-\\x1e, \\x85, \\u2028, \\u2029) and no
    surrounding whitespace (the parser strips it)."""
    return text == text.strip() and len(text.splitlines()) <= 1 and "\r" not in text and "\n" not in text


def _line_format_fits(fields: dict) -> bool:
    """Whether every field survives the ``name = value`` line format unchanged: string values
    only (a number, true/false or null would come back as text), names without ``=`` that do
    not start with ``{`` (the JSON form), nothing that line breaks or stripping would change."""
    return all(
        isinstance(key, str) and key and "=" not in key and not key.startswith("{") and _one_line(key)
        and isinstance(value, str) and _one_line(value)
        for key, value in fields.items()
    )


def _fields_text(fields: dict | None) -> str:
    """The custom fields as the form's textarea shows them: ``name = value`` lines when they
    fit that format, else a JSON object, so saving the form unchanged never changes them."""
    fields = fields or {}
    if _line_format_fits(fields):
        return "\n".join(f"{k} = {v}" for k, v in fields.items())
    return json.dumps(fields, ensure_ascii=False, indent=2)


def _parse_json_fields(raw: str) -> tuple[dict, list[str]]:
    try:
        fields = json.loads(raw)
    except json.JSONDecodeError as exc:
        return {}, [f"the fields are not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"]
    except (ValueError, RecursionError):
        return {}, ["the fields are not valid JSON"]
    if not isinstance(fields, dict):
        return {}, ["write the fields as a JSON object, e.g. {\"plan\": \"pro\", \"seats\": 3}"]
    return fields, [f"{k}: {', '.join(v)}" for k, v in contacts.fields_problems(fields).items()]


def _parse_fields(raw: str, old: dict | None) -> tuple[dict, list[str]]:
    """The textarea -> a dict: a JSON object when the text starts with ``{`` (any value the
    API takes: text, numbers, true/false, null), else ``name = value`` lines, where a value
    that reads the same as the stored one keeps its stored type."""
    if raw.lstrip().startswith("{"):
        return _parse_json_fields(raw)
    old = old or {}
    fields: dict = {}
    problems = []
    for n, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            problems.append(f"line {n}: write each field as name = value (or write all of them as a JSON object)")
            continue
        previous = old.get(key)
        fields[key] = previous if previous is not None and str(previous) == value else value
    problems += [f"{k}: {', '.join(v)}" for k, v in contacts.fields_problems(fields).items()]
    return fields, problems


def _contact_form() -> dict:
    f = request.form
    return {k: (f.get(k) or "").strip() for k in ("email", "first_name", "last_name", "timezone", "fields")}


def _attributes(form: dict) -> dict:
    """The form's contact attributes as the domain takes them (an empty box clears its value)."""
    return {"email": form["email"], **{k: form[k] or None for k in ("first_name", "last_name", "timezone")}}


def _form_errors(form: dict, old_fields: dict | None) -> tuple[dict, dict[str, list[str]]]:
    """The parsed custom fields, and every problem of the form at once (the domain's rules,
    as the API applies them)."""
    fields, problems = _parse_fields(form["fields"], old_fields)
    errors = contacts.contact_problems(_attributes(form))
    if problems:
        errors["fields"] = problems
    return fields, errors


@bp.route("/contacts/new", methods=["GET", "POST"])
@login_required
def contact_new():
    db = get_db()
    form = _contact_form() if request.method == "POST" else {}
    errors: dict[str, list[str]] = {}
    if request.method == "POST":
        fields, errors = _form_errors(form, None)
        existing = None if "email" in errors else contacts.find_contact(db, g.workspace_id, form["email"])
        if existing is not None:
            errors["email"] = ["a contact with this address already exists"]
        if not errors:
            with refused() as refusal:
                attributes = _attributes(form)
                contact, _ = contacts.upsert_contact(db, g.workspace_id, attributes.pop("email"), fields=fields,
                                                     **attributes)
                db.commit()
            if refusal.exc is None:
                flash(f"Contact {contact.email} added.", "success")
                return redirect(url_for("ui.contact_page", contact_id=contact.id)), 303
            errors = refusal.errors()
        return render_template("contact_form.html", contact=None, form=form, errors=errors,
                               existing=existing), 422
    return render_template("contact_form.html", contact=None, form=form, errors=errors, existing=None)


def _contact(contact_id: int) -> Contact:
    return contacts.get_contact(get_db(), g.workspace_id, contact_id)


def _contact_context(contact: Contact) -> dict:
    db = get_db()
    member_of = list(
        db.scalars(
            select(ContactList)
            .join(ListMember, ListMember.list_id == ContactList.id)
            .where(ListMember.contact_id == contact.id)
            .order_by(func.lower(ContactList.name))
        )
    )
    enrollments = db.execute(
        select(Enrollment, Campaign.name)
        .join(Campaign, Campaign.id == Enrollment.campaign_id)
        .where(Enrollment.contact_id == contact.id)
        .order_by(Enrollment.id.desc())
        .limit(RECENT_ROWS)
    ).all()
    messages = list(
        db.scalars(select(Message).where(Message.contact_id == contact.id)
                   .order_by(Message.id.desc()).limit(RECENT_ROWS))
    )
    suppression = db.scalar(
        select(Suppression).where(Suppression.workspace_id == g.workspace_id, Suppression.email == contact.email)
    )
    other_lists = [lst for lst in all_lists(db) if lst.id not in {m.id for m in member_of}]
    return {"member_of": member_of, "other_lists": other_lists, "enrollments": enrollments, "messages": messages,
            "suppression": suppression}


@bp.route("/contacts/<int:contact_id>", methods=["GET", "POST"])
@login_required
def contact_page(contact_id: int):
    db = get_db()
    contact = _contact(contact_id)
    if request.method == "GET":
        form = {"email": contact.email, "first_name": contact.first_name or "", "last_name": contact.last_name or "",
                "timezone": contact.timezone or "", "fields": _fields_text(contact.fields)}
        return render_template("contact_form.html", contact=contact, form=form, errors={},
                               **_contact_context(contact))
    form = _contact_form()
    fields, errors = _form_errors(form, contact.fields)
    if not errors:
        with refused() as refusal:
            contacts.update_contact(db, g.workspace_id, contact.id, **_attributes(form))
            # The form shows every custom field, so what it sends is the whole set (a field
            # taken out of the box is removed; the API's PATCH merges instead).
            contact.fields = fields
            db.commit()
        if refusal.exc is None:
            flash("Contact saved.", "success")
            return redirect(url_for("ui.contact_page", contact_id=contact.id)), 303
        errors = refusal.errors()
    contact = _contact(contact_id)
    return render_template("contact_form.html", contact=contact, form=form, errors=errors,
                           **_contact_context(contact)), 422


@bp.post("/contacts/<int:contact_id>/lists")
@login_required
def contact_add_to_list(contact_id: int):
    db = get_db()
    contact = _contact(contact_id)
    list_id = parse_id(request.form.get("list_id"))
    if list_id is None:
        flash("Choose a list from the menu to add the contact to.", "error")
        return redirect(url_for("ui.contact_page", contact_id=contact.id)), 303
    row = contacts.get_list(db, g.workspace_id, list_id)
    added = contacts.add_list_members(db, g.workspace_id, row.id, [contact.id])
    db.commit()
    if added:
        notify_list_changed(row.id)
    flash(f"Added to {row.name}." if added else f"Already in {row.name}.", "success")
    return redirect(url_for("ui.contact_page", contact_id=contact.id)), 303


@bp.get("/contacts/<int:contact_id>/delete")
@login_required
def contact_delete_confirm(contact_id: int):
    contact = _contact(contact_id)
    return render_template(
        "confirm.html", title=f"Delete {contact.email}?",
        message=("The contact and its list memberships are deleted; a suppression of the address stays. "
                 "A contact with campaign history cannot be deleted (suppress it instead)."),
        action=url_for("ui.contact_delete", contact_id=contact.id), button="Delete contact", danger=True,
        back=url_for("ui.contact_page", contact_id=contact.id))


@bp.post("/contacts/<int:contact_id>/delete")
@login_required
@form_action(lambda contact_id: url_for("ui.contact_page", contact_id=contact_id))
def contact_delete(contact_id: int):
    db = get_db()
    contact = _contact(contact_id)
    email = contact.email
    contacts.delete_contact(db, g.workspace_id, contact.id)
    db.commit()
    flash(f"Contact {email} deleted.", "success")
    return redirect(url_for("ui.contacts_page")), 303
