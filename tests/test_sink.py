"""The local SendGrid sink (sendgrid_sink/): wire format, recording, failure modes, signed events.

The sink is standalone, so these tests need no database or queue: the conftest's autouse
``database`` and ``clean_state`` fixtures are replaced by no-ops for this module.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import python_http_client.exceptions as http_exc
import sendgrid
from sendgrid.helpers.eventwebhook import EventWebhook
from sendgrid.helpers.mail import CustomArg, Header, Mail

from sendgrid_sink import (
    MAX_BODY_BYTES,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    create_sink_app,
    generate_key_pair,
    make_sink_server,
    run_sink,
    sign_events,
)

MESSAGE_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")
AUTH = {"Authorization": "Bearer SG.test"}


@pytest.fixture(scope="session")
def database():
    """No database for the sink's tests (overrides the conftest's session fixture)."""
    yield None


@pytest.fixture(autouse=True)
def clean_state():
    """Nothing to clean: every test builds its own sink."""
    yield


@pytest.fixture
def sink_app():
    app = create_sink_app({"TESTING": True})
    yield app
    app.extensions["sendgrid_sink"].close()


@pytest.fixture
def sink(sink_app):
    return sink_app.test_client()


@pytest.fixture
def state(sink_app):
    return sink_app.extensions["sendgrid_sink"]


def mail(key: str | None = "key-1", to: str = "ann@example.com", **overrides) -> dict:
    body = {
        "personalizations": [{"to": [{"email": to, "name": "Ann"}]}],
        "from": {"email": "team@herald.test", "name": "Herald"},
        "reply_to": {"email": "reply+tok@inbound.herald.test"},
        "subject": "Hello <Ann>",
        "content": [
            {"type": "text/plain", "value": "Hi Ann"},
            {"type": "text/html", "value": "<p>Hi <b>Ann</b></p>"},
        ],
        "custom_args": {"campaign_id": "7"},
        "headers": {"List-Unsubscribe": "<https://herald.test/u/tok>"},
        "tracking_settings": {"click_tracking": {"enable": True}, "open_tracking": {"enable": False}},
    }
    if key is not None:
        body["personalizations"][0]["custom_args"] = {"message_key": key}
    body.update(overrides)
    return body


def send(client, body, headers=None, **kw):
    return client.post("/v3/mail/send", json=body, headers={**AUTH, **(headers or {})}, **kw)


def assert_error_shape(resp, status: int) -> list[dict]:
    assert resp.status_code == status, resp.data
    data = resp.get_json()
    assert set(data) == {"errors"} and data["errors"]
    for err in data["errors"]:
        assert set(err) == {"message", "field", "help"}
    return data["errors"]


def wait_for(predicate, timeout: float = 3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


# --------------------------------------------------------------------------- mail send


def test_accepts_valid_mail_and_records_everything(sink):
    resp = send(sink, mail(), headers={"Idempotency-Key": "key-1"})
    assert resp.status_code == 202
    assert resp.data == b""
    message_id = resp.headers["X-Message-Id"]
    assert MESSAGE_ID.match(message_id)

    rec = sink.get("/_sink/messages/1").get_json()
    assert rec["seq"] == 1 and rec["status"] == 202 and rec["message_id"] == message_id
    assert isinstance(rec["time"], float) and abs(rec["time"] - time.time()) < 5
    assert rec["idempotency_key"] == "key-1"
    assert rec["key"] == "key-1"
    assert rec["custom_args"] == {"campaign_id": "7", "message_key": "key-1"}
    assert rec["to"] == ["ann@example.com"]
    assert rec["from"] == {"email": "team@herald.test", "name": "Herald"}
    assert rec["reply_to"] == {"email": "reply+tok@inbound.herald.test"}
    assert rec["subject"] == "Hello <Ann>"
    assert rec["html"] == "<p>Hi <b>Ann</b></p>" and rec["text"] == "Hi Ann"
    assert rec["headers"] == {"List-Unsubscribe": "<https://herald.test/u/tok>"}
    assert rec["tracking_settings"]["click_tracking"] == {"enable": True}
    assert rec["errors"] is None


def test_each_call_gets_its_own_message_id(sink):
    ids = {send(sink, mail()).headers["X-Message-Id"] for _ in range(5)}
    assert len(ids) == 5


@pytest.mark.parametrize(
    "auth, message",
    [
        (None, "authorization required"),
        ("Bearer ", "The provided authorization grant is invalid, expired, or revoked"),
        ("Basic dXNlcjpwYXNz", "The provided authorization grant is invalid, expired, or revoked"),
    ],
)
def test_unauthorized(sink, auth, message):
    headers = {"Authorization": auth} if auth is not None else {}
    resp = sink.post("/v3/mail/send", json=mail(), headers=headers)
    errors = assert_error_shape(resp, 401)
    assert errors == [{"message": message, "field": None, "help": None}]
    stats = sink.get("/_sink/stats").get_json()
    assert stats["calls"] == 1 and stats["accepted"] == 0 and stats["by_status"] == {"401": 1}


def test_configured_api_key_is_enforced():
    app = create_sink_app({"SINK_API_KEY": "SG.right"})
    client = app.test_client()
    assert send(client, mail(), headers={"Authorization": "Bearer SG.wrong"}).status_code == 401
    assert send(client, mail(), headers={"Authorization": "Bearer SG.right"}).status_code == 202


def _without(body: dict, *keys: str) -> dict:
    for k in keys:
        body.pop(k)
    return body


def _personalization(**fields) -> dict:
    body = mail()
    body["personalizations"][0].update(fields)
    return body


BAD_BODIES = [
    ("no personalizations", _without(mail(), "personalizations"), "personalizations",
     "The personalizations field is required and must have at least one personalization."),
    ("empty personalizations", mail(personalizations=[]), "personalizations",
     "The personalizations field is required and must have at least one personalization."),
    ("1001 personalizations",
     mail(personalizations=[{"to": [{"email": f"u{i}@example.com"}]} for i in range(1001)]),
     "personalizations", "The personalization block is limited to 1000 personalizations per API request."),
    ("personalization without to", mail(personalizations=[{"subject": "x"}]), "personalizations.0.to",
     "The to array is required for all personalization objects"),
    ("empty to", _personalization(to=[]), "personalizations.0.to",
     "The to array is required for all personalization objects"),
    ("to without email", _personalization(to=[{"name": "Ann"}]), "personalizations.0.to.0.email",
     "The to email parameter is required."),
    ("invalid to address", _personalization(to=[{"email": "not-an-address"}]),
     "personalizations.0.to.0.email", "Does not contain a valid address."),
    ("duplicate recipient", _personalization(cc=[{"email": "ANN@example.com"}]), "personalizations.0",
     "Each email address in the personalization block should be unique"),
    ("no from", _without(mail(), "from"), "from.email",
     "The from object must be provided for every email send."),
    ("from without email", mail(**{"from": {"name": "Herald"}}), "from.email",
     "The from object must be provided for every email send."),
    ("invalid from", mail(**{"from": {"email": "herald"}}), "from.email",
     "The from email does not contain a valid address."),
    ("no subject", _without(mail(), "subject"), "subject", "The subject is required."),
    ("no content", _without(mail(), "content"), "content",
     "Unless a valid template_id is provided, the content parameter is required."),
    ("empty content", mail(content=[]), "content",
     "Unless a valid template_id is provided, the content parameter is required."),
    ("empty content value", mail(content=[{"type": "text/html", "value": ""}]), "content.0.value",
     "The content value must be a string at least one character in length."),
    ("html before text", mail(content=[{"type": "text/html", "value": "<p>x</p>"},
                                       {"type": "text/plain", "value": "x"}]),
     "content", "Following RFC 1341, section 7.2"),
    ("integer custom arg", mail(custom_args={"campaign_id": 7}), "custom_args.campaign_id",
     "All values of custom arguments object must be strings"),
    ("integer personalization custom arg", _personalization(custom_args={"message_key": 12}),
     "personalizations.0.custom_args.message_key", "All values of custom arguments object must be strings"),
    ("empty custom_args", mail(custom_args={}), "custom_args", "custom_args cannot be empty."),
    ("reserved header", mail(headers={"Subject": "x"}), "headers.Subject",
     "Header can not be one of the reserved keys."),
    ("non-string header", mail(headers={"X-Count": 3}), "headers.X-Count", "The header values must be strings."),
]


@pytest.mark.parametrize("body, field, message", [b[1:] for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES])
def test_rejects_what_sendgrid_rejects(sink, body, field, message):
    errors = assert_error_shape(send(sink, body), 400)
    assert any(e["field"] == field and e["message"].startswith(message) for e in errors), errors
    rec = sink.get("/_sink/messages/1").get_json()
    assert rec["status"] == 400 and rec["message_id"] is None and rec["errors"] == errors


def test_subject_per_personalization_or_template_is_enough(sink):
    body = _without(mail(), "subject")
    body["personalizations"][0]["subject"] = "Per person"
    assert send(sink, body).status_code == 202
    templated = _without(mail(), "subject", "content")
    templated["template_id"] = "d-0123456789abcdef0123456789abcdef"
    assert send(sink, templated).status_code == 202
    assert sink.get("/_sink/messages/1").get_json()["subject"] == "Per person"


def test_1000_personalizations_are_accepted(sink):
    body = mail(personalizations=[{"to": [{"email": f"u{i}@example.com"}]} for i in range(1000)])
    assert send(sink, body).status_code == 202


@pytest.mark.parametrize(
    "raw, status, message",
    [
        (b"{not json", 400, "Bad Request"),
        (b"[1, 2]", 400, "Invalid type. Expected: object, given: array."),
        (b"", 400, "Bad Request"),
        (b"\xff\xfe{}", 415, "Invalid UTF8 in request"),
    ],
)
def test_rejects_bodies_that_are_not_json_objects(sink, raw, status, message):
    resp = sink.post("/v3/mail/send", data=raw, headers={**AUTH, "Content-Type": "application/json"})
    errors = assert_error_shape(resp, status)
    assert errors[0]["message"] == message


def test_payload_over_20_mb_is_413(sink):
    body = json.dumps(mail(content=[{"type": "text/plain", "value": "x" * MAX_BODY_BYTES}])).encode()
    assert len(body) > MAX_BODY_BYTES
    resp = sink.post("/v3/mail/send", data=body, headers={**AUTH, "Content-Type": "application/json"})
    assert_error_shape(resp, 413)
    rec = sink.get("/_sink/messages?fields=summary").get_json()["messages"][0]
    assert rec["status"] == 413


def test_custom_args_are_merged_personalization_wins(sink):
    body = mail(custom_args={"campaign_id": "7", "message_key": "top", "step": "1"})
    body["personalizations"][0]["custom_args"] = {"message_key": "mine"}
    assert send(sink, body).status_code == 202
    rec = sink.get("/_sink/messages/1").get_json()
    assert rec["custom_args"] == {"campaign_id": "7", "message_key": "mine", "step": "1"}
    assert rec["key"] == "mine"


def test_every_call_is_recorded_and_repeats_are_counted(sink):
    for _ in range(3):
        send(sink, mail("dup"), headers={"Idempotency-Key": "dup"})
    send(sink, mail("once"), headers={"Idempotency-Key": "once"})
    send(sink, mail("dup"), headers={"Authorization": ""})  # refused calls count too

    assert sink.get("/_sink/keys").get_json() == {"dup": 4, "once": 1}
    assert sink.get("/_sink/keys?accepted=1").get_json() == {"dup": 3, "once": 1}
    assert sink.get("/_sink/keys?by=idempotency").get_json() == {"dup": 3, "once": 1}
    stats = sink.get("/_sink/stats").get_json()
    assert stats["calls"] == 5 and stats["accepted"] == 4
    assert stats["by_status"] == {"202": 4, "401": 1}
    assert stats["keys"] == {"distinct": 2, "repeated": 1, "max_repeats": 3, "max_calls": 4}
    assert stats["accepted_keys"]["max_repeats"] == 2

    listed = sink.get("/_sink/messages?key=dup").get_json()
    assert listed["count"] == 4 and [m["seq"] for m in listed["messages"]] == [1, 2, 3, 5]
    ids = [m["message_id"] for m in listed["messages"][:3]]
    assert len(set(ids)) == 3


def test_message_listing_filters(sink):
    for i in range(5):
        send(sink, mail(f"k{i}"))
    send(sink, _without(mail("bad"), "from"))
    summary = sink.get("/_sink/messages?fields=summary&since=3").get_json()
    assert summary["count"] == 3
    assert [m["seq"] for m in summary["messages"]] == [4, 5, 6]
    assert set(summary["messages"][0]) >= {"seq", "time", "key", "to", "status"}
    assert "html" not in summary["messages"][0]
    assert sink.get("/_sink/messages?status=400").get_json()["count"] == 1
    assert sink.get("/_sink/messages?limit=2").get_json()["count"] == 2
    assert sink.get("/_sink/messages/99").status_code == 404
    assert sink.get("/_sink/messages?since=x").status_code == 400


def test_old_calls_keep_only_light_details():
    app = create_sink_app({"SINK_MAX_STORED_BODIES": 2})
    client = app.test_client()
    for i in range(3):
        send(client, mail(f"k{i}"))
    first = client.get("/_sink/messages/1").get_json()
    assert first["truncated"] and "html" not in first and first["key"] == "k0" and first["to"] == ["ann@example.com"]
    assert first["status"] == 202 and first["custom_args"]["message_key"] == "k0"
    assert client.get("/_sink/messages/1/html").status_code == 200
    assert client.get("/_sink/messages/3").get_json()["html"] == "<p>Hi <b>Ann</b></p>"
    assert client.get("/_sink/stats").get_json()["calls"] == 3


# --------------------------------------------------------------------------- failure modes


def test_429_for_n_calls_with_rate_limit_headers_then_back_to_normal(sink):
    resp = sink.post("/_sink/behaviour", json={"mode": "429", "count": 2, "reset_in": 30})
    assert resp.status_code == 200
    now = time.time()
    for _ in range(2):
        resp = send(sink, mail())
        errors = assert_error_shape(resp, 429)
        assert errors[0]["message"] == "too many requests"
        assert int(resp.headers["X-RateLimit-Limit"]) > 0
        assert resp.headers["X-RateLimit-Remaining"] == "0"
        assert now + 28 <= int(resp.headers["X-RateLimit-Reset"]) <= now + 32
    assert send(sink, mail()).status_code == 202
    statuses = [m["status"] for m in sink.get("/_sink/messages?fields=summary").get_json()["messages"]]
    assert statuses == [429, 429, 202]


def test_503_for_n_calls_then_202(sink):
    sink.post("/_sink/behaviour", json={"mode": "5xx", "status": 503, "count": 3})
    assert [send(sink, mail()).status_code for _ in range(4)] == [503, 503, 503, 202]
    assert sink.get("/_sink/stats").get_json()["by_status"] == {"503": 3, "202": 1}


def test_behaviour_for_some_seconds(sink):
    sink.post("/_sink/behaviour", json={"mode": "5xx", "seconds": 0.5})
    assert send(sink, mail()).status_code == 500
    time.sleep(0.55)
    assert send(sink, mail()).status_code == 202


def test_behaviour_queue_and_ok(sink):
    sink.post("/_sink/behaviour", json=[{"mode": "429", "count": 1}, {"mode": "502", "count": 1}])
    assert [send(sink, mail()).status_code for _ in range(3)] == [429, 502, 202]
    sink.post("/_sink/behaviour", json={"mode": "5xx"})
    assert send(sink, mail()).status_code == 500
    sink.post("/_sink/behaviour", json={"mode": "ok"})
    assert send(sink, mail()).status_code == 202
    assert sink.get("/_sink/behaviour").get_json() == {"behaviours": []}
    sink.post("/_sink/behaviour", json=[{"mode": "ok", "count": 2}, {"mode": "429", "count": 1}])
    assert [send(sink, mail()).status_code for _ in range(4)] == [202, 202, 429, 202]
    assert sink.post("/_sink/behaviour", json={"mode": "sometimes"}).status_code == 400


def test_unauthenticated_calls_do_not_use_up_a_behaviour(sink):
    sink.post("/_sink/behaviour", json={"mode": "429", "count": 1})
    assert sink.post("/v3/mail/send", json=mail()).status_code == 401
    assert send(sink, mail()).status_code == 429


def test_slow_answers_202_after_the_delay(sink):
    sink.post("/_sink/behaviour", json={"mode": "slow", "delay": 0.2, "count": 1})
    started = time.monotonic()
    resp = send(sink, mail())
    assert resp.status_code == 202 and MESSAGE_ID.match(resp.headers["X-Message-Id"])
    assert time.monotonic() - started >= 0.19


def test_hang_without_a_socket_is_recorded_as_dropped(sink):
    sink.post("/_sink/behaviour", json={"mode": "hang", "delay": 0.05, "count": 1})
    assert send(sink, mail()).status_code == 504  # the test client has no socket to drop
    rec = sink.get("/_sink/messages/1").get_json()
    assert rec["status"] is None and rec["message_id"] is None
    assert sink.get("/_sink/stats").get_json()["by_status"] == {"dropped": 1}


def test_fail_addresses_until_cleared(sink):
    resp = sink.post("/_sink/fail-addresses", json={"emails": ["Bad@Example.com"], "status": 400})
    assert resp.get_json()["emails"] == ["bad@example.com"]
    errors = assert_error_shape(send(sink, mail(to="bad@example.com")), 400)
    assert errors == [{
        "message": "Does not contain a valid address.",
        "field": "personalizations.0.to.0.email",
        "help": "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html#message.personalizations.to",
    }]
    assert send(sink, mail(to="good@example.com")).status_code == 202
    assert sink.delete("/_sink/fail-addresses").status_code == 200
    assert send(sink, mail(to="bad@example.com")).status_code == 202


def test_reset_clears_records_and_behaviours(sink):
    sink.post("/_sink/fail-addresses", json={"emails": ["bad@example.com"]})
    sink.post("/_sink/behaviour", json={"mode": "429"})
    send(sink, mail())
    assert sink.post("/_sink/reset").status_code == 200
    stats = sink.get("/_sink/stats").get_json()
    assert stats["calls"] == 0 and stats["keys"]["distinct"] == 0 and stats["behaviours"] == []
    assert sink.get("/_sink/keys").get_json() == {}
    assert send(sink, mail(to="bad@example.com")).status_code == 202
    assert sink.get("/_sink/messages").get_json()["messages"][0]["seq"] == 1


# --------------------------------------------------------------------------- outbox


def test_outbox_lists_newest_first_and_renders_html_sandboxed(sink):
    send(sink, mail("first", subject="First"))
    evil = "<script>alert(1)</script><p onclick=\"x()\">Hi</p>"
    send(sink, mail("second", subject="Second <b>", content=[{"type": "text/html", "value": evil}]))
    page = sink.get("/").get_data(as_text=True)
    assert page.index("Second &lt;b&gt;") < page.index("First")
    assert "<script" not in page and "<link" not in page
    assert sink.get("/_sink/outbox").status_code == 200

    detail = sink.get("/_sink/messages/2/html")
    assert detail.status_code == 200 and "text/html" in detail.content_type
    text = detail.get_data(as_text=True)
    # no script runs in the frame (no allow-scripts); links open in a new tab, outside it
    assert '<iframe sandbox="allow-popups allow-popups-to-escape-sandbox"' in text
    assert ('srcdoc="&lt;base target=&quot;_blank&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;'
            '&lt;p onclick=&quot;x()&quot;&gt;Hi&lt;/p&gt;"') in text
    assert "<script" not in text
    assert "default-src 'none'" in detail.headers["Content-Security-Policy"]


# --------------------------------------------------------------------------- signatures


def test_sign_events_round_trip_with_sendgrid_event_webhook():
    private_key, public_key = generate_key_pair()
    payload = '[{"email":"ann@example.com","event":"delivered","timestamp":1700000000}]\r\n'
    timestamp = "1700000005"
    signature = sign_events(private_key, payload.encode(), timestamp)
    webhook = EventWebhook(public_key)
    assert webhook.verify_signature(payload, signature, timestamp)
    assert not webhook.verify_signature(payload.replace("delivered", "bounce"), signature, timestamp)
    assert not webhook.verify_signature(payload, signature, "1700000006")
    _, other_public_key = generate_key_pair()
    assert not EventWebhook(other_public_key).verify_signature(payload, signature, timestamp)


def test_configured_private_key_gives_its_public_key():
    from cryptography.hazmat.primitives import serialization

    private_key, public_key = generate_key_pair()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    client = create_sink_app({"SINK_EVENT_PRIVATE_KEY_PEM": pem}).test_client()
    assert client.get("/_sink/event-public-key").get_data(as_text=True) == public_key
    assert client.get("/_sink/event-public-key?format=json").get_json() == {"public_key": public_key}
    assert sign_events(pem, b"[]\r\n", 1) and EventWebhook(public_key).verify_signature(
        "[]\r\n", sign_events(pem, b"[]\r\n", 1), "1"
    )


class _Receiver:
    """A stand-in for Herald's webhook endpoint that keeps raw bodies and headers."""

    def __init__(self, status: int = 200):
        received: list[tuple[dict, bytes]] = []
        self.received = received
        self.status = status
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((dict(self.headers), body))
                self.send_response(outer.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhooks/sendgrid/events"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def events(self) -> list[dict]:
        return [e for _, body in self.received for e in json.loads(body)]

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def receiver():
    r = _Receiver()
    yield r
    r.close()


def _verify(public_key: str, headers: dict, body: bytes) -> bool:
    return EventWebhook(public_key).verify_signature(
        body.decode("utf-8"), headers[SIGNATURE_HEADER], headers[TIMESTAMP_HEADER]
    )


def test_accepted_messages_produce_signed_processed_and_delivered_events(receiver):
    app = create_sink_app({"SINK_EVENTS_URL": receiver.url, "SINK_EVENT_INTERVAL": 0.05})
    client = app.test_client()
    try:
        public_key = client.get("/_sink/event-public-key").get_data(as_text=True)
        message_id = send(client, mail("evt-1")).headers["X-Message-Id"]
        assert send(client, _without(mail("evt-2"), "from")).status_code == 400  # no events for refusals
        events = wait_for(lambda: len(receiver.events()) >= 2 and receiver.events())
        time.sleep(0.15)
        assert len(receiver.events()) == 2
        for headers, body in receiver.received:
            assert body.endswith(b"\r\n")
            assert _verify(public_key, headers, body)
            assert not EventWebhook(public_key).verify_signature(
                body.decode().replace("ann@", "bob@"), headers[SIGNATURE_HEADER], headers[TIMESTAMP_HEADER]
            )
        assert [e["event"] for e in events] == ["processed", "delivered"]
        for event in events:
            assert event["email"] == "ann@example.com"
            assert isinstance(event["timestamp"], int)
            assert event["message_key"] == "evt-1" and event["campaign_id"] == "7"
            assert event["sg_message_id"].startswith(message_id + ".filterdrecv")
            assert event["smtp-id"].startswith(f"<{message_id}@")
        assert len({e["sg_event_id"] for e in events}) == 2
        stats = client.get("/_sink/stats").get_json()["events"]
        assert stats["posted"] == 2 and stats["failed_posts"] == 0
    finally:
        app.extensions["sendgrid_sink"].close()


def test_failed_event_posts_are_retried(receiver):
    receiver.status = 500
    app = create_sink_app({"SINK_EVENTS_URL": receiver.url, "SINK_EVENT_INTERVAL": 0.02})
    client = app.test_client()
    try:
        send(client, mail("retry"))
        wait_for(lambda: len(receiver.received) >= 2)
        receiver.status = 200
        wait_for(lambda: client.get("/_sink/stats").get_json()["events"]["posted"] == 2)
        bodies = {body for _, body in receiver.received}
        assert len(bodies) == 1  # the same batch, posted again
    finally:
        app.extensions["sendgrid_sink"].close()


def test_events_for_one_message_share_its_sg_message_id_whenever_they_happen():
    """SendGrid names a recipient's copy when it accepts the message; a click a minute after the
    bounce carries the same sg_message_id (CI once saw them differ across a second boundary)."""
    app = create_sink_app({"SINK_AUTO_EVENTS": ""})
    client = app.test_client()
    state = app.extensions["sendgrid_sink"]
    try:
        send(client, mail("same-id"))
        rec = state.find_for_key("same-id")
        (early,) = state.build_events(rec, ["bounce"], timestamp=int(rec["time"]))
        (late,) = state.build_events(rec, ["click"], timestamp=int(rec["time"]) + 61)
        assert late["timestamp"] - early["timestamp"] == 61
        assert early["sg_message_id"] == late["sg_message_id"]
        assert early["sg_event_id"] != late["sg_event_id"]
    finally:
        state.close()


def test_post_event_on_demand(receiver):
    app = create_sink_app({"SINK_AUTO_EVENTS": ""})
    client = app.test_client()
    try:
        public_key = client.get("/_sink/event-public-key").get_data(as_text=True)
        message_id = send(client, mail("bounce-me")).headers["X-Message-Id"]
        assert client.post("/_sink/events", json={"key": "bounce-me", "event": "bounce"}).status_code == 409
        assert client.post("/_sink/events-url", json={"url": receiver.url}).get_json() == {"url": receiver.url}

        resp = client.post("/_sink/events", json={"key": "bounce-me", "event": "bounce", "reason": "550 no"})
        assert resp.status_code == 200 and resp.get_json()["status"] == 200
        headers, body = receiver.received[-1]
        assert _verify(public_key, headers, body)
        (event,) = json.loads(body)
        assert event["event"] == "bounce" and event["reason"] == "550 no" and event["message_key"] == "bounce-me"
        assert event["sg_message_id"].startswith(message_id + ".")

        resp = client.post("/_sink/events", json={"seq": 1, "event": "click", "url": "https://x.test/a"})
        (click,) = json.loads(receiver.received[-1][1])
        assert click["url"] == "https://x.test/a" and click["sg_message_id"] == event["sg_message_id"]
        assert click["sg_event_id"] != event["sg_event_id"]

        client.post("/_sink/events", json={"seq": 1, "event": "open", "bad_signature": True})
        assert not _verify(public_key, *receiver.received[-1])
        assert client.post("/_sink/events", json={"key": "nope", "event": "open"}).status_code == 404
        assert len(receiver.received) == 3  # nothing automatic: SINK_AUTO_EVENTS is empty
    finally:
        app.extensions["sendgrid_sink"].close()


# --------------------------------------------------------------------------- real HTTP


@pytest.fixture
def served(capsys):
    """run_sink itself, in a background thread on a free port."""
    ready: list = []
    thread = threading.Thread(target=run_sink, kwargs={"host": "127.0.0.1", "port": 0, "on_ready": ready.append},
                              daemon=True)
    thread.start()
    server = wait_for(lambda: ready and ready[0])
    assert capsys.readouterr().out.startswith(f"SendGrid sink on {server.url} ")  # one line with the URL
    yield server
    server.shutdown()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_official_sendgrid_client_against_run_sink(served):
    sg = sendgrid.SendGridAPIClient(api_key="test", host=served.url)
    message = Mail(
        from_email=("team@herald.test", "Herald"),
        to_emails="ann@example.com",
        subject="Library wire format",
        plain_text_content="Hi Ann",
        html_content="<p>Hi Ann</p>",
    )
    message.custom_arg = CustomArg("message_key", "lib-1")
    message.header = Header("List-Unsubscribe", "<https://herald.test/u/tok>")
    response = sg.client.mail.send.post(request_body=message.get(), request_headers={"Idempotency-Key": "lib-1"})
    assert response.status_code == 202
    message_id = response.headers["X-Message-Id"]
    assert MESSAGE_ID.match(message_id)

    rec = served.state.get(1)
    assert rec["status"] == 202 and rec["message_id"] == message_id
    assert rec["key"] == "lib-1" and rec["idempotency_key"] == "lib-1"
    assert rec["to"] == ["ann@example.com"] and rec["from"] == {"email": "team@herald.test", "name": "Herald"}
    assert rec["subject"] == "Library wire format" and rec["html"] == "<p>Hi Ann</p>" and rec["text"] == "Hi Ann"
    assert rec["user_agent"].startswith("sendgrid/")

    served.state.set_behaviours([{"mode": "429", "count": 1, "reset_in": 5}])
    with pytest.raises(http_exc.TooManyRequestsError) as rate_limited:
        sg.send(message)
    assert rate_limited.value.status_code == 429
    assert rate_limited.value.headers["X-RateLimit-Remaining"] == "0"
    assert json.loads(rate_limited.value.body)["errors"][0]["message"] == "too many requests"

    served.state.set_behaviours([{"mode": "5xx", "status": 503, "count": 1}])
    with pytest.raises(http_exc.ServiceUnavailableError):
        sg.send(message)

    with pytest.raises(http_exc.BadRequestsError) as bad:
        sg.send(Mail(from_email="team@herald.test", to_emails="ann@example.com", subject="No content"))
    assert json.loads(bad.value.body)["errors"][0]["field"] == "content"

    no_key = sendgrid.SendGridAPIClient(api_key="test", host=served.url)
    no_key.client.request_headers["Authorization"] = "Basic dGVzdA=="
    with pytest.raises(http_exc.UnauthorizedError):
        no_key.send(message)

    assert sg.send(message).status_code == 202
    statuses = [r["status"] for r in served.state.select()]
    assert statuses == [202, 429, 503, 400, 401, 202]
    assert served.state.key_counts() == {"lib-1": 5}


def test_hang_holds_the_request_until_the_client_times_out(served):
    served.state.set_behaviours([{"mode": "hang", "delay": 30, "count": 1}])
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            conn.request("POST", "/v3/mail/send", json.dumps(mail()), {**AUTH, "Content-Type": "application/json"})
            conn.getresponse()
    finally:
        conn.close()
    assert time.monotonic() - started < 2
    served.state.reset()  # wakes the held request, which then drops its connection
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=5)
    try:
        conn.request("POST", "/v3/mail/send", json.dumps(mail()), {**AUTH, "Content-Type": "application/json"})
        assert conn.getresponse().status == 202
    finally:
        conn.close()


def test_dropped_connection_is_seen_by_the_client():
    with make_sink_server() as server:
        server.state.set_behaviours([{"mode": "hang", "delay": 0.05, "count": 1}])
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
                conn.request("POST", "/v3/mail/send", json.dumps(mail()), {**AUTH, "Content-Type": "application/json"})
                conn.getresponse()
        finally:
            conn.close()
        assert server.state.stats()["by_status"] == {"dropped": 1}


def test_real_server_keep_alive_chunked_and_413():
    with make_sink_server() as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            for _ in range(3):  # one connection, several requests
                conn.request("POST", "/v3/mail/send", json.dumps(mail()), {**AUTH, "Content-Type": "application/json"})
                resp = conn.getresponse()
                assert resp.status == 202 and resp.read() == b""
            chunks = iter([json.dumps(mail("chunked")).encode()[:50], json.dumps(mail("chunked")).encode()[50:]])
            conn.request("POST", "/v3/mail/send", chunks, {**AUTH, "Content-Type": "application/json"},
                         encode_chunked=True)
            resp = conn.getresponse()
            assert resp.status == 202, resp.read()
            resp.read()
            conn.request("GET", "/_sink/stats")
            stats = json.loads(conn.getresponse().read())
            assert stats["calls"] == 4 and stats["keys"]["distinct"] == 2
        finally:
            conn.close()

        big = b'{"x": "' + b"a" * MAX_BODY_BYTES + b'"}'
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            conn.request("POST", "/v3/mail/send", big, {**AUTH, "Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 413
            assert set(json.loads(resp.read())["errors"][0]) == {"message", "field", "help"}
        finally:
            conn.close()


def test_concurrent_clients_are_all_recorded():
    with make_sink_server() as server:
        errors: list[BaseException] = []

        def client(n: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
            try:
                for i in range(50):
                    conn.request("POST", "/v3/mail/send", json.dumps(mail(f"c{n}-{i % 10}")),
                                 {**AUTH, "Content-Type": "application/json"})
                    resp = conn.getresponse()
                    resp.read()
                    assert resp.status == 202
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)
            finally:
                conn.close()

        threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        stats = server.state.stats()
        assert stats["calls"] == stats["accepted"] == 400
        assert stats["keys"] == {"distinct": 80, "repeated": 80, "max_repeats": 4, "max_calls": 5}
        assert [r["seq"] for r in server.state.select()] == list(range(1, 401))


def test_nothing_listens_before_run():
    # Importing and building the app binds no port and starts no thread.
    before = set(threading.enumerate())
    app = create_sink_app()
    assert not set(threading.enumerate()) - before
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # still free to bind anything
    app.extensions["sendgrid_sink"].close()


@pytest.mark.parametrize("name,value,message", [
    ("HERALD_SINK_EVENT_INTERVAL", "abc", "HERALD_SINK_EVENT_INTERVAL: must be a number of at least 0.01, got 'abc'"),
    ("HERALD_SINK_EVENT_BATCH_SIZE", "0", "HERALD_SINK_EVENT_BATCH_SIZE: must be a whole number of at least 1"),
    ("HERALD_SINK_EVENT_TIMEOUT", "nan", "HERALD_SINK_EVENT_TIMEOUT: must be a number"),
    ("HERALD_SINK_MAX_STORED_BODIES", "1.5", "HERALD_SINK_MAX_STORED_BODIES: must be a whole number"),
    ("HERALD_SINK_EVENTS_URL", "notaurl", "HERALD_SINK_EVENTS_URL: 'notaurl' is not an http(s) URL"),
    ("HERALD_SINK_EVENT_PRIVATE_KEY_PEM", "junk", "HERALD_SINK_EVENT_PRIVATE_KEY_PEM: not a usable key"),
])
def test_a_bad_sink_setting_is_one_line_naming_it(monkeypatch, app, name, value, message):
    from sendgrid_sink import SinkConfigError

    monkeypatch.setenv(name, value)
    from sendgrid_sink import SinkState

    with pytest.raises(SinkConfigError, match=re.escape(message)):
        SinkState()
    result = app.test_cli_runner().invoke(args=["sendgrid-sink", "--port", "1"])
    assert isinstance(result.exception, SystemExit) and str(result.exception.code).startswith(f"error: {message}")


def test_the_sink_imports_nothing_of_herald():
    """A standalone dev tool: importing it (and building an app) loads no campaigns, web or tasks."""
    import subprocess
    import sys

    code = ("import sys, sendgrid_sink; sendgrid_sink.create_sink_app().extensions['sendgrid_sink'].close(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('campaigns', 'web', 'tasks')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
