"""Contacts, lists, members and suppressions through the API (and the domain functions)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from campaigns import contacts, suppressions
from campaigns.db import new_session, session_scope
from campaigns.models import Campaign, Contact, ContactList, Enrollment, ListMember, Message, Step, Suppression
from tasks import jobs


def _error(resp):
    body = resp.get_json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    return body["error"]


@pytest.fixture
def notified(monkeypatch):
    """Record notify_list_changed calls, checking the new members were committed first."""

    calls = []

    def fake(list_id):
        with new_session() as s:  # another connection: sees only committed rows
            members = s.scalar(select(func.count()).select_from(ListMember).where(ListMember.list_id == list_id))
        calls.append((list_id, members))

    monkeypatch.setattr(jobs, "notify_list_changed", fake)
    return calls


# --- contacts ----------------------------------------------------------------------------------


def test_upsert_creates_then_updates(api):
    resp = api.post("/api/v1/contacts", json={
        "email": "  Ada@Example.COM ", "first_name": "Ada", "timezone": "Europe/London",
        "fields": {"plan": "pro", "seats": 3, "vip": True, "note": None},
    })
    assert resp.status_code == 201, resp.json
    c = resp.json
    assert c["email"] == "ada@example.com"
    assert c["first_name"] == "Ada" and c["last_name"] is None and c["timezone"] == "Europe/London"
    assert c["fields"] == {"plan": "pro", "seats": 3, "vip": True, "note": None}
    assert c["status"] == "active" and c["suppressed"] is False
    assert c["created_at"].endswith("Z") and c["updated_at"].endswith("Z")
    assert set(c) == {"id", "email", "first_name", "last_name", "timezone", "fields", "status", "suppressed",
                      "created_at", "updated_at"}

    again = api.post("/api/v1/contacts", json={"email": "ada@example.com", "last_name": "Lovelace",
                                               "fields": {"plan": "team", "score": 1.5}})
    assert again.status_code == 200, again.json
    assert again.json["id"] == c["id"]
    # attributes not given are kept; fields are merged key by key
    assert again.json["first_name"] == "Ada" and again.json["last_name"] == "Lovelace"
    assert again.json["timezone"] == "Europe/London"
    assert again.json["fields"] == {"plan": "team", "seats": 3, "vip": True, "note": None, "score": 1.5}

    got = api.get(f"/api/v1/contacts/{c['id']}")
    assert got.status_code == 200 and got.json == again.json


@pytest.mark.parametrize(
    "body,field",
    [
        ({"email": "not-an-address"}, "email"),
        ({"email": "a@b"}, "email"),
        ({"email": 42}, "email"),
        ({"first_name": "No Email"}, "email"),
        ({"email": "a@example.com", "timezone": "Mars/Olympus"}, "timezone"),
        ({"email": "a@example.com", "timezone": "europe/paris"}, "timezone"),
        ({"email": "a@example.com", "timezone": 5}, "timezone"),
        ({"email": "a@example.com", "first_name": ["x"]}, "first_name"),
        ({"email": "a@example.com", "first_name": "x" * 201}, "first_name"),
        ({"email": "a@example.com", "fields": {"a": {"nested": 1}}}, "fields"),
        ({"email": "a@example.com", "fields": {"a": [1, 2]}}, "fields"),
        ({"email": "a@example.com", "fields": ["a"]}, "fields"),
        ({"email": "a@example.com", "surname": "x"}, "surname"),
    ],
)
def test_contact_validation_is_422_per_field(api, body, field):
    resp = api.post("/api/v1/contacts", json=body)
    assert resp.status_code == 422, resp.json
    err = _error(resp)
    assert field in err["details"], err


@pytest.mark.parametrize(
    "data,content_type,status",
    [
        (b"", "application/json", 400),
        (b"{not json", "application/json", 400),
        (b"[1, 2]", "application/json", 400),
        (b'"a string"', "application/json", 400),
        (b"null", "application/json", 400),
        (b'{"email": "a@example.com", "fields": {"x": NaN}}', "application/json", 422),
        (b"email=a@example.com", "application/x-www-form-urlencoded", 400),
    ],
)
def test_contact_bad_bodies_never_500(api, data, content_type, status):
    resp = api.post("/api/v1/contacts", data=data, content_type=content_type)
    assert resp.status_code == status, resp.data
    _error(resp)
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Contact)) == 0


def test_contacts_listing_filters_and_cursor(api):
    ids = [api.post("/api/v1/contacts", json={"email": f"p{i}@example.com"}).json["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        resp = api.get("/api/v1/contacts", query_string={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert resp.status_code == 200, resp.json
        seen += [c["id"] for c in resp.json["items"]]
        cursor = resp.json["next_cursor"]
        if cursor is None:
            break
    assert seen == ids

    one = api.get("/api/v1/contacts?email= P3@Example.com")
    assert [c["id"] for c in one.json["items"]] == [ids[3]]
    assert api.get("/api/v1/contacts?email=nobody@example.com").json == {"items": [], "next_cursor": None}

    lst = api.post("/api/v1/lists", json={"name": "L"}).json
    api.post(f"/api/v1/lists/{lst['id']}/members", json={"contact_ids": [ids[1], ids[4]]})
    in_list = api.get(f"/api/v1/contacts?list_id={lst['id']}").json["items"]
    assert [c["id"] for c in in_list] == [ids[1], ids[4]]

    assert api.get("/api/v1/contacts?list_id=999999").status_code == 404
    for bad in ("list_id=abc", "cursor=!!", "limit=0", "limit=x", "limit=100000"):
        resp = api.get(f"/api/v1/contacts?{bad}")
        assert resp.status_code == 400, (bad, resp.json)
        _error(resp)


def test_patch_and_delete_contact(api):
    c = api.post("/api/v1/contacts", json={"email": "x@example.com", "first_name": "X", "timezone": "UTC",
                                           "fields": {"a": "1"}}).json
    other = api.post("/api/v1/contacts", json={"email": "y@example.com"}).json

    resp = api.patch(f"/api/v1/contacts/{c['id']}", json={"last_name": "Ray", "timezone": None,
                                                          "fields": {"b": 2}})
    assert resp.status_code == 200, resp.json
    assert resp.json["last_name"] == "Ray" and resp.json["timezone"] is None
    assert resp.json["first_name"] == "X" and resp.json["fields"] == {"a": "1", "b": 2}

    resp = api.patch(f"/api/v1/contacts/{c['id']}", json={"email": "X2@Example.com"})
    assert resp.status_code == 200 and resp.json["email"] == "x2@example.com"
    resp = api.patch(f"/api/v1/contacts/{c['id']}", json={"email": other["email"]})
    assert resp.status_code == 409, resp.json
    _error(resp)
    for body in ({"status": "active"}, {"email": "nope"}, {"timezone": "Nowhere/Land"}, {"fields": 3}):
        resp = api.patch(f"/api/v1/contacts/{c['id']}", json=body)
        assert resp.status_code == 422, (body, resp.json)
    assert api.patch(f"/api/v1/contacts/{c['id']}", data=b"[]", content_type="application/json").status_code == 400

    assert api.delete(f"/api/v1/contacts/{c['id']}").status_code == 204
    assert api.get(f"/api/v1/contacts/{c['id']}").status_code == 404
    assert api.delete(f"/api/v1/contacts/{c['id']}").status_code == 404
    assert api.patch("/api/v1/contacts/999999", json={"first_name": "a"}).status_code == 404


# --- lists and members -------------------------------------------------------------------------


def test_lists_crud(api):
    resp = api.post("/api/v1/lists", json={"name": " Customers "})
    assert resp.status_code == 201, resp.json
    lst = resp.json
    assert lst["name"] == "Customers" and lst["member_count"] == 0 and lst["created_at"].endswith("Z")

    dup = api.post("/api/v1/lists", json={"name": "Customers"})
    assert dup.status_code == 409 and _error(dup)["code"] == "conflict"
    for body in ({}, {"name": ""}, {"name": "   "}, {"name": 3}, {"name": "a", "x": 1}):
        resp = api.post("/api/v1/lists", json=body)
        assert resp.status_code == 422, (body, resp.json)

    second = api.post("/api/v1/lists", json={"name": "Leads"}).json
    page = api.get("/api/v1/lists?limit=1").json
    assert [x["id"] for x in page["items"]] == [lst["id"]] and page["next_cursor"]
    rest = api.get(f"/api/v1/lists?limit=1&cursor={page['next_cursor']}").json
    assert [x["id"] for x in rest["items"]] == [second["id"]] and rest["next_cursor"] is None

    renamed = api.patch(f"/api/v1/lists/{lst['id']}", json={"name": "Clients"})
    assert renamed.status_code == 200 and renamed.json["name"] == "Clients"
    assert api.patch(f"/api/v1/lists/{lst['id']}", json={"name": "Leads"}).status_code == 409
    assert api.patch(f"/api/v1/lists/{lst['id']}", json={"name": "Clients"}).status_code == 200

    assert api.delete(f"/api/v1/lists/{lst['id']}").status_code == 204
    assert api.get(f"/api/v1/lists/{lst['id']}").status_code == 404
    assert api.delete(f"/api/v1/lists/{lst['id']}").status_code == 404


def test_members_by_email_and_by_id(api, other_api, notified):
    lst = api.post("/api/v1/lists", json={"name": "L"}).json
    existing = api.post("/api/v1/contacts", json={"email": "old@example.com", "first_name": "Old"}).json
    foreign = other_api.post("/api/v1/contacts", json={"email": "theirs@example.com"}).json

    resp = api.post(f"/api/v1/lists/{lst['id']}/members", json={
        "emails": ["old@example.com", "NEW@example.com", "new@example.com", "broken", ""],
    })
    assert resp.status_code == 200, resp.json
    body = resp.json
    assert (body["added"], body["already"], body["contacts_created"]) == (2, 0, 1)
    assert sorted(i["email"] for i in body["invalid"]) == ["", "broken"]
    assert all(i["reason"] for i in body["invalid"])
    assert notified == [(lst["id"], 2)]

    resp = api.post(f"/api/v1/lists/{lst['id']}/members", json={"contact_ids": [existing["id"], foreign["id"], 987654]})
    body = resp.json
    assert (body["added"], body["already"]) == (0, 1)
    assert sorted(i["contact_id"] for i in body["invalid"]) == sorted([foreign["id"], 987654])
    assert {i["reason"] for i in body["invalid"]} == {"no such contact"}
    assert len(notified) == 1  # nothing was added: no notification

    got = api.get(f"/api/v1/lists/{lst['id']}").json
    assert got["member_count"] == 2
    members = api.get(f"/api/v1/lists/{lst['id']}/members?limit=1").json
    assert len(members["items"]) == 1 and members["next_cursor"]
    rest = api.get(f"/api/v1/lists/{lst['id']}/members?cursor={members['next_cursor']}").json
    emails = [c["email"] for c in members["items"] + rest["items"]]
    assert emails == ["old@example.com", "new@example.com"]
    # the existing contact kept its name; the foreign one was not touched
    assert members["items"][0]["first_name"] == "Old"
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(ListMember).where(ListMember.contact_id == foreign["id"])) == 0

    assert api.delete(f"/api/v1/lists/{lst['id']}/members/{existing['id']}").status_code == 204
    assert api.delete(f"/api/v1/lists/{lst['id']}/members/{existing['id']}").status_code == 404
    assert api.get(f"/api/v1/lists/{lst['id']}").json["member_count"] == 1
    # the contact itself stays
    assert api.get(f"/api/v1/contacts/{existing['id']}").status_code == 200


@pytest.mark.parametrize(
    "body",
    [{}, {"emails": "a@example.com"}, {"contact_ids": ["1"]}, {"contact_ids": [1.5]}, {"contact_ids": [True]},
     {"emails": [1]}, {"emails": [], "other": 1}],
)
def test_members_bad_bodies(api, body):
    lst = api.post("/api/v1/lists", json={"name": "L"}).json
    resp = api.post(f"/api/v1/lists/{lst['id']}/members", json=body)
    assert resp.status_code == 422, resp.json
    _error(resp)


def test_members_unknown_list(api):
    resp = api.post("/api/v1/lists/424242/members", json={"emails": ["a@example.com"]})
    assert resp.status_code == 404
    assert api.get("/api/v1/lists/424242/members").status_code == 404
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Contact)) == 0


# --- suppressions ------------------------------------------------------------------------------


def test_suppressions_bulk_list_and_delete(api):
    ann = api.post("/api/v1/contacts", json={"email": "ann@example.com"}).json
    api.post("/api/v1/contacts", json={"email": "bob@example.com"})

    resp = api.post("/api/v1/suppressions", json={
        "emails": ["Ann@example.com", "ghost@example.com", "ghost@example.com ", "nope", "x@"],
        "reason": "unsubscribe",
    })
    assert resp.status_code == 200, resp.json
    assert (resp.json["added"], resp.json["already"]) == (2, 0)
    assert sorted(i["email"] for i in resp.json["invalid"]) == ["nope", "x@"]

    # existing suppressions are kept as they were (reason unchanged), new ones added
    resp = api.post("/api/v1/suppressions", json={"emails": ["ann@example.com", "bob@example.com"]})
    assert (resp.json["added"], resp.json["already"]) == (1, 1)
    with session_scope() as s:
        reasons = dict(s.execute(select(Suppression.email, Suppression.reason)).all())
    assert reasons == {"ann@example.com": "unsubscribe", "ghost@example.com": "unsubscribe",
                       "bob@example.com": "manual"}

    got = api.get(f"/api/v1/contacts/{ann['id']}").json
    assert got["suppressed"] is True and got["status"] == "unsubscribed"
    bob = api.get("/api/v1/contacts?email=bob@example.com").json["items"][0]
    assert bob["suppressed"] is True and bob["status"] == "active"  # 'manual' leaves the status

    page = api.get("/api/v1/suppressions?limit=2").json
    rest = api.get(f"/api/v1/suppressions?cursor={page['next_cursor']}").json
    assert [x["email"] for x in page["items"] + rest["items"]] == [
        "ann@example.com", "ghost@example.com", "bob@example.com"]
    assert set(page["items"][0]) == {"id", "email", "reason", "created_at"}

    # a contact created for an address suppressed by an unsubscribe starts unsubscribed
    ghost = api.post("/api/v1/contacts", json={"email": "ghost@example.com"})
    assert ghost.status_code == 201 and ghost.json["status"] == "unsubscribed" and ghost.json["suppressed"]

    assert api.delete("/api/v1/suppressions/ANN@example.com").status_code == 204
    got = api.get(f"/api/v1/contacts/{ann['id']}").json
    assert got["suppressed"] is False and got["status"] == "active"
    resp = api.delete("/api/v1/suppressions/ann@example.com")
    assert resp.status_code == 404 and _error(resp)["code"] == "not_found"


@pytest.mark.parametrize(
    "body",
    [{}, {"emails": []}, {"emails": "a@example.com"}, {"emails": ["a@example.com"], "reason": "because"},
     {"emails": ["a@example.com"], "extra": True}, {"emails": [None]}],
)
def test_suppressions_bad_bodies(api, body):
    resp = api.post("/api/v1/suppressions", json=body)
    assert resp.status_code == 422, resp.json
    _error(resp)


def test_suppressions_bulk_limit(api):
    too_many = [f"u{i}@example.com" for i in range(contacts.MAX_BULK + 1)]
    assert api.post("/api/v1/suppressions", json={"emails": too_many}).status_code == 422
    resp = api.post("/api/v1/suppressions", json={"emails": too_many[:contacts.MAX_BULK]})
    assert resp.status_code == 200 and resp.json["added"] == contacts.MAX_BULK


def _running_enrollment(s, workspace_id, email):
    contact = Contact(workspace_id=workspace_id, email=email, fields={})
    lst = ContactList(workspace_id=workspace_id, name="seq")
    s.add_all([contact, lst])
    s.flush()
    camp = Campaign(workspace_id=workspace_id, name="c", from_email="me@example.com", list_id=lst.id,
                    status="running")
    s.add(camp)
    s.flush()
    step = Step(workspace_id=workspace_id, campaign_id=camp.id, position=0, type="email", subject="s", html="h")
    s.add(step)
    s.flush()
    enr = Enrollment(workspace_id=workspace_id, campaign_id=camp.id, contact_id=contact.id)
    s.add(enr)
    s.flush()
    msg = Message(workspace_id=workspace_id, campaign_id=camp.id, enrollment_id=enr.id, step_id=step.id,
                  contact_id=contact.id, email=email, message_key=f"k-{enr.id}-{email}")
    s.add(msg)
    s.flush()
    return contact.id, enr.id, msg.id


@pytest.mark.parametrize(
    "reason,status",
    [("unsubscribe", "unsubscribed"), ("bounce", "bounced"), ("dropped", "bounced"),
     ("spamreport", "complained"), ("manual", "active")],
)
def test_suppress_domain_function(api, reason, status):
    ws = api.workspace_id
    with session_scope() as s:
        contact_id, enr_id, msg_id = _running_enrollment(s, ws, "seq@example.com")
    with session_scope() as s:
        assert suppressions.suppress(s, ws, [" SEQ@example.com", "", "nobody@example.com"], reason) == 2
        assert suppressions.suppress(s, ws, ["seq@example.com"], reason) == 0  # kept, not duplicated
    with session_scope() as s:
        assert s.get(Contact, contact_id).status == status
        assert s.get(Enrollment, enr_id).status == "stopped"
        assert s.get(Message, msg_id).status == "cancelled"
        assert suppressions.is_suppressed(s, ws, "Seq@Example.com")
        assert suppressions.is_suppressed(s, ws, "nobody@example.com")  # no contact needed
        suppressions.unsuppress(s, ws, "nobody@example.com")
        assert not suppressions.is_suppressed(s, ws, "nobody@example.com")
        with pytest.raises(contacts.NotFound):
            suppressions.unsuppress(s, ws, "nobody@example.com")


# --- hostile input: never a 500 ----------------------------------------------------------------

HUGE = 10**20  # past BIGINT


@pytest.mark.parametrize(
    "method,url,kwargs,status",
    [
        ("post", "/api/v1/contacts", {"json": {"email": "a@example.com", "first_name": "a\x00b"}}, 422),
        ("post", "/api/v1/contacts", {"json": {"email": "a@example.com", "fields": {"k": "v\x00"}}}, 422),
        ("post", "/api/v1/contacts", {"json": {"email": "a@example.com", "fields": {"k\x00": 1}}}, 422),
        ("post", "/api/v1/contacts", {"json": {"email": "a\x00@example.com"}}, 422),
        ("post", "/api/v1/contacts", {"data": b'{"email": "a@example.com", "first_name": "\\ud800"}',
                                      "content_type": "application/json"}, 422),
        ("post", "/api/v1/contacts", {"data": b'{"email": "a@example.com", "fields": {"\\udfff": 1}}',
                                      "content_type": "application/json"}, 422),
        ("post", "/api/v1/contacts", {"data": b"[" * 100_000, "content_type": "application/json"}, 400),
        ("post", "/api/v1/contacts", {"data": b"\xff\xfe\x00{", "content_type": "application/json"}, 400),
        ("post", "/api/v1/contacts", {"json": {"email": "a@example.com", "timezone": "Europe/\x00"}}, 422),
        ("post", "/api/v1/lists", {"json": {"name": "a\x00"}}, 422),
        ("get", f"/api/v1/contacts/{HUGE}", {}, 404),
        ("patch", f"/api/v1/contacts/{HUGE}", {"json": {}}, 404),
        ("delete", f"/api/v1/contacts/{HUGE}", {}, 404),
        ("get", f"/api/v1/lists/{HUGE}", {}, 404),
        ("get", f"/api/v1/lists/{HUGE}/members", {}, 404),
        ("post", f"/api/v1/lists/{HUGE}/members", {"json": {"emails": []}}, 404),
        ("get", f"/api/v1/imports/{HUGE}", {}, 404),
        ("get", f"/api/v1/contacts?list_id={HUGE}", {}, 400),  # beyond any id: a malformed filter
        ("post", f"/api/v1/contacts/import?list_id={HUGE}", {"data": b"email\na@example.com\n",
                                                            "content_type": "text/csv"}, 400),
        ("get", "/api/v1/contacts?email=a%00b", {}, 200),
        ("delete", "/api/v1/suppressions/a%00b@example.com", {}, 404),
        ("get", "/api/v1/contacts?cursor=" + "OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5", {}, 400),
        ("get", "/api/v1/suppressions?cursor=" + "OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5", {}, 400),
    ],
)
def test_hostile_input_is_a_4xx(api, method, url, kwargs, status):
    resp = getattr(api, method)(url, **kwargs)
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True)[:300])
    if status >= 400:
        _error(resp)


def test_hostile_ids_and_addresses_in_bodies(api):
    lst = api.post("/api/v1/lists", json={"name": "L"}).json
    resp = api.post(f"/api/v1/lists/{lst['id']}/members", json={"contact_ids": [HUGE, -1, 0]})
    assert resp.status_code == 200 and resp.json["added"] == 0 and len(resp.json["invalid"]) == 3
    assert api.delete(f"/api/v1/lists/{lst['id']}/members/{HUGE}").status_code == 404
    resp = api.post("/api/v1/suppressions", json={"emails": ["a\x00@example.com", "\ud800@example.com",
                                                             "ok@example.com"]})
    assert resp.status_code == 200 and resp.json["added"] == 1 and len(resp.json["invalid"]) == 2
    resp = api.post("/api/v1/contacts", json={"email": "big@example.com", "fields": {"n": HUGE, "f": 1e300}})
    assert resp.status_code == 201 and resp.json["fields"] == {"n": HUGE, "f": 1e300}


def test_deletes_that_would_rewrite_history_are_refused(api):
    with session_scope() as s:
        contact_id, enr_id, _ = _running_enrollment(s, api.workspace_id, "busy@example.com")
        list_id = s.scalar(select(Campaign.list_id).where(Campaign.workspace_id == api.workspace_id))
    resp = api.delete(f"/api/v1/contacts/{contact_id}")
    assert resp.status_code == 409 and "Suppress the address" in _error(resp)["message"]
    resp = api.delete(f"/api/v1/lists/{list_id}")
    assert resp.status_code == 409 and _error(resp)["details"]["campaigns"]
    with session_scope() as s:
        assert s.get(Enrollment, enr_id) is not None and s.get(ContactList, list_id) is not None
        s.execute(Campaign.__table__.update().values(status="cancelled"))
    assert api.delete(f"/api/v1/lists/{list_id}").status_code == 204


def test_empty_email_filter_is_no_filter(api):
    api.post("/api/v1/contacts", json={"email": "one@example.com"})
    assert len(api.get("/api/v1/contacts?email=").json["items"]) == 1
