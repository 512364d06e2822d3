"""CSV import of contacts: one streamed, batched function (:func:`import_csv`) behind the three
ways in - the synchronous API call, the background task (:func:`run_import`) and the CLI.

The file
    UTF-8, with or without a BOM, lines ending in LF, CRLF or CR. The first line is the header
    row and must have an email column. Quoted fields may hold delimiters and newlines (and a
    quote written twice, ``""``); a closing quote must end its cell.

Delimiter
    A comma, a semicolon (Excel in many European locales) or a tab (TSV), told from the header
    row alone (the start of the file: the rest is streamed): the delimiter that splits it into
    several columns. When more than one does (a header name holding another delimiter, unquoted),
    the one whose split has an email column wins; if several do, the file is refused as
    ambiguous, and if none does, the error names the delimiter assumed (the one giving the most
    columns) and the header line as read. A header with none of them is one column.

Header names
    Matched ignoring case, surrounding spaces and any spaces, dashes and underscores
    (:data:`FIELD_ALIASES`): ``email`` (``E-mail``, ``Email Address``, ``email_address``),
    ``first_name`` (``First Name``, ``firstname``, ``given name``, ``forename``), ``last_name``
    (``Last Name``, ``surname``, ``family name``) and ``timezone`` (``Time Zone``, ``tz``; an
    IANA name). Two columns naming the same field (``Email`` and ``E-mail Address``) are an
    error naming both. Every other named column becomes a custom field under its header text
    (``mail``, ``Full Name`` or ``E-mail 2`` included); a column with an empty header is ignored.
    A file with more custom columns than a contact may have fields (``MAX_FIELDS``, 100) is
    refused whole, as is a column name over 100 characters.

Row numbers
    Rows are numbered like a spreadsheet's rows, i.e. the file's CSV records: the header is row
    1, the first data row is row 2. A quoted field that spans several physical lines is still one
    row, so a row number can be smaller than the line number a text editor shows; once they
    differ, a row's error also names its physical line (``(line 7 of the file)``), and an error
    on a row that spans lines names them all (``(lines 3-5 of the file)``).

What each data row counts as (exactly one of)
    ``created``  - a new contact;
    ``updated``  - an existing contact (re-importing a file updates, never duplicates);
    ``skipped``  - a blank row (every cell empty);
    an entry in ``errors`` - a broken row: wrong number of columns, bytes that are not UTF-8,
    a NUL byte, a missing or invalid address, a time zone that is not IANA, a name over 200
    characters or holding a line break, a custom field's value over 8,192 characters or custom
    fields over 65,536 characters in all (``campaigns.contact_rules``), malformed quoting (text
    after a closing quote, a cell over ``csv.field_size_limit()``). Good rows are stored regardless.

Quotes left open
    A quote that is never closed would make the rest of the file one cell. When a quoted cell
    has no closing quote before the end of the file, its row is an error saying so, with the
    physical lines that could therefore not be read (from the row's first line to the end of the
    file): they are neither imported nor counted in ``rows``, and the import ends there (the rows
    before it are imported as usual). When a broken row's quoted cell does close further down
    (a cell over the size limit, or a stray quote), the row is one error naming the lines it
    spans, and reading goes on after them: rows are never swallowed silently.

    An empty cell means "not given": it never clears a stored value. When an address appears on
    several rows, the rows are merged in file order (a later non-empty cell wins): the first row
    counts as created (or updated, if the contact existed) and every later row as updated.

Suppressions
    The import never removes a suppression and never changes an existing contact's status, so
    an unsubscribed, bounced or complained contact stays so; a new contact whose address is
    already suppressed starts with the status the suppression implies. Such rows are stored and
    counted like any other.

Unusable files
    An empty body, binary content (NUL bytes, or a first line that is not UTF-8), no header row,
    no email column, two columns for one field or an ambiguous delimiter raise
    :class:`CsvUnusable` (HTTP 400) before anything is stored.

Memory
    The stream is read through ``csv.reader`` (strict quoting) and handled in batches of
    ``batch_size`` rows, one set-based upsert per batch (``INSERT ... ON CONFLICT (workspace_id,
    email) DO UPDATE``), and committed batch by batch, so memory stays flat whatever the file's
    size (a broken record is read past line by line, holding none of it). At most
    ``max_errors`` errors are listed; ``errors_truncated`` counts the rest.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import BinaryIO

from sqlalchemy import and_, func, literal_column, or_, select, text, update
from sqlalchemy.orm import Session

from .config import get_settings
from .contacts import (
    FIELD_KEY_MAX,
    FIELD_VALUE_MAX,
    FIELDS_TOTAL_MAX,
    MAX_FIELDS,
    NAME_MAX,
    add_list_members,
    dialect_insert,
    email_problem,
    fields_size,
    get_list,
    insert_many,
    is_timezone,
    status_for_new_contact,
    suppression_reasons,
)
from .db import is_postgres, new_session, utcnow
from .errors import BadRequest, HeraldError
from .models import Contact, Import

log = logging.getLogger(__name__)

BATCH_SIZE = 1_000
MAX_ERRORS = 1_000
SNIFF_BYTES = 8_192
KNOWN_COLUMNS = ("email", "first_name", "last_name", "timezone")
DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab"}  # in order of preference on a tie
# The header names of the known columns, as :func:`_column_key` writes them (lower case, without
# spaces, dashes and underscores). Deliberately narrow: a name that could mean something else
# (``mail``, ``name``, ``first``) stays a custom field, as it always was.
FIELD_ALIASES = {
    "email": ("email", "emailaddress"),
    "first_name": ("firstname", "givenname", "forename"),
    "last_name": ("lastname", "surname", "familyname"),
    "timezone": ("timezone", "tz"),
}
_FIELD_OF = {alias: name for name, aliases in FIELD_ALIASES.items() for alias in aliases}
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of bad bytes


class CsvUnusable(BadRequest):
    """The file cannot be imported at all (nothing was stored)."""

    code = "bad_csv"


@dataclass
class ImportReport:
    """The per-import counts and the per-row errors (see the module docstring)."""

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


class _Source(io.RawIOBase):
    """The caller's byte stream with its first bytes read ahead (to sniff them) and served
    again, counting the bytes handed on (the progress by bytes). Never closes the stream."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self._head = b""
        self.bytes_read = 0

    def sniff(self, size: int) -> bytes:
        chunks, have = [], 0
        while have < size:
            data = self._stream.read(size - have)
            if not data:
                break
            chunks.append(data)
            have += len(data)
        self._head = b"".join(chunks)
        return self._head

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
        else:
            data = self._stream.read(len(buffer))
            n = len(data)
            buffer[:n] = data
        self.bytes_read += n
        return n


def _check_head(head: bytes) -> None:
    if not head:
        raise CsvUnusable("the file is empty; send a CSV file whose first line names the columns (e.g. email)")
    if b"\x00" in head:
        raise CsvUnusable(
            "the file is binary (it contains NUL bytes), not CSV text; "
            "if it is a spreadsheet or UTF-16 text, save it as CSV UTF-8"
        )
    first_line = head.split(b"\n", 1)[0]
    try:
        # Not final: the sniffed bytes may end in the middle of a character.
        codecs.getincrementaldecoder("utf-8")().decode(first_line, final=b"\n" in head)
    except UnicodeDecodeError as exc:
        raise CsvUnusable(
            f"the file is not UTF-8 text (undecodable byte at offset {exc.start}); save it as CSV UTF-8"
        ) from None


def _quote_open_after(line: str, quoted: bool, delimiter: str = ",") -> bool:
    """Whether a quoted cell is still open at the end of a physical ``line``, which starts inside
    one (``quoted``) or at the start of a record. Follows the csv module's reading of quotes (the
    excel dialect): a quote opens a cell only as its first character, ``""`` inside one is a
    quote, and after the closing quote the cell goes on unquoted up to the next ``delimiter``."""
    pos, size = 0, len(line)
    while pos < size:
        if quoted:
            end = line.find('"', pos)
            if end < 0:
                return True
            if line.startswith('"', end + 1):
                pos = end + 2  # a doubled quote: still inside
                continue
            quoted = False
            pos = end + 1
        elif line.startswith('"', pos):
            quoted, pos = True, pos + 1
            continue
        # an unquoted cell (or the rest of a closed one): it ends at the next delimiter or at the line's end
        end = line.find(delimiter, pos)
        if end < 0:
            return False
        pos = end + 1
    return quoted


class _Lines:
    """The text's physical lines, handed to ``csv.reader`` one at a time: counts them, keeps the
    lines of the record being read (``held``, cleared by the caller for each record), and notes
    when the text has ended."""

    def __init__(self, text: io.TextIOBase, delimiter: str = ","):
        self._lines = iter(text)
        self.delimiter = delimiter
        self.count = 0  # physical lines read so far
        self.held: list[str] = []
        self.ended = False

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        try:
            line = next(self._lines)
        except StopIteration:
            self.ended = True
            raise
        self.count += 1
        self.held.append(line)
        return line

    def skip_open_cell(self) -> bool:
        """After ``csv.reader`` gave up on a record (it goes on with the next line, as if the record
        ended on the line it stopped in): when that record has a quoted cell still open there, read
        past the lines up to where it closes, so that reading goes on after the whole record.
        Returns True when the cell never closes (the text ended first). Holds no skipped line."""
        quoted = False
        for line in self.held:
            quoted = _quote_open_after(line, quoted, self.delimiter)
        self.held.clear()
        while quoted:
            try:
                line = next(self._lines)
            except StopIteration:
                self.ended = True
                return True
            self.count += 1
            quoted = _quote_open_after(line, True, self.delimiter)
        return False


@dataclass(frozen=True)
class CsvFormat:
    """How the file is read: its delimiter, and what it was told from (for error messages)."""

    delimiter: str = ","
    header_line: str = ""  # the file's first line, as read
    note: str = ""  # why this delimiter, when the header alone did not make it plain

    def describe(self) -> str:
        """E.g. "read as semicolon-separated, from the first line 'email;name'"."""
        how = f"read as {DELIMITERS[self.delimiter]}-separated"
        if self.note:
            how += f" ({self.note})"
        return f"{how}, from the first line {_short(self.header_line, 200)}"


def _header_fields(cells: list[str]) -> set[str]:
    return {_FIELD_OF[key] for key in map(_column_key, cells) if key in _FIELD_OF}


def _names(delimiters) -> str:
    return " and ".join(DELIMITERS[d] + "s" for d in delimiters)


def detect_format(head: bytes) -> CsvFormat:
    """The delimiter of a file, from its first bytes (``head``): the one of comma, semicolon and
    tab that splits the header row into several columns (see "Delimiter" above). Each is tried
    with the csv module itself, so a delimiter inside a quoted header name does not count.
    Raises CsvUnusable when two of them each give a header with an email column."""
    # The head may end in the middle of a character or of a line: only its first record is read.
    text = head.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    first_line = re.split(r"\r\n|\r|\n", text, maxsplit=1)[0]
    splits: dict[str, list[str]] = {}
    for delimiter in DELIMITERS:
        try:
            cells = next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True), [])
        except csv.Error:
            continue  # e.g. a header longer than the head, cut in a quoted name: the reader will say
        if len(cells) > 1:
            splits[delimiter] = cells
    if not splits:
        return CsvFormat(",", first_line, "no comma, semicolon or tab in it: one column")
    if len(splits) == 1:
        return CsvFormat(next(iter(splits)), first_line)
    with_email = [d for d, cells in splits.items() if "email" in _header_fields(cells)]
    if len(with_email) == 1:
        return CsvFormat(with_email[0], first_line)
    if with_email:
        readings = "; ".join(
            f"split on {DELIMITERS[d]}s: {', '.join(_short(c, 40) for c in splits[d][:6])}" for d in with_email
        )
        raise CsvUnusable(
            f"cannot tell the file's delimiter: the first line {_short(first_line, 200)} holds "
            f"{_names(splits)}, and split on either it has an email column ({readings}); "
            "save it with one delimiter (comma, semicolon or tab), quoting a header name that holds another one"
        )
    # None has an email column: the error will say so; assume the one that gives the most columns.
    assumed = max(splits, key=lambda d: len(splits[d]))  # a tie: the first in DELIMITERS
    return CsvFormat(assumed, first_line, f"the most columns; the line holds {_names(splits)}")


def _open(stream: BinaryIO) -> tuple[_Source, _Lines, csv.reader, CsvFormat]:
    source = _Source(stream)
    head = source.sniff(SNIFF_BYTES)
    _check_head(head)
    fmt = detect_format(head)
    text = io.TextIOWrapper(
        io.BufferedReader(source, buffer_size=64 * 1024), encoding="utf-8-sig", errors="surrogateescape", newline=""
    )
    lines = _Lines(text, fmt.delimiter)
    # strict: a quote left open at the end of the file, or text after a closing quote, is an error
    # (csv.Error) instead of a cell that silently takes in the lines after it
    return source, lines, csv.reader(lines, delimiter=fmt.delimiter, strict=True), fmt


def _lines_text(first: int, last: int) -> str:
    return f"line {first}" if first == last else f"lines {first}-{last}"


def _where(row: int, first: int, last: int) -> str:
    """Where a row is in the file, when its row number does not say it (see "Row numbers")."""
    if first == last == row:
        return ""
    return f" ({_lines_text(first, last)} of the file)"


def _unreadable(exc: csv.Error, first: int, last: int) -> str:
    """The error of a record the csv module could not read (read past up to ``last``)."""
    reason = str(exc)
    if "expected after" in reason:
        reason = (f"text follows a closing quote ({reason}); a quote inside a quoted cell is written twice, "
                  'and a cell with a quote in it is quoted as a whole')
    message = f"the row cannot be read as CSV: {reason}"
    if last > first:
        message += f"; it takes in {last - first + 1} lines, none of them imported: is a quote left open on this row?"
    return message


def _never_closed(first: int, last: int) -> str:
    lines = last - first + 1
    return (
        "a quoted cell on this row is never closed (there is no closing quote before the end of the file), "
        f"so the rest of the file, {_lines_text(first, last)} ({lines} line{'s' * (lines != 1)}), could not be "
        "read and nothing in it was imported (rows after this one are not counted); close the quote (a quote "
        "inside a quoted cell is written twice) and import the file again"
    )


@dataclass(frozen=True)
class Columns:
    """Where each known column is (None: absent) and the custom fields, by position."""

    count: int
    email: int
    first_name: int | None
    last_name: int | None
    timezone: int | None
    custom: tuple[tuple[int, str], ...]


def _column_key(cell: str) -> str:
    """A header name as :data:`FIELD_ALIASES` writes it: ``E-mail Address`` -> ``emailaddress``."""
    return re.sub(r"[\s_\-]+", "", cell.strip().lower())


def parse_header(header: list[str], fmt: CsvFormat | None = None) -> Columns:
    """The header row -> :class:`Columns`, or CsvUnusable saying what is wrong with it (``fmt``:
    how the file was read, named in the error when there is no email column)."""
    if not header or all(not c.strip() for c in header):
        raise CsvUnusable("the file has no header row: its first line must name the columns (e.g. email,first_name)")
    if any(_UNDECODABLE.search(c) or "\x00" in c for c in header):
        raise CsvUnusable("the header row is not UTF-8 text; save the file as CSV UTF-8")
    known: dict[str, int] = {}
    custom: dict[str, int] = {}
    for i, cell in enumerate(header):
        name = cell.strip()
        if not name:
            continue  # a column without a name is ignored
        key = _column_key(name)
        if key in _FIELD_OF:
            known_as = _FIELD_OF[key]
            if known_as in known:
                j = known[known_as]
                first = header[j].strip()
                if first.casefold() == name.casefold():
                    raise CsvUnusable(
                        f"the column {first!r} appears twice in the header row (columns {j + 1} and {i + 1}"
                        + (f", as {first!r} and {name!r}" if first != name else "") + "); remove or rename one"
                    )
                raise CsvUnusable(
                    f"the columns {first!r} (column {j + 1}) and {name!r} (column {i + 1}) are both read as the "
                    f"{known_as} column; remove one of them, or rename it to keep it as a custom field"
                )
            known[known_as] = i
        else:
            if name in custom:
                raise CsvUnusable(f"the column {name!r} appears twice in the header row")
            if len(name) > FIELD_KEY_MAX:
                raise CsvUnusable(f"the column name {name[:40]!r}... is longer than {FIELD_KEY_MAX} characters")
            custom[name] = i
            if len(custom) > MAX_FIELDS:
                raise CsvUnusable(
                    f"the header row has more than {MAX_FIELDS} custom columns (columns other than email, "
                    f"first_name, last_name and timezone), and a contact has at most {MAX_FIELDS} custom fields; "
                    "remove the columns you do not need"
                )
    if "email" not in known:
        if any(not email_problem(c) for c in header):
            raise CsvUnusable(
                "the file has no header row: its first line holds an email address; "
                "add a first line naming the columns (e.g. email,first_name)"
            )
        found = ", ".join(_short(c, 40) for c in header[:10]) + (", ..." if len(header) > 10 else "")
        how = f"; {fmt.describe()}" if fmt is not None else ""
        raise CsvUnusable(
            f"the header row has no 'email' column (found: {found}{how}). The email column may be named "
            "email, e-mail, email address or email_address (case, spaces, dashes and underscores do not "
            "matter), and the columns may be separated by commas, semicolons or tabs"
        )
    return Columns(
        count=len(header),
        email=known["email"],
        first_name=known.get("first_name"),
        last_name=known.get("last_name"),
        timezone=known.get("timezone"),
        custom=tuple((i, name) for name, i in custom.items()),
    )


def inspect_csv(stream: BinaryIO) -> Columns:
    """Check that a file can be imported (CsvUnusable if not), reading only its first row."""
    _, _, reader, fmt = _open(stream)
    try:
        header = next(reader)
    except StopIteration:
        header = []
    except csv.Error as exc:
        raise CsvUnusable(f"the header row cannot be read as CSV ({fmt.describe()}): {exc}") from None
    return parse_header(header, fmt)


def _short(value: str, size: int = 60) -> str:
    return repr(value if len(value) <= size else value[:size] + "...")


def _cell(record: list[str], index: int | None) -> str | None:
    if index is None:
        return None
    return record[index].strip() or None


def _parse_row(record: list[str], cols: Columns) -> tuple[str, list] | str | None:
    """A data row -> ``(email, [first, last, tz, fields])``, an error message, or None (blank)."""
    if not record or all(not c.strip() for c in record):
        return None
    if any(_UNDECODABLE.search(c) for c in record):
        return "the row is not valid UTF-8 text (undecodable bytes)"
    if any("\x00" in c for c in record):
        return "the row contains a NUL byte"
    if len(record) != cols.count:
        return f"expected {cols.count} columns, found {len(record)}"
    raw_email = record[cols.email].strip()
    if not raw_email:
        return "the email cell is empty"
    problem = email_problem(raw_email)
    if problem:
        return f"invalid email address {_short(raw_email)}: {problem}"
    first, last, tz = _cell(record, cols.first_name), _cell(record, cols.last_name), _cell(record, cols.timezone)
    for what, value in (("first_name", first), ("last_name", last)):
        if value is not None and ("\n" in value or "\r" in value):
            return f"{what} holds a line break: is a quote left open on this row?"
        if value is not None and len(value) > NAME_MAX:
            return f"{what} is longer than {NAME_MAX} characters"
    if tz is not None and not is_timezone(tz):
        return f"unknown time zone {_short(tz)}: use an IANA name such as Europe/Paris or UTC"
    fields = {}
    for i, name in cols.custom:
        value = record[i].strip()
        if len(value) > FIELD_VALUE_MAX:
            return f"the value of {_short(name, 40)} is longer than {FIELD_VALUE_MAX:,} characters ({len(value):,})"
        if value:
            fields[name] = value
    if fields_size(fields) > FIELDS_TOTAL_MAX:
        return f"the custom fields hold more than {FIELDS_TOTAL_MAX:,} characters in all"
    return raw_email.lower(), [first, last, tz, fields]


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
    RETURNING id, created_at
    """
)


def _sqlite_upsert(session: Session, rows: list[dict]) -> list:
    table = Contact.__table__
    stmt = dialect_insert(session)(table)
    new_row, c = stmt.excluded, table.c
    stmt = stmt.on_conflict_do_update(
        index_elements=[c.workspace_id, c.email],
        set_={
            "first_name": func.coalesce(new_row.first_name, c.first_name),
            "last_name": func.coalesce(new_row.last_name, c.last_name),
            "timezone": func.coalesce(new_row.timezone, c.timezone),
            # RFC 7396 merge of two flat objects: the new keys win, the others stay.
            "fields": func.json_patch(func.coalesce(c.fields, literal_column("'{}'")), new_row.fields),
            "updated_at": new_row.updated_at,
        },
    ).returning(c.id, c.created_at)
    return insert_many(session, stmt, rows)


def _upsert(session: Session, workspace_id: int, batch: dict[str, list]) -> tuple[list[int], int]:
    """One set-based upsert of a batch (``INSERT ... ON CONFLICT (workspace_id, email) DO
    UPDATE``); returns (contact ids, how many were new).

    Empty cells (None) keep the stored value, custom fields are merged key by key, and the
    status of an existing contact is never touched. A new contact's status follows a
    suppression of its address. A row is new when the ``created_at`` it returns is this
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
    return [r[0] for r in returned], sum(1 for r in returned if r[1] == now)


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
    source, lines, reader, fmt = _open(stream)
    try:
        header = next(reader)
    except StopIteration:
        header = []
    except csv.Error as exc:
        raise CsvUnusable(f"the header row cannot be read as CSV ({fmt.describe()}): {exc}") from None
    cols = parse_header(header, fmt)

    report = resume or ImportReport(max_errors=max_errors, list_id=list_id)
    report.list_id = list_id
    done_before = report.rows
    batch: dict[str, list] = {}
    in_batch = 0
    row = 1  # the header

    def flush() -> None:
        nonlocal batch, in_batch
        if batch:
            ids, created = _upsert(session, workspace_id, batch)
            report.created += created
            report.updated += len(batch) - created
            if list_id is not None:
                report.members_added += add_list_members(session, workspace_id, list_id, ids)
        batch, in_batch = {}, 0
        if progress is not None:
            progress(report, source.bytes_read)
        session.commit()

    never_closed = False
    while not never_closed:
        first = lines.count + 1  # the physical line the record starts on
        lines.held.clear()
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            # A quote still open at the end of the file, text after a closing quote, or a cell over
            # csv.field_size_limit(). The reader goes on with the next line: read past the rest of
            # the record first, up to where its open quoted cell closes (if it ever does).
            never_closed = lines.ended or lines.skip_open_cell()
            record = None
            problem = _never_closed(first, lines.count) if never_closed else _unreadable(exc, first, lines.count)
        else:
            problem = None
        row += 1
        if row - 1 <= done_before:
            continue
        report.rows += 1
        in_batch += 1
        parsed = problem if record is None else _parse_row(record, cols)
        if parsed is None:
            report.skipped += 1
        elif isinstance(parsed, str):
            report.error(row, parsed if never_closed else parsed + _where(row, first, lines.count))
        else:
            email, values = parsed
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
    except Exception:  # noqa: BLE001 - the queue store did not answer
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
        if not claimed:
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
