"""The size limits of a contact's custom fields (issue 18.5), the same on the API, the UI and
CSV imports: at most 100 fields, names of 1-100 characters, text values of 8,192 characters,
65,536 characters in all."""

from __future__ import annotations

import io

import pytest
from sqlalchemy import func, select

from campaigns import contact_rules
from campaigns.db import session_scope
from campaigns.models import Contact
from tests.helpers import contacts_by_email, post_csv

MAX = contact_rules.MAX_FIELDS
VALUE_MAX = contact_rules.FIELD_VALUE_MAX


def _count_contacts(workspace_id: int) -> int:
    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(Contact).where(Contact.workspace_id == workspace_id))


def _details(resp) -> str:
    return str(resp.json["error"]["details"])


# --------------------------------------------------------------------------- API


def test_the_api_takes_the_limits_and_refuses_one_more(api):
    at_limit = {f"f{i}": "v" for i in range(MAX)}
    assert api.post("/api/v1/contacts", json={"email": "a@example.com", "fields": at_limit}).status_code == 201
    assert api.post("/api/v1/contacts", json={"email": "b@example.com",
                                              "fields": {"notes": "x" * VALUE_MAX}}).status_code == 201

    resp = api.post("/api/v1/contacts", json={"email": "c@example.com", "fields": {**at_limit, "one_more": 1}})
    assert resp.status_code == 422 and f"at most {MAX} custom fields" in _details(resp), resp.json
    resp = api.post("/api/v1/contacts", json={"email": "c@example.com", "fields": {"notes": "x" * (VALUE_MAX + 1)}})
    assert resp.status_code == 422 and "at most 8,192 characters" in _details(resp), resp.json
    resp = api.post("/api/v1/contacts", json={"email": "c@example.com", "fields": {"n" * 101: "v"}})
    assert resp.status_code == 422 and "at most 100 characters" in _details(resp), resp.json
    resp = api.post("/api/v1/contacts", json={"email": "c@example.com",
                                              "fields": {f"f{i}": "x" * 8000 for i in range(9)}})
    assert resp.status_code == 422 and "65,536 characters in all" in _details(resp), resp.json
    assert set(contacts_by_email(api.workspace_id)) == {"a@example.com", "b@example.com"}


def test_a_patch_that_would_take_a_contact_past_the_limit_is_refused_and_changes_nothing(api):
    full = {f"f{i}": "v" for i in range(MAX)}
    cid = api.post("/api/v1/contacts", json={"email": "a@example.com", "fields": full}).json["id"]
    resp = api.patch(f"/api/v1/contacts/{cid}", json={"fields": {"extra": "x"}, "first_name": "Ann"})
    assert resp.status_code == 422 and f"at most {MAX} custom fields" in resp.json["error"]["message"], resp.json
    stored = api.get(f"/api/v1/contacts/{cid}").json
    assert stored["fields"] == full and stored["first_name"] is None
    # a key it already has is replaced, not added: within the limit
    assert api.patch(f"/api/v1/contacts/{cid}", json={"fields": {"f0": "new"}}).status_code == 200


# --------------------------------------------------------------------------- UI


def test_the_contact_form_refuses_too_many_or_too_long_fields_and_keeps_the_text(ui):
    too_many = "\n".join(f"f{i} = v" for i in range(MAX + 1))
    resp = ui.post("/contacts/new", {"email": "a@example.com", "fields": too_many})
    html = resp.get_data(as_text=True)
    assert resp.status_code == 422 and f"at most {MAX} custom fields" in html
    assert "f100 = v" in html  # what was typed is shown again
    resp = ui.post("/contacts/new", {"email": "a@example.com", "fields": "notes = " + "x" * (VALUE_MAX + 1)})
    assert resp.status_code == 422 and "at most 8,192 characters" in resp.get_data(as_text=True)
    assert _count_contacts(ui.workspace_id) == 0

    resp = ui.post("/contacts/new", {"email": "a@example.com", "fields": "notes = " + "x" * VALUE_MAX})
    assert resp.status_code == 303


def test_the_contact_form_shows_every_problem_at_once(ui):
    resp = ui.post("/contacts/new", {"email": "not an address", "first_name": "x" * 201, "timezone": "Mars/Base"})
    html = resp.get_data(as_text=True)
    assert resp.status_code == 422
    assert "at most 200 characters" in html and "IANA time zone" in html and "valid" in html
    assert _count_contacts(ui.workspace_id) == 0


# --------------------------------------------------------------------------- CSV import


def _header(custom: int) -> str:
    return "email," + ",".join(f"c{i}" for i in range(custom))


def test_an_import_with_more_custom_columns_than_fields_is_refused_whole(api):
    body = (_header(MAX + 1) + "\na@example.com" + ",x" * (MAX + 1) + "\n").encode()
    resp = post_csv(api, body)
    assert resp.status_code == 400 and f"more than {MAX} custom columns" in resp.json["error"]["message"], resp.json
    assert contacts_by_email(api.workspace_id) == {}
    body = (_header(MAX) + "\na@example.com" + ",x" * MAX + "\n").encode()
    assert post_csv(api, body).json["created"] == 1


def test_an_import_row_with_a_value_too_long_is_a_row_error_and_the_others_import(api):
    body = ("email,notes\na@example.com,short\nb@example.com," + "x" * (VALUE_MAX + 1) + "\nc@example.com,ok\n")
    r = post_csv(api, body.encode()).json
    assert r["created"] == 2 and [e["row"] for e in r["errors"]] == [3], r
    assert "longer than 8,192 characters" in r["errors"][0]["error"]
    assert set(contacts_by_email(api.workspace_id)) == {"a@example.com", "c@example.com"}


def test_imports_cannot_grow_a_stored_contact_past_the_field_limit(api):
    """Each file is within the limits, but their columns together are not: the second import
    leaves a stored contact as it is (a row error naming the limit) and updates the others."""
    first = "email," + ",".join(f"a{i}" for i in range(60)) + "\nx@example.com" + ",1" * 60 + "\n"
    assert post_csv(api, first.encode()).json["created"] == 1
    second = ("email," + ",".join(f"b{i}" for i in range(60)) + "\n"
              + "x@example.com" + ",2" * 60 + "\n"       # 120 fields once merged: refused
              + "y@example.com" + ",2" * 60 + "\n"       # new: 60 fields
              + "x@example.com" + ",3" * 60 + "\n")      # the same address again: refused too
    r = post_csv(api, second.encode()).json
    assert r["created"] == 1 and r["updated"] == 0, r
    assert [e["row"] for e in r["errors"]] == [2, 4] and f"more than {MAX} custom fields" in r["errors"][0]["error"]
    stored = contacts_by_email(api.workspace_id)
    assert set(stored["x@example.com"].fields) == {f"a{i}" for i in range(60)}
    assert len(stored["y@example.com"].fields) == 60
    # within the limit, the merge goes on as before
    third = "email," + ",".join(f"a{i}" for i in range(40)) + "\nx@example.com" + ",9" * 40 + "\n"
    r = post_csv(api, third.encode()).json
    assert r["updated"] == 1 and not r["errors"], r
    assert contacts_by_email(api.workspace_id)["x@example.com"].fields["a0"] == "9"


def test_an_import_row_over_the_total_is_a_row_error(api):
    header = "email," + ",".join(f"c{i}" for i in range(9))
    body = header + "\na@example.com" + ("," + "x" * 8000) * 9 + "\nb@example.com" + ",y" * 9 + "\n"
    r = post_csv(api, body.encode()).json
    assert r["created"] == 1 and [e["row"] for e in r["errors"]] == [2], r
    assert "65,536 characters in all" in r["errors"][0]["error"]


def test_the_ui_import_refuses_a_file_with_too_many_columns(ui):
    body = (_header(MAX + 1) + "\na@example.com" + ",x" * (MAX + 1) + "\n").encode()
    resp = ui.post("/contacts/import", {"file": (io.BytesIO(body), "wide.csv")}, content_type="multipart/form-data")
    assert resp.status_code == 400 and f"more than {MAX} custom columns" in resp.get_data(as_text=True)


@pytest.mark.parametrize("fields", [{f"f{i}": 1 for i in range(MAX)}, {"k": "x" * VALUE_MAX}])
def test_the_domain_rules_accept_what_is_at_the_limits(fields):
    assert contact_rules.fields_problems(fields) == {}
