"""API routes: contacts, lists and their members, suppressions, CSV imports.

Handlers are thin: find the workspace's resource first (so another workspace's id is a 404
whatever the body), validate the body with the marshmallow schemas below (``unknown=RAISE``:
an unknown field is a 422 naming it), call ``campaigns.contacts`` / ``campaigns.importer``,
commit, then tell the engine about new list members, and answer JSON.
"""

from __future__ import annotations

import logging
import os
import uuid

from flask import g, request
from marshmallow import RAISE, Schema, ValidationError, validates_schema
from marshmallow import fields as mf
from marshmallow.validate import Length, OneOf, Range
from sqlalchemy import select

from campaigns import contacts, csv_reading, engine, importer, suppressions
from campaigns.config import get_settings
from campaigns.errors import BadRequest, HeraldError, NotFound
from campaigns.models import Contact, ContactList, Import, Suppression
from tasks import jobs
from tasks.imports import run_import

from ..db import get_db
from ..params import int_arg, paginate
from .blueprint import UnsupportedMediaType, bp, json_body
from .fields import DictOr, ListOr, Out, Rounded, Timestamp, With, page_of
from .openapi import doc

log = logging.getLogger(__name__)


class ServiceUnavailable(HeraldError):
    code = "unavailable"
    status = 503


# --- schemas: request bodies -------------------------------------------------------------------


class _Strict(Schema):
    class Meta:
        unknown = RAISE


class ContactIn(_Strict):
    """Types here; what a valid contact is, the domain says (``contacts.contact_problems``, as
    for the UI's form): every problem at once, by field."""

    email = mf.String(required=True)
    first_name = mf.String(allow_none=True, metadata={"maxLength": contacts.NAME_MAX})
    last_name = mf.String(allow_none=True, metadata={"maxLength": contacts.NAME_MAX})
    timezone = mf.String(allow_none=True, metadata={"description": "an IANA time zone, e.g. Europe/Paris"})
    fields = mf.Dict(keys=mf.String(), values=mf.Raw(allow_none=True), allow_none=True, metadata={
        "description": f"at most {contacts.MAX_FIELDS} custom fields, names of 1-{contacts.FIELD_KEY_MAX} characters, "
                       f"text values of at most {contacts.FIELD_VALUE_MAX:,} characters, "
                       f"{contacts.FIELDS_TOTAL_MAX:,} in all"})

    @validates_schema
    def _contact_rules(self, data, **kwargs):
        problems = contacts.contact_problems(data, partial=True)  # which fields are required: the schema's
        if problems:
            raise ValidationError(problems)


class ContactPatch(ContactIn):
    email = mf.String()


class ListIn(_Strict):
    name = mf.String(required=True, validate=Length(min=1, max=contacts.NAME_MAX))


class MembersIn(_Strict):
    emails = mf.List(mf.String(), validate=Length(max=contacts.MAX_BULK))
    contact_ids = mf.List(mf.Integer(strict=True), validate=Length(max=contacts.MAX_BULK))

    @validates_schema
    def _one_of_them(self, data, **kwargs):
        if "emails" not in data and "contact_ids" not in data:
            raise ValidationError("give emails or contact_ids", "_schema")


class SuppressionsIn(_Strict):
    emails = mf.List(mf.String(), required=True, validate=Length(min=1, max=contacts.MAX_BULK))
    reason = mf.String(load_default="manual", validate=OneOf(suppressions.SUPPRESSION_REASONS))


# --- schemas: query strings (documentation; parsed with int_arg/paginate) ----------------------


class PageQuery(Schema):
    cursor = mf.String(metadata={"description": "next_cursor of the previous page"})
    limit = mf.Integer(validate=Range(1, 500), metadata={"description": "page size (default 50)"})


class ContactQuery(PageQuery):
    email = mf.String(metadata={"description": "one address (normalised before matching)"})
    list_id = mf.Integer(metadata={"description": "members of this list only"})


class ImportQuery(Schema):
    list_id = mf.Integer(metadata={"description": "add the imported contacts to this list"})
    async_ = mf.Boolean(data_key="async", metadata={"description": "1: queue it, answer 202 with import_id"})


# --- schemas: responses (the serializers) ------------------------------------------------------


class ContactOut(Out):
    id = mf.Integer()
    email = mf.String()
    first_name = mf.String(allow_none=True)
    last_name = mf.String(allow_none=True)
    timezone = mf.String(allow_none=True)
    fields = DictOr(none_as={})
    status = mf.String(metadata={"enum": ["active", "unsubscribed", "bounced", "complained"]})
    suppressed = mf.Boolean()
    created_at = Timestamp()
    updated_at = Timestamp()


ContactPage = page_of(ContactOut, "ContactPage")


class ListOut(Out):
    id = mf.Integer()
    name = mf.String()
    member_count = mf.Integer()
    created_at = Timestamp()


ListPage = page_of(ListOut, "ListPage")


class InvalidItem(Schema):
    """An address or a contact id that was not taken: one of ``email`` or ``contact_id``, and why."""

    email = mf.Raw()
    contact_id = mf.Raw()
    reason = mf.String(required=True)


class MembersResult(Out):
    added = mf.Integer()
    already = mf.Integer()
    contacts_created = mf.Integer()
    invalid = mf.List(mf.Nested(InvalidItem))


class SuppressionOut(Out):
    id = mf.Integer()
    email = mf.String()
    reason = mf.String()
    created_at = Timestamp()


SuppressionPage = page_of(SuppressionOut, "SuppressionPage")


class SuppressionsResult(Out):
    added = mf.Integer()
    already = mf.Integer()
    invalid = mf.List(mf.Nested(InvalidItem))


class RowError(Out):
    row = mf.Integer(metadata={"description": "spreadsheet line: the header is row 1, the first data row 2"})
    error = mf.String()


class ImportReportOut(Out):
    created = mf.Integer()
    updated = mf.Integer()
    skipped = mf.Integer()
    rows = mf.Integer()
    errors = ListOr(mf.Nested(RowError), none_as=[])
    errors_truncated = mf.Integer()


class ImportAccepted(Out):
    import_id = mf.Integer()


class ImportOut(ImportReportOut):
    id = mf.Integer()
    status = mf.String(metadata={"enum": ["pending", "running", "done", "failed"]})
    progress = Rounded(places=4)
    rows_done = mf.Integer()
    list_id = mf.Integer(allow_none=True)
    error = mf.String(allow_none=True)
    created_at = Timestamp()
    finished_at = Timestamp(allow_none=True)


ImportPage = page_of(ImportOut, "ImportPage")


# --- answers -------------------------------------------------------------------------------------


def _contacts(session, rows: list[Contact]) -> list[With]:
    suppressed = suppressions.suppressed_emails(session, g.workspace_id, (c.email for c in rows))
    return [With(c, suppressed=c.email in suppressed) for c in rows]


def _contact_page(session, stmt) -> dict:
    page = paginate(session, stmt, Contact)
    page["items"] = _contacts(session, page["items"])
    return ContactPage().dump(page)


def _one_contact(session, c: Contact) -> dict:
    return ContactOut().dump(With(c, suppressed=suppressions.is_suppressed(session, g.workspace_id, c.email)))


def _one_list(session, row: ContactList) -> dict:
    return ListOut().dump(With(row, member_count=contacts.member_counts(session, [row.id])[row.id]))


def _import(row: Import) -> With:
    accounted = row.created + row.updated + row.skipped + len(row.errors or [])
    # Every data row is exactly one of created/updated/skipped/error, so the errors not
    # listed are what the other counts leave over.
    return With(row, progress=importer.import_progress(row), rows=row.rows_done,
                errors_truncated=max(0, row.rows_done - accounted))


def _no_content():
    return "", 204


def _notify_list_changed(list_id: int) -> None:
    """After the commit: running campaigns of the list enroll the new members. The members are
    stored whatever happens here, so a queue failure is logged, not turned into an error."""
    try:
        jobs.notify_list_changed(list_id)
    except Exception:
        log.exception("could not notify the engine that list %s changed", list_id)


# --- contacts ----------------------------------------------------------------------------------


@bp.route("/contacts", methods=["POST"])
@doc("Create or update a contact (upsert by email); 201 when created, 200 when updated",
     request=ContactIn, response=ContactOut, status=201, responses={200: ContactOut}, tags=["contacts"])
def create_contact():
    data = ContactIn().load(json_body())
    s = get_db()
    attrs = {k: data[k] for k in ("first_name", "last_name", "timezone", "fields") if k in data}
    contact, created = contacts.upsert_contact(s, g.workspace_id, data["email"], **attrs)
    s.commit()
    return _one_contact(s, contact), 201 if created else 200


@bp.route("/contacts", methods=["GET"])
@doc("List contacts (by address or list), paged by cursor; 404 when list_id is not a list of the workspace",
     query=ContactQuery, response=ContactPage, errors=(404,), tags=["contacts"])
def list_contacts():
    s = get_db()
    email = request.args.get("email") or None  # "?email=" is no filter
    stmt = contacts.contacts_query(s, g.workspace_id, email=email, list_id=int_arg("list_id"))
    return _contact_page(s, stmt)


@bp.route("/contacts/<int:contact_id>", methods=["GET"])
@doc("Read a contact", response=ContactOut, tags=["contacts"])
def get_contact(contact_id: int):
    s = get_db()
    return _one_contact(s, contacts.get_contact(s, g.workspace_id, contact_id))


@bp.route("/contacts/<int:contact_id>", methods=["PATCH"])
@doc("Change a contact (fields are merged key by key; null clears a name or the time zone)",
     request=ContactPatch, response=ContactOut, tags=["contacts"])
def patch_contact(contact_id: int):
    s = get_db()
    contacts.get_contact(s, g.workspace_id, contact_id)
    data = ContactPatch().load(json_body())
    contact = contacts.update_contact(s, g.workspace_id, contact_id, **data)
    s.commit()
    return _one_contact(s, contact)


@bp.route("/contacts/<int:contact_id>", methods=["DELETE"])
@doc("Delete a contact (a suppression of its address stays); 409 when it has campaign history",
     status=204, tags=["contacts"])
def delete_contact(contact_id: int):
    s = get_db()
    contacts.delete_contact(s, g.workspace_id, contact_id)
    s.commit()
    return _no_content()


# --- lists -------------------------------------------------------------------------------------


@bp.route("/lists", methods=["POST"])
@doc("Create a list (409 when the name is taken)", request=ListIn, response=ListOut, status=201, errors=(409,),
     tags=["lists"])
def create_list():
    data = ListIn().load(json_body())
    s = get_db()
    row = contacts.create_list(s, g.workspace_id, data["name"])
    s.commit()
    return ListOut().dump(With(row, member_count=0)), 201


@bp.route("/lists", methods=["GET"])
@doc("List the lists, paged by cursor", query=PageQuery, response=ListPage, tags=["lists"])
def list_lists():
    s = get_db()
    page = paginate(s, contacts.lists_query(g.workspace_id), ContactList)
    counts = contacts.member_counts(s, (r.id for r in page["items"]))
    page["items"] = [With(r, member_count=counts.get(r.id, 0)) for r in page["items"]]
    return ListPage().dump(page)


@bp.route("/lists/<int:list_id>", methods=["GET"])
@doc("Read a list, with its member count", response=ListOut, tags=["lists"])
def get_list(list_id: int):
    s = get_db()
    return _one_list(s, contacts.get_list(s, g.workspace_id, list_id))


@bp.route("/lists/<int:list_id>", methods=["PATCH"])
@doc("Rename a list (409 when the name is taken)", request=ListIn, response=ListOut, tags=["lists"])
def patch_list(list_id: int):
    s = get_db()
    contacts.get_list(s, g.workspace_id, list_id)
    data = ListIn().load(json_body())
    row = contacts.rename_list(s, g.workspace_id, list_id, data["name"])
    s.commit()
    return _one_list(s, row)


@bp.route("/lists/<int:list_id>", methods=["DELETE"])
@doc("Delete a list and its memberships (the contacts stay); 409 while a running or paused campaign uses it",
     status=204, tags=["lists"])
def delete_list(list_id: int):
    s = get_db()
    contacts.delete_list(s, g.workspace_id, list_id)
    s.commit()
    return _no_content()


@bp.route("/lists/<int:list_id>/members", methods=["POST"])
@doc("Add members by address (missing contacts are created) or by contact id; unknown ids and "
     "invalid addresses are reported in `invalid`, never added", request=MembersIn, response=MembersResult,
     tags=["lists"])
def add_members(list_id: int):
    s = get_db()
    contacts.get_list(s, g.workspace_id, list_id)
    data = MembersIn().load(json_body())
    result = contacts.add_members(
        s, g.workspace_id, list_id, emails=data.get("emails"), contact_ids=data.get("contact_ids")
    )
    s.commit()
    if result["added"]:
        _notify_list_changed(list_id)
    return MembersResult().dump(result)


@bp.route("/lists/<int:list_id>/members", methods=["GET"])
@doc("The list's members (contacts), paged by cursor", query=PageQuery, response=ContactPage, tags=["lists"])
def list_members(list_id: int):
    s = get_db()
    return _contact_page(s, contacts.members_query(s, g.workspace_id, list_id))


@bp.route("/lists/<int:list_id>/members/<int:contact_id>", methods=["DELETE"])
@doc("Remove a contact from a list (404 when it is not a member)", status=204, tags=["lists"])
def remove_member(list_id: int, contact_id: int):
    s = get_db()
    contacts.remove_member(s, g.workspace_id, list_id, contact_id)
    s.commit()
    return _no_content()


# --- suppressions ------------------------------------------------------------------------------


@bp.route("/suppressions", methods=["GET"])
@doc("The suppression list, paged by cursor", query=PageQuery, response=SuppressionPage, tags=["suppressions"])
def list_suppressions():
    s = get_db()
    return SuppressionPage().dump(paginate(s, suppressions.suppressions_query(g.workspace_id), Suppression))


@bp.route("/suppressions", methods=["POST"])
@doc(f"Suppress addresses in bulk (up to {contacts.MAX_BULK:,}); invalid ones are reported, existing ones kept",
     request=SuppressionsIn, response=SuppressionsResult, tags=["suppressions"])
def add_suppressions():
    data = SuppressionsIn().load(json_body())
    valid, invalid = contacts.sort_addresses(data["emails"])
    valid = set(valid)
    s = get_db()
    added = suppressions.suppress(s, g.workspace_id, valid, data["reason"])
    s.commit()
    return SuppressionsResult().dump({"added": added, "already": len(valid) - added, "invalid": invalid})


@bp.route("/suppressions/<path:email>", methods=["DELETE"])
@doc("Remove an address from the suppression list (404 when it is not on it)", status=204, tags=["suppressions"])
def delete_suppression(email: str):
    s = get_db()
    enrolled = engine.unsuppress(s, g.workspace_id, email)  # and enrolled where it was skipped
    s.commit()
    jobs.notify_enrolled(enrolled)
    return _no_content()


# --- CSV imports -------------------------------------------------------------------------------

CSV_TYPES = {"", "text/csv", "application/csv", "text/plain", "application/octet-stream", "application/vnd.ms-excel"}


def _async_flag() -> bool:
    raw = (request.args.get("async") or "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise BadRequest("async must be 1 or 0")


def _save_upload() -> tuple[str, int]:
    """Stream the request body to a file under instance/imports; (path, size)."""
    folder = get_settings().instance_dir / "imports"
    folder.mkdir(parents=True, exist_ok=True)
    path = str(folder / f"{uuid.uuid4().hex}.csv")
    size = 0
    try:
        with open(path, "wb") as fh:
            while chunk := request.stream.read(1024 * 1024):
                fh.write(chunk)
                size += len(chunk)
        with open(path, "rb") as fh:
            csv_reading.inspect_csv(fh)  # an unusable file is a 400 now, not a failed import later
    except BaseException:
        os.unlink(path)
        raise
    return path, size


@bp.route("/contacts/import", methods=["POST"])
@doc("Import contacts from a CSV body (Content-Type: text/csv; a header row with an email column). "
     "Answers the report (rows numbered like a spreadsheet: the header is row 1); with ?async=1, "
     "queues the import and answers 202 {import_id}", request="text/csv", query=ImportQuery,
     response=ImportReportOut, responses={202: ImportAccepted}, errors=(404, 415, 503), tags=["contacts"])
def import_contacts():
    mimetype = request.mimetype or ""
    if mimetype not in CSV_TYPES:
        raise UnsupportedMediaType(
            f"send the CSV file itself as the request body with Content-Type: text/csv (got {mimetype})"
        )
    charset = (request.mimetype_params.get("charset") or "utf-8").lower().replace("_", "-")
    if charset not in ("utf-8", "utf8", "us-ascii", "ascii"):
        raise UnsupportedMediaType(f"the CSV must be UTF-8 (got charset={charset}); save it as CSV UTF-8")
    s = get_db()
    list_id = int_arg("list_id")
    if list_id is not None:
        contacts.get_list(s, g.workspace_id, list_id)
    asynchronous = _async_flag()
    # End the transaction the checks opened: nothing holds the database (on SQLite, its write
    # lock) while the body streams in; the importer opens one transaction per batch.
    s.commit()
    if asynchronous:
        return _queue_import(s, list_id)
    report = importer.import_csv(s, g.workspace_id, request.stream, list_id=list_id)
    s.commit()
    if report.members_added:
        _notify_list_changed(list_id)
    return ImportReportOut().dump(report.as_dict())


def _queue_import(s, list_id: int | None):
    path, size = _save_upload()
    job, queued = importer.queue_import(s, g.workspace_id, list_id, path, size, run_import)
    if not queued:
        raise ServiceUnavailable("the task queue did not answer; try again")
    return ImportAccepted().dump({"import_id": job.id}), 202


@bp.route("/imports", methods=["GET"])
@doc("Background imports, newest last, paged by cursor", query=PageQuery, response=ImportPage, tags=["contacts"])
def list_imports():
    s = get_db()
    stmt = select(Import).where(Import.workspace_id == g.workspace_id)
    page = paginate(s, stmt, Import)
    page["items"] = [_import(row) for row in page["items"]]
    return ImportPage().dump(page)


@bp.route("/imports/<int:import_id>", methods=["GET"])
@doc("A background import: status, progress (0..1) and the same report as a synchronous import",
     response=ImportOut, tags=["contacts"])
def get_import(import_id: int):
    s = get_db()
    row = s.get(Import, import_id) if contacts.valid_id(import_id) else None
    if row is None or row.workspace_id != g.workspace_id:
        raise NotFound(f"no import with id {import_id}")
    return ImportOut().dump(_import(row))
