"""The web UI through Flask's test client: every page, its forms, CSRF, empty states and errors.

Fast on purpose: the queue is stepped by hand (``tests.helpers.drain``) where a page needs sent
email; the real browser, a live server and a consumer are in ``test_ui_browser.py``.
"""

from __future__ import annotations

import dataclasses
import io
import re
import time
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select, update

import web.outbox as outbox
from campaigns import accounts, stats
from campaigns.db import session_scope, utcnow
from campaigns.models import Campaign, Contact, Message, MessageAttempt, Suppression, User, UserSession
from tasks import huey
from tasks.engine import PRIORITY_TEST
from tests.helpers import (
    CSRF_META,
    UiClient,
    campaign_body,
    drain,
    flashes,
    free_port,
    location,
    make_contacts,
    make_workspace,
    run_queued_imports,
)
from web import create_app
from web.ui import summaries as ui_campaigns
from web.ui.summaries import chart_data


def assert_labelled(html: str) -> None:
    """Every visible form control has a label (``<label for>``, a wrapping label or aria-label)."""
    for match in re.finditer(r"<(input|select|textarea)\b([^>]*)>", html):
        attrs = match.group(2)
        if re.search(r'type="(hidden|submit)"', attrs):
            continue
        if "aria-label=" in attrs or html[: match.start()].rstrip().endswith('<label class="check">'):
            continue
        control_id = re.search(r'\bid="([^"]+)"', attrs)
        assert control_id and f'<label for="{control_id.group(1)}"' in html, match.group(0)


def new_campaign(ui, list_id: int, **extra) -> int:
    resp = ui.api.post("/api/v1/campaigns", json=campaign_body(list_id, **extra))
    assert resp.status_code == 201, resp.json
    return resp.json["id"]


# --------------------------------------------------------------------------- sign in, pages, CSRF

PAGES = ["/", "/campaigns", "/campaigns/new", "/contacts", "/contacts/new", "/contacts/import", "/lists",
         "/suppressions", "/messages", "/dead-letters", "/queue", "/outbox", "/settings"]


@pytest.mark.parametrize("path", PAGES)
def test_pages_need_sign_in(client, path):
    resp = client.get(path)
    assert resp.status_code == 302 and "/login?next=" in location(resp)


def test_sign_in_goes_back_to_the_page_asked_for_and_never_off_site(app):
    _, _, _, email = make_workspace(password="correct horse")
    client = app.test_client()
    token = CSRF_META.search(client.get("/login").get_data(as_text=True)).group(1)
    data = {"email": email, "password": "correct horse", "csrf_token": token}
    assert location(client.post("/login?next=/lists", data=data)) == "/lists"
    client.post("/logout", data={"csrf_token": CSRF_META.search(client.get("/").get_data(as_text=True)).group(1)})
    token = CSRF_META.search(client.get("/login").get_data(as_text=True)).group(1)
    data["csrf_token"] = token
    assert location(client.post("/login?next=//evil.example/x", data=data)) == "/"


BAD_TARGETS = ["/lists\nX-Evil: 1", "/lists\r\nSet-Cookie: a=b", "/a\x00b", "/a\tb", "/a\x7fb", "/a\u2028b",
               "/\\evil.example/x"]


@pytest.mark.parametrize("target", BAD_TARGETS)
def test_a_next_with_a_control_character_signs_in_to_the_home_page(app, target):
    """A newline in ?next= was a 500 after the session row was stored (no cookie handed out)."""

    _, _, _, email = make_workspace(password="correct horse")
    client = app.test_client()
    token = CSRF_META.search(client.get("/login").get_data(as_text=True)).group(1)
    with session_scope() as s:
        before = s.scalar(select(func.count()).select_from(UserSession))
    resp = client.post("/login", query_string={"next": target},
                       data={"email": email, "password": "correct horse", "csrf_token": token})
    assert resp.status_code == 302 and location(resp) == "/", resp.get_data(as_text=True)[:500]
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(UserSession)) == before + 1
    assert client.get("/settings").status_code == 200  # the session row's cookie was handed out


@pytest.mark.parametrize("target", BAD_TARGETS)
def test_a_forms_back_with_a_control_character_goes_to_the_default_page(ui, target):
    list_id = ui.api.post("/api/v1/lists", json={"name": "L"}).json["id"]
    cid = ui.api.post("/api/v1/contacts", json={"email": "a@example.com"}).json["id"]
    ui.api.post(f"/api/v1/lists/{list_id}/members", json={"contact_ids": [cid]})
    resp = ui.post(f"/lists/{list_id}/members/{cid}/remove", {"back": target})
    assert resp.status_code == 303 and location(resp) == f"/lists/{list_id}"
    resp = ui.post(f"/campaigns/{2**40}/replay-failed", {"back": target})  # no such campaign: the 404 page
    assert resp.status_code == 404


EMPTY_STATES = {
    "/": "No campaigns yet",
    "/contacts": "No contacts yet",
    "/lists": "No lists yet",
    "/suppressions": "Nobody is suppressed",
    "/messages": "No messages yet",
    "/dead-letters": "No dead letters",
    "/campaigns/new": "First, a list of contacts",
    "/settings": "Create key",
    "/queue": "No campaign is running or paused",
    "/outbox": "Nothing received yet",
    "/contacts/import": "Upload and import",
    "/contacts/new": "Add a contact",
}


@pytest.mark.parametrize("path", sorted(EMPTY_STATES))
def test_every_page_renders_its_empty_state(ui, sink, path):
    html = ui.text(path)
    assert EMPTY_STATES[path] in html
    assert 'name="csrf_token"' in html  # at least the sign-out form
    assert_labelled(html)


UNSAFE_FORMS = [
    ("/logout", {}),
    ("/workspace", {"workspace_id": "1"}),
    ("/settings/api-keys", {"name": "x"}),
    ("/contacts/new", {"email": "a@example.com"}),
    ("/lists", {"name": "L"}),
    ("/suppressions", {"emails": "a@example.com"}),
    ("/suppressions/remove", {"email": "a@example.com"}),
    ("/campaigns/new", {"name": "x"}),
    ("/contacts/import", {}),
]


@pytest.mark.parametrize(("path", "data"), UNSAFE_FORMS)
def test_forms_without_the_csrf_token_are_refused(ui, path, data):
    resp = ui.post(path, data, csrf=False)
    assert resp.status_code == 400
    assert "security token" in resp.get_data(as_text=True)
    resp = ui.post(path, {**data, "csrf_token": "forged"}, csrf=False)
    assert resp.status_code == 400
    with session_scope() as s:
        assert s.scalar(select(Contact.id)) is None and s.scalar(select(Suppression.id)) is None
    assert ui.get("/").status_code == 200  # still signed in


def test_every_form_on_every_page_carries_the_csrf_token(ui, sink):
    list_id = make_contacts(ui.api, 2)
    cid = new_campaign(ui, list_id)
    running = new_campaign(ui, list_id)
    ui.post(f"/campaigns/{running}/launch")
    with session_scope() as s:
        contact_id = s.scalar(select(Contact.id))
    for path in PAGES + [f"/lists/{list_id}", f"/contacts/{contact_id}", f"/campaigns/{cid}/edit",
                         f"/campaigns/{cid}", f"/campaigns/{cid}/launch", f"/campaigns/{running}/cancel"]:
        html = ui.text(path)
        assert_labelled(html)
        for form in re.findall(r"<form[^>]*>.*?</form>", html, re.S):
            if 'method="post"' in form:
                assert 'name="csrf_token"' in form, (path, form[:300])


def test_a_domain_error_is_an_html_page_not_json(ui):
    resp = ui.get("/campaigns/999999")
    assert resp.status_code == 404 and resp.mimetype == "text/html"
    assert "There is no campaign 999999" in resp.get_data(as_text=True)
    assert ui.get("/campaigns/99999999999999999999999").status_code == 404
    assert ui.get("/messages/0").status_code == 404
    assert ui.get("/contacts?before=99999999999999999999999").status_code == 200


# --------------------------------------------------------------------------- workspaces, API keys


def test_workspace_switcher(app):
    ws_a, _, key_a, email = make_workspace(name="Alpha", password="correct horse")
    with session_scope() as s:
        beta = accounts.create_workspace(s, "Beta")
        accounts.create_user(s, email, "correct horse", beta)
        beta_id = beta.id
    stranger, *_ = make_workspace(name="Gamma")
    ui = UiClient(app, email, "correct horse", ws_a, key_a, "Alpha")
    ui.api.post("/api/v1/lists", json={"name": "Alpha list"})
    html = ui.text("/lists")
    assert "Alpha list" in html and 'class="ws-menu"' in html and f'value="{beta_id}" class="ws-item">Beta<' in html
    resp = ui.post("/workspace", {"workspace_id": str(beta_id)})
    assert resp.status_code == 303
    html = ui.text("/lists")
    assert "Alpha list" not in html and "No lists yet" in html and "Switched to Beta" in html
    resp = ui.post("/workspace", {"workspace_id": str(stranger)}, follow_redirects=True)
    assert "not a member of that workspace" in resp.get_data(as_text=True)
    assert "No lists yet" in ui.text("/lists")  # still in Beta


def test_api_keys_are_shown_once_listed_by_prefix_and_revoked_after_confirming(ui):
    resp = ui.post("/settings/api-keys", {"name": "CRM sync"})
    assert resp.status_code == 200 and resp.headers["Cache-Control"] == "no-store"
    html = resp.get_data(as_text=True)
    key = re.search(r'id="new-key"[^>]*value="(hk_[^"]+)"', html).group(1)
    assert "it will not be shown again" in html
    listing = ui.text("/settings")
    assert key not in listing and f"{key[:10]}…" in listing and "CRM sync" in listing
    assert ui.client.get("/api/v1/lists", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    key_id = re.findall(r"/settings/api-keys/(\d+)/revoke", listing)[0]
    confirm = ui.text(f"/settings/api-keys/{key_id}/revoke")
    assert "Revoke key" in confirm and "cannot be undone" in confirm
    resp = ui.post(f"/settings/api-keys/{key_id}/revoke", follow_redirects=True)
    assert "is revoked" in resp.get_data(as_text=True)
    assert ui.client.get("/api/v1/lists", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    other_ws, _, other_key, _ = make_workspace()
    with session_scope() as s:
        from campaigns.models import ApiKey

        other_id = s.scalar(select(ApiKey.id).where(ApiKey.workspace_id == other_ws))
    assert ui.get(f"/settings/api-keys/{other_id}/revoke").status_code == 404
    assert ui.post(f"/settings/api-keys/{other_id}/revoke").status_code == 404


# --------------------------------------------------------------------------- contacts


def test_add_search_and_edit_contacts(ui):
    resp = ui.post("/contacts/new", {"email": "not-an-address", "first_name": "X"})
    assert resp.status_code == 422
    html = resp.get_data(as_text=True)
    assert 'aria-invalid="true"' in html and "must have an @-sign" in html and 'value="X"' in html

    resp = ui.post("/contacts/new", {"email": "Ada@Example.com", "first_name": "Ada", "timezone": "Europe/London",
                                     "fields": "company = Analytical Engines\nrole = founder"})
    assert resp.status_code == 303
    page = location(resp)
    html = ui.text(page)
    assert "ada@example.com" in html and "company = Analytical Engines" in html

    dup = ui.post("/contacts/new", {"email": "ada@example.com"})
    assert dup.status_code == 422 and "already exists" in dup.get_data(as_text=True)

    bad = ui.post(page, {"email": "ada@example.com", "timezone": "Mars/Olympus", "fields": "no equals sign"})
    assert bad.status_code == 422
    html = bad.get_data(as_text=True)
    assert "write each field as name = value" in html
    bad = ui.post(page, {"email": "ada@example.com", "timezone": "Mars/Olympus"})
    assert bad.status_code == 422 and "not an IANA time zone" in bad.get_data(as_text=True)

    ok = ui.post(page, {"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace",
                        "timezone": "UTC", "fields": "company = Engines Ltd"})
    assert ok.status_code == 303
    with session_scope() as s:
        c = s.scalar(select(Contact))
        assert (c.last_name, c.timezone, c.fields) == ("Lovelace", "UTC", {"company": "Engines Ltd"})

    ui.post("/contacts/new", {"email": "grace@navy.example"}, follow_redirects=True)
    html = ui.text("/contacts?q=EXAMPLE.COM")
    assert "ada@example.com" in html and "grace@navy.example" not in html
    assert "No contact matches" in ui.text("/contacts?q=nobody%25")
    assert "No contact matches" in ui.text("/contacts?q=a%00b")


def test_long_pages_are_paged_newest_first(ui):
    rows = "email\n" + "".join(f"p{i:03d}@example.com\n" for i in range(60))
    ui.api.post("/api/v1/contacts/import", data=rows, headers={"Content-Type": "text/csv"})
    html = ui.text("/contacts?q=example")
    assert "p059@example.com" in html and "p009@example.com" not in html
    older = re.search(r'href="(/contacts\?[^"]*before=\d+[^"]*)">Older', html).group(1).replace("&amp;", "&")
    assert "q=example" in older
    html = ui.text(older)
    assert "p009@example.com" in html and "p059@example.com" not in html and "← Newest" in html
    assert "Older" not in html


def test_contact_lists_suppression_and_delete(ui):
    list_id = ui.api.post("/api/v1/lists", json={"name": "VIP"}).json["id"]
    ui.post("/contacts/new", {"email": "kim@example.com"})
    with session_scope() as s:
        cid = s.scalar(select(Contact.id))
    assert ui.post(f"/contacts/{cid}/lists", {"list_id": str(list_id)}).status_code == 303
    assert "kim@example.com" in ui.text(f"/lists/{list_id}")
    ui.post("/suppressions", {"emails": "kim@example.com"})
    html = ui.text(f"/contacts/{cid}")
    assert "Suppressed (manual)" in html
    assert "Delete kim@example.com?" in ui.text(f"/contacts/{cid}/delete")
    assert ui.post(f"/contacts/{cid}/delete").status_code == 303
    assert "No contacts yet" in ui.text("/contacts")


# --------------------------------------------------------------------------- CSV import


CSV = b"email,first_name,company\nada@example.com,Ada,Engines\ngrace@example.com,Grace,Navy\nnot-an-email,Bad,X\n\n"


def test_csv_import_shows_progress_and_the_per_row_report(ui):
    resp = ui.post("/contacts/import", {"file": (io.BytesIO(CSV), "people.csv"), "new_list": "Imported"},
                   content_type="multipart/form-data")
    assert resp.status_code == 303, resp.get_data(as_text=True)
    page = location(resp)
    html = ui.text(page)
    assert "Waiting for a worker" in html and 'data-import-poll="/api/v1/imports/' in html
    assert 'data-finished="false"' in html and "<progress" in html
    run_queued_imports()
    html = ui.text(page)
    assert 'data-finished="true"' in html and "badge-done" in html
    assert re.search(r'data-import-count="created">2<', html)
    assert "Rows that were not imported" in html and "invalid email address" in html
    assert re.search(r'<td class="num">4</td>', html)  # the spreadsheet line of the bad row
    assert "Imported" in html  # the new list
    # the page's script polls the API, which answers the session
    import_id = int(page.rsplit("/", 1)[1])
    job = ui.get(f"/api/v1/imports/{import_id}").json
    assert job["status"] == "done" and job["errors"][0]["row"] == 4
    assert f"/contacts/imports/{import_id}" in ui.text("/contacts/import")  # recent imports


@pytest.mark.parametrize(("body", "message"), [
    (b"name,company\nAda,X\n", "no &#39;email&#39; column"),
    (b"", "the file is empty"),
    (None, "choose a CSV file"),
])
def test_an_unusable_csv_is_refused_with_a_reason(ui, body, message):
    data = {} if body is None else {"file": (io.BytesIO(body), "x.csv")}
    resp = ui.post("/contacts/import", data, content_type="multipart/form-data")
    assert resp.status_code == 400
    assert message.lower() in resp.get_data(as_text=True).lower()
    assert huey.pending_count() == 0


# --------------------------------------------------------------------------- lists and suppressions


def test_lists_create_view_members_and_delete(ui):
    assert "a list needs a name" in ui.post("/lists", {"name": "  "}).get_data(as_text=True).lower()
    resp = ui.post("/lists", {"name": "Prospects"})
    assert resp.status_code == 303
    page = location(resp)
    assert "This list is empty" in ui.text(page)
    dup = ui.post("/lists", {"name": "Prospects"})
    assert dup.status_code == 422 and "already exists" in dup.get_data(as_text=True)
    list_id = int(page.rsplit("/", 1)[1])
    resp = ui.post(f"/lists/{list_id}/members", {"emails": "ann.member@example.com, bob.member@example.com\nnope"},
                   follow_redirects=True)
    html = resp.get_data(as_text=True)
    assert "2 added" in html and "Not added: nope" in html and "ann.member@example.com" in html
    assert ">2</td>" in ui.text("/lists")
    with session_scope() as s:
        a_id = s.scalar(select(Contact.id).where(Contact.email == "ann.member@example.com"))
    ui.post(f"/lists/{list_id}/members/{a_id}/remove")
    assert "ann.member@example.com" not in ui.text(f"/lists/{list_id}")
    ui.post(f"/lists/{list_id}/rename", {"name": "Warm prospects"})
    assert "Warm prospects" in ui.text(f"/lists/{list_id}")
    assert "1 memberships" in ui.text(f"/lists/{list_id}/delete")
    ui.post(f"/lists/{list_id}/delete")
    assert "No lists yet" in ui.text("/lists")


def test_suppression_list_add_and_remove_with_a_confirmation(ui):
    resp = ui.post("/suppressions", {"emails": "X@Example.com\nbad-address"}, follow_redirects=True)
    html = resp.get_data(as_text=True)
    assert "1 address suppressed" in html and "Not suppressed: bad-address" in html and "x@example.com" in html
    confirm = ui.text("/suppressions/remove?email=x@example.com")
    assert "Mail x@example.com again?" in confirm and "Remove from suppression list" in confirm
    with session_scope() as s:
        assert s.scalar(select(Suppression.email)) == "x@example.com"  # nothing removed by looking
    resp = ui.post("/suppressions/remove", {"email": "x@example.com"}, follow_redirects=True)
    assert "removed from the suppression list" in resp.get_data(as_text=True)
    assert "Nobody is suppressed" in ui.text("/suppressions")
    assert ui.get("/suppressions/remove?email=x@example.com").status_code == 404


# --------------------------------------------------------------------------- the campaign builder


def builder_form(html: str) -> dict:
    """The builder's fields as the browser would submit them (first option of selects)."""
    form = re.search(r'<form method="post" id="builder".*?</form>', html, re.S).group(0)
    data = {}
    for name, value in re.findall(r'<input[^>]*?name="([^"]+)"[^>]*?value="([^"]*)"', form):
        if name == "csrf_token":
            continue
        tag = re.search(rf'<input[^>]*name="{re.escape(name)}"[^>]*value="{re.escape(value)}"[^>]*>', form).group(0)
        if 'type="checkbox"' in tag and "checked" not in tag:
            continue
        if 'type="checkbox"' in tag and name in data:
            data.setdefault("__multi__" + name, [data[name]]).append(value)
            continue
        data[name] = value
    for name, body in re.findall(r'<textarea[^>]*name="([^"]+)"[^>]*>(.*?)</textarea>', form, re.S):
        import html as htmllib

        data[name] = htmllib.unescape(body)
    for name, options in re.findall(r'<select[^>]*name="([^"]+)"[^>]*>(.*?)</select>', form, re.S):
        selected = re.search(r'<option value="([^"]*)" selected', options) or re.search(r'<option value="([^"]*)"',
                                                                                         options)
        data[name] = selected.group(1) if selected else ""
    out = {}
    for k, v in data.items():
        if k.startswith("__multi__"):
            out[k[len("__multi__"):]] = v
        elif "__multi__" + k not in data:
            out[k] = v
    return out


def test_new_campaign_needs_a_list_and_valid_sender(ui):
    list_id = ui.api.post("/api/v1/lists", json={"name": "L"}).json["id"]
    resp = ui.post("/campaigns/new", {"name": "", "list_id": "", "from_email": "nope"})
    assert resp.status_code == 422
    assert "choose the list to send to" in resp.get_data(as_text=True)
    resp = ui.post("/campaigns/new", {"name": "", "list_id": str(list_id), "from_email": "nope"})
    html = resp.get_data(as_text=True)
    assert resp.status_code == 422 and "must not be blank" in html and "not a valid email address" in html
    resp = ui.post("/campaigns/new", {"name": "Spring", "list_id": str(list_id), "from_email": "me@example.com"})
    assert resp.status_code == 303 and location(resp).endswith("/edit")
    with session_scope() as s:
        c = s.scalar(select(Campaign))
        assert c.status == "draft" and [st.type for st in c.steps] == ["email"]


def test_builder_steps_add_reorder_remove_and_save(ui):
    list_id = make_contacts(ui.api, 2)
    cid = new_campaign(ui, list_id, steps=[{"type": "email", "subject": "One", "html": "<p>1</p>"}])
    page = f"/campaigns/{cid}/edit"
    html = ui.text(page)
    assert "Preview" in html and "Hello" not in html and "P0" in html  # preview for the first list member

    form = builder_form(html)
    assert form["steps-0-subject"] == "One" and form["list_id"] == str(list_id)
    resp = ui.post(page, {**form, "action": "add-wait"})
    assert resp.status_code == 303 and location(resp).endswith("#step-1")
    form = builder_form(ui.text(page))
    form["steps-1-amount"], form["steps-1-unit"] = "2", "seconds"
    ui.post(page, {**form, "action": "add-email"})
    form = builder_form(ui.text(page))
    assert [form.get(f"steps-{i}-type") for i in range(3)] == ["email", "wait", "email"]
    ui.post(page, {**form, "action": "up-2"})  # the new email before the wait
    with session_scope() as s:
        c = s.get(Campaign, cid)
        assert [st.type for st in c.steps] == ["email", "email", "wait"]
        assert c.steps[2].wait_seconds == 2
    form = builder_form(ui.text(page))
    ui.post(page, {**form, "action": "remove-2"})
    with session_scope() as s:
        assert [st.type for st in s.get(Campaign, cid).steps] == ["email", "email"]

    # sending settings round-trip, including what the form does not show
    with session_scope() as s:
        s.get(Campaign, cid).limits = {"per_minute": 5}
    form = builder_form(ui.text(page))
    assert form["per_minute"] == "5"
    form.update({"window_on": "1", "window_start": "09:00", "window_end": "17:00", "window_days": ["mon", "fri"],
                 "window_timezone": "contact", "per_day": "100", "daily_cap": "50", "stop_on": ["reply", "click"],
                 "name": "Renamed"})
    form.pop("track_clicks", None)
    resp = ui.post(page, {**form, "action": "save"})
    assert resp.status_code == 303
    with session_scope() as s:
        c = s.get(Campaign, cid)
        assert c.name == "Renamed" and c.send_window["days"] == ["mon", "fri"]
        assert c.limits == {"per_minute": 5, "per_day": 100, "sender": {"daily_cap": 50}}
        assert c.stop_on == ["reply", "click"] and c.tracking == {"opens": True, "clicks": False}


def test_builder_shows_template_errors_at_their_line_and_keeps_the_unsaved_text(ui):
    list_id = make_contacts(ui.api, 1)
    cid = new_campaign(ui, list_id)
    page = f"/campaigns/{cid}/edit"
    form = builder_form(ui.text(page))
    form["steps-0-html"] = "<p>Hi</p>\n<p>{{ contact.phone }}</p>\n<p>bye</p>"
    form["steps-2-subject"] = "{% if %}"
    form["per_minute"] = "lots"
    resp = ui.post(page, {**form, "action": "save"})
    assert resp.status_code == 422
    html = resp.get_data(as_text=True)
    assert "Not saved: 3 problems to fix" in html
    assert "Step 1, HTML: line 2:" in html and "contact.phone" in html
    assert '<span class="bad"><span class="ln">2</span>&lt;p&gt;{{ contact.phone }}&lt;/p&gt;</span>' in html
    assert 'href="#steps-0-html"' in html and 'href="#per_minute"' in html
    assert "Step 3, subject: line 1:" in html and "must be a whole number" in html
    assert "{{ contact.phone }}" in html  # the typed text is kept
    with session_scope() as s:
        assert "phone" not in s.get(Campaign, cid).steps[0].html  # and nothing was saved


def test_live_preview_through_the_api_with_the_session(ui):
    list_id = make_contacts(ui.api, 1)
    cid = new_campaign(ui, list_id)
    html = ui.text(f"/campaigns/{cid}/edit")
    assert f'data-preview-url="/api/v1/campaigns/{cid}/preview"' in html
    body = {"subject": "Hi {{ contact.first_name }}", "html": "<p>{{ contact.fields.missing }}x</p>", "email":
            "person0@example.com"}
    assert ui.client.post(f"/api/v1/campaigns/{cid}/preview", json=body).status_code == 400  # no CSRF header
    resp = ui.client.post(f"/api/v1/campaigns/{cid}/preview", json=body, headers={"X-CSRFToken": ui.token})
    assert resp.status_code == 200 and resp.json["subject"] == "Hi P0" and resp.json["errors"] == {}
    body["html"] = "<p>\n{{ nope }}</p>"
    resp = ui.client.post(f"/api/v1/campaigns/{cid}/preview", json=body, headers={"X-CSRFToken": ui.token})
    assert resp.json["errors"]["html"][0].startswith("line 2:")


def test_test_send_goes_first_and_stays_out_of_the_stats(ui, sink):
    list_id = make_contacts(ui.api, 1)
    cid = new_campaign(ui, list_id)
    bad = ui.post(f"/campaigns/{cid}/test-send", {"email": "nope", "step": "0"}, follow_redirects=True)
    assert "Test not sent" in bad.get_data(as_text=True)
    resp = ui.post(f"/campaigns/{cid}/test-send", {"email": "me@example.com", "step": "2"}, follow_redirects=True)
    assert "Test email queued for me@example.com" in resp.get_data(as_text=True)
    task = huey.dequeue()
    assert task.name == "send_messages" and task.priority == PRIORITY_TEST
    task.execute()
    with session_scope() as s:
        m = s.scalar(select(Message))
        assert m.is_test and m.status == "sent" and m.email == "me@example.com"
    assert sink.messages()[0]["subject"].endswith("Following up")
    assert "0</dd>" in ui.text(f"/campaigns/{cid}")


def test_launch_summary_counts_who_is_enrolled_and_who_is_skipped(ui):
    list_id = make_contacts(ui.api, 5)
    ui.api.post("/api/v1/suppressions", json={"emails": ["person0@example.com", "person1@example.com"]})
    with session_scope() as s:
        s.execute(Contact.__table__.update().where(Contact.email == "person2@example.com").values(status="bounced"))
    cid = new_campaign(ui, list_id)
    html = ui.text(f"/campaigns/{cid}/launch")
    assert re.search(r"<strong data-summary-eligible>2</strong> contacts will be enrolled", html)
    assert "<strong>2</strong> suppressed: skipped" in html and "<strong>1</strong> bounced: skipped" in html
    assert "up to <strong>2</strong> emails over 1 s of waits: at most 4 emails" in html
    assert "Launch now" in html
    with session_scope() as s:
        assert s.get(Campaign, cid).status == "draft"  # looking launches nothing


def test_launch_summary_says_a_wait_after_the_last_email_does_nothing(ui):
    list_id = make_contacts(ui.api, 2)
    steps = [{"type": "wait", "seconds": 60}, {"type": "email", "subject": "Hi", "html": "<p>x</p>"},
             {"type": "wait", "seconds": 3600}, {"type": "email", "subject": "Again", "html": "<p>y</p>"},
             {"type": "wait", "seconds": 7200}]
    cid = new_campaign(ui, list_id, steps=steps)
    html = ui.text(f"/campaigns/{cid}/launch")
    # the waits before an email count; the one after the last email is called out, not counted
    assert "up to <strong>2</strong> emails over 1 h 1 min of waits: at most 4 emails" in html, html
    assert re.search(r"<p class=\"warn\" data-trailing-wait>The wait after the last email \(2 h\) does nothing", html)
    plain = new_campaign(ui, list_id)
    assert "data-trailing-wait" not in ui.text(f"/campaigns/{plain}/launch")


def test_the_campaigns_list_shares_its_counts_with_the_live_views(ui, monkeypatch):
    list_id = make_contacts(ui.api, 1)
    cid = new_campaign(ui, list_id)
    now, calls, real = [1000.0], [], stats.campaign_stats
    monkeypatch.setattr(stats, "clock", lambda: now[0])
    monkeypatch.setattr(stats, "campaign_stats", lambda s, c: calls.append(c) or real(s, c))
    for _ in range(3):
        assert f'href="/campaigns/{cid}/edit"' in ui.text("/campaigns")
    assert calls == [cid]  # counted once for three visits within 5 s
    now[0] += 5.1
    ui.text("/campaigns")
    assert calls == [cid, cid]


def test_launch_run_and_watch_a_campaign(ui, sink):
    list_id = make_contacts(ui.api, 3)
    cid = new_campaign(ui, list_id)
    html = ui.text(f"/campaigns/{cid}")
    assert "A draft: nothing is sent" in html and "data-stream-url" not in html
    resp = ui.post(f"/campaigns/{cid}/launch")
    assert resp.status_code == 303 and location(resp) == f"/campaigns/{cid}"
    html = ui.text(f"/campaigns/{cid}")
    assert f'data-stream-url="/api/v1/campaigns/{cid}/stream"' in html and "Launched" in html
    assert 'data-show-when="running"' in html  # the pause button, shown while running
    drain(huey, until=lambda: ui.api.get(f"/api/v1/campaigns/{cid}").json["status"] == "completed", timeout=60)
    html = ui.text(f"/campaigns/{cid}")
    assert "badge-completed" in html and 'data-stat="sent">6<' in html and "6 of 6 emails handled (100%)" in html
    assert "<svg" in html and "Emails sent per minute" in html and "6 emails sent between" in html
    assert 'data-step-id="' in html
    # completed just now: the page keeps following its figures (delivery events) for an hour
    follow = int(re.search(r'data-follow-until="(\d+)"', html).group(1))
    assert f'data-stream-url="/api/v1/campaigns/{cid}/stream"' in html
    assert 3590 < follow / 1000 - time.time() <= 3600
    with session_scope() as s:
        done = s.get(Campaign, cid)
        done.finished_at -= timedelta(hours=2)  # in Python: SQLite has no datetime arithmetic
    assert "data-stream-url" not in ui.text(f"/campaigns/{cid}")  # long done: a still page
    chart = ui.text(f"/campaigns/{cid}/chart")
    assert chart.lstrip().startswith("<figure") and "6 in all" in chart
    # relaunching a running campaign is refused politely
    resp = ui.post(f"/campaigns/{cid}/launch", follow_redirects=True)
    assert resp.status_code == 200 and "Could not launch the campaign" in resp.get_data(as_text=True)

    # the message log, its filters and a message's details
    html = ui.text(f"/messages?campaign_id={cid}")
    assert html.count('href="/messages/') >= 6
    with session_scope() as s:
        step2 = s.get(Campaign, cid).steps[2].id
        first = s.scalar(select(Message).where(Message.step_id == step2).order_by(Message.id))
    html = ui.text(f"/messages?campaign_id={cid}&step_id={step2}&email=person1")
    assert "person1@example.com" in html and "person0@example.com" not in html
    assert "No message matches" in ui.text(f"/messages?campaign_id={cid}&status=failed")
    html = ui.text(f"/messages/{first.id}")
    assert first.message_key in html and "Attempts" in html and 'badge-sent">sent<' in html
    assert re.search(r'<td class="num">202</td>', html) and " ms</td>" in html
    assert "accepted it with 202" in html


def test_pause_resume_and_cancel_with_a_confirmation(ui, sink):
    list_id = make_contacts(ui.api, 2)
    cid = new_campaign(ui, list_id, steps=[
        {"type": "email", "subject": "a", "html": "<p>a</p>"}, {"type": "wait", "seconds": 3600},
        {"type": "email", "subject": "b", "html": "<p>b</p>"}])
    ui.post(f"/campaigns/{cid}/launch")
    drain(huey)
    assert ui.post(f"/campaigns/{cid}/pause").status_code == 303
    html = ui.text(f"/campaigns/{cid}")
    assert "badge-paused" in html and "paused by a user" in html
    assert ui.post(f"/campaigns/{cid}/resume").status_code == 303
    assert "badge-running" in ui.text(f"/campaigns/{cid}")
    confirm = ui.text(f"/campaigns/{cid}/cancel")
    assert "2 scheduled emails will not be sent" in confirm and "Keep it" in confirm
    assert "badge-running" in ui.text(f"/campaigns/{cid}")
    ui.post(f"/campaigns/{cid}/cancel")
    html = ui.text(f"/campaigns/{cid}")
    assert "badge-cancelled" in html and "data-stream-url" not in html
    resp = ui.post(f"/campaigns/{cid}/resume", follow_redirects=True)
    assert "Could not resume the campaign" in resp.get_data(as_text=True)
    assert ui.get(f"/campaigns/{cid}/edit").status_code == 303  # only drafts are edited
    assert "Delete" in ui.text(f"/campaigns/{cid}/delete")
    ui.post(f"/campaigns/{cid}/delete")
    assert "No campaigns yet" in ui.text("/")


def test_a_draft_is_deleted_not_cancelled(ui):
    """Cancelling a draft would leave a campaign that can never launch: the page offers Delete,
    the cancel page and form send the user back with the reason, and the draft stays a draft."""
    list_id = make_contacts(ui.api, 1)
    cid = new_campaign(ui, list_id)
    html = ui.text(f"/campaigns/{cid}")
    assert re.search(r'<a [^>]*/cancel"[^>]*data-show-when="running paused" hidden>Cancel', html)
    assert re.search(r'<a [^>]*/delete"[^>]*data-show-when="[^"]*draft[^"]*">Delete', html)
    resp = ui.get(f"/campaigns/{cid}/cancel")
    assert resp.status_code == 303 and location(resp).endswith(f"/campaigns/{cid}")
    assert flashes(ui.text(f"/campaigns/{cid}")) == [
        "A draft has not been launched, so there is nothing to cancel: delete it instead."]
    ui.post(f"/campaigns/{cid}/cancel")
    assert flashes(ui.text(f"/campaigns/{cid}")) == [
        "Could not cancel the campaign: A draft has not been launched, so there is nothing to cancel: "
        "delete it instead"]
    with session_scope() as s:
        assert s.get(Campaign, cid).status == "draft"


def test_progress_leaves_out_what_stopped_sequences_will_not_send(ui, sink):
    list_id = make_contacts(ui.api, 3)
    two_emails = [{"type": "email", "subject": "a", "html": "<p>a</p>"}, {"type": "wait", "seconds": 3600},
                  {"type": "email", "subject": "b", "html": "<p>b</p>"}]
    cid = new_campaign(ui, list_id, steps=two_emails)
    ui.post(f"/campaigns/{cid}/launch")
    drain(huey, until=lambda: ui.api.get(f"/api/v1/campaigns/{cid}").json["stats"]["sent"] == 3, timeout=60)
    stats = ui.api.get(f"/api/v1/campaigns/{cid}").json["stats"]
    assert (stats["stopped"], stats["skipped"]) == (0, 0)
    assert "3 of 6 emails handled (50%)<" in ui.text(f"/campaigns/{cid}")
    # one contact unsubscribes (suppressed): its second email will never go
    assert ui.api.post("/api/v1/suppressions", json={"emails": ["person1@example.com"]}).status_code == 200
    stats = ui.api.get(f"/api/v1/campaigns/{cid}").json["stats"]
    assert (stats["enrolled"], stats["stopped"], stats["skipped"]) == (3, 1, 1)
    assert all("stopped" not in step["stats"] for step in ui.api.get(f"/api/v1/campaigns/{cid}").json["steps"])
    html = ui.text(f"/campaigns/{cid}")
    assert "3 of 5 emails handled (60%); 1 sequence ended early (1 email not to send)" in html
    # a dead letter ends its sequence too, until it is replayed; at the last email it leaves nothing unsent
    sink.fail_addresses(["person0@example.com"], status=400)
    other = new_campaign(ui, list_id, steps=two_emails)
    ui.post(f"/campaigns/{other}/launch")
    drain(huey, until=lambda: ui.api.get(f"/api/v1/campaigns/{other}").json["stats"]["sent"] == 1, timeout=60)
    stats = ui.api.get(f"/api/v1/campaigns/{other}").json["stats"]  # person1 is suppressed: never enrolled
    assert (stats["enrolled"], stats["dead_letters"], stats["stopped"], stats["skipped"]) == (2, 1, 1, 1), stats
    assert "2 of 3 emails handled (66%); 1 sequence ended early (1 email not to send)" in ui.text(f"/campaigns/{other}")
    sink.clear_fail_addresses()
    assert ui.post(f"/campaigns/{other}/replay-failed").status_code == 303
    stats = ui.api.get(f"/api/v1/campaigns/{other}").json["stats"]
    assert (stats["stopped"], stats["skipped"]) == (0, 0)
    one_email = new_campaign(ui, list_id, steps=two_emails[:1])
    sink.fail_addresses(["person0@example.com"], status=400)
    ui.post(f"/campaigns/{one_email}/launch")
    drain(huey, until=lambda: ui.api.get(f"/api/v1/campaigns/{one_email}").json["status"] == "completed", timeout=60)
    stats = ui.api.get(f"/api/v1/campaigns/{one_email}").json["stats"]
    assert (stats["dead_letters"], stats["stopped"], stats["skipped"]) == (1, 0, 0), stats
    sink.clear_fail_addresses()
    # a cancel of the whole campaign is no stop condition: what it left unsent still shows as not done
    ui.post(f"/campaigns/{cid}/cancel")
    stats = ui.api.get(f"/api/v1/campaigns/{cid}").json["stats"]
    assert (stats["stopped"], stats["skipped"]) == (1, 1)
    assert "3 of 5 emails handled (60%)" in ui.text(f"/campaigns/{cid}")


def test_dead_letters_are_listed_and_replayed_one_or_all(ui, sink):
    list_id = make_contacts(ui.api, 3)
    sink.fail_addresses(["person0@example.com", "person1@example.com"], status=400)
    cid = new_campaign(ui, list_id, steps=[{"type": "email", "subject": "a", "html": "<p>a</p>"}])
    ui.post(f"/campaigns/{cid}/launch")
    drain(huey, until=lambda: ui.api.get(f"/api/v1/campaigns/{cid}").json["status"] == "completed", timeout=60)
    html = ui.text("/dead-letters")
    assert "person0@example.com" in html and "person1@example.com" in html and "Replay all 2" in html
    assert "2 dead letters: inspect and replay" in ui.text(f"/campaigns/{cid}")
    with session_scope() as s:
        dead = s.scalars(select(Message).where(Message.status == "failed").order_by(Message.id)).all()
        attempt = s.scalar(select(MessageAttempt).where(MessageAttempt.message_id == dead[0].id))
    assert attempt.http_status == 400
    detail = ui.text(f"/messages/{dead[0].id}")
    assert "This is a dead letter" in detail and "Replay" in detail
    assert re.search(r'<pre class="mono response">[^<]*&#34;errors&#34;', detail)  # the provider's answer
    sink.clear_fail_addresses()
    resp = ui.post(f"/messages/{dead[0].id}/replay", {"back": "/dead-letters"})
    assert location(resp) == "/dead-letters"
    assert "Not replayed" in ui.post(f"/messages/{dead[0].id}/replay", follow_redirects=True).get_data(as_text=True)
    resp = ui.post(f"/campaigns/{cid}/replay-failed", {"back": "https://evil.example/"})
    assert location(resp) == f"/campaigns/{cid}"
    drain(huey, until=lambda: ui.api.get(f"/api/v1/campaigns/{cid}").json["status"] == "completed", timeout=60)
    assert "No dead letters" in ui.text("/dead-letters")
    with session_scope() as s:
        assert s.get(Message, dead[0].id).status == "sent"
    # they failed once: still counted as failed (statistics never decrease), no dead letter left
    html = ui.text(f"/campaigns/{cid}")
    assert '<dd data-stat="failed">2</dd>' in html and "inspect and replay" not in html
    assert "3 of 3 emails handled" in html


def test_dead_letters_are_deleted_one_or_all_after_a_confirmation(ui, sink):
    list_id = make_contacts(ui.api, 4)
    sink.fail_addresses(["person0@example.com", "person1@example.com", "person2@example.com"], status=400)
    cid = new_campaign(ui, list_id, steps=[{"type": "email", "subject": "a", "html": "<p>a</p>"}])
    ui.post(f"/campaigns/{cid}/launch")
    drain(huey, until=lambda: ui.api.get(f"/api/v1/campaigns/{cid}").json["status"] == "completed", timeout=60)
    with session_scope() as s:
        dead = s.scalars(select(Message.id).where(Message.status == "failed").order_by(Message.id)).all()
        sent = s.scalar(select(Message.id).where(Message.status == "sent"))
    html = ui.text("/dead-letters")
    assert "Delete all 3…" in html and f'href="/messages/{dead[0]}/delete?back=' in html
    assert "Delete…" in ui.text(f"/messages/{dead[0]}")

    # one: the confirmation names it and changes nothing; the POST deletes it and goes back
    confirm = ui.text(f"/messages/{dead[0]}/delete?back=/dead-letters?campaign_id={cid}")
    assert "Delete the dead letter to person0@example.com?" in confirm and "Keep it" in confirm
    with session_scope() as s:
        assert s.get(Message, dead[0]).status == "failed"
    resp = ui.post(f"/messages/{dead[0]}/delete", {"back": f"/dead-letters?campaign_id={cid}"})
    assert location(resp) == f"/dead-letters?campaign_id={cid}"
    assert "Dead letter to person0@example.com deleted." in ui.text(location(resp))
    assert ui.get(f"/messages/{dead[0]}").status_code == 404
    assert "person0@example.com" not in ui.text("/dead-letters")
    # a message that is no dead letter is not offered for deletion, and a forged POST is refused
    resp = ui.get(f"/messages/{sent}/delete")
    assert location(resp) == f"/messages/{sent}"
    resp = ui.post(f"/messages/{sent}/delete", follow_redirects=True)
    assert "Not deleted" in resp.get_data(as_text=True)
    with session_scope() as s:
        assert s.get(Message, sent).status == "sent"

    # all of a campaign: the confirmation counts them; the POST deletes them
    confirm = ui.text(f"/campaigns/{cid}/delete-failed")
    assert "Delete 2 dead letters of" in confirm and "Keep them" in confirm
    resp = ui.post(f"/campaigns/{cid}/delete-failed")
    assert location(resp) == "/dead-letters"
    html = ui.text("/dead-letters")
    assert "2 dead letters of" in html and "deleted." in html and "No dead letters" in html
    assert location(ui.get(f"/campaigns/{cid}/delete-failed")) == "/dead-letters"  # none left to confirm
    assert "inspect and replay" not in ui.text(f"/campaigns/{cid}")
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Message).where(Message.campaign_id == cid)) == 1
    assert ui.get("/campaigns/99999999999999999999999/delete-failed").status_code == 404
    assert ui.post("/campaigns/99999999999999999999999/delete-failed").status_code == 404


def test_queue_health_page(ui, sink):
    list_id = make_contacts(ui.api, 2)
    cid = new_campaign(ui, list_id)
    ui.post(f"/campaigns/{cid}/launch")
    html = ui.text("/queue")
    assert 'data-queue-poll="/api/v1/queue"' in html
    for label in ("Queue depth", "Scheduled", "In flight", "Stalled", "Dead letters", "Failure rate", "p50", "p95"):
        assert label in html
    assert ui.get("/api/v1/queue").json["depth"] >= 1


def test_the_test_send_address_defaults_to_the_users_own_only_when_mail_can_go_there(ui):
    cid = new_campaign(ui, make_contacts(ui.api, 1))
    assert f'id="test-email" name="email" type="email" required value="{ui.email}"' in ui.text(f"/campaigns/{cid}/edit")
    with session_scope() as s:  # a login at a special-use domain (the old demo login was demo@herald.local)
        s.execute(User.__table__.update().where(User.email == ui.email).values(email="me@team.local"))
    assert 'id="test-email" name="email" type="email" required value=""' in ui.text(f"/campaigns/{cid}/edit")
    assert 'type="email" required value="me@team.local"' not in ui.text(f"/campaigns/{cid}")


def test_a_test_send_stays_in_the_outbox_and_the_log_after_its_draft_is_edited(ui, sink):
    list_id = make_contacts(ui.api, 1)
    cid = new_campaign(ui, list_id)
    msg = ui.api.post(f"/api/v1/campaigns/{cid}/test-send", json={"email": "me@example.com"}).json
    drain(huey, until=lambda: len(sink.accepted()) == 1, timeout=30)
    edit = {"steps": [{"type": "email", "subject": "Rewritten", "html": "<p>new</p>"}]}
    assert ui.api.patch(f"/api/v1/campaigns/{cid}", json=edit).status_code == 200
    html = ui.text("/outbox")
    assert "me@example.com" in html and "other call" not in html
    page = ui.text(f"/messages/{msg['id']}")
    assert "removed from the draft since this test" in page and "me@example.com" in page


def test_outbox_lists_what_the_sink_received_for_this_workspace(ui, sink, app, monkeypatch):
    list_id = make_contacts(ui.api, 2)
    cid = new_campaign(ui, list_id, steps=[{"type": "email", "subject": "Hi {{ contact.first_name }}",
                                            "html": "<p>Hello <b>{{ contact.first_name }}</b></p>"}])
    ui.post(f"/campaigns/{cid}/launch")
    drain(huey, until=lambda: ui.api.get(f"/api/v1/campaigns/{cid}").json["status"] == "completed", timeout=60)
    # a call from elsewhere (another tool) is not shown
    import urllib.request

    req = urllib.request.Request(sink.url + "/v3/mail/send", method="POST", headers={
        "Authorization": "Bearer x", "Content-Type": "application/json"}, data=(
        b'{"personalizations":[{"to":[{"email":"z@example.com"}],"custom_args":{"message_key":"other"}}],'
        b'"from":{"email":"a@example.com"},"subject":"s","content":[{"type":"text/plain","value":"v"}]}'))
    urllib.request.urlopen(req, timeout=10).close()
    html = ui.text("/outbox")
    assert "person0@example.com" in html and "person1@example.com" in html and "z@example.com" not in html
    assert "1 other call on this page" in html and "202 accepted" in html
    assert "<td>Hi P0</td>" in html and "<td>Hi P1</td>" in html  # the subject as sent
    seq = re.findall(r'href="/outbox/(\d+)"', html)[0]
    detail = ui.text(f"/outbox/{seq}")
    assert "srcdoc=" in detail and "Hello &lt;b&gt;P" in detail
    # no script runs in the frame; links (the unsubscribe link) open in a new tab, outside it
    assert 'sandbox="allow-popups allow-popups-to-escape-sandbox"' in detail
    assert 'srcdoc="&lt;base target=&#34;_blank&#34;&gt;' in detail
    assert f"{sink.url}/_sink/messages/{seq}/html" in detail
    assert ui.get("/outbox/3").status_code == 404  # the other tool's call
    assert ui.get("/outbox/999").status_code == 404


    settings = app.config["HERALD_SETTINGS"]
    down = dataclasses.replace(settings, sendgrid_api_host=f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(outbox, "settings", lambda: down)
    resp = ui.get("/outbox")
    assert resp.status_code == 503 and "The local SendGrid sink is not running" in resp.get_data(as_text=True)


def test_the_outbox_exists_only_when_mail_goes_to_the_local_sink(ui, monkeypatch):
    nav_link = 'href="/outbox"'
    assert ui.get("/outbox").status_code == 200 and nav_link in ui.text("/settings")


    monkeypatch.setenv("SENDGRID_API_KEY", "SG.real")
    real = create_app({"TESTING": True})
    ws_id, name, key, email = make_workspace(password="correct horse")
    signed_in = UiClient(real, email, "correct horse", ws_id, key, name)
    assert signed_in.get("/outbox").status_code == 404
    assert signed_in.get("/outbox/1").status_code == 404
    page = signed_in.text("/settings")
    assert nav_link not in page and "Open the outbox" not in page and "SendGrid at" in page


def test_another_workspaces_ids_are_not_found(ui, other_api, sink):
    list_id = make_contacts(other_api, 1)
    resp = other_api.post("/api/v1/campaigns", json=campaign_body(list_id))
    cid = resp.json["id"]
    with session_scope() as s:
        contact_id = s.scalar(select(Contact.id))
    for path in (f"/campaigns/{cid}", f"/campaigns/{cid}/edit", f"/campaigns/{cid}/launch", f"/campaigns/{cid}/chart",
                 f"/lists/{list_id}", f"/contacts/{contact_id}"):
        assert ui.get(path).status_code == 404, path
    for path in (f"/campaigns/{cid}/launch", f"/campaigns/{cid}/cancel", f"/lists/{list_id}/delete",
                 f"/contacts/{contact_id}/delete"):
        assert ui.post(path).status_code == 404, path
    with session_scope() as s:
        assert s.get(Campaign, cid).status == "draft"


def test_chart_buckets_sends_per_minute_and_widens_long_campaigns():
    t0 = datetime(2025, 1, 1, 9, 0)
    assert chart_data([]) is None
    chart = chart_data([(t0, 3), (t0 + timedelta(minutes=2), 5)])
    assert chart["bucket"] == 1 and [b["count"] for b in chart["bars"]] == [3, 0, 5]
    assert chart["total"] == 8 and chart["peak"] == 5 and chart["ticks"][-1]["value"] == 5
    long = chart_data([(t0, 1), (t0 + timedelta(hours=5), 2)])
    assert long["bucket"] == 5 and len(long["bars"]) <= 90 and long["total"] == 3
    running = chart_data([(t0, 1)], until=t0 + timedelta(minutes=4, seconds=30))
    assert len(running["bars"]) == 5


def test_the_live_chart_is_counted_once_for_every_viewer_while_the_campaign_sends(ui, monkeypatch):
    calls = []
    real = ui_campaigns.sends_per_minute
    monkeypatch.setattr(ui_campaigns, "sends_per_minute", lambda db, cid: calls.append(cid) or real(db, cid))
    list_id = make_contacts(ui.api, 2)
    cid = new_campaign(ui, list_id)
    with session_scope() as s:
        s.execute(Campaign.__table__.update().where(Campaign.id == cid).values(status="running"))
    for _ in range(3):  # three viewers' refreshes within the chart's 2 s: one count
        assert ui.get(f"/campaigns/{cid}/chart").status_code == 200
    assert calls == [cid]
    with session_scope() as s:
        s.execute(Campaign.__table__.update().where(Campaign.id == cid).values(status="completed"))
    ui.get(f"/campaigns/{cid}/chart")
    ui.get(f"/campaigns/{cid}/chart")
    assert calls == [cid] * 3  # finished: its last figures are counted afresh each time


def test_unicode_digits_and_odd_query_keys_are_no_500(ui):
    # '²'.isdigit() is True and int('²') raises: every such parse answered 500.
    list_id = make_contacts(ui.api, 2)
    cid = new_campaign(ui, list_id)
    for path in ("/contacts?before=\u00b2", "/campaigns?before=\u00b2", "/suppressions?before=\u00b2",
                 f"/lists/{list_id}?before=\u00b2", "/messages?campaign_id=\u00b2", "/dead-letters?campaign_id=\u00b2",
                 f"/campaigns/{cid}/edit?preview_contact=\u00b2",
                 # keys of url_for's own or the view's, carried into the "Newest" link
                 "/contacts?before=999&_method=POST", "/contacts?before=999&endpoint=x",
                 f"/lists/{list_id}?before=999&list_id=2", "/contacts?before=999&_external=1&_anchor=x"):
        resp = ui.get(path)
        assert resp.status_code == 200, (path, resp.status_code)
        assert "http://localhost" not in resp.get_data(as_text=True), path  # no absolute link built from Host
    for path, data in (("/workspace", {"workspace_id": "\u00b2"}),
                       ("/campaigns/new", {"name": "x", "list_id": "\u00b2"}),
                       (f"/campaigns/{cid}/edit", {"action": "up-\u00b2"}),
                       (f"/campaigns/{cid}/edit", {"per_minute": "\u00b2", "action": "save"}),
                       (f"/campaigns/{cid}/test-send", {"email": "me@example.com", "step": "\u00b2"})):
        resp = ui.post(path, data)
        assert resp.status_code in (200, 303, 400, 422), (path, data, resp.status_code)


def test_test_send_never_redirects_off_site(ui, sink):
    list_id = make_contacts(ui.api, 1)
    cid = new_campaign(ui, list_id)
    for back in ("https://evil.example/phish", "//evil.example", "javascript:alert(1)"):
        resp = ui.post(f"/campaigns/{cid}/test-send", {"email": "me@example.com", "back": back})
        assert resp.status_code == 303 and location(resp) == f"/campaigns/{cid}/edit", back


def test_a_failed_sign_in_takes_as_long_for_an_unknown_address(app, monkeypatch):
    # The password hash was computed only for a known address: the time told which ones exist.
    from campaigns import accounts

    _, _, _, email = make_workspace(password="correct horse")
    checked = []
    real = accounts.check_password_hash
    monkeypatch.setattr(accounts, "check_password_hash", lambda h, p: checked.append(h) or real(h, p))
    with session_scope() as s:
        assert accounts.authenticate(s, email, "wrong") is None
        assert accounts.authenticate(s, "nobody-" + email, "wrong") is None
        assert accounts.authenticate(s, email, "correct horse") is not None
    assert len(checked) == 3 and checked[1].split("$")[0] == checked[0].split("$")[0]  # the same kind of hash


def test_signing_out_ends_the_session_on_the_server(app, ui):
    # The session was only a signed cookie: a copy taken before signing out kept working for 31 days.
    from campaigns.models import UserSession

    cookie = ui.client.get_cookie("session").value
    other = UiClient(app, ui.email, "correct horse", ui.workspace_id, "unused", "other browser")
    ui.post("/logout")
    thief = app.test_client()
    thief.set_cookie("session", cookie)
    resp = thief.get("/settings")
    assert resp.status_code == 302 and "/login" in location(resp)
    assert thief.get("/api/v1/queue").status_code == 401  # the API's session path too
    assert other.get("/settings").status_code == 200  # another browser of the same user stays signed in
    # an expired session is no session either
    with session_scope() as s:
        s.execute(update(UserSession).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert other.get("/settings").status_code == 302
