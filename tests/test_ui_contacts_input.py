"""The contacts UI with awkward input: Unicode digits, custom fields the line format cannot
write, too many addresses, very long searches, imports with more errors than are listed."""

from __future__ import annotations

import html as htmllib
import io
import json
import re

import pytest
from sqlalchemy import func, select

from campaigns import contacts
from campaigns.db import session_scope
from campaigns.models import Contact, Import, ListMember, Suppression
from tasks import huey
from tests.helpers import flashes, location, run_queued_imports


def _contact(ui, email: str = "ada@example.com", fields: dict | None = None) -> int:
    with session_scope() as s:
        row = Contact(workspace_id=ui.workspace_id, email=email, fields=fields or {}, status="active")
        s.add(row)
        s.flush()
        return row.id


def _stored_fields(contact_id: int) -> dict:
    with session_scope() as s:
        return s.get(Contact, contact_id).fields


def details_form(page: str) -> dict:
    """The contact form's fields as a browser submits them: a textarea loses one leading
    newline when parsed and sends its line breaks as CRLF."""
    form = re.search(r'<form method="post" class="card" novalidate>.*?</form>', page, re.S).group(0)
    data = {name: htmllib.unescape(value)
            for name, value in re.findall(r'<input id="\w+" name="(\w+)"[^>]*? value="([^"]*)"', form)}
    body = re.search(r'<textarea id="fields" name="fields"[^>]*>(.*?)</textarea>', form, re.S).group(1)
    body = htmllib.unescape(body)
    if body.startswith("\n"):
        body = body[1:]
    data["fields"] = body.replace("\r\n", "\n").replace("\n", "\r\n")
    return data


# --------------------------------------------------------------------------- Unicode digits


def test_a_unicode_digit_list_id_on_the_contact_page_is_refused_not_a_500(ui):
    list_id = ui.api.post("/api/v1/lists", json={"name": "VIP"}).json["id"]
    cid = _contact(ui)
    for junk in ("²", "١", "x", "", "-1", "99999999999999999999999"):
        resp = ui.post(f"/contacts/{cid}/lists", {"list_id": junk})
        assert resp.status_code in (303, 400, 404), (junk, resp.status_code)
    resp = ui.post(f"/contacts/{cid}/lists", {"list_id": "²"}, follow_redirects=True)
    assert resp.status_code == 200 and any("Choose a list" in m for m in flashes(resp.get_data(as_text=True)))
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(ListMember)) == 0
    assert ui.post(f"/contacts/{cid}/lists", {"list_id": str(list_id)}).status_code == 303
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(ListMember)) == 1


@pytest.mark.parametrize("junk", ["²", "١٢", "abc", "1.5"])
def test_a_unicode_digit_list_id_on_the_import_page_is_a_400_and_nothing_is_queued(ui, junk):
    data = {"file": (io.BytesIO(b"email\nada@example.com\n"), "x.csv"), "list_id": junk}
    resp = ui.post("/contacts/import", data, content_type="multipart/form-data")
    assert resp.status_code == 400
    assert "choose a list" in resp.get_data(as_text=True).lower()
    assert huey.pending_count() == 0
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Import)) == 0


# --------------------------------------------------------------------------- custom fields


ROUND_TRIPS = [  # each one was changed or refused by saving the form unchanged
    {"a=b": "v2"},
    {"notes": "line1\nline2", "company": "Engines"},
    {"x": None, "company": "Engines"},
    {"seats": 3, "ratio": 1.5, "whole": 2.0, "big": 2**62, "vip": True, "off": False, "none": None},
    {"pad": "  spaced  ", "tab": "\tx"},
    {" key ": "v"},
    {"{brace": "v", "pad ": "v "},
    {"crlf": "a\r\nb", "cr": "a\rb", "sep": "a\u2028b", "vt": "a\x0bb"},
    {"ville": "Zürich", "quote": 'say "hi" <b>&amp;</b>', "eq": "a = b = c", "empty": "", "emoji": " 🙂"},
]


@pytest.mark.parametrize("fields", ROUND_TRIPS)
def test_saving_the_contact_form_unchanged_keeps_its_fields_byte_identical(ui, fields):
    cid = _contact(ui, fields=fields)
    before = json.dumps(_stored_fields(cid))
    page = ui.text(f"/contacts/{cid}")
    data = details_form(page)
    resp = ui.post(f"/contacts/{cid}", data)
    assert resp.status_code == 303, resp.get_data(as_text=True)[-3000:]
    assert json.dumps(_stored_fields(cid)) == before
    # and once more, from the page as saved
    assert ui.post(f"/contacts/{cid}", details_form(ui.text(f"/contacts/{cid}"))).status_code == 303
    assert json.dumps(_stored_fields(cid)) == before


def test_simple_fields_stay_in_the_line_format_and_awkward_ones_are_json(ui):
    simple = _contact(ui, "a@example.com", {"company": "Engines", "plan": "a = b", "empty": "", "emoji": "🙂"})
    data = details_form(ui.text(f"/contacts/{simple}"))
    assert data["fields"] == "company = Engines\r\nplan = a = b\r\nempty = \r\nemoji = 🙂"
    assert ui.post(f"/contacts/{simple}", data).status_code == 303
    assert json.dumps(_stored_fields(simple)) == json.dumps({"company": "Engines", "plan": "a = b", "empty": "",
                                                             "emoji": "🙂"})
    awkward = _contact(ui, "b@example.com", {"a=b": "v2", "n": 3})
    text = details_form(ui.text(f"/contacts/{awkward}"))["fields"]
    assert text.startswith("{") and json.loads(text) == {"a=b": "v2", "n": 3}
    assert "JSON" in ui.text(f"/contacts/{awkward}")  # the help names both formats


def test_the_fields_box_takes_json_with_what_the_api_takes_and_refuses_the_rest(ui):
    cid = _contact(ui)
    base = {"email": "ada@example.com"}
    ok = ui.post(f"/contacts/{cid}", {**base, "fields": '{"n": 1, "b": true, "x": null, "s": "a\\nb", "k=v": "w"}'})
    assert ok.status_code == 303
    assert _stored_fields(cid) == {"n": 1, "b": True, "x": None, "s": "a\nb", "k=v": "w"}
    for text, message in [
        ('{"nested": {"a": 1}}', "a field value must be a string, a number, true/false or null"),
        ('{"list": [1]}', "a field value must be a string, a number, true/false or null"),
        ('{"n": NaN}', "finite"),
        ('{"": "v"}', "a field name must be a non-empty string"),
        ('{"a": 1', "not valid JSON"),
        ('{"deep": ' + "[" * 100_000, "not valid JSON"),
    ]:
        resp = ui.post(f"/contacts/{cid}", {**base, "fields": text})
        body = htmllib.unescape(resp.get_data(as_text=True))
        assert resp.status_code == 422 and message in body, (text[:40], resp.status_code)
    assert _stored_fields(cid) == {"n": 1, "b": True, "x": None, "s": "a\nb", "k=v": "w"}
    # a new contact takes JSON too
    resp = ui.post("/contacts/new", {"email": "new@example.com", "fields": '{"seats": 2}'})
    assert resp.status_code == 303
    assert _stored_fields(int(location(resp).rsplit("/", 1)[1])) == {"seats": 2}


# --------------------------------------------------------------------------- suppressions


def test_more_addresses_than_the_bulk_limit_are_refused_and_nothing_is_suppressed(ui):
    typed = "\n".join(f"person{i}@example.com" for i in range(contacts.MAX_BULK + 5))
    resp = ui.post("/suppressions", {"emails": typed})
    assert resp.status_code == 422
    page = resp.get_data(as_text=True)
    assert "10,000" in page and "10,005" in page
    assert "person10004@example.com" in page and "person0@example.com" in page  # the textarea keeps them
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Suppression)) == 0
    resp = ui.post("/suppressions", {"emails": "\n".join(typed.splitlines()[: contacts.MAX_BULK])},
                   follow_redirects=True)
    assert "10000 addresses suppressed" in resp.get_data(as_text=True)


def test_too_many_members_or_none_are_refused_with_the_typed_text_kept(ui):
    list_id = ui.api.post("/api/v1/lists", json={"name": "Big"}).json["id"]
    typed = "\n".join(f"person{i}@example.com" for i in range(contacts.MAX_BULK + 5))
    resp = ui.post(f"/lists/{list_id}/members", {"emails": typed})
    assert resp.status_code == 422
    page = resp.get_data(as_text=True)
    assert "10,005 addresses: at most 10,000 can be added" in page and 'aria-invalid="true"' in page
    assert "person10004@example.com" in page and "person0@example.com" in page  # the textarea keeps them
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(ListMember)) == 0
        assert s.scalar(select(func.count()).select_from(Contact)) == 0
    resp = ui.post(f"/lists/{list_id}/members", {"emails": " , \n"})
    assert resp.status_code == 422 and "Type at least one address." in resp.get_data(as_text=True)
    resp = ui.post(f"/lists/{list_id}/members", {"emails": "a@example.com, b@example.com"}, follow_redirects=True)
    assert "2 added" in resp.get_data(as_text=True)


# --------------------------------------------------------------------------- long searches


def test_a_very_long_search_is_no_500(ui):
    list_id = ui.api.post("/api/v1/lists", json={"name": "VIP"}).json["id"]
    ui.post(f"/lists/{list_id}/members", {"emails": "ada@example.com"})
    ui.post("/suppressions", {"emails": "ada@example.com"})
    long = "a" * 50_001
    for path, empty in [("/contacts", "No contact matches"), ("/suppressions", "No suppressed address matches"),
                        (f"/lists/{list_id}", "No member matches")]:
        for q in (long, "%" * 30_000, "ada@" + "x" * 400):
            page = ui.text(f"{path}?q={q.replace('%', '%25')}")
            assert empty in page and "320 characters" in page, path
            assert "ada@example.com</a>" not in page and "<td>ada@example.com</td>" not in page
        assert "ada@example.com" in ui.text(f"{path}?q=ADA")


# --------------------------------------------------------------------------- import status


def test_the_import_status_counts_every_error_and_says_how_many_are_not_listed(ui):
    bad = b"email\n" + b"".join(b"not-an-address-%d\n" % i for i in range(1500)) + b"ok@example.com\n"
    resp = ui.post("/contacts/import", {"file": (io.BytesIO(bad), "bad.csv")}, content_type="multipart/form-data")
    assert resp.status_code == 303
    run_queued_imports()
    page = ui.text(location(resp))
    assert 'data-import-count="errors">1,500<' in page
    more = re.search(r"<p[^>]*data-import-truncated[^>]*>(.*?)</p>", page, re.S)
    assert "hidden" not in more.group(0) and "500 more" in more.group(1)
    assert "counts the records of the file" in page and "a quoted cell spanning lines is one record" in page
    recent = ui.text("/contacts/import")
    assert re.search(r'<td class="num">1,500</td>', recent)
    assert "counts the records of the file" in recent and "listed with their line number" not in recent
