"""UI pages: contacts (search, add, edit), CSV import with progress, lists, the suppression list."""

from __future__ import annotations

import json
import logging
import os
import uuid

from flask import flash, g, redirect, render_template, request, url_for
from sqlalchemy import func, select

from campaigns import contacts, engine, importer
from campaigns.errors import BadRequest, HeraldError, NotFound
from campaigns.models import Campaign, Contact, ContactList, Enrollment, Import, ListMember, Message, Suppression

from .auth import login_required
from .db import get_db
from .ui import bp, error_text, field_errors, keyset_page, parse_id, safe_next, settings

log = logging.getLogger(__name__)
CONTACT_STATUSES = ("active", "unsubscribed", "bounced", "complained")


def _notify_list_changed(list_id: int) -> None:
    """After the commit: running campaigns of the list enroll the new members (a queue failure
    is logged; the members are stored either way and the reconciler finds them)."""
    from tasks import jobs

    try:
        jobs.notify_list_changed(list_id)
    except Exception:  # noqa: BLE001
        log.exception("could not notify the engine that list %s changed", list_id)


def _all_lists(db) -> list[ContactList]:
    return list(db.scalars(contacts.lists_query(g.workspace_id).order_by(func.lower(ContactList.name))))


SEARCH_MAX = contacts.EMAIL_MAX  # no stored address is longer, so a longer search matches nothing


def _search_text() -> tuple[str, str | None]:
    """The ``?q=`` search (trimmed, lower-cased, cut to SEARCH_MAX characters for the page)
    and why it can match nothing, if it cannot: over-long (SQLite refuses LIKE patterns over
    50,000 bytes) or unstorable text."""
    q = (request.args.get("q") or "").strip().lower()
    if len(q) > SEARCH_MAX:
        return q[:SEARCH_MAX], f"An address has at most {SEARCH_MAX} characters, so a longer search matches nothing."
    return q, (contacts.text_problem(q) if q else None)


def _emails_from_text(raw: str) -> list[str]:
    """Addresses typed one per line, or separated by commas, semicolons or spaces."""
    for sep in (",", ";", "\t", " "):
        raw = raw.replace(sep, "\n")
    return [e.strip() for e in raw.splitlines() if e.strip()]


# --------------------------------------------------------------------------- contacts


@bp.get("/contacts")
@login_required
def contacts_page():
    db = get_db()
    q, problem = _search_text()
    status = request.args.get("status") or ""
    stmt = select(Contact).where(Contact.workspace_id == g.workspace_id)
    if q and not problem:
        stmt = stmt.where(Contact.email.contains(q, autoescape=True))
    if status in CONTACT_STATUSES:
        stmt = stmt.where(Contact.status == status)
    rows, next_before = ([], None) if problem else keyset_page(db, stmt, Contact)
    suppressed = contacts.suppressed_emails(db, g.workspace_id, (c.email for c in rows))
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


@bp.route("/contacts/new", methods=["GET", "POST"])
@login_required
def contact_new():
    db = get_db()
    form = _contact_form() if request.method == "POST" else {}
    errors: dict[str, list[str]] = {}
    if request.method == "POST":
        fields, problems = _parse_fields(form["fields"], None)
        if problems:
            errors["fields"] = problems
        existing = None if contacts.email_problem(form["email"]) else contacts.find_contact(
            db, g.workspace_id, form["email"])
        if existing is not None:
            errors["email"] = ["a contact with this address already exists"]
        if not errors:
            try:
                contact, _ = contacts.upsert_contact(
                    db, g.workspace_id, form["email"], first_name=form["first_name"] or None,
                    last_name=form["last_name"] or None, timezone=form["timezone"] or None, fields=fields)
                db.commit()
            except HeraldError as exc:
                db.rollback()
                errors = field_errors(exc) or {"_": [error_text(exc)]}
            else:
                flash(f"Contact {contact.email} added.", "success")
                return redirect(url_for("ui.contact_page", contact_id=contact.id)), 303
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
        .limit(20)
    ).all()
    messages = list(
        db.scalars(select(Message).where(Message.contact_id == contact.id).order_by(Message.id.desc()).limit(20))
    )
    suppression = db.scalar(
        select(Suppression).where(Suppression.workspace_id == g.workspace_id, Suppression.email == contact.email)
    )
    other_lists = [lst for lst in _all_lists(db) if lst.id not in {m.id for m in member_of}]
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
    errors: dict[str, list[str]] = {}
    fields, problems = _parse_fields(form["fields"], contact.fields)
    if problems:
        errors["fields"] = problems
    if not errors:
        try:
            contacts.update_contact(db, g.workspace_id, contact.id, email=form["email"],
                                    first_name=form["first_name"] or None, last_name=form["last_name"] or None,
                                    timezone=form["timezone"] or None)
            # The form shows every custom field, so what it sends is the whole set (a field
            # taken out of the box is removed; the API's PATCH merges instead).
            contact.fields = fields
            db.commit()
        except HeraldError as exc:
            db.rollback()
            errors = field_errors(exc) or {"_": [error_text(exc)]}
        else:
            flash("Contact saved.", "success")
            return redirect(url_for("ui.contact_page", contact_id=contact.id)), 303
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
        _notify_list_changed(row.id)
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
def contact_delete(contact_id: int):
    db = get_db()
    contact = _contact(contact_id)
    email = contact.email
    try:
        contacts.delete_contact(db, g.workspace_id, contact.id)
        db.commit()
    except HeraldError as exc:
        db.rollback()
        flash(error_text(exc), "error")
        return redirect(url_for("ui.contact_page", contact_id=contact_id)), 303
    flash(f"Contact {email} deleted.", "success")
    return redirect(url_for("ui.contacts_page")), 303


# --------------------------------------------------------------------------- CSV import


def _error_counts(job: Import) -> tuple[int, int]:
    """``(rows with errors, errors not listed)``: at most importer.MAX_ERRORS errors are kept,
    and every data row is exactly one of created/updated/skipped/error, so the unlisted ones
    are what the counts leave over (as ``GET /api/v1/imports/<id>`` says)."""
    listed = len(job.errors or [])
    truncated = max(0, (job.rows_done or 0) - (job.created or 0) - (job.updated or 0) - (job.skipped or 0) - listed)
    return listed + truncated, truncated


def _error_totals(imports: list[Import]) -> dict[int, int]:
    return {job.id: _error_counts(job)[0] for job in imports}


def _imports(db, limit: int = 10) -> list[Import]:
    return list(db.scalars(select(Import).where(Import.workspace_id == g.workspace_id)
                           .order_by(Import.id.desc()).limit(limit)))


@bp.route("/contacts/import", methods=["GET", "POST"])
@login_required
def import_page():
    db = get_db()
    if request.method == "GET":
        imports = _imports(db)
        return render_template("import.html", lists=_all_lists(db), imports=imports, error=None,
                               error_totals=_error_totals(imports), form={"list_id": request.args.get("list_id", "")})
    form = {"list_id": request.form.get("list_id", ""), "new_list": (request.form.get("new_list") or "").strip()}
    upload = request.files.get("file")
    try:
        if upload is None or not upload.filename:
            raise importer.CsvUnusable("choose a CSV file to import")
        list_id = None
        if form["new_list"]:
            row, _ = contacts.get_or_create_list(db, g.workspace_id, form["new_list"])
            list_id = row.id
        elif form["list_id"].strip():
            chosen = parse_id(form["list_id"])
            if chosen is None:
                raise BadRequest("choose a list from the menu (or no list)", {"list_id": ["not a list id"]})
            list_id = contacts.get_list(db, g.workspace_id, chosen).id
        job = _queue_import(db, upload, list_id)
    except HeraldError as exc:
        db.rollback()
        imports = _imports(db)
        return render_template("import.html", lists=_all_lists(db), imports=imports, error=error_text(exc),
                               error_totals=_error_totals(imports), form=form), exc.status
    return redirect(url_for("ui.import_status", import_id=job.id)), 303


def _queue_import(db, upload, list_id: int | None) -> Import:
    """Save the upload under instance/imports, check it can be read, then queue the same
    background import as ``POST /api/v1/contacts/import?async=1``."""
    from tasks.imports import run_import

    folder = settings().instance_dir / "imports"
    folder.mkdir(parents=True, exist_ok=True)
    path = str(folder / f"{uuid.uuid4().hex}.csv")
    try:
        upload.save(path)
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            importer.inspect_csv(fh)  # an unusable file is refused now, not failed later
    except BaseException:
        if os.path.exists(path):
            os.unlink(path)
        raise
    job, _ = importer.queue_import(db, g.workspace_id, list_id, path, size, run_import)
    return job


@bp.get("/contacts/imports/<int:import_id>")
@login_required
def import_status(import_id: int):
    db = get_db()
    job = db.get(Import, import_id) if contacts.valid_id(import_id) else None
    if job is None or job.workspace_id != g.workspace_id:
        raise NotFound(f"There is no import {import_id} in this workspace.")
    target = db.get(ContactList, job.list_id) if job.list_id else None
    errors_total, errors_truncated = _error_counts(job)
    return render_template("import_status.html", job=job, progress=importer.import_progress(job), target=target,
                           errors_total=errors_total, errors_truncated=errors_truncated)


# --------------------------------------------------------------------------- lists


@bp.route("/lists", methods=["GET", "POST"])
@login_required
def lists_page():
    db = get_db()
    error, name = None, ""
    if request.method == "POST":
        name = request.form.get("name") or ""
        try:
            row = contacts.create_list(db, g.workspace_id, name)
            db.commit()
        except HeraldError as exc:
            db.rollback()
            error = error_text(exc)
        else:
            flash(f"List {row.name} created.", "success")
            return redirect(url_for("ui.list_page", list_id=row.id)), 303
    rows = _all_lists(db)
    counts = contacts.member_counts(db, (r.id for r in rows))
    return render_template("lists.html", rows=rows, counts=counts, error=error, name=name), (422 if error else 200)


@bp.get("/lists/<int:list_id>")
@login_required
def list_page(list_id: int):
    return _list_view(list_id)


def _list_view(list_id: int, emails: str = "", error: str | None = None, status: int = 200):
    """The list's page; ``emails`` and ``error``: the members form shown again with what was
    typed and why it was refused."""
    db = get_db()
    row = contacts.get_list(db, g.workspace_id, list_id)
    q, problem = _search_text()
    stmt = contacts.members_query(db, g.workspace_id, row.id)
    if q and not problem:
        stmt = stmt.where(Contact.email.contains(q, autoescape=True))
    members, next_before = ([], None) if problem else keyset_page(db, stmt, Contact)
    suppressed = contacts.suppressed_emails(db, g.workspace_id, (c.email for c in members))
    campaigns = list(db.scalars(select(Campaign).where(Campaign.list_id == row.id).order_by(Campaign.id.desc())))
    return render_template("list.html", row=row, members=members, next_before=next_before, q=q,
                           count=contacts.member_counts(db, [row.id])[row.id], suppressed=suppressed,
                           campaigns=campaigns, search_note=problem, search_max=SEARCH_MAX, emails=emails,
                           error=error, max_bulk=contacts.MAX_BULK), status


@bp.post("/lists/<int:list_id>/members")
@login_required
def list_add_members(list_id: int):
    db = get_db()
    row = contacts.get_list(db, g.workspace_id, list_id)
    typed = request.form.get("emails") or ""
    emails = _emails_from_text(typed)
    if not emails:
        return _list_view(row.id, typed, "Type at least one address.", 422)
    if len(emails) > contacts.MAX_BULK:
        # Refused whole, and shown again as typed: nothing is lost, nothing half-added.
        return _list_view(row.id, typed, f"{len(emails):,} addresses: at most {contacts.MAX_BULK:,} can be added at "
                          "once. Nothing was added; split the list, or import a CSV file into the list.", 422)
    result = contacts.add_members(db, g.workspace_id, row.id, emails=emails)
    db.commit()
    if result["added"]:
        _notify_list_changed(row.id)
    parts = [f"{result['added']} added"]
    if result["already"]:
        parts.append(f"{result['already']} already members")
    if result["contacts_created"]:
        parts.append(f"{result['contacts_created']} new contacts")
    flash(", ".join(parts) + ".", "success")
    for bad in result["invalid"][:10]:
        flash(f"Not added: {bad.get('email')!s} ({bad['reason']}).", "error")
    return redirect(url_for("ui.list_page", list_id=row.id)), 303


@bp.post("/lists/<int:list_id>/members/<int:contact_id>/remove")
@login_required
def list_remove_member(list_id: int, contact_id: int):
    db = get_db()
    row = contacts.get_list(db, g.workspace_id, list_id)
    contacts.remove_member(db, g.workspace_id, row.id, contact_id)
    db.commit()
    flash(f"Removed from {row.name}.", "success")
    return redirect(safe_next(request.form.get("back"), url_for("ui.list_page", list_id=row.id))), 303


@bp.post("/lists/<int:list_id>/rename")
@login_required
def list_rename(list_id: int):
    db = get_db()
    try:
        row = contacts.rename_list(db, g.workspace_id, list_id, request.form.get("name") or "")
        db.commit()
        flash(f"List renamed to {row.name}.", "success")
    except NotFound:
        raise
    except HeraldError as exc:
        db.rollback()
        flash(error_text(exc), "error")
    return redirect(url_for("ui.list_page", list_id=list_id)), 303


@bp.get("/lists/<int:list_id>/delete")
@login_required
def list_delete_confirm(list_id: int):
    db = get_db()
    row = contacts.get_list(db, g.workspace_id, list_id)
    count = contacts.member_counts(db, [row.id])[row.id]
    return render_template(
        "confirm.html", title=f"Delete the list {row.name}?",
        message=(f"The list and its {count:,} memberships are deleted; the contacts stay. "
                 "Draft campaigns that use it lose their list."),
        action=url_for("ui.list_delete", list_id=row.id), button="Delete list", danger=True,
        back=url_for("ui.list_page", list_id=row.id))


@bp.post("/lists/<int:list_id>/delete")
@login_required
def list_delete(list_id: int):
    db = get_db()
    row = contacts.get_list(db, g.workspace_id, list_id)
    name = row.name
    try:
        contacts.delete_list(db, g.workspace_id, row.id)
        db.commit()
    except HeraldError as exc:
        db.rollback()
        flash(error_text(exc), "error")
        return redirect(url_for("ui.list_page", list_id=list_id)), 303
    flash(f"List {name} deleted.", "success")
    return redirect(url_for("ui.lists_page")), 303


# --------------------------------------------------------------------------- suppressions


@bp.get("/suppressions")
@login_required
def suppressions_page():
    return _suppressions_view(request.args.get("emails", ""))


def _suppressions_view(emails: str, error: str | None = None, status: int = 200):
    db = get_db()
    q, problem = _search_text()
    stmt = contacts.suppressions_query(g.workspace_id)
    if q and not problem:
        stmt = stmt.where(Suppression.email.contains(q, autoescape=True))
    rows, next_before = ([], None) if problem else keyset_page(db, stmt, Suppression)
    total = db.scalar(select(func.count()).select_from(Suppression).where(Suppression.workspace_id == g.workspace_id))
    return render_template("suppressions.html", rows=rows, next_before=next_before, q=q, total=total,
                           emails=emails, error=error, search_note=problem, search_max=SEARCH_MAX,
                           max_bulk=contacts.MAX_BULK), status


@bp.post("/suppressions")
@login_required
def suppressions_add():
    db = get_db()
    typed = request.form.get("emails") or ""
    raw = _emails_from_text(typed)
    if len(raw) > contacts.MAX_BULK:
        # Refused whole (as the API and the list members form do): cutting the list would
        # leave the addresses after the limit silently unsuppressed.
        return _suppressions_view(
            typed, error=(f"{len(raw):,} addresses: at most {contacts.MAX_BULK:,} can be suppressed at once. "
                          "Nothing was suppressed; split the list and send it in parts."), status=422)
    valid, invalid = set(), []
    for email in raw:
        problem = contacts.email_problem(email)
        if problem:
            invalid.append((email, problem))
        else:
            valid.add(email.strip().lower())
    if not raw:
        flash("Type at least one address to suppress.", "error")
        return redirect(url_for("ui.suppressions_page")), 303
    added = contacts.suppress(db, g.workspace_id, valid, "manual")
    db.commit()
    already = len(valid) - added
    flash(f"{added} address{'es' if added != 1 else ''} suppressed"
          + (f", {already} already on the list" if already else "") + ".", "success")
    for email, problem in invalid[:10]:
        flash(f"Not suppressed: {email} ({problem}).", "error")
    return redirect(url_for("ui.suppressions_page")), 303


def _suppression(email: str) -> Suppression:
    email = (email or "").strip().lower()
    row = None
    if email and not contacts.text_problem(email):
        row = get_db().scalar(
            select(Suppression).where(Suppression.workspace_id == g.workspace_id, Suppression.email == email))
    if row is None:
        raise NotFound(f"{email or 'That address'} is not on the suppression list.")
    return row


@bp.get("/suppressions/remove")
@login_required
def suppression_remove_confirm():
    row = _suppression(request.args.get("email", ""))
    return render_template(
        "confirm.html", title=f"Mail {row.email} again?",
        message=(f"{row.email} was suppressed ({row.reason}, {row.created_at:%Y-%m-%d}). Removing it lets campaigns "
                 "send to this address again and sets its contact back to active. Sequences it stopped stay "
                 "stopped."),
        action=url_for("ui.suppression_remove"), fields={"email": row.email}, button="Remove from suppression list",
        danger=True, back=url_for("ui.suppressions_page"))


@bp.post("/suppressions/remove")
@login_required
def suppression_remove():
    db = get_db()
    row = _suppression(request.form.get("email", ""))
    email = row.email
    enrolled = engine.unsuppress(db, g.workspace_id, email)  # and enrolled where it was skipped
    db.commit()
    from tasks import jobs

    jobs.notify_enrolled(enrolled)
    joined = f" Enrolled in {enrolled} running campaign{'s' if enrolled != 1 else ''} of its lists." if enrolled else ""
    flash(f"{email} removed from the suppression list.{joined}", "success")
    return redirect(url_for("ui.suppressions_page")), 303
