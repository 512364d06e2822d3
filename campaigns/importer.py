"""CSV import of contacts: one streamed, batched function (:func:`import_csv`) behind the three
ways in - the synchronous API call, the background task (:func:`run_import`) and the CLI.

The file is read by :mod:`campaigns.csv_reading`; rows are stored in batches of
:data:`BATCH_SIZE`, one set-based upsert and one commit per batch, so memory stays flat. The
file format, how each row counts and what is refused: docs/imports.md.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import BinaryIO

from sqlalchemy import and_, func, literal_column, or_, select, text, update
from sqlalchemy.orm import Session

from .config import get_settings
from .contact_rules import MAX_FIELDS
from .contacts import (
    add_list_members,
    get_list,
)
from .csv_reading import data_rows, open_csv, read_header
from .db import dialect_insert, insert_many, is_postgres, new_session, utcnow
from .errors import HeraldError
from .models import Contact, Import
from .suppressions import status_for_new_contact, suppression_reasons

log = logging.getLogger(__name__)

BATCH_SIZE = 1_000
MAX_ERRORS = 1_000


@dataclass
class ImportReport:
    """The per-import counts and the per-row errors (docs/imports.md)."""

    created: int = 0
    updated: int = 0
    skipped: int = 0
    rows: int = 0  # data rows read (the header not included)
    errors: list[dict] = field(default_factory=list)
    errors_truncated: int = 0
    list_id: int | None = None  # the list the rows were added to
    members_added: int = 0  # new memberships of that list
    max_errors: int = MAX_ERRORS

    def error(self, row: int, message: str) -> None:
        if len(self.errors) < self.max_errors:
            self.errors.append({"row": row, "error": message})
        else:
            self.errors_truncated += 1

    def as_dict(self) -> dict:
        return {
            "created": self.created,
            "updated": self.updated,
            "skipped": self.skipped,
            "errors": list(self.errors),
            "errors_truncated": self.errors_truncated,
            "rows": self.rows,
        }


Progress = Callable[[ImportReport, int], None]


def _merge(into: list, later: list) -> None:
    """A later row of the same address: its non-empty cells win."""
    for i in range(3):
        if later[i] is not None:
            into[i] = later[i]
    into[3].update(later[3])


# PostgreSQL: the batch travels as one array per column (unnest), so the statement is short,
# prepared once and the same for every batch, instead of 9,000 placeholders re-parsed each time.
_PG_UPSERT = text(
    """
    INSERT INTO contacts (workspace_id, email, first_name, last_name, timezone, fields, status,
                          created_at, updated_at)
    SELECT :workspace_id, r.email, r.first_name, r.last_name, r.timezone, CAST(r.fields AS json),
           r.status, :now, :now
    FROM unnest(CAST(:emails AS text[]), CAST(:first_names AS text[]), CAST(:last_names AS text[]),
                CAST(:timezones AS text[]), CAST(:fields AS text[]), CAST(:statuses AS text[]))
         AS r(email, first_name, last_name, timezone, fields, status)
    ON CONFLICT (workspace_id, email) DO UPDATE SET
        first_name = COALESCE(EXCLUDED.first_name, contacts.first_name),
        last_name = COALESCE(EXCLUDED.last_name, contacts.last_name),
        timezone = COALESCE(EXCLUDED.timezone, contacts.timezone),
        fields = CASE WHEN json_typeof(contacts.fields) = 'object'
                      THEN CAST(CAST(contacts.fields AS jsonb) || CAST(EXCLUDED.fields AS jsonb) AS json)
                      ELSE EXCLUDED.fields END,
        updated_at = EXCLUDED.updated_at
    WHERE json_typeof(contacts.fields) IS DISTINCT FROM 'object'
       OR (SELECT count(*) FROM jsonb_object_keys(CAST(contacts.fields AS jsonb) || CAST(EXCLUDED.fields AS jsonb)))
          <= :max_fields
    RETURNING id, created_at, email
    """
)


def _sqlite_upsert(session: Session, rows: list[dict]) -> list:
    table = Contact.__table__
    stmt = dialect_insert(session)(table)
    new_row, c = stmt.excluded, table.c
    merged = func.json_patch(func.coalesce(c.fields, literal_column("'{}'")), new_row.fields)
    stmt = stmt.on_conflict_do_update(
        index_elements=[c.workspace_id, c.email],
        # the merged fields stay within MAX_FIELDS, or the stored contact is left as it is
        where=select(func.count()).select_from(func.json_each(merged).table_valued("key")).scalar_subquery()
        <= MAX_FIELDS,
        set_={
            "first_name": func.coalesce(new_row.first_name, c.first_name),
            "last_name": func.coalesce(new_row.last_name, c.last_name),
            "timezone": func.coalesce(new_row.timezone, c.timezone),
            # RFC 7396 merge of two flat objects: the new keys win, the others stay.
            "fields": merged,
            "updated_at": new_row.updated_at,
        },
    ).returning(c.id, c.created_at, c.email)
    return insert_many(session, stmt, rows)


def _upsert(session: Session, workspace_id: int, batch: dict[str, list]) -> tuple[list[int], int, set[str]]:
    """One set-based upsert of a batch (``INSERT ... ON CONFLICT (workspace_id, email) DO
    UPDATE``); returns (contact ids, how many were new, the addresses refused).

    Empty cells (None) keep the stored value, custom fields are merged key by key, and the
    status of an existing contact is never touched. A stored contact whose fields would grow
    past MAX_FIELDS with the file's is left as it is, and its address is returned as refused.
    A new contact's status follows a suppression of its address. A row is new when the ``created_at`` it returns is this
    batch's own timestamp (an update keeps the stored one), so no separate lookup is needed.
    """
    emails = sorted(batch)  # sorted, so concurrent imports lock rows in the same order
    reasons = suppression_reasons(session, workspace_id, emails)
    statuses = [status_for_new_contact(reasons.get(e)) for e in emails]
    now = utcnow()
    values = [batch[e] for e in emails]
    if is_postgres(session):
        returned = session.execute(
            _PG_UPSERT,
            {
                "workspace_id": workspace_id,
                "now": now,
                "emails": emails,
                "first_names": [v[0] for v in values],
                "last_names": [v[1] for v in values],
                "timezones": [v[2] for v in values],
                "fields": [json.dumps(v[3]) for v in values],
                "statuses": statuses,
                "max_fields": MAX_FIELDS,
            },
        ).all()
    else:
        returned = _sqlite_upsert(
            session,
            [
                {
                    "workspace_id": workspace_id,
                    "email": email,
                    "first_name": first,
                    "last_name": last,
                    "timezone": tz,
                    "fields": fields,
                    "status": status,
                    "created_at": now,
                    "updated_at": now,
                }
                for email, (first, last, tz, fields), status in zip(emails, values, statuses, strict=True)
            ],
        )
    refused = set(emails) - {r[2] for r in returned}
    return [r[0] for r in returned], sum(1 for r in returned if r[1] == now), refused


def import_csv(
    session: Session,
    workspace_id: int,
    stream: BinaryIO,
    *,
    list_id: int | None = None,
    progress: Progress | None = None,
    batch_size: int | None = None,
    max_errors: int = MAX_ERRORS,
    resume: ImportReport | None = None,
) -> ImportReport:
    """Import contacts from a CSV byte stream into a workspace (and a list, when given).

    Reads ``stream`` once, front to back, never holding more than a batch. Commits the session
    as it goes: after every batch (so a large import neither holds one huge transaction nor
    loses work done, and no transaction is open while the stream is read), calling
    ``progress(report, bytes_read)`` just before each commit, in the same transaction. Raises
    CsvUnusable (nothing stored) for an unusable file and NotFound when ``list_id`` is not the
    workspace's. The caller tells the engine about new list members (``report.members_added``).

    ``resume``: the report of an interrupted run of the same file, as its last commit left it;
    its ``rows`` first data rows are read past (they are stored) and its counts carried on.
    Rows are read the same way on every run (a broken record is read past the same way), so
    they are numbered the same.
    """
    batch_size = batch_size or BATCH_SIZE
    if list_id is not None:
        get_list(session, workspace_id, list_id)
        session.commit()  # hold no transaction (nor SQLite's write lock) while reading the stream
    source, lines, reader, fmt = open_csv(stream)
    cols = read_header(reader, fmt)

    report = resume or ImportReport(max_errors=max_errors, list_id=list_id)
    report.list_id = list_id
    done_before = report.rows
    batch: dict[str, list] = {}
    rows_of: dict[str, list[int]] = {}  # the data rows each address of the batch came from
    in_batch = 0

    def flush() -> None:
        nonlocal batch, rows_of, in_batch
        if batch:
            ids, created, refused = _upsert(session, workspace_id, batch)
            report.created += created
            report.updated += len(batch) - created - len(refused)
            for email in sorted(refused, key=lambda e: rows_of[e][0]):
                report.updated -= len(rows_of[email]) - 1  # its repeats in the file were counted as updates
                for row in rows_of[email]:
                    report.error(row, f"the contact would have more than {MAX_FIELDS} custom fields with this "
                                      f"file's columns; it was left as it is")
            if list_id is not None:
                report.members_added += add_list_members(session, workspace_id, list_id, ids)
        batch, rows_of, in_batch = {}, {}, 0
        if progress is not None:
            progress(report, source.bytes_read)
        session.commit()

    for row, parsed in data_rows(reader, lines, cols, skip=done_before):
        report.rows += 1
        in_batch += 1
        if parsed is None:
            report.skipped += 1
        elif isinstance(parsed, str):
            report.error(row, parsed)
        else:
            email, values = parsed
            rows_of.setdefault(email, []).append(row)
            if email in batch:
                _merge(batch[email], values)
                report.updated += 1
            else:
                batch[email] = values
        if in_batch >= batch_size:
            flush()
    flush()
    return report


# --- background imports ------------------------------------------------------------------------


def import_progress(row: Import) -> float:
    if row.status == "done":
        return 1.0
    if not row.total_bytes:
        return 0.0
    return max(0.0, min(1.0, row.bytes_done / row.total_bytes))


def _resume_report(job: Import) -> ImportReport:
    """The report as a run's last commit left it (every data row is in exactly one count, so
    the errors that were not listed are what the counts leave over)."""
    errors = list(job.errors or [])
    truncated = job.rows_done - job.created - job.updated - job.skipped - len(errors)
    return ImportReport(
        created=job.created, updated=job.updated, skipped=job.skipped, rows=job.rows_done,
        errors=errors, errors_truncated=max(0, truncated), list_id=job.list_id,
    )


def queue_import(session: Session, workspace_id: int, list_id: int | None, path: str, size: int,
                 enqueue: Callable[[int], object]) -> tuple[Import, bool]:
    """Record a background import of an upload saved at ``path`` and hand its id to the queue.

    Returns the ``Import`` row and whether it was queued. When the row cannot be stored the file
    is removed and the error raised; when the queue does not answer, the row is marked failed
    (with the reason) and the file removed, so nothing is left half-started.
    """
    job = Import(workspace_id=workspace_id, list_id=list_id, status="pending", path=path, total_bytes=size,
                 errors=[])
    try:
        session.add(job)
        session.commit()
    except BaseException:
        if os.path.exists(path):
            os.unlink(path)
        raise
    try:
        enqueue(job.id)
    except Exception:  # the queue store did not answer
        log.exception("could not queue import %s", job.id)
        job.status, job.error = "failed", "the task queue did not answer; try again"
        session.commit()
        os.unlink(path)
        return job, False
    return job, True


def release_import(import_id: int) -> bool:
    """Put a running import back to ``pending`` (its worker was interrupted), so that a new run
    resumes it after the last committed batch. Returns whether it was running."""
    with new_session() as session:
        released = session.execute(
            update(Import)
            .where(Import.id == import_id, Import.status == "running")
            .values(status="pending")
            .execution_options(synchronize_session=False)
        ).rowcount
        session.commit()
    return bool(released)


class _ClaimLost(Exception):
    """Another run took the import over (this one's heartbeat was found stale)."""


def _stale_before() -> datetime:
    return utcnow() - timedelta(seconds=get_settings().lease_seconds)


def _no_live_heartbeat(stale: datetime):
    """No heartbeat since ``stale``: whatever run had the import is gone."""
    return or_(Import.heartbeat_at.is_(None), Import.heartbeat_at < stale)


def stale_imports() -> list[int]:
    """Imports whose run is gone: ``running`` with a heartbeat older than the lease (the
    consumer was killed: no signal handler put them back), or ``pending`` that long (their task
    was lost with the queue store). Queuing them again is safe: a run claims before it works."""
    stale = _stale_before()
    with new_session() as session:
        return list(session.scalars(
            select(Import.id).where(
                Import.status.in_(("running", "pending")), _no_live_heartbeat(stale),
                or_(Import.status == "running", Import.created_at < stale),
            ).order_by(Import.id)
        ))


def _claim(session: Session, import_id: int, token: str) -> bool:
    """``pending -> running`` (or take over a run whose heartbeat went stale) under ``token``."""
    claimed = session.execute(
        update(Import)
        .where(Import.id == import_id, or_(
            Import.status == "pending",
            and_(Import.status == "running", _no_live_heartbeat(_stale_before())),
        ))
        .values(status="running", run_token=token, heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount
    session.commit()
    return bool(claimed)


def run_import(import_id: int) -> ImportReport | None:
    """Run a queued import (an ``Import`` row in ``pending``): stream its file through
    :func:`import_csv`, keeping the row's progress and report current after every batch (in
    the batch's own transaction, so they always agree with what is stored).

    Claims the row first (``pending -> running``, with a new run token and a heartbeat), so a
    task delivered twice runs once; returns None when the row was not claimable. A run that
    was interrupted and released (:func:`release_import`), or whose heartbeat went stale (its
    consumer was killed), is taken over and resumes after its last committed batch; every
    batch renews the heartbeat only while the token is still this run's, so a run that was
    taken over stops at its next batch and writes nothing more. Ends ``done`` or ``failed``
    (with ``error``) and then deletes the file; unexpected errors are recorded, then raised
    again. An interruption (KeyboardInterrupt, SystemExit) keeps the file.
    """
    token = uuid.uuid4().hex
    with new_session() as session:
        if not _claim(session, import_id, token):
            return None
        job = session.get(Import, import_id)
        path, workspace_id, list_id = job.path, job.workspace_id, job.list_id
        resume = _resume_report(job) if job.rows_done else None
        mine = and_(Import.id == import_id, Import.run_token == token)

        def progress(report: ImportReport, bytes_read: int) -> None:
            if not session.execute(
                update(Import)
                .where(mine)
                .values(
                    bytes_done=bytes_read,
                    rows_done=report.rows,
                    created=report.created,
                    updated=report.updated,
                    skipped=report.skipped,
                    errors=list(report.errors),
                    heartbeat_at=utcnow(),
                )
                .execution_options(synchronize_session=False)
            ).rowcount:
                raise _ClaimLost

        def finish(**values) -> None:
            done = session.execute(
                update(Import)
                .where(mine)
                .values(finished_at=utcnow(), **values)
                .execution_options(synchronize_session=False)
            ).rowcount
            session.commit()
            if path and done:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

        try:
            with open(path, "rb") as fh:
                report = import_csv(session, workspace_id, fh, list_id=list_id, progress=progress, resume=resume)
        except _ClaimLost:
            session.rollback()  # the batch that found it out is not kept: the new run redoes it
            log.warning("import %s was taken over by another run; this one stops", import_id)
            return None
        except (HeraldError, OSError) as exc:
            session.rollback()
            finish(status="failed", error=getattr(exc, "message", None) or str(exc))
            return None
        except Exception as exc:
            session.rollback()
            log.exception("import %s failed", import_id)
            finish(status="failed", error=f"internal error: {type(exc).__name__}")
            raise
        finish(status="done", bytes_done=job.total_bytes)
        return report
