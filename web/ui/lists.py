"""UI pages: lists and their members, CSV import with progress, the suppression list."""

from __future__ import annotations

import os
import uuid

from flask import flash, g, redirect, render_template, request, url_for
from sqlalchemy import func, select

from campaigns import contacts, csv_reading, engine, importer, suppressions
from campaigns.errors import BadRequest, NotFound
from campaigns.models import Campaign, Contact, ContactList, Import, Suppression
from tasks import jobs
from tasks.imports import run_import

from ..auth import login_required
from ..db import get_db
from ..params import keyset_page, parse_id
from .blueprint import bp, error_text, form_action, refused, safe_next, settings
from .contacts import SEARCH_MAX, all_lists, emails_from_text, notify_list_changed, search_text

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
        return render_template("import.html", lists=all_lists(db), imports=imports, error=None,
                               error_totals=_error_totals(imports), form={"list_id": request.args.get("list_id", "")})
    form = {"list_id": request.form.get("list_id", ""), "new_list": (request.form.get("new_list") or "").strip()}
    upload = request.files.get("file")
    with refused() as refusal:
        if upload is None or not upload.filename:
            raise csv_reading.CsvUnusable("choose a CSV file to import")
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
    if refusal.exc is not None:
        imports = _imports(db)
        return render_template("import.html", lists=all_lists(db), imports=imports, error=error_text(refusal.exc),
                               error_totals=_error_totals(imports), form=form), refusal.exc.status
    return redirect(url_for("ui.import_status", import_id=job.id)), 303


def _queue_import(db, upload, list_id: int | None) -> Import:
    """Save the upload under instance/imports, check it can be read, then queue the same
    background import as ``POST /api/v1/contacts/import?async=1``."""
    folder = settings().instance_dir / "imports"
    folder.mkdir(parents=True, exist_ok=True)
    path = str(folder / f"{uuid.uuid4().hex}.csv")
    try:
        upload.save(path)
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            csv_reading.inspect_csv(fh)  # an unusable file is refused now, not failed later
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
        with refused() as refusal:
            row = contacts.create_list(db, g.workspace_id, name)
            db.commit()
        if refusal.exc is None:
            flash(f"List {row.name} created.", "success")
            return redirect(url_for("ui.list_page", list_id=row.id)), 303
        error = error_text(refusal.exc)
    rows = all_lists(db)
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
    q, problem = search_text()
    stmt = contacts.members_query(db, g.workspace_id, row.id)
    if q and not problem:
        stmt = stmt.where(Contact.email.contains(q, autoescape=True))
    members, next_before = ([], None) if problem else keyset_page(db, stmt, Contact)
    suppressed = suppressions.suppressed_emails(db, g.workspace_id, (c.email for c in members))
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
    emails = emails_from_text(typed)
    if not emails:
        return _list_view(row.id, typed, "Type at least one address.", 422)
    if len(emails) > contacts.MAX_BULK:
        # Refused whole, and shown again as typed: nothing is lost, nothing half-added.
        return _list_view(row.id, typed, f"{len(emails):,} addresses: at most {contacts.MAX_BULK:,} can be added at "
                          "once. Nothing was added; split the list, or import a CSV file into the list.", 422)
    result = contacts.add_members(db, g.workspace_id, row.id, emails=emails)
    db.commit()
    if result["added"]:
        notify_list_changed(row.id)
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


def _list_url(list_id: int) -> str:
    return url_for("ui.list_page", list_id=list_id)


@bp.post("/lists/<int:list_id>/rename")
@login_required
@form_action(_list_url)
def list_rename(list_id: int):
    db = get_db()
    row = contacts.rename_list(db, g.workspace_id, list_id, request.form.get("name") or "")
    db.commit()
    flash(f"List renamed to {row.name}.", "success")
    return redirect(_list_url(list_id)), 303


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
@form_action(_list_url)
def list_delete(list_id: int):
    db = get_db()
    row = contacts.get_list(db, g.workspace_id, list_id)
    name = row.name
    contacts.delete_list(db, g.workspace_id, row.id)
    db.commit()
    flash(f"List {name} deleted.", "success")
    return redirect(url_for("ui.lists_page")), 303


# --------------------------------------------------------------------------- suppressions


@bp.get("/suppressions")
@login_required
def suppressions_page():
    return _suppressions_view(request.args.get("emails", ""))


def _suppressions_view(emails: str, error: str | None = None, status: int = 200):
    db = get_db()
    q, problem = search_text()
    stmt = suppressions.suppressions_query(g.workspace_id)
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
    raw = emails_from_text(typed)
    if len(raw) > contacts.MAX_BULK:
        # Refused whole (as the API and the list members form do): cutting the list would
        # leave the addresses after the limit silently unsuppressed.
        return _suppressions_view(
            typed, error=(f"{len(raw):,} addresses: at most {contacts.MAX_BULK:,} can be suppressed at once. "
                          "Nothing was suppressed; split the list and send it in parts."), status=422)
    valid, invalid = contacts.sort_addresses(raw)
    valid = set(valid)
    if not raw:
        flash("Type at least one address to suppress.", "error")
        return redirect(url_for("ui.suppressions_page")), 303
    added = suppressions.suppress(db, g.workspace_id, valid, "manual")
    db.commit()
    already = len(valid) - added
    flash(f"{added} address{'es' if added != 1 else ''} suppressed"
          + (f", {already} already on the list" if already else "") + ".", "success")
    for bad in invalid[:10]:
        flash(f"Not suppressed: {bad['email']} ({bad['reason']}).", "error")
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
    jobs.notify_enrolled(enrolled)
    joined = f" Enrolled in {enrolled} running campaign{'s' if enrolled != 1 else ''} of its lists." if enrolled else ""
    flash(f"{email} removed from the suppression list.{joined}", "success")
    return redirect(url_for("ui.suppressions_page")), 303
