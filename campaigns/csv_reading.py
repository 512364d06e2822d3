"""Reading a contacts CSV file: its delimiter, header row and data rows, streamed.

What a file may hold and how each row counts is written up in docs/imports.md; storing the
rows is :mod:`campaigns.importer`'s.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from dataclasses import dataclass
from typing import BinaryIO

from .contacts import (
    FIELD_KEY_MAX,
    FIELD_VALUE_MAX,
    FIELDS_TOTAL_MAX,
    MAX_FIELDS,
    NAME_MAX,
    email_problem,
    fields_size,
    is_timezone,
)
from .errors import BadRequest

SNIFF_BYTES = 8_192
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


def open_csv(stream: BinaryIO) -> tuple[_Source, _Lines, csv.reader, CsvFormat]:
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


def lines_note(row: int, first: int, last: int) -> str:
    """Where a row is in the file, when its row number does not say it (docs/imports.md, "Row numbers")."""
    if first == last == row:
        return ""
    return f" ({_lines_text(first, last)} of the file)"


def unreadable_row(exc: csv.Error, first: int, last: int) -> str:
    """The error of a record the csv module could not read (read past up to ``last``)."""
    reason = str(exc)
    if "expected after" in reason:
        reason = (f"text follows a closing quote ({reason}); a quote inside a quoted cell is written twice, "
                  'and a cell with a quote in it is quoted as a whole')
    message = f"the row cannot be read as CSV: {reason}"
    if last > first:
        message += f"; it takes in {last - first + 1} lines, none of them imported: is a quote left open on this row?"
    return message


def unclosed_quote(first: int, last: int) -> str:
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


def read_header(reader, fmt: CsvFormat) -> Columns:
    """Read and parse the header row (CsvUnusable saying why it cannot be used)."""
    try:
        header = next(reader)
    except StopIteration:
        header = []
    except csv.Error as exc:
        raise CsvUnusable(f"the header row cannot be read as CSV ({fmt.describe()}): {exc}") from None
    return parse_header(header, fmt)


def inspect_csv(stream: BinaryIO) -> Columns:
    """Check that a file can be imported (CsvUnusable if not), reading only its first row."""
    _, _, reader, fmt = open_csv(stream)
    return read_header(reader, fmt)


def _short(value: str, size: int = 60) -> str:
    return repr(value if len(value) <= size else value[:size] + "...")


def _cell(record: list[str], index: int | None) -> str | None:
    if index is None:
        return None
    return record[index].strip() or None


def parse_row(record: list[str], cols: Columns) -> tuple[str, list] | str | None:
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


def data_rows(reader, lines: _Lines, cols: Columns, skip: int = 0):
    """The data rows after the header, in order, as ``(row number, parse_row's answer)``; an
    error says where it is in the file. The first ``skip`` rows are read past (not parsed, not
    yielded): an import resuming after its last stored batch. A quote never closed ends it."""
    row = 1  # the header
    while True:
        first = lines.count + 1  # the physical line the record starts on
        lines.held.clear()
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            # A quote still open at the end of the file, text after a closing quote, or a cell over
            # csv.field_size_limit(). The reader goes on with the next line: read past the rest of
            # the record first, up to where its open quoted cell closes (if it ever does).
            row += 1
            if lines.ended or lines.skip_open_cell():
                if row - 1 > skip:
                    yield row, unclosed_quote(first, lines.count)
                return
            if row - 1 > skip:
                yield row, unreadable_row(exc, first, lines.count) + lines_note(row, first, lines.count)
            continue
        row += 1
        if row - 1 <= skip:
            continue
        parsed = parse_row(record, cols)
        yield row, (parsed + lines_note(row, first, lines.count) if isinstance(parsed, str) else parsed)
