"""SendGrid Inbound Parse: replies matched by token and by In-Reply-To/References; auto-replies kept apart."""

from __future__ import annotations

import base64
import dataclasses
import json
import uuid
from urllib.parse import urlencode

import pytest
from sqlalchemy import select

from campaigns.models import Enrollment, Message, Reply
from campaigns.tokens import reply_address
from tasks import huey
from tests.helpers import campaign_stats, count_rows, drain, launched_campaign, make_contacts

SECRET = "parse-secret-0123456789"
DOMAIN = "reply.example.com"
URL = f"/webhooks/sendgrid/inbound/{SECRET}"
TWO_STEPS = [
    {"type": "email", "subject": "Hello {{ contact.first_name }}", "html": "<p>Hello</p>"},
    {"type": "wait", "seconds": 3600},
    {"type": "email", "subject": "Following up", "html": "<p>Again</p>"},
]


@pytest.fixture
def inbound(app):
    """Inbound Parse on, with its secret and reply domain, for this test."""
    settings = app.config["HERALD_SETTINGS"]
    app.config["HERALD_SETTINGS"] = dataclasses.replace(settings, inbound_parse_secret=SECRET,
                                                        inbound_domain=DOMAIN)
    yield
    app.config["HERALD_SETTINGS"] = settings


@pytest.fixture
def sent(api, db, sink):
    """A two-step campaign whose first email went to two contacts: (campaign id, [message, message])."""
    list_id = make_contacts(api, 2)
    cid = launched_campaign(api, list_id, steps=TWO_STEPS)
    drain(huey, until=lambda: len(sink.accepted()) >= 2, timeout=60)
    drain(huey, until=lambda: count_rows(db, Message, Message.status == "scheduled") == 2, timeout=30)
    db.expire_all()
    first = db.scalars(select(Message).where(Message.campaign_id == cid, Message.status == "sent")
                       .order_by(Message.email)).all()
    assert len(first) == 2
    return cid, first


def headers_block(**h) -> str:
    names = {"message_id": "Message-ID", "in_reply_to": "In-Reply-To", "auto_submitted": "Auto-Submitted",
             "content_type": "Content-Type", "x_autoreply": "X-Autoreply", "return_path": "Return-Path"}
    lines = [f"{names.get(k, k.replace('_', '-').title())}: {v}" for k, v in h.items()]
    return "\r\n".join(lines) + "\r\n"


def parse_post(client, *, to=None, sender="Person Zero <person0@example.com>", subject="Re: Hello P0",
               text="Sounds good, let's talk.", envelope=None, url=URL, **headers):
    headers.setdefault("message_id", f"<reply-{uuid.uuid4().hex}@mail.example.net>")
    fields = {
        "headers": headers_block(From=sender, To=to or "team@example.com", Subject=subject, **headers),
        "from": sender,
        "to": to or "team@example.com",
        "subject": subject,
        "text": text,
        "html": f"<p>{text}</p>",
        "envelope": json.dumps(envelope or {"to": [to or "team@example.com"], "from": "person0@example.com"}),
        "charsets": json.dumps({"to": "UTF-8", "subject": "UTF-8", "from": "UTF-8", "text": "UTF-8"}),
        "SPF": "pass",
        "spam_score": "0.1",
    }
    return client.post(url, data=fields, content_type="multipart/form-data")


def enrollment_status(db, msg) -> str:
    db.expire_all()
    return db.get(Enrollment, msg.enrollment_id).status


# --------------------------------------------------------------------------- routing


def test_the_route_is_404_when_the_secret_is_unset(client):
    assert parse_post(client).status_code == 404


def test_a_wrong_secret_is_404(client, inbound):
    assert parse_post(client, url="/webhooks/sendgrid/inbound/wrong-secret").status_code == 404
    assert parse_post(client, url=URL + "x").status_code == 404


@pytest.mark.parametrize("kind", ["json", "empty_form", "no_fields", "bad_envelope", "envelope_not_object",
                                  "deeply_nested_envelope", "deeply_nested_mime"])
def test_a_malformed_post_is_400(client, inbound, db, kind):
    if kind == "json":
        resp = client.post(URL, json={"from": "a@example.com"})
    elif kind == "empty_form":
        resp = client.post(URL, data={}, content_type="multipart/form-data")
    elif kind == "no_fields":
        resp = client.post(URL, data={"spam_score": "1"}, content_type="multipart/form-data")
    elif kind == "bad_envelope":
        resp = client.post(URL, data={"from": "a@example.com", "envelope": "{not json"},
                           content_type="multipart/form-data")
    elif kind == "deeply_nested_envelope":  # a RecursionError in json: bad input, never a retryable 5xx
        resp = client.post(URL, data={"from": "a@example.com", "envelope": "[" * 100_000},
                           content_type="multipart/form-data")
    elif kind == "deeply_nested_mime":
        raw = "".join(f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n' for i in range(2000))
        resp = client.post(URL, data={"from": "a@example.com", "email": "From: a@example.com\r\n" + raw + "\r\nhi"},
                           content_type="multipart/form-data")
    else:
        resp = client.post(URL, data={"from": "a@example.com", "envelope": "[1]"}, content_type="multipart/form-data")
    assert resp.status_code == 400, resp.data
    assert count_rows(db, Reply) == 0


# --------------------------------------------------------------------------- matching


def test_a_reply_matched_by_its_token_counts_and_stops_the_sequence(api, client, inbound, db, sent):
    cid, (m0, m1) = sent
    resp = parse_post(client, to=f"Team <{reply_address(m0.message_key, DOMAIN)}>")
    assert resp.status_code == 200, resp.json
    assert resp.json["matched"] is True and resp.json["auto"] is False
    reply = db.scalars(select(Reply)).one()
    assert (reply.message_id, reply.matched_by, reply.workspace_id) == (m0.id, "token", m0.workspace_id)
    assert reply.from_email == "person0@example.com"
    assert enrollment_status(db, m0) == "stopped" and enrollment_status(db, m1) == "active"
    db.expire_all()
    second = db.scalars(select(Message).where(Message.campaign_id == cid, Message.step_id != m0.step_id)).all()
    assert {m.email: m.status for m in second} == {m0.email: "cancelled", m1.email: "scheduled"}
    s = campaign_stats(api, cid)
    assert s["replied"] == 1 and s["rates"]["replied"] == 0.5


def test_a_reply_matched_by_in_reply_to_from_the_sent_message_id(api, client, inbound, db, sink, sent):
    cid, (m0, m1) = sent
    sent_id = sink.messages(key=m1.message_key)[0]["headers"]["Message-ID"]
    resp = parse_post(client, sender="person1@example.com", in_reply_to=sent_id,
                      References=f"<older@elsewhere.example> {sent_id}")
    assert resp.status_code == 200 and resp.json["matched"] is True
    reply = db.scalars(select(Reply)).one()
    assert (reply.message_id, reply.matched_by) == (m1.id, "in-reply-to")
    assert enrollment_status(db, m1) == "stopped"
    assert campaign_stats(api, cid)["replied"] == 1


def test_a_reply_matched_by_references_when_in_reply_to_is_unknown(api, client, inbound, db, sent):
    cid, (m0, _) = sent
    resp = parse_post(client, in_reply_to="<something@else.example>",
                      References=f"<{m0.message_key}@127.0.0.1> <x@y.example>")
    assert resp.json["matched"] is True
    assert db.scalars(select(Reply.matched_by)).one() == "references"
    assert campaign_stats(api, cid)["replied"] == 1


def test_a_reply_to_nothing_known_is_stored_and_answered_2xx(client, inbound, db):
    resp = parse_post(client, to="someone@example.com", in_reply_to="<nope@nowhere.example>")
    assert resp.status_code == 200 and resp.json["matched"] is False
    reply = db.scalars(select(Reply)).one()
    assert reply.message_id is None and reply.workspace_id is None and reply.text.startswith("Sounds good")


def test_a_forged_token_matches_nothing(client, inbound, db, sent):
    _, (m0, _) = sent
    token = reply_address(m0.message_key, DOMAIN).split("@")[0]
    resp = parse_post(client, to=f"{token[:-3]}abc@{DOMAIN}")
    assert resp.json["matched"] is False


def test_inbound_parse_retries_are_stored_and_counted_once(api, client, inbound, db, sent):
    cid, (m0, _) = sent
    to = reply_address(m0.message_key, DOMAIN)
    first = parse_post(client, to=to, message_id="<same-reply@mail.example.net>")
    again = parse_post(client, to=to, message_id="<same-reply@mail.example.net>")
    assert first.status_code == again.status_code == 200
    assert first.json["duplicate"] is False and again.json["duplicate"] is True
    assert count_rows(db, Reply) == 1
    assert campaign_stats(api, cid)["replied"] == 1


def test_replied_at_is_set_once(api, client, inbound, db, sent):
    cid, (m0, _) = sent
    to = reply_address(m0.message_key, DOMAIN)
    parse_post(client, to=to, message_id="<one@mail.example.net>")
    db.expire_all()
    first = db.get(Message, m0.id).replied_at
    parse_post(client, to=to, message_id="<two@mail.example.net>", text="And another thing")
    db.expire_all()
    assert db.get(Message, m0.id).replied_at == first
    assert count_rows(db, Reply) == 2 and campaign_stats(api, cid)["replied"] == 1


# --------------------------------------------------------------------------- auto-replies


AUTO_REPLIES = {
    "auto_submitted": dict(auto_submitted="auto-replied"),
    "x_autoreply": dict(x_autoreply="yes"),
    "precedence_bulk": dict(Precedence="bulk"),
    "out_of_office_subject": dict(subject="Out of Office: Hello P0"),
    "automatic_reply_subject": dict(subject="Automatic reply: Hello P0"),
    "mailer_daemon": dict(sender="MAILER-DAEMON@mx.example.com", subject="Undelivered Mail Returned to Sender"),
    "postmaster": dict(sender="postmaster@example.com", subject="Delivery report"),
    "multipart_report": dict(content_type='multipart/report; report-type=delivery-status; boundary="b"'),
}


def test_auto_replies_are_stored_but_do_not_count(api, client, inbound, db, sent):
    cid, (m0, _) = sent
    for kind, extra in sorted(AUTO_REPLIES.items()):
        resp = parse_post(client, to=reply_address(m0.message_key, DOMAIN), message_id=f"<{kind}@mx.example>",
                          **extra)
        assert resp.status_code == 200, kind
        assert (resp.json["matched"], resp.json["auto"], resp.json["duplicate"]) == (True, True, False), kind
    replies = db.scalars(select(Reply)).all()
    assert len(replies) == len(AUTO_REPLIES)
    assert all(r.is_auto and r.message_id == m0.id for r in replies)
    assert enrollment_status(db, m0) == "active"
    db.expire_all()
    assert db.get(Message, m0.id).replied_at is None
    assert campaign_stats(api, cid)["replied"] == 0


def test_auto_submitted_no_is_a_person(api, client, inbound, db, sent):
    cid, (m0, _) = sent
    resp = parse_post(client, to=reply_address(m0.message_key, DOMAIN), auto_submitted="no")
    assert resp.json["auto"] is False
    assert campaign_stats(api, cid)["replied"] == 1


def test_a_reply_does_not_stop_the_sequence_when_stop_on_lacks_reply(api, client, inbound, db, sink):
    list_id = make_contacts(api, 1)
    cid = launched_campaign(api, list_id, steps=TWO_STEPS, stop_on=["click"])
    drain(huey, until=lambda: count_rows(db, Message, Message.status == "scheduled") == 1, timeout=60)
    m0 = db.scalars(select(Message).where(Message.status == "sent")).one()
    parse_post(client, to=reply_address(m0.message_key, DOMAIN))
    assert campaign_stats(api, cid)["replied"] == 1
    assert enrollment_status(db, m0) == "active"


def test_the_raw_mime_option_is_understood(api, client, inbound, db, sent):
    cid, (m0, _) = sent
    raw = (f"From: person0@example.com\r\nTo: {reply_address(m0.message_key, DOMAIN)}\r\n"
           "Subject: Re: Hello\r\nMessage-ID: <raw-1@mail.example.net>\r\n"
           "Content-Type: text/plain; charset=utf-8\r\n\r\nYes please.\r\n")
    resp = client.post(URL, data={"email": raw, "from": "person0@example.com",
                                  "to": reply_address(m0.message_key, DOMAIN)},
                       content_type="multipart/form-data")
    assert resp.status_code == 200 and resp.json["matched"] is True
    assert db.scalars(select(Reply.text)).one().strip() == "Yes please."
    assert campaign_stats(api, cid)["replied"] == 1


def _multipart(fields: dict[str, bytes], boundary: str = "hb0undary", types: dict[str, str] | None = None) -> bytes:
    """A multipart body; ``types`` gives a part its own Content-Type header."""
    out = b""
    for name, value in fields.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n'
        if types and name in types:
            head += f"Content-Type: {types[name]}\r\n"
        out += (head + "\r\n").encode() + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_fields_are_decoded_with_the_charsets_inbound_parse_names(api, client, inbound, db, sent):
    cid, (m0, _) = sent
    to = reply_address(m0.message_key, DOMAIN).encode()
    body = _multipart({
        "headers": b"Message-ID: <latin-1@mail.example.net>\r\nSubject: =?iso-8859-1?q?Gr=FC=DFe?=\r\n",
        "from": b"person0@example.com",
        "to": to,
        "subject": "Re: Grüße aus Köln".encode("iso-8859-1"),
        "text": "Grüße, gerne nächste Woche – bis dann".encode("cp1252"),
        "html": "<p>Grüße</p>".encode(),  # no charset named: UTF-8
        "charsets": json.dumps({"to": "UTF-8", "from": "UTF-8", "subject": "iso-8859-1",
                                "text": "windows-1252"}).encode(),
    })
    resp = client.post(URL, data=body, content_type="multipart/form-data; boundary=hb0undary")
    assert resp.status_code == 200, resp.json
    assert resp.json["matched"] is True
    reply = db.scalars(select(Reply)).one()
    assert reply.subject == "Re: Grüße aus Köln"
    assert reply.text == "Grüße, gerne nächste Woche – bis dann"
    assert campaign_stats(api, cid)["replied"] == 1


def test_an_unknown_or_wrong_charset_is_replaced_not_a_500(client, inbound, db):
    body = _multipart({
        "from": b"someone@example.com",
        "to": b"team@example.com",
        "subject": b"Re: \xff\xfe odd",
        "text": "Grüße".encode("iso-8859-1"),  # declared UTF-8 below: not valid UTF-8
        "charsets": json.dumps({"subject": "x-no-such-charset", "text": "UTF-8"}).encode(),
    })
    resp = client.post(URL, data=body, content_type="multipart/form-data; boundary=hb0undary")
    assert resp.status_code == 200, resp.json
    reply = db.scalars(select(Reply)).one()
    assert reply.subject == "Re: \ufffd\ufffd odd" and reply.text == "Gr\ufffd\ufffde"


def test_a_multipart_post_without_a_boundary_is_400(client, inbound):
    resp = client.post(URL, data=b"x", content_type="multipart/form-data")
    assert resp.status_code == 400 and "boundary" in resp.json["error"]["message"]


@pytest.mark.parametrize("charset", ["base64", "rot13", "zlib", "hex", "idna", "undefined"])
@pytest.mark.parametrize("where", ["charsets", "part_header"])
def test_a_charset_that_is_not_a_text_encoding_is_read_as_utf8_not_a_500(client, inbound, db, charset, where):
    fields = {
        "from": b"someone@example.com",
        "to": b"team@example.com",
        "subject": "Re: Grüße".encode(),
        "text": "Grüße, bis dann".encode(),
        "charsets": json.dumps({"subject": charset, "text": charset} if where == "charsets" else {}).encode(),
    }
    types = {"subject": f"text/plain; charset={charset}", "text": f"text/plain; charset={charset}"}
    body = _multipart(fields, types=types if where == "part_header" else None)
    resp = client.post(URL, data=body, content_type="multipart/form-data; boundary=hb0undary")
    assert resp.status_code == 200, resp.data
    reply = db.scalars(select(Reply)).one()
    assert (reply.subject, reply.text) == ("Re: Grüße", "Grüße, bis dann")


def test_deeply_nested_charsets_are_ignored_not_a_500(client, inbound, db):
    body = _multipart({"from": b"someone@example.com", "text": b"hello", "charsets": b"[" * 100_000})
    resp = client.post(URL, data=body, content_type="multipart/form-data; boundary=hb0undary")
    assert resp.status_code == 200, resp.data
    assert db.scalars(select(Reply.text)).one() == "hello"


def test_a_raw_mime_reply_larger_than_500_kb_is_stored_and_stops_the_sequence(api, client, inbound, db, sent):
    """"POST the raw, full MIME message" sends attachments inside the ``email`` field: Flask's
    per-field default of 500 kB must not refuse it (a 4xx makes Inbound Parse drop the reply)."""
    cid, (m0, m1) = sent
    to = reply_address(m0.message_key, DOMAIN)
    attachment = base64.encodebytes(bytes(range(256)) * 1800).decode()  # ~460 kB as 620 kB of base64
    raw = (f"From: person0@example.com\r\nTo: {to}\r\nSubject: Re: Hello\r\n"
           "Message-ID: <big-raw@mail.example.net>\r\nMIME-Version: 1.0\r\n"
           'Content-Type: multipart/mixed; boundary="mixed"\r\n\r\n'
           "--mixed\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nSigned copy attached.\r\n"
           '--mixed\r\nContent-Type: application/pdf; name="contract.pdf"\r\n'
           "Content-Transfer-Encoding: base64\r\n\r\n" + attachment + "--mixed--\r\n")
    assert len(raw) > 600 * 1024
    # Encoded here: the test client would spool a body this large to a file it never closes.
    body = _multipart({"email": raw.encode(), "from": b"person0@example.com", "to": to.encode()})
    resp = client.post(URL, data=body, content_type="multipart/form-data; boundary=hb0undary")
    assert resp.status_code == 200, resp.data
    assert resp.json["matched"] is True and resp.json["auto"] is False
    assert db.scalars(select(Reply.text)).one().strip() == "Signed copy attached."
    assert enrollment_status(db, m0) == "stopped" and enrollment_status(db, m1) == "active"
    assert campaign_stats(api, cid)["replied"] == 1


@pytest.mark.parametrize("content_type", ["multipart/form-data", "application/x-www-form-urlencoded"])
def test_large_text_and_html_fields_are_accepted(client, inbound, db, content_type):
    text = "A long reply. " * 60_000  # 840 kB, in text and in html
    fields = {"from": b"person0@example.com", "to": b"team@example.com", "text": text.encode(),
              "html": f"<p>{text}</p>".encode()}
    if content_type == "multipart/form-data":
        resp = client.post(URL, data=_multipart(fields), content_type="multipart/form-data; boundary=hb0undary")
    else:
        resp = client.post(URL, data=urlencode(fields), content_type=content_type)
    assert resp.status_code == 200, resp.data
    assert db.scalars(select(Reply.text)).one().startswith("A long reply.")
