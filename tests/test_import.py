"""CSV import: the synchronous API, the background task, the CLI, and a 100,000-row stream."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from campaigns import contacts, csv_reading, importer
from campaigns.config import get_settings
from campaigns.db import session_scope
from campaigns.models import Contact, Import, ListMember, Suppression
from tasks import huey, jobs
from tasks.imports import requeue_interrupted_import, requeue_stale_imports, run_import
from tests.helpers import contacts_by_email, post_csv, run_queued_imports


def count(model, *where) -> int:
    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


MIXED = (
    "email,first_name,last_name,timezone,company\n"  # row 1
    "ann@example.com,Ann,Lee,Europe/Paris,Acme\n"  # 2 ok
    "not-an-address,Bad,Row,,X\n"  # 3 invalid address
    "bob@example.com,Bob,,Mars/Base,Y\n"  # 4 bad time zone
    "cat@example.com,Cat\n"  # 5 wrong column count
    ",NoEmail,,,\n"  # 6 empty email
    "\n"  # 7 blank: skipped
    "dan@example.com,Dan,,America/New_York,\n"  # 8 ok (empty custom field not stored)
    "eve@example.com,Eve,X,UTC,Z,extra\n"  # 9 wrong column count
)


def test_good_rows_stored_bad_rows_reported_by_number(api):
    resp = post_csv(api, MIXED.encode())
    assert resp.status_code == 200, resp.json
    r = resp.json
    assert (r["created"], r["updated"], r["skipped"], r["rows"], r["errors_truncated"]) == (2, 0, 1, 8, 0)
    assert [e["row"] for e in r["errors"]] == [3, 4, 5, 6, 9]
    by_row = {e["row"]: e["error"] for e in r["errors"]}
    assert "invalid email address" in by_row[3]
    assert "time zone" in by_row[4] and "Mars/Base" in by_row[4]
    assert "expected 5 columns, found 2" in by_row[5]
    assert "email cell is empty" in by_row[6]
    assert "found 6" in by_row[9]

    stored = contacts_by_email(api.workspace_id)
    assert set(stored) == {"ann@example.com", "dan@example.com"}
    ann = stored["ann@example.com"]
    assert (ann.first_name, ann.last_name, ann.timezone, ann.fields) == ("Ann", "Lee", "Europe/Paris",
                                                                         {"company": "Acme"})
    assert stored["dan@example.com"].fields == {}


def test_bom_quoted_newlines_and_custom_fields(api):
    body = (
        "\ufeffEMAIL,First Name,Plan,\"Notes, long\"\r\n"
        "ann@example.com,Ann,pro,\"line one\r\nline two, with comma\"\r\n"
        "\"bob@example.com\",\"Bob \"\"B\"\" Jr\",free,\"\"\r\n"
        "not valid,x,y,z\r\n"
    ).encode("utf-8")
    r = post_csv(api, body).json
    assert (r["created"], r["updated"], r["skipped"]) == (2, 0, 0)
    # the multi-line record is one row: the broken one is row 4
    assert r["errors"] == [{"row": 4, "error": r["errors"][0]["error"]}]
    stored = contacts_by_email(api.workspace_id)
    ann, bob = stored["ann@example.com"], stored["bob@example.com"]
    assert ann.first_name == "Ann"
    assert ann.fields == {"Plan": "pro", "Notes, long": "line one\r\nline two, with comma"}
    assert bob.first_name == 'Bob "B" Jr' and bob.fields == {"Plan": "free"}


def test_duplicates_merged_last_wins_and_reimport_is_idempotent(api):
    api.post("/api/v1/contacts", json={"email": "old@example.com", "first_name": "Old", "fields": {"keep": "1"}})
    body = (
        b"email,first_name,last_name,color\n"
        b"a@example.com,A1,,red\n"
        b"OLD@example.com,,Smith,blue\n"
        b"a@example.com,A2,Last,\n"
        b"a@example.com,,,green\n"
    )
    r = post_csv(api, body).json
    # first row of an address: created (or updated if it existed); every later row: updated
    assert (r["created"], r["updated"], r["skipped"], r["errors"]) == (1, 3, 0, [])
    stored = contacts_by_email(api.workspace_id)
    a = stored["a@example.com"]
    assert (a.first_name, a.last_name, a.fields) == ("A2", "Last", {"color": "green"})
    old = stored["old@example.com"]
    # an empty cell never clears a stored value; custom fields are merged
    assert (old.first_name, old.last_name, old.fields) == ("Old", "Smith", {"keep": "1", "color": "blue"})

    again = post_csv(api, body).json
    assert (again["created"], again["updated"]) == (0, 4)
    assert count(Contact, Contact.workspace_id == api.workspace_id) == 2
    assert contacts_by_email(api.workspace_id)["a@example.com"].fields == {"color": "green"}


def test_duplicates_across_batches_count_the_same(api):
    rows = "".join(f"d{i % 7}@example.com,N{i}\n" for i in range(50))
    with session_scope() as s:
        report = importer.import_csv(s, api.workspace_id, io.BytesIO(("email,first_name\n" + rows).encode()),
                                     batch_size=4)
    assert (report.created, report.updated, report.rows) == (7, 43, 50)
    stored = contacts_by_email(api.workspace_id)
    assert len(stored) == 7 and stored["d0@example.com"].first_name == "N49"


def test_suppressed_addresses_stay_suppressed_on_reimport(api):
    ann = api.post("/api/v1/contacts", json={"email": "ann@example.com"}).json
    api.post("/api/v1/suppressions", json={"emails": ["ann@example.com"], "reason": "unsubscribe"})
    api.post("/api/v1/suppressions", json={"emails": ["bounced@example.com"], "reason": "bounce"})
    body = b"email,first_name\nann@example.com,Ann\nbounced@example.com,Bo\nfine@example.com,Fi\n"
    for _ in range(2):
        r = post_csv(api, body).json
        assert r["errors"] == []
    got = api.get(f"/api/v1/contacts/{ann['id']}").json
    assert got["first_name"] == "Ann" and got["status"] == "unsubscribed" and got["suppressed"] is True
    bo = api.get("/api/v1/contacts?email=bounced@example.com").json["items"][0]
    assert bo["status"] == "bounced" and bo["suppressed"] is True
    fine = api.get("/api/v1/contacts?email=fine@example.com").json["items"][0]
    assert fine["status"] == "active" and fine["suppressed"] is False
    assert count(Suppression, Suppression.workspace_id == api.workspace_id) == 2


UNUSABLE = [
    pytest.param(b"", "empty", id="empty"),
    pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "binary", id="binary-nul"),
    pytest.param("email,name\nå@example.com,x\n".encode("utf-16"), "binary", id="utf16"),
    pytest.param("émail,prénom\na@example.com,b\n".encode("latin-1"), "not UTF-8", id="latin1-header"),
    pytest.param(b"\n\nemail\na@example.com\n", "no header row", id="blank-first-line"),
    pytest.param(b"ann@example.com,Ann\nbob@example.com,Bob\n", "no header row", id="no-header"),
    pytest.param(b"name,phone\nAnn,123\n", "no 'email' column", id="no-email-column"),
    pytest.param(b"email,Email\na@example.com,b@example.com\n", "appears twice", id="duplicate-column"),
    # two names of one field: an error naming both, never a silent pick
    pytest.param(b"Email,Name,E-mail Address\na@example.com,A,b@example.com\n",
                 "'Email' (column 1) and 'E-mail Address' (column 3) are both read as the email column",
                 id="duplicate-email-aliases"),
    pytest.param(b"email;Surname;Last Name\na@example.com;B;C\n",
                 "'Surname' (column 2) and 'Last Name' (column 3) are both read as the last_name column",
                 id="duplicate-last-name-aliases"),
    pytest.param(b"email\tfirst_name\tFirst Name\na@example.com\tA\tB\n", "'first_name' (column 2) and 'First Name'",
                 id="duplicate-first-name-tsv"),
    # no email column: the error names the delimiter it assumed and the header line it saw
    pytest.param(b"name;phone\nAnn;123\n", "read as semicolon-separated, from the first line 'name;phone'",
                 id="no-email-semicolon"),
    pytest.param(b"Name|Mail\nAnn|a@example.com\n",
                 "read as comma-separated (no comma, semicolon or tab in it: one column), "
                 "from the first line 'Name|Mail'",
                 id="no-email-other-delimiter"),
    # ambiguous: both a comma and a semicolon split the header, neither gives an email column
    pytest.param(b"name;phone,fax\nAnn;1,2\n",
                 "read as comma-separated (the most columns; the line holds commas and semicolons), "
                 "from the first line 'name;phone,fax'", id="ambiguous-without-email"),
    # ambiguous: read either way the header has an email column
    pytest.param(b"email;x,email\na@example.com;1,b@example.com\n",
                 "cannot tell the file's delimiter: the first line 'email;x,email' holds commas and semicolons",
                 id="ambiguous-with-email"),
]


@pytest.mark.parametrize("body,message", UNUSABLE)
def test_unusable_files_are_400_and_store_nothing(api, body, message):
    lst = api.post("/api/v1/lists", json={"name": "L"}).json
    for params in ({}, {"list_id": lst["id"]}, {"async": "1"}):
        resp = post_csv(api, body, **params)
        assert resp.status_code == 400, (params, resp.json)
        err = resp.json["error"]
        assert err["code"] == "bad_csv" and message in err["message"], err
    assert count(Contact) == 0 and count(ListMember) == 0 and count(Import) == 0
    folder = get_settings().instance_dir / "imports"
    assert not folder.exists() or not list(folder.iterdir())


# --- delimiters and header names: what spreadsheets and other tools export ---------------------


def test_semicolon_file_with_bom_and_crlf(api, other_api):
    # Excel in a European locale: semicolons, a BOM, CRLF; commas are plain text in the cells.
    # Only the header decides the delimiter: the rows past the sniffed head are read the same way.
    filler = "".join(f"f{i}@example.com;F{i};;Note, with comma {i}\r\n" for i in range(400))
    assert len(filler) > csv_reading.SNIFF_BYTES
    body = (
        "\ufeffE-mail;Vorname;First Name;Notes\r\n"  # row 1
        "ann@example.com;Anna;Ann;\"Met in Köln; said \"\"hi\"\",\r\nthen left\"\r\n"  # row 2, lines 2-3
        "bob@example.com,Bob,,\r\n"  # row 3: commas are not the delimiter here
        "cat@example.com;;Cat;a,b,c\r\n"  # row 4
        + filler  # rows 5-404
        + "not-an-address;X;Y;Z\r\n"  # row 405, line 406
    ).encode()
    resp = post_csv(api, body)
    assert resp.status_code == 200, resp.json
    r = resp.json
    assert (r["rows"], r["created"], r["skipped"]) == (404, 402, 0)
    assert [e["row"] for e in r["errors"]] == [3, 405]
    assert "expected 4 columns, found 1" in r["errors"][0]["error"]
    assert "invalid email address 'not-an-address'" in r["errors"][1]["error"]
    assert r["errors"][1]["error"].endswith("(line 406 of the file)")
    stored = contacts_by_email(api.workspace_id)
    ann, cat = stored["ann@example.com"], stored["cat@example.com"]
    assert ann.first_name == "Ann"
    assert ann.fields == {"Vorname": "Anna", "Notes": 'Met in Köln; said "hi",\r\nthen left'}
    assert cat.first_name == "Cat" and cat.fields == {"Notes": "a,b,c"}
    assert stored["f399@example.com"].fields == {"Vorname": "F399", "Notes": "Note, with comma 399"}

    # the background import reads it the same way
    import_id = post_csv(other_api, body, **{"async": "1"}).json["import_id"]
    assert run_queued_imports() == 1
    done = other_api.get(f"/api/v1/imports/{import_id}").json
    assert (done["status"], done["created"], done["errors"]) == ("done", 402, r["errors"])


def test_tab_separated_file(api, app, tmp_path):
    body = (
        b"Email Address\tGiven Name\tFamily Name\tTime Zone\tCompany, Inc.\n"
        b"ann@example.com\tAnn\tLee\tEurope/Paris\tAcme, Ltd; EU\n"
        b'bob@example.com\t"Bob\tthe builder"\t\t\t\n'  # a quoted tab is text
        b"cat@example.com,Cat,,UTC,X\n"  # a comma row in a tab file: one column, not five
        b"dan@example.com\tDan\t\tMars/Base\t\n"
    )
    r = post_csv(api, body).json
    assert (r["created"], [e["row"] for e in r["errors"]]) == (2, [4, 5])
    assert "expected 5 columns, found 1" in r["errors"][0]["error"] and "Mars/Base" in r["errors"][1]["error"]
    stored = contacts_by_email(api.workspace_id)
    ann = stored["ann@example.com"]
    assert (ann.first_name, ann.last_name, ann.timezone) == ("Ann", "Lee", "Europe/Paris")
    assert ann.fields == {"Company, Inc.": "Acme, Ltd; EU"}
    assert stored["bob@example.com"].first_name == "Bob\tthe builder"

    # the CLI reads it the same way
    path = tmp_path / "people.tsv"
    path.write_bytes(body.replace(b"@example.com", b"@example.org"))
    result = app.test_cli_runner().invoke(args=["import-contacts", str(path), "--workspace", api.workspace_name])
    assert result.exit_code == 0, result.output
    assert "4 rows: 2 created, 0 updated, 0 skipped, 2 with errors" in result.output


def test_a_quote_left_open_in_a_semicolon_file_is_read_past_on_semicolons(api):
    # The reader gives up at csv.field_size_limit(); what it reads past (up to where the quote
    # closes) must follow the file's delimiter, or the rows after it would be misnumbered.
    filler = "".join(f"f{i}@example.com;F{i}\n" for i in range(6_000))
    assert len(filler) > csv_reading.csv.field_size_limit()
    after = "".join(f"after{i}@example.com;A{i}\n" for i in range(5))
    body = ("email;first_name\nok@example.com;A\nbroken@example.com;\"Oops\n" + filler
            + "stray@example.com;\"Q\"\n" + after + "bad-address;X\n")
    r = post_csv(api, body.encode()).json
    assert (r["rows"], r["created"], r["errors_truncated"]) == (8, 6, 0)
    assert [e["row"] for e in r["errors"]] == [3, 9]
    broken, bad = (e["error"] for e in r["errors"])
    assert "field limit" in broken and broken.endswith("(lines 3-6004 of the file)")
    assert "invalid email address 'bad-address'" in bad and bad.endswith("(line 6010 of the file)")
    assert "after4@example.com" in contacts_by_email(api.workspace_id)


@pytest.mark.parametrize("header", [
    "Email Address,First Name,Last Name,Time Zone",
    "E-mail,firstname,surname,tz",
    "EMAIL_ADDRESS,Given Name,Family Name,timezone",
    " e-mail address , first-name ,LAST_NAME,time_zone",
    "email,Forename,lastname,TZ",
], ids=["mailchimp", "short", "underscores", "spaces-dashes", "plain"])
def test_header_aliases_of_the_known_columns(api, header):
    body = f"{header},mail,Full Name,E-mail 2\nANN@example.com,Ann,Lee,Asia/Tokyo,m,Ann Lee,ann2@example.com\n"
    r = post_csv(api, body.encode()).json
    assert (r["created"], r["errors"]) == (1, [])
    ann = contacts_by_email(api.workspace_id)["ann@example.com"]
    assert (ann.first_name, ann.last_name, ann.timezone) == ("Ann", "Lee", "Asia/Tokyo")
    # names that could mean something else stay custom fields, under their header text
    assert ann.fields == {"mail": "m", "Full Name": "Ann Lee", "E-mail 2": "ann2@example.com"}


@pytest.mark.parametrize("body,delimiter,fields", [
    # a header name holding another delimiter, unquoted: the split with an email column wins
    (b"Email;Notes, misc\na@example.com;x, y\n", ";", {"Notes, misc": "x, y"}),
    (b"Email,Company; Inc\na@example.com,x; y\n", ",", {"Company; Inc": "x; y"}),
    (b"Email\tNotes, misc; more\na@example.com\tx\n", "\t", {"Notes, misc; more": "x"}),
    # quoted, another delimiter in a header name is not counted at all
    (b'email;"Notes, misc"\na@example.com;x\n', ";", {"Notes, misc": "x"}),
], ids=["semicolon", "comma", "tab", "quoted"])
def test_a_header_holding_two_delimiters_is_read_with_the_one_that_finds_the_email_column(api, body, delimiter,
                                                                                          fields):
    assert csv_reading.detect_format(body).delimiter == delimiter
    r = post_csv(api, body).json
    assert (r["created"], r["errors"]) == (1, [])
    assert contacts_by_email(api.workspace_id)["a@example.com"].fields == fields


def test_ambiguous_header_error_shows_both_readings(api):
    resp = post_csv(api, b"email;x,email\na@example.com;1,b@example.com\n")
    assert resp.status_code == 400
    message = resp.json["error"]["message"]
    assert "split on commas: 'email;x', 'email'" in message and "split on semicolons: 'email', 'x,email'" in message
    assert "save it with one delimiter" in message
    assert count(Contact) == 0


def test_undecodable_bytes_and_nul_in_a_later_row_are_row_errors(api):
    # NUL bytes near the start mean a binary file (400); further down they are one bad row
    filler = b"".join(b"f%d@example.com,Filler\n" % i for i in range(500))
    assert len(filler) > csv_reading.SNIFF_BYTES
    body = (b"email,first_name\nok@example.com,Ok\nbad@example.com,Caf\xe9\n" + filler
            + b"nul@example.com,a\x00b\nz@example.com,Z\n")
    r = post_csv(api, body).json
    assert (r["created"], [e["row"] for e in r["errors"]]) == (502, [3, 504])
    assert "UTF-8" in r["errors"][0]["error"] and "NUL" in r["errors"][1]["error"]
    stored = contacts_by_email(api.workspace_id)
    assert "bad@example.com" not in stored and "nul@example.com" not in stored and "z@example.com" in stored


def test_header_only_and_oversized_fields(api):
    r = post_csv(api, b"email,first_name\r\n").json
    assert (r["created"], r["rows"], r["errors"]) == (0, 0, [])
    huge = b"x" * 200_000  # over csv.field_size_limit(): that row is reported, the reader goes on
    body = b"email,notes\na@example.com,short\nb@example.com,\"" + huge + b"\"\nc@example.com,ok\n"
    r = post_csv(api, body).json
    assert r["created"] == 2 and [e["row"] for e in r["errors"]] == [3]
    assert "cannot be read as CSV" in r["errors"][0]["error"]
    assert set(contacts_by_email(api.workspace_id)) == {"a@example.com", "c@example.com"}


# --- quotes left open: never a silent loss of rows ----------------------------------------------

UNCLOSED = b'email,first_name\na@x.com,"Ann\nb@x.com,Bob\nc@x.com,Cat\n'


def test_a_quote_never_closed_is_reported_not_swallowing_rows(api):
    r = post_csv(api, UNCLOSED)
    assert r.status_code == 200, r.json
    r = r.json
    # the broken row is reported where it starts; b and c could not be read, and the error says so
    assert (r["rows"], r["created"], r["updated"], r["skipped"], r["errors_truncated"]) == (1, 0, 0, 0, 0)
    assert [e["row"] for e in r["errors"]] == [2]
    message = r["errors"][0]["error"]
    assert "never closed" in message and "lines 2-4 (3 lines)" in message and "could not be read" in message
    assert count(Contact, Contact.workspace_id == api.workspace_id) == 0  # no "Ann\nb@x.com,Bob..." stored


def _filler(prefix: str, n: int) -> str:
    return "".join(f"{prefix}{i}@example.com,F{i}\n" for i in range(n))


def test_a_quote_left_open_past_the_field_size_limit(api, other_api):
    # Never closed: the reader gives up at csv.field_size_limit() on the way; nothing after the
    # broken row is read (nor counted), the rows before it are imported.
    filler = _filler("f", 6_000)
    assert len(filler) > csv_reading.csv.field_size_limit()
    body = ("email,first_name\nok0@example.com,A\nok1@example.com,B\nbroken@example.com,\"Oops\n" + filler
            + "not-an-address,X\n")
    r = post_csv(api, body.encode()).json
    assert (r["rows"], r["created"], r["errors_truncated"]) == (3, 2, 0)
    assert [e["row"] for e in r["errors"]] == [4]
    assert "never closed" in r["errors"][0]["error"] and "lines 4-6005 (6002 lines)" in r["errors"][0]["error"]
    assert set(contacts_by_email(api.workspace_id)) == {"ok0@example.com", "ok1@example.com"}

    # Closed far below (a stray quote): one error for the whole record, naming its lines, and
    # reading goes on after it with the rows numbered right.
    after = "".join(f"after{i}@example.com,A{i}\n" for i in range(5))
    body = ("email,first_name\nok@example.com,A\nbroken@example.com,\"Oops\n" + filler
            + "stray@example.com,\"Q\"\n" + after + "bad-address,X\n")
    r = post_csv(other_api, body.encode()).json
    assert (r["rows"], r["created"], r["errors_truncated"]) == (8, 6, 0)
    assert [e["row"] for e in r["errors"]] == [3, 9]
    broken, bad = (e["error"] for e in r["errors"])
    assert "cannot be read as CSV" in broken and "field limit" in broken and "(lines 3-6004 of the file)" in broken
    assert "invalid email address 'bad-address'" in bad and bad.endswith("(line 6010 of the file)")
    stored = contacts_by_email(other_api.workspace_id)
    assert len(stored) == 6 and "stray@example.com" not in stored and "after4@example.com" in stored


def test_quoted_multiline_cells_are_kept_and_later_rows_name_their_line(api):
    body = (
        b"email,first_name,notes\n"  # line 1
        b'ann@example.com,Ann,"Met at the fair.\nSaid ""call me"" in May,\nthen moved."\n'  # row 2, lines 2-4
        b'bob@example.com,Bob,"one line"\n'  # row 3, line 5
        b'cat@example.com,Cat,"two\r\nlines"\r\n'  # row 4, lines 6-7
        b"not-an-address,X,y\n"  # row 5, line 8
        b"dan@example.com,Dan,\n"  # row 6, line 9
    )
    r = post_csv(api, body).json
    assert (r["rows"], r["created"]) == (5, 4)
    assert [e["row"] for e in r["errors"]] == [5]
    assert r["errors"][0]["error"].endswith("(line 8 of the file)")
    stored = contacts_by_email(api.workspace_id)
    assert stored["ann@example.com"].fields == {"notes": 'Met at the fair.\nSaid "call me" in May,\nthen moved.'}
    assert stored["cat@example.com"].fields == {"notes": "two\r\nlines"}
    assert stored["bob@example.com"].fields == {"notes": "one line"} and "dan@example.com" in stored


@pytest.mark.parametrize("end", [b"\n", b""], ids=["newline", "no-newline"])
def test_a_quote_left_open_in_the_last_row(api, end):
    body = b"email,first_name\na@example.com,A\nb@example.com,B\nz@example.com,\"Zed" + end
    r = post_csv(api, body).json
    assert (r["rows"], r["created"]) == (3, 2)
    assert [e["row"] for e in r["errors"]] == [4]
    assert "never closed" in r["errors"][0]["error"] and "line 4 (1 line)" in r["errors"][0]["error"]
    assert set(contacts_by_email(api.workspace_id)) == {"a@example.com", "b@example.com"}


def test_malformed_quotes_are_row_errors_and_reading_goes_on(api):
    body = (
        b"email,first_name\n"
        b'a@example.com,"Ann\nb@example.com,Bob\nc@example.com,"Cat"\n'  # row 2: closed by the next quote
        b'd@example.com,"Dan" Jr\n'  # row 3 (line 5): text after the closing quote
        b'e@example.com,"Eve\nLee"\n'  # row 4 (lines 6-7): a name with a line break
        b"f@example.com,Fay\n"  # row 5 (line 8)
    )
    r = post_csv(api, body).json
    assert (r["rows"], r["created"]) == (4, 1)
    assert [e["row"] for e in r["errors"]] == [2, 3, 4]
    first, second, third = (e["error"] for e in r["errors"])
    assert "takes in 3 lines" in first and "quote left open" in first and first.endswith("(lines 2-4 of the file)")
    assert "text follows a closing quote" in second and second.endswith("(line 5 of the file)")
    assert "first_name holds a line break" in third and third.endswith("(lines 6-7 of the file)")
    assert set(contacts_by_email(api.workspace_id)) == {"f@example.com"}


def test_async_import_reports_a_quote_never_closed_the_same(api, other_api):
    body = b"email,first_name\nok@example.com,Ok\n" + UNCLOSED.split(b"\n", 1)[1]
    import_id = post_csv(api, body, **{"async": "1"}).json["import_id"]
    assert run_queued_imports() == 1
    done = api.get(f"/api/v1/imports/{import_id}").json
    sync = post_csv(other_api, body).json
    assert (done["status"], done["rows_done"], done["created"], done["errors_truncated"]) == ("done", 2, 1, 0)
    assert done["errors"] == sync["errors"] and [e["row"] for e in done["errors"]] == [3]
    assert "never closed" in done["errors"][0]["error"] and "lines 3-5 (3 lines)" in done["errors"][0]["error"]
    assert set(contacts_by_email(api.workspace_id)) == {"ok@example.com"}


def test_wrong_content_type_is_415(api):
    resp = api.post("/api/v1/contacts/import", json={"email": "a@example.com"})
    assert resp.status_code == 415 and resp.json["error"]["code"] == "unsupported_media_type"
    resp = api.post("/api/v1/contacts/import", data={"file": (io.BytesIO(b"email\na@example.com\n"), "a.csv")})
    assert resp.status_code == 415
    assert post_csv(api, b"email\na@example.com\n", **{"async": "maybe"}).status_code == 400
    assert count(Contact) == 0
    resp = post_csv(api, b"email\na@example.com\n", content_type="text/csv; charset=latin-1")
    assert resp.status_code == 415 and "UTF-8" in resp.json["error"]["message"]
    assert post_csv(api, b"email\na@example.com\n", content_type="text/csv; charset=UTF-8").status_code == 200
    assert count(Contact) == 1


def test_import_into_a_list(api, other_api, monkeypatch):
    calls = []
    monkeypatch.setattr(jobs, "notify_list_changed", calls.append)
    lst = api.post("/api/v1/lists", json={"name": "L"}).json
    foreign = other_api.post("/api/v1/lists", json={"name": "theirs"}).json
    body = b"email\na@example.com\nb@example.com\nbroken\n"

    resp = post_csv(api, body, list_id=foreign["id"])
    assert resp.status_code == 404 and count(Contact) == 0
    assert post_csv(api, body, list_id=999999).status_code == 404

    r = post_csv(api, body, list_id=lst["id"]).json
    assert r["created"] == 2 and len(r["errors"]) == 1
    assert api.get(f"/api/v1/lists/{lst['id']}").json["member_count"] == 2
    assert calls == [lst["id"]]
    post_csv(api, body, list_id=lst["id"])  # nothing new in the list: no notification
    assert calls == [lst["id"]]


def test_errors_list_is_capped(api):
    body = "email\n" + "".join(f"bad{i}\n" for i in range(importer.MAX_ERRORS + 25)) + "ok@example.com\n"
    r = post_csv(api, body.encode()).json
    assert len(r["errors"]) == importer.MAX_ERRORS and r["errors_truncated"] == 25
    assert r["created"] == 1 and r["errors"][0]["row"] == 2


def test_progress_callback_every_batch(api):
    body = ("email,first_name\n" + "".join(f"p{i}@example.com,P{i}\n" for i in range(35))).encode()
    seen = []
    with session_scope() as s:
        report = importer.import_csv(s, api.workspace_id, io.BytesIO(body), batch_size=10,
                                     progress=lambda r, b: seen.append((r.rows, r.created, b)))
    assert [x[0] for x in seen] == [10, 20, 30, 35]
    assert [x[1] for x in seen] == [10, 20, 30, 35]
    assert seen[-1][2] == len(body) and all(a[2] <= b[2] for a, b in zip(seen, seen[1:], strict=False))
    assert report.created == 35


def test_async_import_with_progress_and_the_same_report(api, other_api):
    lst = api.post("/api/v1/lists", json={"name": "L"}).json
    body = MIXED.encode()
    resp = post_csv(api, body, list_id=lst["id"], **{"async": "1"})
    assert resp.status_code == 202, resp.json
    import_id = resp.json["import_id"]

    pending = api.get(f"/api/v1/imports/{import_id}").json
    assert pending["status"] == "pending" and pending["progress"] == 0 and pending["rows_done"] == 0
    with session_scope() as s:
        path = s.get(Import, import_id).path
    assert os.path.exists(path) and path.startswith(str(get_settings().instance_dir / "imports"))
    assert other_api.get(f"/api/v1/imports/{import_id}").status_code == 404

    assert run_queued_imports() == 1
    done = api.get(f"/api/v1/imports/{import_id}").json
    assert done["status"] == "done" and done["progress"] == 1.0 and done["finished_at"].endswith("Z")
    assert not os.path.exists(path)

    # the same report as the synchronous import of the same file (in another workspace)
    sync = post_csv(other_api, body).json
    for key in ("created", "updated", "skipped", "errors", "errors_truncated"):
        assert done[key] == sync[key], key
    assert done["rows_done"] == sync["rows"] == 8
    assert api.get(f"/api/v1/lists/{lst['id']}").json["member_count"] == 2
    listed = api.get("/api/v1/imports").json["items"]
    assert [x["id"] for x in listed] == [import_id]

    # a task delivered twice runs once
    with session_scope() as s:
        assert importer.run_import(import_id) is None


def test_async_progress_is_updated_every_batch(api, monkeypatch):
    monkeypatch.setattr(importer, "BATCH_SIZE", 10)
    body = ("email\n" + "".join(f"q{i}@example.com\n" for i in range(25))).encode()
    import_id = post_csv(api, body, **{"async": "1"}).json["import_id"]

    snapshots = []
    real = importer.import_csv

    def spy(session, workspace_id, stream, *, progress, **kw):
        def wrapped(report, bytes_read):
            progress(report, bytes_read)  # writes the Import row, committed with the batch
            snapshots.append(session.execute(
                select(Import.status, Import.rows_done, Import.created, Import.bytes_done).where(Import.id == import_id)
            ).one())

        return real(session, workspace_id, stream, progress=wrapped, **kw)

    monkeypatch.setattr(importer, "import_csv", spy)
    assert run_queued_imports() == 1
    assert [(s.status, s.rows_done, s.created) for s in snapshots] == [
        ("running", 10, 10), ("running", 20, 20), ("running", 25, 25)]
    assert snapshots[0].bytes_done <= snapshots[-1].bytes_done == len(body)
    final = api.get(f"/api/v1/imports/{import_id}").json
    assert (final["status"], final["created"], final["progress"]) == ("done", 25, 1.0)


def test_interrupted_async_import_resumes_after_its_last_batch(api, monkeypatch):
    monkeypatch.setattr(importer, "BATCH_SIZE", 10)
    lines = [f"r{i}@example.com,R{i}" if i != 4 else "broken,X" for i in range(25)]
    body = ("email,first_name\n" + "\n".join(lines) + "\n").encode()
    import_id = post_csv(api, body, **{"async": "1"}).json["import_id"]

    real = _stop_after_first_batch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_queued_imports()
    halfway = api.get(f"/api/v1/imports/{import_id}").json
    assert (halfway["status"], halfway["rows_done"], halfway["created"]) == ("running", 10, 9)
    with session_scope() as s:
        path = s.get(Import, import_id).path
    assert os.path.exists(path)  # kept for the next run

    # what the consumer does on shutdown: release it and queue it again
    monkeypatch.setattr(importer, "import_csv", real)
    requeue_interrupted_import("interrupted", run_import.s(import_id))
    assert run_queued_imports() == 1
    done = api.get(f"/api/v1/imports/{import_id}").json
    assert (done["status"], done["rows_done"], done["created"], done["updated"]) == ("done", 25, 24, 0)
    assert [e["row"] for e in done["errors"]] == [6]
    assert count(Contact, Contact.workspace_id == api.workspace_id) == 24
    assert not os.path.exists(path)
    requeue_interrupted_import("interrupted", run_import.s(import_id))  # not running: nothing to do
    assert run_queued_imports() == 0


def test_interrupted_import_with_broken_quotes_resumes_to_the_same_report(api, other_api, monkeypatch):
    monkeypatch.setattr(importer, "BATCH_SIZE", 10)
    lines = [f"r{i}@example.com,R{i}" for i in range(25)]
    lines[3], lines[5] = 'r3@example.com,"Oops', 'r5@example.com,"Q"'  # row 5: one record over lines 5-7
    body = ("email,first_name\n" + "\n".join(lines) + '\nr25@example.com,"Never\n').encode()  # row 25: line 27
    import_id = post_csv(api, body, **{"async": "1"}).json["import_id"]

    real = _stop_after_first_batch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_queued_imports()
    halfway = api.get(f"/api/v1/imports/{import_id}").json
    assert (halfway["status"], halfway["rows_done"], halfway["created"]) == ("running", 10, 9)

    monkeypatch.setattr(importer, "import_csv", real)
    requeue_interrupted_import("interrupted", run_import.s(import_id))
    assert run_queued_imports() == 1
    done = api.get(f"/api/v1/imports/{import_id}").json
    sync = post_csv(other_api, body).json
    assert (done["status"], done["rows_done"], done["created"], done["updated"]) == ("done", 24, 22, 0)
    assert (sync["rows"], sync["created"]) == (24, 22) and done["errors"] == sync["errors"]
    assert [e["row"] for e in done["errors"]] == [5, 25]
    assert done["errors"][0]["error"].endswith("(lines 5-7 of the file)")
    assert "never closed" in done["errors"][1]["error"] and "line 27 (1 line)" in done["errors"][1]["error"]
    assert count(Contact, Contact.workspace_id == api.workspace_id) == 22


def test_async_import_failures_are_recorded(api):
    # the file vanished before the task ran: failed, with the reason
    import_id = post_csv(api, b"email\na@example.com\n", **{"async": "1"}).json["import_id"]
    with session_scope() as s:
        os.unlink(s.get(Import, import_id).path)
    run_queued_imports()
    got = api.get(f"/api/v1/imports/{import_id}").json
    assert got["status"] == "failed" and "No such file" in got["error"] and got["finished_at"]

    # the target list deleted while the import waited: the import still runs, without it
    lst = api.post("/api/v1/lists", json={"name": "L"}).json
    import_id = post_csv(api, b"email\na@example.com\n", list_id=lst["id"], **{"async": "1"}).json["import_id"]
    assert api.delete(f"/api/v1/lists/{lst['id']}").status_code == 204
    run_queued_imports()
    got = api.get(f"/api/v1/imports/{import_id}").json
    assert (got["status"], got["created"], got["list_id"]) == ("done", 1, None)


def test_cli_import(app, api, tmp_path):
    runner = app.test_cli_runner()
    path = tmp_path / "people.csv"
    path.write_bytes(MIXED.encode())

    result = runner.invoke(args=["import-contacts", str(path), "--workspace", api.workspace_name, "--list", "VIPs"])
    assert result.exit_code == 0, result.output
    assert "created list 'VIPs'" in result.output
    assert "row 3: invalid email address" in result.output
    assert "8 rows: 2 created, 0 updated, 1 skipped, 5 with errors" in result.output
    with session_scope() as s:
        lst = contacts.find_list(s, api.workspace_id, "VIPs")
        assert contacts.member_counts(s, [lst.id])[lst.id] == 2

    again = runner.invoke(args=["import-contacts", str(path), "--workspace", api.workspace_name, "--list", "VIPs"])
    assert again.exit_code == 0 and "created list" not in again.output
    assert "0 created, 2 updated" in again.output

    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"name\nAnn\n")
    result = runner.invoke(args=["import-contacts", str(bad), "--workspace", api.workspace_name, "--list", "New"])
    assert result.exit_code != 0 and "no 'email' column" in result.output
    with session_scope() as s:
        assert contacts.find_list(s, api.workspace_id, "New") is None
    result = runner.invoke(args=["import-contacts", str(path), "--workspace", "no-such-workspace"])
    assert result.exit_code != 0 and "no workspace named" in result.output
    result = runner.invoke(args=["import-contacts", str(tmp_path / "missing.csv"), "--workspace", api.workspace_name])
    assert result.exit_code != 0
    assert count(Contact, Contact.workspace_id == api.workspace_id) == 2

    helptext = runner.invoke(args=["import-contacts", "--help"]).output
    assert "--list" in helptext and "created if" in helptext


ROWS = 100_000


@pytest.mark.slow
def test_100k_rows_stream_with_flat_memory(api, tmp_path):
    path = tmp_path / "big.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write("email,first_name,last_name,timezone,company,notes\n")
        for i in range(ROWS):
            fh.write(f"user{i}@example.com,First{i},Last{i},Europe/Paris,Company {i % 97},"
                     f"\"notes, for row {i}: {'x' * 100}\"\n")
    size = path.stat().st_size
    assert size > 15_000_000

    # The import runs in a fresh process (this one carries whatever earlier tests left in its
    # allocator and thread arenas). A warm-up import first, so what follows measures the big one.
    warm = tmp_path / "warm.csv"
    warm.write_bytes(b"email,first_name,last_name,timezone,company,notes\n" + b"".join(
        b"warm%d@example.com,F,L,UTC,C,N\n" % i for i in range(2_500)))
    code = (
        "import json, resource, sys, time\n"
        "from campaigns.db import new_session\n"
        "from campaigns.importer import import_csv\n"
        "ws = int(sys.argv[3])\n"
        "def peak():\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "with new_session() as s, open(sys.argv[2], 'rb') as fh:\n"
        "    import_csv(s, ws, fh)\n"
        "base = peak()\n"
        "t = time.monotonic()\n"
        "with new_session() as s, open(sys.argv[1], 'rb') as fh:\n"
        "    r = import_csv(s, ws, fh)\n"
        "print(json.dumps({'base': base, 'peak': peak(), 'elapsed': time.monotonic() - t, "
        "'counts': [r.created, r.updated, r.skipped, len(r.errors)]}))\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code, str(path), str(warm), str(api.workspace_id)], cwd=root,
                         env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["counts"] == [ROWS, 0, 0, 0]
    assert count(Contact, Contact.workspace_id == api.workspace_id) == ROWS + 2_500
    # ru_maxrss is a high-water mark: growth is how far the big import pushed the process's peak
    # above where the small one left it (0 when it never needed more than the small one did).
    growth = r["peak"] - r["base"]
    print(f"100k rows: {r['elapsed']:.1f}s, peak resident memory +{growth / 1e6:.1f} MB for a {size / 1e6:.1f} MB file")
    # Flat: a few batches' worth. Holding the file would add its size; holding the rows, ~10x.
    assert growth < size / 4, (growth, size)


def _stop_after_first_batch(monkeypatch):
    """import_csv that stops (KeyboardInterrupt: a worker stopping, or killed) before its second
    batch commits. Returns the real import_csv."""
    real = importer.import_csv
    batches = []

    def dying(session, workspace_id, stream, *, progress, **kw):
        def wrapped(report, bytes_read):
            batches.append(report.rows)
            if len(batches) == 2:
                raise KeyboardInterrupt
            progress(report, bytes_read)

        return real(session, workspace_id, stream, progress=wrapped, **kw)

    monkeypatch.setattr(importer, "import_csv", dying)
    return real


def _age_heartbeat(import_id: int, seconds: float) -> None:
    with session_scope() as s:
        job = s.get(Import, import_id)
        job.heartbeat_at = job.heartbeat_at - timedelta(seconds=seconds)
        job.created_at = job.created_at - timedelta(seconds=seconds)


def test_an_import_whose_consumer_was_killed_is_found_and_resumed(api, monkeypatch):
    monkeypatch.setattr(importer, "BATCH_SIZE", 10)
    body = ("email,first_name\n" + "".join(f"k{i}@example.com,K{i}\n" for i in range(25))).encode()
    import_id = post_csv(api, body, **{"async": "1"}).json["import_id"]
    real = _stop_after_first_batch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):  # SIGKILL: no handler puts it back, it stays running
        run_queued_imports()
    monkeypatch.setattr(importer, "import_csv", real)
    assert api.get(f"/api/v1/imports/{import_id}").json["status"] == "running"
    assert requeue_stale_imports() == 0  # its heartbeat is recent: it may still be running

    _age_heartbeat(import_id, 121)  # older than the lease (HERALD_LEASE_SECONDS, 120 s)
    assert requeue_stale_imports() == 1
    assert run_queued_imports() == 1
    done = api.get(f"/api/v1/imports/{import_id}").json
    assert (done["status"], done["rows_done"], done["created"]) == ("done", 25, 25)
    assert count(Contact, Contact.workspace_id == api.workspace_id) == 25
    assert requeue_stale_imports() == 0


def test_a_run_that_was_taken_over_stops_and_writes_nothing_more(api, monkeypatch):
    monkeypatch.setattr(importer, "BATCH_SIZE", 10)
    body = ("email\n" + "".join(f"t{i}@example.com\n" for i in range(25))).encode()
    import_id = post_csv(api, body, **{"async": "1"}).json["import_id"]
    real = importer.import_csv

    def overtaken(session, workspace_id, stream, *, progress, **kw):
        def wrapped(report, bytes_read):
            if report.rows == 20:
                # Meanwhile another run claimed it (this one looked dead). Written in this batch's
                # own transaction: SQLite would not let a second writer in while it is open.
                session.execute(update(Import).where(Import.id == import_id).values(run_token="the-other-run"))
            progress(report, bytes_read)

        return real(session, workspace_id, stream, progress=wrapped, **kw)

    monkeypatch.setattr(importer, "import_csv", overtaken)
    assert run_queued_imports() == 1
    with session_scope() as s:
        job = s.get(Import, import_id)
        assert (job.status, job.rows_done, job.created) == ("running", 10, 10)  # the second batch was not kept
        assert os.path.exists(job.path)  # the run that took over still needs the file
    assert count(Contact, Contact.workspace_id == api.workspace_id) == 10


def test_a_pending_import_whose_task_was_lost_is_queued_again(api):
    import_id = post_csv(api, b"email\nlost@example.com\n", **{"async": "1"}).json["import_id"]
    huey.flush()  # the queue store lost the task
    assert run_queued_imports() == 0
    with session_scope() as s:
        s.get(Import, import_id).created_at -= timedelta(seconds=121)
    assert requeue_stale_imports() == 1 and run_queued_imports() == 1
    assert api.get(f"/api/v1/imports/{import_id}").json["status"] == "done"
