"""Inputs found by fuzzing the JSON API (schemathesis and by hand) that got a wrong answer.

- A test send to an address on the suppression list is refused (409) whatever form the address
  takes: email-validator's normal form (an IDNA domain in Unicode, NFC) used to miss the
  suppression of the address as given (stripped and lower-cased, like every stored address).
- Every answer of the API is one its OpenAPI document names, with a body its schema allows
  (the objects there are closed: a key the schema lacks contradicts the document).
- A test send goes to the address as contacts hold it: email-validator's normal form (above) used
  to miss the contact of that address, so the test rendered the sample contact, and the message
  log's ``?email=`` filter did not find the test under the address given.
- A test send's ``step`` is a whole number: 0.5 or "1" used to be truncated (1.9 sent the step at
  position 1) and answered 202.
- A body past MAX_CONTENT_LENGTH (413) and a session request of an unsafe method without its CSRF
  token (400, a DELETE too) are answers the document names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from sqlalchemy import func, select

from campaigns.models import Message
from tasks import huey
from tests.apidoc import assert_documented
from tests.helpers import drain, make_workspace


def campaign_body(list_id: int, **overrides) -> dict:
    body = {"name": "Fuzzed", "list_id": list_id, "from_email": "team@example.com",
            "steps": [{"type": "email", "subject": "Hi {{ contact.first_name }}", "html": "<p>Hello</p>"}]}
    body.update(overrides)
    return body


@pytest.fixture
def setup(api):
    """A list with a contact and a draft campaign on it, made through the API."""
    list_id = api.post("/api/v1/lists", json={"name": "Fuzzed list"}).json["id"]
    api.post(f"/api/v1/lists/{list_id}/members", json={"emails": ["member@example.com"]})
    campaign_id = api.post("/api/v1/campaigns", json=campaign_body(list_id)).json["id"]
    return list_id, campaign_id


# --------------------------------------------------------------------------- test sends and suppressions


@pytest.mark.parametrize("address", [
    "a@xn--bcher-kva.example",  # an IDNA domain: email-validator gives it back as 'a@bücher.example'
    "e\u0301x@example.com",  # a decomposed é: email-validator gives it back composed (NFC)
    " Shouting@Example.COM ",  # the plain case, for comparison
])
def test_test_send_refuses_an_address_suppressed_as_given(api, db, setup, address):
    _, campaign_id = setup
    resp = api.post("/api/v1/suppressions", json={"emails": [address]})
    assert resp.status_code == 200 and resp.json["added"] == 1, resp.json
    resp = api.post(f"/api/v1/campaigns/{campaign_id}/test-send", json={"email": address})
    assert resp.status_code == 409, resp.get_data(as_text=True)
    assert resp.json["error"]["code"] == "conflict" and "suppression list" in resp.json["error"]["message"]
    assert db.scalar(select(func.count()).select_from(Message)) == 0  # nothing queued


def test_test_send_still_validates_and_sends(api, db, setup):
    _, campaign_id = setup
    bad = api.post(f"/api/v1/campaigns/{campaign_id}/test-send", json={"email": "nope"})
    assert bad.status_code == 422 and "email" in bad.json["error"]["details"]
    assert api.post("/api/v1/campaigns/999999/test-send", json={"email": "nope"}).status_code == 404
    resp = api.post(f"/api/v1/campaigns/{campaign_id}/test-send", json={"email": " Me@Example.com "})
    assert resp.status_code == 202, resp.get_data(as_text=True)
    assert resp.json["email"] == "me@example.com" and resp.json["is_test"] is True


# --------------------------------------------------------------------------- the OpenAPI document


def test_message_and_queue_answers_fit_the_document(api, spec, setup):
    _, campaign_id = setup
    sent = api.post(f"/api/v1/campaigns/{campaign_id}/test-send", json={"email": "me@example.com"})
    assert_documented(spec, "post", "/api/v1/campaigns/{campaign_id}/test-send", sent)
    message_id = sent.json["id"]
    assert_documented(spec, "get", "/api/v1/messages/{message_id}", api.get(f"/api/v1/messages/{message_id}"))
    listing = api.get(f"/api/v1/messages?campaign_id={campaign_id}&status=queued&limit=5")
    assert listing.json["items"]
    assert_documented(spec, "get", "/api/v1/messages", listing)
    assert_documented(spec, "get", "/api/v1/messages", api.get("/api/v1/messages?status=bogus"))
    assert_documented(spec, "get", "/api/v1/queue", api.get("/api/v1/queue"))
    # a queued message is no dead letter
    assert_documented(spec, "post", "/api/v1/messages/{message_id}/replay",
                      api.post(f"/api/v1/messages/{message_id}/replay"))
    assert_documented(spec, "post", "/api/v1/campaigns/{campaign_id}/replay-failed",
                      api.post(f"/api/v1/campaigns/{campaign_id}/replay-failed"))
    # the stream's query is documented (a bad one is a documented 400), and its media type
    stream = spec["paths"]["/api/v1/campaigns/{campaign_id}/stream"]["get"]
    assert {p["name"] for p in stream["parameters"] if p["in"] == "query"} >= {"lifetime", "interval"}
    assert "text/event-stream" in stream["responses"]["200"]["content"]
    assert_documented(spec, "get", "/api/v1/campaigns/{campaign_id}/stream",
                      api.get(f"/api/v1/campaigns/{campaign_id}/stream?lifetime=nan"))


def test_refusals_and_second_successes_are_documented(api, spec, setup):
    list_id, campaign_id = setup
    for _ in range(2):  # 201, then 200 (the upsert updates)
        resp = api.post("/api/v1/contacts", json={"email": "x@example.com"})
        assert_documented(spec, "post", "/api/v1/contacts", resp)
    assert_documented(spec, "post", "/api/v1/lists", api.post("/api/v1/lists", json={"name": "Fuzzed list"}))  # 409
    assert_documented(spec, "get", "/api/v1/contacts", api.get("/api/v1/contacts?list_id=999999"))  # 404
    for action in ("pause", "resume"):  # a draft is neither running nor paused: 409
        resp = api.post(f"/api/v1/campaigns/{campaign_id}/{action}")
        assert resp.status_code == 409
        assert_documented(spec, "post", f"/api/v1/campaigns/{{campaign_id}}/{action}", resp)
    # a draft whose list was deleted cannot be launched: 422
    other = api.post("/api/v1/lists", json={"name": "Short-lived"}).json["id"]
    orphan = api.post("/api/v1/campaigns", json=campaign_body(other)).json["id"]
    assert api.delete(f"/api/v1/lists/{other}").status_code == 204
    resp = api.post(f"/api/v1/campaigns/{orphan}/launch")
    assert resp.status_code == 422
    assert_documented(spec, "post", "/api/v1/campaigns/{campaign_id}/launch", resp)
    resp = api.post(f"/api/v1/campaigns/{campaign_id}/cancel")  # a draft: deleted, not cancelled
    assert resp.status_code == 409 and "delete it instead" in resp.json["error"]["message"]
    assert_documented(spec, "post", "/api/v1/campaigns/{campaign_id}/cancel", resp)
    assert api.post(f"/api/v1/campaigns/{campaign_id}/launch").status_code == 202
    resp = api.post(f"/api/v1/campaigns/{campaign_id}/cancel")
    assert resp.status_code == 200 and resp.json["status"] == "cancelled"
    assert_documented(spec, "post", "/api/v1/campaigns/{campaign_id}/cancel", resp)
    for action in ("launch", "pause", "resume", "replay-failed"):  # a cancelled campaign: 409
        resp = api.post(f"/api/v1/campaigns/{campaign_id}/{action}")
        assert resp.status_code == 409
        assert_documented(spec, "post", f"/api/v1/campaigns/{{campaign_id}}/{action}", resp)
    resp = api.post(f"/api/v1/campaigns/{campaign_id}/test-send", json={"email": "x@example.com"})
    assert_documented(spec, "post", "/api/v1/campaigns/{campaign_id}/test-send", resp)
    api.post("/api/v1/suppressions", json={"emails": ["x@example.com"]})
    resp = api.post(f"/api/v1/campaigns/{campaign_id}/test-send", json={"email": "x@example.com"})
    assert resp.status_code == 409
    assert_documented(spec, "post", "/api/v1/campaigns/{campaign_id}/test-send", resp)


def test_csv_import_is_documented(api, spec, setup):
    list_id, _ = setup
    operation = spec["paths"]["/api/v1/contacts/import"]["post"]
    assert "text/csv" in operation["requestBody"]["content"]
    path = "/api/v1/contacts/import"
    csv = b"email,first_name\nimported@example.com,Ann\n"
    assert_documented(spec, "post", path, api.post(path, data=csv, content_type="text/csv"))  # 200
    resp = api.post(f"{path}?async=1&list_id={list_id}", data=csv, content_type="text/csv")
    assert resp.status_code == 202
    assert_documented(spec, "post", path, resp)
    drain(huey)  # the import runs and removes its upload (other tests look for leftovers)
    assert api.get(f"/api/v1/imports/{resp.json['import_id']}").json["status"] == "done"
    resp = api.post(f"{path}?list_id=999999", data=csv, content_type="text/csv")
    assert resp.status_code == 404
    assert_documented(spec, "post", path, resp)
    resp = api.post(path, data=csv, content_type="application/json")
    assert resp.status_code == 415
    assert_documented(spec, "post", path, resp)
    resp = api.post(path, data=b"", content_type="text/csv")
    assert resp.status_code == 400
    assert_documented(spec, "post", path, resp)
    assert_documented(spec, "get", "/api/v1/imports/{import_id}", api.get("/api/v1/imports/1"))


@pytest.mark.parametrize("address", ["ann@xn--bcher-kva.example", "e\u0301x@example.com"])
def test_test_send_renders_for_the_contact_of_the_address_given(api, db, setup, address):
    _, campaign_id = setup
    contact = api.post("/api/v1/contacts", json={"email": address, "first_name": "Ann"}).json
    assert contact["email"] == address
    resp = api.post(f"/api/v1/campaigns/{campaign_id}/test-send", json={"email": address})
    assert resp.status_code == 202, resp.get_data(as_text=True)
    assert resp.json["email"] == address  # as the contact holds it, not email-validator's normal form
    assert db.get(Message, resp.json["id"]).contact_id == contact["id"]  # rendered for Ann, not the sample
    found = api.get("/api/v1/messages", query_string={"email": address, "campaign_id": campaign_id}).json["items"]
    assert [m["id"] for m in found] == [resp.json["id"]]


# --------------------------------------------------------------------------- test send: the step


@pytest.mark.parametrize("step", [0.5, 1.9, 1.0, "1", True])
def test_test_send_refuses_a_step_that_is_not_a_whole_number(api, db, setup, step):
    _, campaign_id = setup
    resp = api.post(f"/api/v1/campaigns/{campaign_id}/test-send", json={"email": "me@example.com", "step": step})
    assert resp.status_code == 422, resp.get_data(as_text=True)
    assert "step" in resp.json["error"]["details"]
    assert db.scalar(select(func.count()).select_from(Message)) == 0  # no step was guessed and sent


def test_test_send_still_takes_a_step_position(api, setup):
    _, campaign_id = setup
    resp = api.post(f"/api/v1/campaigns/{campaign_id}/test-send", json={"email": "me@example.com", "step": 0})
    assert resp.status_code == 202, resp.get_data(as_text=True)
    assert api.post(f"/api/v1/campaigns/{campaign_id}/test-send",
                    json={"email": "me@example.com", "step": None}).status_code == 202  # null: the first email


# --------------------------------------------------------------------------- refusals before the handler's own


@pytest.fixture
def small_body_limit(app):
    before = app.config["MAX_CONTENT_LENGTH"]
    app.config["MAX_CONTENT_LENGTH"] = 1024
    yield 1024
    app.config["MAX_CONTENT_LENGTH"] = before


def test_a_body_past_the_size_limit_is_a_documented_413(api, spec, setup, small_body_limit):
    list_id, campaign_id = setup
    big = "x" * (small_body_limit + 1)
    calls = [
        ("post", "/api/v1/contacts", "/api/v1/contacts", {"json": {"email": "a@example.com", "first_name": big}}),
        ("patch", f"/api/v1/campaigns/{campaign_id}", "/api/v1/campaigns/{campaign_id}", {"json": {"name": big}}),
        ("post", f"/api/v1/campaigns/{campaign_id}/test-send", "/api/v1/campaigns/{campaign_id}/test-send",
         {"json": {"email": big}}),
        ("post", "/api/v1/suppressions", "/api/v1/suppressions", {"json": {"emails": [big]}}),
        ("post", "/api/v1/contacts/import", "/api/v1/contacts/import",
         {"data": ("email\n" + big).encode(), "content_type": "text/csv"}),
    ]
    for method, url, path, kwargs in calls:
        resp = getattr(api, method)(url, **kwargs)
        assert resp.status_code == 413, (url, resp.get_data(as_text=True))
        assert resp.json["error"]["code"] == "request_entity_too_large"
        assert_documented(spec, method, path, resp)
    # every operation that reads a body names the 413
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if isinstance(operation, dict) and "requestBody" in operation:
                assert "413" in operation["responses"], (method, path)


def test_an_unsafe_method_without_the_csrf_token_is_a_documented_400(app, spec):
    _, _, key, email = make_workspace()
    client = app.test_client()
    token = re.search(r'<meta name="csrf-token" content="([^"]+)">', client.get("/login").get_data(as_text=True))
    resp = client.post("/login", data={"email": email, "password": "correct horse", "csrf_token": token.group(1)})
    assert resp.status_code == 302
    auth = {"Authorization": f"Bearer {key}"}
    list_id = client.post("/api/v1/lists", json={"name": "Signed in"}, headers=auth).json["id"]
    contact_id = client.post("/api/v1/contacts", json={"email": "x@example.com"}, headers=auth).json["id"]
    for url, path in [
        (f"/api/v1/lists/{list_id}", "/api/v1/lists/{list_id}"),
        (f"/api/v1/contacts/{contact_id}", "/api/v1/contacts/{contact_id}"),
        ("/api/v1/suppressions/x@example.com", "/api/v1/suppressions/{email}"),
        ("/api/v1/messages/1", "/api/v1/messages/{message_id}"),
    ]:
        resp = client.delete(url)  # the session, no X-CSRFToken
        assert resp.status_code == 400 and resp.json["error"]["code"] == "csrf_failed", resp.get_data(as_text=True)
        assert_documented(spec, "delete", path, resp)
    assert client.get(f"/api/v1/lists/{list_id}").status_code == 200  # nothing was deleted
    assert client.get(f"/api/v1/contacts/{contact_id}").status_code == 200


def test_a_method_not_allowed_names_the_allowed_ones(api):
    resp = api.client.open("/api/v1/queue", method="TRACE", headers={"Authorization": f"Bearer {api.key}"})
    assert resp.status_code == 405 and resp.json["error"]["code"] == "method_not_allowed"
    assert set(resp.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "HEAD", "OPTIONS"}
    assert resp.mimetype == "application/json"


def test_a_form_encoded_body_is_told_to_use_json(api):
    # what `curl -d '{"name": ...}'` sends without -H 'Content-Type: application/json'
    resp = api.post("/api/v1/lists", data='{"name": "Prospects"}', content_type="application/x-www-form-urlencoded")
    assert resp.status_code == 400
    assert "Content-Type: application/json" in resp.json["error"]["message"]
    assert "application/x-www-form-urlencoded" in resp.json["error"]["message"]
    assert api.post("/api/v1/lists", data='{"name": "Prospects"}', content_type="application/json").status_code == 201


def test_the_readme_campaign_example_is_accepted(api):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    body = json.loads(re.search(r"```json\n(.*?)```", readme, re.S).group(1))
    body["list_id"] = api.post("/api/v1/lists", json={"name": "Prospects"}).json["id"]
    resp = api.post("/api/v1/campaigns", json=body)
    assert resp.status_code == 201, resp.json
    assert [s["type"] for s in resp.json["steps"]] == ["email", "wait", "email"]
