"""The OpenAPI document and the API's answers cannot drift apart.

- Every documented success answer of every operation is made for real (with seeded data) and its
  body checked against the documented schema in both directions: a key the schema lacks fails,
  a required key that is missing fails (response objects list every field as required).
  Covering a new operation is not optional: the test fails when the document names an
  operation or a success status it did not exercise.
- The campaign list counts a page's stats in the same few queries whatever its length.
- A text/plain (or XML...) body is refused with a 415, not parsed as JSON (issue 18.8).
- An over-long URL is a JSON 414 that the document names for every operation (issue 18.7).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import event, update

from campaigns import stats
from campaigns.db import get_engine
from campaigns.models import Event, Message, MessageAttempt
from tasks import huey
from tests.apidoc import assert_documented
from tests.helpers import campaign_body, drain, make_contacts
from web.api.blueprint import MAX_URL_BYTES

CSV = b"email,first_name\nimported@example.com,Ann\nbad-address,Bo\n"


def _documented_successes(spec: dict) -> set[tuple[str, str, str]]:
    return {
        (method, path, status)
        for path, item in spec["paths"].items()
        for method, op in item.items() if method != "parameters"
        for status in op["responses"] if status.startswith("2")
    }


class Caller:
    """Makes a request to an operation of the document, checks the answer against it, and
    notes (method, path, status) as covered."""

    def __init__(self, api, spec):
        self.api, self.spec, self.covered = api, spec, set()

    def __call__(self, method: str, template: str, status: int, query: str = "", **kwargs):
        path = template.format(**kwargs.pop("ids", {}))
        resp = getattr(self.api, method)(path + query, **kwargs)
        assert resp.status_code == status, f"{method.upper()} {path}{query}: {resp.get_data(as_text=True)[:300]}"
        assert_documented(self.spec, method, template, resp)
        self.covered.add((method, template, str(status)))
        return resp


def _make_dead_letter(db, message_id: int) -> None:
    db.execute(update(Message).where(Message.id == message_id).values(status="failed", failed_at=datetime(2026, 1, 1)))
    db.commit()


def _log_an_attempt_and_an_event(db, message_id: int) -> None:
    m = db.get(Message, message_id)
    started = datetime(2026, 1, 1, 9, 0, 0, 123456)
    db.add(MessageAttempt(workspace_id=m.workspace_id, campaign_id=m.campaign_id, message_id=m.id, number=1,
                          started_at=started, finished_at=started + timedelta(seconds=1), duration_ms=1000.04,
                          outcome="retry", http_status=503, error="try later", retry_at=started))
    db.add(Event(workspace_id=m.workspace_id, message_id=m.id, message_key=m.message_key, dedupe_key="d1",
                 event="delivered", email=m.email, timestamp=started, payload={}))
    db.commit()


V1 = "/api/v1"


def test_every_documented_success_is_answered_as_documented(api, spec, db):
    call = Caller(api, spec)
    call("get", f"{V1}/openapi.json", 200)
    # lists and contacts
    list_id = call("post", f"{V1}/lists", 201, json={"name": "Documented"}).json["id"]
    ids = {"list_id": list_id}
    contact = call("post", f"{V1}/contacts", 201, json={"email": "ann@example.com", "fields": {"plan": "pro"}}).json
    call("post", f"{V1}/contacts", 200, json={"email": "ann@example.com", "first_name": "Ann"})
    ids["contact_id"] = contact["id"]
    call("get", f"{V1}/contacts/{{contact_id}}", 200, ids=ids)
    call("patch", f"{V1}/contacts/{{contact_id}}", 200, ids=ids, json={"timezone": "Europe/Paris"})
    members = call("post", f"{V1}/lists/{{list_id}}/members", 200, ids=ids,
                   json={"emails": ["ann@example.com", "bob@example.com", "nope"], "contact_ids": [999999]})
    assert members.json["invalid"]  # an address and an id in `invalid`
    call("get", f"{V1}/lists", 200)
    call("get", f"{V1}/lists/{{list_id}}", 200, ids=ids)
    call("patch", f"{V1}/lists/{{list_id}}", 200, ids=ids, json={"name": "Documented, renamed"})
    call("get", f"{V1}/lists/{{list_id}}/members", 200, ids=ids, query="?limit=1")
    call("get", f"{V1}/contacts", 200, query=f"?list_id={list_id}")
    # suppressions
    call("post", f"{V1}/suppressions", 200, json={"emails": ["gone@example.com", "not an address"]})
    call("get", f"{V1}/suppressions", 200)
    call("delete", f"{V1}/suppressions/{{email}}", 204, ids={"email": "gone@example.com"})
    # imports
    call("post", f"{V1}/contacts/import", 200, data=CSV, content_type="text/csv")
    queued = call("post", f"{V1}/contacts/import", 202, query="?async=1", data=CSV, content_type="text/csv")
    drain(huey)
    call("get", f"{V1}/imports", 200)
    call("get", f"{V1}/imports/{{import_id}}", 200, ids={"import_id": queued.json["import_id"]})

    # a campaign, its test sends and dead letters
    body = campaign_body(list_id, send_window={"start": "00:00", "end": "23:59", "timezone": "UTC",
                                               "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]},
                         limits={"per_minute": 100})
    ids["campaign_id"] = call("post", f"{V1}/campaigns", 201, json=body).json["id"]
    call("get", f"{V1}/campaigns/{{campaign_id}}", 200, ids=ids)
    call("patch", f"{V1}/campaigns/{{campaign_id}}", 200, ids=ids, json={"name": "Renamed", "send_window": None})
    call("post", f"{V1}/campaigns/{{campaign_id}}/preview", 200, ids=ids, json={"email": "ann@example.com"})
    first = call("post", f"{V1}/campaigns/{{campaign_id}}/test-send", 202, ids=ids, json={"email": "me@example.com"})
    second = api.post(f"{V1}/campaigns/{ids['campaign_id']}/test-send", json={"email": "me@example.com"}).json
    _log_an_attempt_and_an_event(db, first.json["id"])
    _make_dead_letter(db, first.json["id"])
    _make_dead_letter(db, second["id"])
    detail = call("get", f"{V1}/messages/{{message_id}}", 200, ids={"message_id": first.json["id"]})
    assert detail.json["attempts_log"] and detail.json["events"]
    call("get", f"{V1}/messages", 200, query=f"?campaign_id={ids['campaign_id']}")
    call("post", f"{V1}/messages/{{message_id}}/replay", 202, ids={"message_id": first.json["id"]})
    call("delete", f"{V1}/messages/{{message_id}}", 204, ids={"message_id": second["id"]})

    call("post", f"{V1}/campaigns/{{campaign_id}}/launch", 202, ids=ids)
    call("post", f"{V1}/campaigns/{{campaign_id}}/pause", 200, ids=ids)
    call("post", f"{V1}/campaigns/{{campaign_id}}/resume", 200, ids=ids)
    call("post", f"{V1}/campaigns/{{campaign_id}}/replay-failed", 202, ids=ids)
    call("post", f"{V1}/campaigns/{{campaign_id}}/delete-failed", 200, ids=ids)
    call("get", f"{V1}/campaigns", 200)
    call("get", f"{V1}/queue", 200)
    call("post", f"{V1}/campaigns/{{campaign_id}}/cancel", 200, ids=ids)
    stream = call("get", f"{V1}/campaigns/{{campaign_id}}/stream", 200, ids=ids)  # ended: it closes at once
    assert "event: end" in stream.get_data(as_text=True)
    call("delete", f"{V1}/campaigns/{{campaign_id}}", 204, ids=ids)

    # what is left to delete
    call("delete", f"{V1}/lists/{{list_id}}/members/{{contact_id}}", 204, ids=ids)
    call("delete", f"{V1}/contacts/{{contact_id}}", 204, ids=ids)
    call("delete", f"{V1}/lists/{{list_id}}", 204, ids=ids)

    missing = _documented_successes(spec) - call.covered
    assert not missing, f"documented answers this test does not make (add them): {sorted(missing)}"


def test_every_operation_and_success_is_listed_by_the_coverage_check(spec):
    """The coverage check reads the document itself: a new route shows up in it."""
    successes = _documented_successes(spec)
    assert ("get", f"{V1}/campaigns", "200") in successes
    assert {("post", f"{V1}/contacts", "200"), ("post", f"{V1}/contacts", "201")} <= successes
    operations = {(m, p) for p, item in spec["paths"].items() for m in item if m != "parameters"}
    assert operations == {(m, p) for m, p, _ in successes}  # each operation has a success answer


# --------------------------------------------------------------------------- the campaign list's queries


def _statements(app, api, path: str) -> int:
    seen = []

    def count(conn, cursor, statement, parameters, context, executemany):
        seen.append(statement)

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", count)
    try:
        resp = api.get(path)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert resp.status_code == 200
    return len(seen)


def test_the_campaign_list_counts_a_page_in_a_fixed_number_of_queries(app, api):
    list_id = make_contacts(api, 2)
    for _ in range(2):
        api.post(f"{V1}/campaigns", json=campaign_body(list_id))
    stats.clear_shared()
    few = _statements(app, api, f"{V1}/campaigns?limit=20")
    for _ in range(18):
        api.post(f"{V1}/campaigns", json=campaign_body(list_id))
    stats.clear_shared()
    many = _statements(app, api, f"{V1}/campaigns?limit=20")
    assert len(api.get(f"{V1}/campaigns?limit=20").json["items"]) == 20
    assert many == few, f"2 campaigns took {few} statements, 20 took {many}"
    # a second look within the live views' sharing reuses the counts
    assert _statements(app, api, f"{V1}/campaigns?limit=20") < many


def test_the_campaign_list_counts_match_each_campaigns_own(api, sink):
    """Batched counts are the campaign's own counts (stats, stopped and skipped included)."""
    list_id = make_contacts(api, 3)
    one_email = [{"type": "email", "subject": "Hi", "html": "<p>Hi</p>"}]
    ids = [api.post(f"{V1}/campaigns", json=campaign_body(list_id, steps=one_email)).json["id"] for _ in range(2)]
    api.post(f"{V1}/campaigns/{ids[0]}/launch")
    drain(huey)
    listed = {c["id"]: c for c in api.get(f"{V1}/campaigns").json["items"]}
    for campaign_id in ids:
        own = api.get(f"{V1}/campaigns/{campaign_id}").json
        assert listed[campaign_id]["stats"] == own["stats"]
        assert [s["stats"] for s in listed[campaign_id]["steps"]] == [s["stats"] for s in own["steps"]]
    assert listed[ids[0]]["stats"]["enrolled"] == 3


# --------------------------------------------------------------------------- 415 and 414


@pytest.mark.parametrize("content_type", ["text/plain", "text/plain; charset=utf-8", "application/xml"])
def test_a_json_body_sent_as_another_type_is_415(api, spec, content_type):
    resp = api.post(f"{V1}/lists", data='{"name": "Typed"}', content_type=content_type)
    assert resp.status_code == 415 and resp.json["error"]["code"] == "unsupported_media_type"
    assert "application/json" in resp.json["error"]["message"]
    assert_documented(spec, "post", f"{V1}/lists", resp)
    assert api.get(f"{V1}/lists").json["items"] == []  # nothing was stored
    # JSON under its own names is read
    assert api.post(f"{V1}/lists", data='{"name": "Typed"}', content_type="application/json").status_code == 201
    resp = api.post(f"{V1}/lists", data='{"name": "Other"}', content_type="application/merge-patch+json")
    assert resp.status_code == 201


def test_an_over_long_url_is_a_documented_json_414(api, client, spec):
    long_query = "?email=" + "a" * MAX_URL_BYTES
    resp = api.get(f"{V1}/contacts{long_query}")
    assert resp.status_code == 414 and resp.mimetype == "application/json"
    assert str(MAX_URL_BYTES) in resp.json["error"]["message"].replace(",", "")
    assert_documented(spec, "get", f"{V1}/contacts", resp)
    assert client.get(f"{V1}/contacts{long_query}").status_code == 414  # before authentication
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method != "parameters":
                assert "414" in op["responses"], f"{method} {path}"
    just_under = "?email=" + "a" * (MAX_URL_BYTES - len(f"{V1}/contacts?email=") - 1)
    assert api.get(f"{V1}/contacts{just_under}").status_code == 200
