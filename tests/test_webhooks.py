"""The SendGrid Event Webhook: real ECDSA signatures, storage and dedupe, effects, exact statistics."""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import logging
import random
import threading
import time
import uuid

import pytest
from sqlalchemy import select, update
from werkzeug.serving import make_server

from campaigns import engine
from campaigns import events as ev
from campaigns.db import session_scope
from campaigns.models import Contact, Enrollment, Event, Message, Suppression
from campaigns.ratelimit import get_limiter
from sendgrid_sink import generate_key_pair, sign_events
from tasks import huey
from tasks.engine import HOOKS
from tests.helpers import campaign_stats, count_rows, drain, launched_campaign, make_contacts
from web import webhooks

URL = "/webhooks/sendgrid/events"
SIG = "X-Twilio-Email-Event-Webhook-Signature"
TS = "X-Twilio-Email-Event-Webhook-Timestamp"
ONE_STEP = [{"type": "email", "subject": "Hi {{ contact.first_name }}", "html": "<p>Hello</p>"}]
TWO_STEPS = ONE_STEP + [{"type": "wait", "seconds": 3600},
                        {"type": "email", "subject": "Again", "html": "<p>Again</p>"}]
_ids = itertools.count(1)


# --------------------------------------------------------------------------- helpers (local)


@pytest.fixture
def private_key(app):
    """The app verifies signatures with a fresh key pair's public key for this test."""
    key, public = generate_key_pair()
    settings = app.config["HERALD_SETTINGS"]
    app.config["HERALD_SETTINGS"] = dataclasses.replace(settings, webhook_public_key=public)
    yield key
    app.config["HERALD_SETTINGS"] = settings


def encode(events) -> bytes:
    return json.dumps(events, separators=(",", ":")).encode() + b"\r\n"


def post(client, events, key=None, timestamp=None, headers=None):
    body = events if isinstance(events, bytes) else encode(events)
    h = {"Content-Type": "application/json"}
    if key is not None:
        ts = timestamp or str(int(time.time()))
        h[SIG] = sign_events(key, body, ts)
        h[TS] = ts
    h.update(headers or {})
    return client.post(URL, data=body, headers=h)


def sg_event(msg: Message, kind: str, ts: int | None = None, sg_event_id: str | None = None, **extra) -> dict:
    """An event as SendGrid posts it for a message Herald sent (custom_args flattened)."""
    ts = ts or int(time.time())
    event = {
        "email": msg.email,
        "timestamp": ts,
        "smtp-id": f"<{msg.provider_message_id}@sink>",
        "event": kind,
        "sg_event_id": sg_event_id or f"ev{next(_ids)}-{uuid.uuid4().hex[:10]}",
        "sg_message_id": f"{msg.provider_message_id}.filterdrecv-1-2-3-0.0",
        "message_key": msg.message_key,
        "herald_workspace": str(msg.workspace_id),
        "herald_campaign": str(msg.campaign_id),
    }
    event.update(extra)
    return event


def messages(db, cid, step: int | None = None):
    db.expire_all()
    stmt = select(Message).where(Message.campaign_id == cid).order_by(Message.id)
    rows = db.scalars(stmt).all()
    if step is not None:
        first_step = min(m.step_id for m in rows)
        rows = [m for m in rows if (m.step_id == first_step) == (step == 0)]
    return rows


def sent_campaign(api, db, n: int, steps=None, **extra) -> tuple[int, list[Message]]:
    """A launched campaign whose first email went to ``n`` contacts (through the sink)."""
    list_id = make_contacts(api, n)
    cid = launched_campaign(api, list_id, steps=steps or ONE_STEP, **extra)
    drain(huey, until=lambda: sum(1 for m in messages(db, cid) if m.status == "sent") >= n, timeout=60)
    first = sorted(messages(db, cid, step=0), key=lambda m: m.email)
    assert len(first) == n and all(m.provider_message_id for m in first)
    return cid, first


def apply_all(batch_size: int = ev.BATCH) -> ev.ProcessReport:
    report = ev.process_pending(batch_size=batch_size)
    assert report is not None
    return report


def a_batch(n: int = 3) -> list[dict]:
    """Events for messages Herald does not know (each call a new set)."""
    tag = uuid.uuid4().hex[:12]
    return [{"email": f"x{i}@example.com", "timestamp": 1700000000 + i, "event": "processed",
             "sg_event_id": f"e-{tag}-{i}", "sg_message_id": f"nosuch{tag}.filter.{i}"} for i in range(n)]


# --------------------------------------------------------------------------- signatures


def _forged(key, body, ts):
    other, _ = generate_key_pair()
    return sign_events(other, body, ts), ts, body


SIGNATURE_CASES = {
    "forged": _forged,
    "altered_body": lambda key, body, ts: (sign_events(key, body, ts), ts, body.replace(b"x0@", b"y0@")),
    "altered_timestamp": lambda key, body, ts: (sign_events(key, body, ts), str(int(ts) + 1), body),
    "malformed_base64": lambda key, body, ts: ("not*base64!!", ts, body),
    "bad_padding": lambda key, body, ts: ("abc", ts, body),
    "base64_not_der": lambda key, body, ts: (base64.b64encode(b"hello world").decode(), ts, body),
    "empty_signature": lambda key, body, ts: ("", ts, body),
    "missing_signature": lambda key, body, ts: (None, ts, body),
    "missing_timestamp": lambda key, body, ts: (sign_events(key, body, ts), None, body),
}


@pytest.mark.parametrize("case", sorted(SIGNATURE_CASES))
def test_bad_signatures_are_refused_with_403(client, db, private_key, case):
    body = encode(a_batch())
    ts = str(int(time.time()))
    signature, timestamp, sent_body = SIGNATURE_CASES[case](private_key, body, ts)
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers[SIG] = signature
    if timestamp is not None:
        headers[TS] = timestamp
    resp = client.post(URL, data=sent_body, headers=headers)
    assert resp.status_code == 403, resp.data
    assert resp.json["error"]["code"] == "forbidden"
    assert count_rows(db, Event) == 0


def test_a_real_signature_is_accepted_and_stored(client, db, private_key):
    resp = post(client, a_batch(3), key=private_key)
    assert resp.status_code == 200, resp.json
    assert resp.json == {"received": 3, "stored": 3, "rejected": 0}
    assert count_rows(db, Event) == 3
    assert count_rows(db, Event, Event.message_id.is_(None), Event.workspace_id.is_(None)) == 3  # unmatched, kept


def test_not_json_with_a_good_signature_is_400(client, private_key):
    resp = post(client, b"this is not json", key=private_key)
    assert resp.status_code == 400


def test_unsigned_posts_are_accepted_without_a_key_with_one_warning(client, db, caplog):
    webhooks._warned.clear()
    with caplog.at_level(logging.WARNING, logger="herald.webhooks"):
        assert post(client, a_batch(2)).status_code == 200
        assert post(client, a_batch(2)).status_code == 200
    warnings = [r for r in caplog.records if "SENDGRID_WEBHOOK_PUBLIC_KEY" in r.getMessage()]
    assert len(warnings) == 1
    assert count_rows(db, Event) == 4


def test_a_signed_body_that_is_not_utf8_is_verified_then_read(client, db, private_key):
    # The signature is over the raw bytes: a correctly signed body is never a 403 for its encoding.
    resp = post(client, b"\xff\xfe\x00garbage", key=private_key)
    assert resp.status_code == 400, resp.data
    assert resp.json["error"]["code"] == "bad_request"
    utf16 = json.dumps([{"event": "open", "email": "zoë@example.com", "sg_event_id": "u16"}]).encode("utf-16")
    resp = post(client, utf16, key=private_key)
    assert resp.status_code == 200 and resp.json["stored"] == 1, resp.data


@pytest.mark.parametrize("body", [
    b"not json", b"", b"{}", b'{"event": "open"}', b"\xff\xfe\x00garbage",
    b"[" * 100_000, b'[{"event": "open", "timestamp": NaN}]',
])
def test_wrong_shapes_are_400(client, db, body):
    resp = post(client, body)
    assert resp.status_code == 400, resp.data
    assert resp.json["error"]["code"] == "bad_request"
    assert count_rows(db, Event) == 0


@pytest.mark.parametrize("body,stored,rejected", [
    (b"[1, 2]", 0, 2), (b'[{"email": "a@example.com"}]', 0, 1), (b'[{"event": 5}]', 0, 1),
    (b'[{"event": ""}]', 0, 1), (b'[{"event": "open"}, null]', 1, 1), (b"[]", 0, 0),
])
def test_items_that_are_not_events_are_skipped_not_400(client, db, body, stored, rejected):
    resp = post(client, body)
    assert resp.status_code == 200, resp.data
    assert resp.json == {"received": stored + rejected, "stored": stored, "rejected": rejected}
    assert count_rows(db, Event) == stored


def test_one_malformed_item_does_not_lose_the_batch(api, client, db, sink, private_key, caplog):
    """SendGrid resends a refused batch unchanged for 24 hours: the good events are stored now,
    the bad items are skipped but visible (logged with index and reason, counted)."""

    cid, (m0, m1) = sent_campaign(api, db, 2)
    batch = [sg_event(m0, "delivered"), {"email": "x@y.z"}, 5, sg_event(m1, "delivered"), {"event": 7}]
    before = get_limiter().counters("events_rejected").get("events_rejected", 0)
    with caplog.at_level(logging.WARNING, logger="herald.events"):
        resp = post(client, batch, key=private_key)
    assert resp.status_code == 200, resp.data
    assert resp.json == {"received": 5, "stored": 2, "rejected": 3}
    rows = db.scalars(select(Event).order_by(Event.id)).all()
    assert [(r.message_id, r.event) for r in rows] == [(m0.id, "delivered"), (m1.id, "delivered")]
    assert [r.payload["email"] for r in rows] == [m0.email, m1.email]  # each row keeps its own payload
    (warning,) = [r.getMessage() for r in caplog.records if "not events" in r.getMessage()]
    assert "item 1: no 'event' string" in warning and "item 2: not an object (int)" in warning
    assert "item 4: no 'event' string" in warning
    assert get_limiter().counters("events_rejected")["events_rejected"] == before + 3
    assert f"herald_events_rejected_total {float(before + 3)}" in client.get("/metrics").get_data(as_text=True)
    # SendGrid's retry of the same body stores nothing twice.
    again = post(client, batch, key=private_key)
    assert again.status_code == 200 and again.json["stored"] == 0
    apply_all()
    assert campaign_stats(api, cid)["delivered"] == 2


def test_odd_values_are_stored_not_500(client, db):
    odd = [
        {"event": "open", "email": "nul\x00@example.com", "timestamp": 1e30, "sg_event_id": "x" * 500},
        {"event": "click", "email": "\ud800@example.com", "url": "https://e.com/\ud800", "timestamp": "soon"},
        {"event": "e" * 300, "message_key": 12345, "sg_message_id": "m" * 1000, "timestamp": None},
        {"event": "bounce", "nested": {"deep": [1, {"x": "\u0000"}]}, "timestamp": -1},
        {"event": "dropped", "sg_event_id": 42, "herald_workspace": "999999999", "email": "a@b.c",
         "reason": "Bounced Address"},
    ]
    resp = post(client, odd)
    assert resp.status_code == 200, resp.data
    assert count_rows(db, Event) == 5
    apply_all()  # nothing here names a message or an existing workspace: recorded only
    assert count_rows(db, Event, Event.processed_at.is_(None)) == 0
    assert count_rows(db, Suppression) == 0


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
def test_bodies_in_other_encodings_are_stored_too(client, db, encoding):
    events = [{"event": "open", "email": "zoë@example.com", "timestamp": 1700000000, "sg_event_id": "enc-1"}]
    resp = post(client, json.dumps(events, ensure_ascii=False).encode(encoding))
    assert resp.status_code == 200 and resp.json["stored"] == 1
    db.expire_all()
    row = db.scalars(select(Event)).one()
    assert row.payload["email"] == "zoë@example.com" and row.email == "zoë@example.com"


def test_one_bad_event_never_blocks_the_others(api, client, db, sink, monkeypatch, caplog):
    cid, msgs = sent_campaign(api, db, 3)
    post(client, [sg_event(m, "bounce", type="bounce") for m in msgs])
    real = ev.suppression_reason

    def fussy(kind, payload):
        if payload.get("email") == msgs[1].email:
            raise ValueError("cannot handle this one")
        return real(kind, payload)

    monkeypatch.setattr(ev.applying, "suppression_reason", fussy)
    with caplog.at_level(logging.ERROR, logger="herald.events"):
        report = apply_all()
    assert report.failed == 1 and count_rows(db, Event, Event.processed_at.is_(None)) == 0
    assert sorted(db.scalars(select(Suppression.email))) == [msgs[0].email, msgs[2].email]
    assert campaign_stats(api, cid)["bounced"] == 2
    assert any("could not be applied" in r.getMessage() for r in caplog.records)


def test_a_storage_failure_is_503_so_sendgrid_retries(client, db, monkeypatch):
    def broken(session, rows, body=None):
        raise RuntimeError("database went away")

    monkeypatch.setattr(ev.storing, "insert_rows", broken)
    resp = post(client, a_batch(2))
    assert resp.status_code == 503
    monkeypatch.undo()
    assert count_rows(db, Event) == 0
    assert post(client, a_batch(2)).status_code == 200


# --------------------------------------------------------------------------- dedupe and order


def test_the_same_batch_three_times_is_stored_once_and_stats_do_not_change(api, client, db, sink):
    cid, msgs = sent_campaign(api, db, 3)
    batch = [sg_event(m, k) for m in msgs for k in ("processed", "delivered", "open")]
    for _ in range(3):
        resp = post(client, batch)
        assert resp.status_code == 200
    assert count_rows(db, Event) == 9
    apply_all()
    first = campaign_stats(api, cid)
    assert (first["sent"], first["delivered"], first["opened"]) == (3, 3, 3)
    for _ in range(3):  # and again after processing
        assert post(client, batch).json["stored"] == 0
    apply_all()
    assert campaign_stats(api, cid) == first
    assert count_rows(db, Event) == 9


def test_a_repeat_with_a_new_sg_event_id_is_stored_once(api, client, db, sink):
    cid, (msg,) = sent_campaign(api, db, 1)
    original = sg_event(msg, "click", ts=1700000000, url="https://example.com/a")
    again = dict(original, sg_event_id="a-brand-new-id")
    other_url = dict(original, sg_event_id="third-id", url="https://example.com/b")
    assert post(client, [original]).json["stored"] == 1
    assert post(client, [again]).json["stored"] == 0
    assert post(client, [original, again, other_url]).json["stored"] == 1  # a different click is new
    assert count_rows(db, Event) == 2
    apply_all()
    assert campaign_stats(api, cid)["clicked"] == 1


def test_delivered_before_processed_stays_delivered(api, client, db, sink):
    cid, (msg,) = sent_campaign(api, db, 1)
    post(client, [sg_event(msg, "delivered", ts=1700000010)])
    apply_all()
    post(client, [sg_event(msg, "processed", ts=1700000000), sg_event(msg, "deferred", ts=1700000005)])
    apply_all()
    db.expire_all()
    row = db.get(Message, msg.id)
    assert row.status == "delivered" and row.delivered_at is not None
    assert campaign_stats(api, cid)["delivered"] == 1


def test_a_late_delivered_never_moves_a_bounce_back(api, client, db, sink):
    cid, (msg,) = sent_campaign(api, db, 1)
    post(client, [sg_event(msg, "bounce", ts=1700000020)])
    apply_all()
    post(client, [sg_event(msg, "delivered", ts=1700000010), sg_event(msg, "processed", ts=1700000000)])
    apply_all()
    db.expire_all()
    assert db.get(Message, msg.id).status == "bounced"
    s = campaign_stats(api, cid)
    assert s["bounced"] == 1 and s["delivered"] == 1  # both happened; the status is the furthest


def test_stats_are_exact_under_repeats_and_any_order(api, client, db, sink):
    cid, msgs = sent_campaign(api, db, 12)
    plan = {
        0: ["processed", "delivered"], 1: ["processed", "delivered", "open"],
        2: ["processed", "delivered", "open", "click"], 3: ["processed", "bounce"],
        4: ["processed", "dropped"], 5: ["processed", "delivered", "spamreport"],
        6: ["processed", "delivered", "unsubscribe"], 7: ["processed", "deferred", "delivered"],
        8: ["processed", "delivered", "open", "open", "click", "click"], 9: ["processed"],
        10: ["processed", "delivered", "group_unsubscribe"], 11: ["deferred"],
    }
    events = []
    for i, kinds in plan.items():
        for n, kind in enumerate(kinds):
            extra = {"url": f"https://example.com/{n}"} if kind == "click" else {}
            events.append(sg_event(msgs[i], kind, ts=1700000000 + n * 10 + i, **extra))
    noisy = events * 3 + [dict(e, sg_event_id=e["sg_event_id"] + "-again") for e in events]
    random.Random(5).shuffle(noisy)
    for i in range(0, len(noisy), 17):
        assert post(client, noisy[i : i + 17]).status_code == 200
        if i % 34 == 0:
            apply_all(batch_size=7)
    apply_all(batch_size=7)
    s = campaign_stats(api, cid)
    expected = {"sent": 12, "delivered": 8, "opened": 3, "clicked": 2, "bounced": 1, "dropped": 1,
                "spam_reports": 1, "unsubscribed": 2}
    assert {k: s[k] for k in expected} == expected
    assert s["rates"]["delivered"] == round(8 / 12, 4)
    assert count_rows(db, Event) == len(events)


# --------------------------------------------------------------------------- effects


def test_each_event_type_has_its_effect(api, client, db, sink):
    cid, m = sent_campaign(api, db, 10, steps=TWO_STEPS)
    batch = [
        sg_event(m[0], "processed"), sg_event(m[0], "delivered"),
        sg_event(m[1], "delivered"), sg_event(m[1], "open"), sg_event(m[1], "click", url="https://e.com/"),
        sg_event(m[2], "bounce", reason="550 5.1.1 no such user", type="bounce"),
        sg_event(m[3], "dropped", reason="Bounced Address"),
        sg_event(m[4], "dropped", reason="Spam Content (if spam checker app enabled)"),
        sg_event(m[5], "spamreport"),
        sg_event(m[6], "unsubscribe"),
        sg_event(m[7], "group_unsubscribe", asm_group_id=1),
        sg_event(m[8], "deferred", response="451 try later", attempt="1"),
        sg_event(m[9], "bounce", reason="550 blocked by policy", type="blocked"),
    ]
    assert post(client, batch).status_code == 200
    drain(huey, until=lambda: count_rows(db, Event, Event.processed_at.is_(None)) == 0, timeout=30)  # the task

    db.expire_all()
    status = {i: db.get(Message, m[i].id).status for i in range(10)}
    assert status == {0: "delivered", 1: "delivered", 2: "bounced", 3: "dropped", 4: "dropped", 5: "sent",
                      6: "sent", 7: "sent", 8: "sent", 9: "bounced"}
    s = campaign_stats(api, cid)
    expected = {"sent": 10, "delivered": 2, "opened": 1, "clicked": 1, "bounced": 2, "dropped": 2,
                "spam_reports": 1, "unsubscribed": 2, "replied": 0}
    assert {k: s[k] for k in expected} == expected

    reasons = dict(db.execute(select(Suppression.email, Suppression.reason)).all())
    assert reasons == {m[2].email: "bounce", m[3].email: "dropped", m[5].email: "spamreport",
                       m[6].email: "unsubscribe", m[7].email: "unsubscribe"}
    contact_status = dict(db.execute(select(Contact.email, Contact.status)).all())
    assert contact_status[m[2].email] == "bounced" and contact_status[m[5].email] == "complained"
    assert contact_status[m[6].email] == "unsubscribed" and contact_status[m[9].email] == "active"
    # every sequence to a suppressed address stopped: its second email is cancelled
    second = {x.email: x.status for x in messages(db, cid, step=1)}
    stopped = {m[i].email for i in (2, 3, 5, 6, 7)}
    assert {e for e, st in second.items() if st == "cancelled"} == stopped
    assert {e for e, st in second.items() if st == "scheduled"} == {x.email for x in m} - stopped
    assert s["scheduled"] == 5


@pytest.mark.parametrize("stop_on,stopped", [
    (["reply"], set()), (["reply", "click"], {"click"}), (["open"], {"open", "click"}),
])
def test_open_and_click_stop_the_sequence_only_when_stop_on_names_them(api, client, db, sink, stop_on, stopped):
    cid, m = sent_campaign(api, db, 3, steps=TWO_STEPS, stop_on=stop_on)
    post(client, [sg_event(m[0], "open"), sg_event(m[1], "click"), sg_event(m[1], "open"),
                  sg_event(m[2], "open", sg_machine_open=True)])
    apply_all()
    db.expire_all()
    enrollments = {e.contact_id: e for e in db.scalars(select(Enrollment).where(Enrollment.campaign_id == cid))}
    got = set()
    if enrollments[m[0].contact_id].status == "stopped":
        got.add("open")
    if enrollments[m[1].contact_id].status == "stopped":
        got.add("click")
    assert got == stopped
    assert enrollments[m[2].contact_id].status == "active"  # a machine open never stops a sequence
    assert campaign_stats(api, cid)["opened"] == 3
    assert count_rows(db, Suppression) == 0


def test_events_map_by_the_x_message_id_prefix_without_a_message_key(api, client, db, sink):
    cid, (msg,) = sent_campaign(api, db, 1)
    event = sg_event(msg, "delivered")
    for k in ("message_key", "herald_workspace", "herald_campaign"):
        event.pop(k)
    assert post(client, [event]).status_code == 200
    row = db.scalars(select(Event)).one()
    assert row.message_id == msg.id and row.workspace_id == msg.workspace_id
    assert row.message_key == msg.message_key  # so the reconciler sees it too
    apply_all()
    assert campaign_stats(api, cid)["delivered"] == 1


def test_an_event_stored_before_its_provider_id_is_mapped_when_processed(api, client, db, sink):
    cid, (msg,) = sent_campaign(api, db, 1)
    with session_scope() as s:
        s.execute(update(Message).where(Message.id == msg.id).values(provider_message_id=None))
    event = sg_event(msg, "delivered")
    event.pop("message_key")
    post(client, [event])
    assert db.scalars(select(Event)).one().message_id is None
    with session_scope() as s:
        s.execute(update(Message).where(Message.id == msg.id).values(provider_message_id=msg.provider_message_id))
    apply_all()
    db.expire_all()
    assert db.scalars(select(Event)).one().message_id == msg.id
    assert campaign_stats(api, cid)["delivered"] == 1


def test_an_unmatched_bounce_suppresses_in_the_workspace_its_custom_args_name(api, client, db):
    event = {"event": "bounce", "email": "Gone@Example.com", "timestamp": 1700000000, "type": "bounce",
             "herald_workspace": str(api.workspace_id)}
    post(client, [event])
    apply_all()
    assert db.execute(select(Suppression.workspace_id, Suppression.email)).all() == [
        (api.workspace_id, "gone@example.com")]


def test_processed_settles_an_ambiguous_message_and_its_sequence_moves_on(api, client, db, sink):
    list_id = make_contacts(api, 1)
    sink.behaviour(mode="hang", count=1, delay=4)
    steps = ONE_STEP + [{"type": "wait", "seconds": 1}, {"type": "email", "subject": "Two", "html": "<p>2</p>"}]
    cid = launched_campaign(api, list_id, steps=steps)
    drain(huey, until=lambda: any(m.status == "ambiguous" for m in messages(db, cid)), timeout=30)
    (msg,) = messages(db, cid)
    post(client, [{"event": "processed", "email": msg.email, "timestamp": int(time.time()),
                   "sg_event_id": "p-1", "message_key": msg.message_key}])
    report = apply_all()
    assert report.settled == 1 and report.wake_at is not None
    db.expire_all()
    assert db.get(Message, msg.id).status == "sent"
    time.sleep(3.2)  # past HERALD_AMBIGUOUS_WINDOW: still never resent
    engine.reconcile(HOOKS)
    drain(huey, until=lambda: api.get(f"/api/v1/campaigns/{cid}").json["status"] == "completed", timeout=30)
    assert sink.keys()[msg.message_key] == 1
    assert len(messages(db, cid)) == 2 and campaign_stats(api, cid)["sent"] == 2


def test_a_768_kb_batch_is_accepted(api, client, db, sink, private_key):
    cid, msgs = sent_campaign(api, db, 5)
    batch, size = [], 0
    while size < 768 * 1024 - 400:
        m = msgs[len(batch) % 5]
        e = sg_event(m, "click", ts=1700000000 + len(batch), url=f"https://example.com/p/{len(batch)}?utm=" + "x" * 120,
                     useragent="Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36", ip="203.0.113.9")
        batch.append(e)
        size += len(json.dumps(e, separators=(",", ":"))) + 1
    while len(encode(batch)) > 768 * 1024:
        batch.pop()
    body = encode(batch)
    assert 700 * 1024 < len(body) <= 768 * 1024
    t0 = time.perf_counter()
    resp = post(client, body, key=private_key)
    elapsed = time.perf_counter() - t0
    assert resp.status_code == 200 and resp.json["stored"] == len(batch), resp.json
    assert elapsed < 5.0
    apply_all()
    assert campaign_stats(api, cid)["clicked"] == 5


# --------------------------------------------------------------------------- the make-run flow


def test_the_sink_posts_signed_events_to_a_running_app(api, app, db, sink, sink_server):
    """The local flow: the sink posts signed events (its key) to the live webhook, a task applies them."""

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    settings = app.config["HERALD_SETTINGS"]
    public = sink._call("GET", "/_sink/event-public-key?format=json")["public_key"]
    app.config["HERALD_SETTINGS"] = dataclasses.replace(settings, webhook_public_key=public)
    webhook = f"http://127.0.0.1:{server.server_port}{URL}"
    sink._call("POST", "/_sink/events-url", {"url": webhook})
    try:
        list_id = make_contacts(api, 4)
        cid = launched_campaign(api, list_id, steps=ONE_STEP)
        drain(huey, until=lambda: campaign_stats(api, cid)["delivered"] == 4, timeout=60)
        key = messages(db, cid)[0].message_key
        answer = sink._call("POST", "/_sink/events", {"key": key, "event": "bounce"})
        assert answer["status"] == 200
        bad = sink._call("POST", "/_sink/events", {"key": key, "event": "open", "bad_signature": True})
        assert bad["status"] == 403
        drain(huey, until=lambda: campaign_stats(api, cid)["bounced"] == 1, timeout=30)
        s = campaign_stats(api, cid)
        assert (s["sent"], s["delivered"], s["bounced"], s["opened"]) == (4, 4, 1, 0)
        assert count_rows(db, Suppression) == 1
        assert sink.stats()["events"]["failed_posts"] == 0
    finally:
        sink._call("POST", "/_sink/events-url", {"url": None})
        app.config["HERALD_SETTINGS"] = settings
        server.shutdown()
        thread.join(5)


def test_processing_is_idempotent_when_run_twice(api, client, db, sink):
    cid, msgs = sent_campaign(api, db, 2)
    post(client, [sg_event(m, k) for m in msgs for k in ("delivered", "open")])
    apply_all()
    before = campaign_stats(api, cid)
    first_seen = db.execute(select(Message.id, Message.delivered_at, Message.opened_at).order_by(Message.id)).all()
    with session_scope() as s:  # as if a crash lost the "processed" marks
        s.execute(update(Event).values(processed_at=None))
    post(client, [sg_event(m, k, ts=1800000000) for m in msgs for k in ("delivered", "open")])  # later repeats
    apply_all()
    assert campaign_stats(api, cid) == before
    db.expire_all()
    assert db.execute(select(Message.id, Message.delivered_at, Message.opened_at).order_by(Message.id)).all() \
        == first_seen  # set once, never moved


# --------------------------------------------------------------------------- timestamp freshness

# sendgrid-python's own test vector (test/unit/test_eventwebhook.py): a batch SendGrid signed on
# 2020-09-14. Genuine, but far too old to be accepted now.
VECTOR_KEY = ("MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3GRqe62gw+"
              "2fNNRaINXvVpiglSI8eNEc6wEA3F+g==")
VECTOR_SIGNATURE = ("MEUCIGHQVtGj+Y3LkG9fLcxf3qfI10QysgDWmMOVmxG0u6ZUAiEAyBiXDWzM+uOe5W0JuG+luQAbPIqHh89M15TluLtEZtM=")
VECTOR_TIMESTAMP = "1600112502"
VECTOR_BODY = json.dumps([{
    "email": "hello@world.com", "event": "dropped", "reason": "Bounced Address",
    "sg_event_id": "ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA",
    "sg_message_id": "LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0",
    "smtp-id": "<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>", "timestamp": 1600112492,
}], sort_keys=True, separators=(",", ":")).encode() + b"\r\n"


@pytest.fixture
def max_age(app):
    """Sets the app's SENDGRID_WEBHOOK_MAX_AGE (and the official vector's key) for one test."""
    settings = app.config["HERALD_SETTINGS"]

    def set_max_age(seconds: int) -> None:
        app.config["HERALD_SETTINGS"] = dataclasses.replace(settings, webhook_public_key=VECTOR_KEY,
                                                            webhook_max_age=seconds)
    yield set_max_age
    app.config["HERALD_SETTINGS"] = settings


def post_vector(client):
    return client.post(URL, data=VECTOR_BODY, headers={"Content-Type": "application/json", SIG: VECTOR_SIGNATURE,
                                                      TS: VECTOR_TIMESTAMP})


def test_a_genuine_batch_signed_in_2020_is_refused_as_stale(client, db, max_age):
    max_age(600)
    resp = post_vector(client)
    assert resp.status_code == 403, resp.json
    error = resp.json["error"]
    assert error["code"] == "stale_timestamp"
    assert "seconds old" in error["message"] and "SENDGRID_WEBHOOK_MAX_AGE (600 seconds)" in error["message"]
    assert error["details"] == {"timestamp": VECTOR_TIMESTAMP, "max_age": 600}
    assert count_rows(db, Event) == 0


def test_max_age_0_turns_the_check_off_for_the_official_vector(client, db, max_age):
    max_age(0)
    resp = post_vector(client)
    assert resp.status_code == 200, resp.json
    assert resp.json == {"received": 1, "stored": 1, "rejected": 0}


@pytest.mark.parametrize("offset,status", [(-700, 403), (700, 403), (-500, 200), (500, 200)])
def test_timestamps_within_max_age_either_way_are_accepted(client, db, private_key, app, offset, status):
    app.config["HERALD_SETTINGS"] = dataclasses.replace(app.config["HERALD_SETTINGS"], webhook_max_age=600)
    resp = post(client, a_batch(2), key=private_key, timestamp=str(int(time.time()) + offset))
    assert resp.status_code == status, resp.json
    assert count_rows(db, Event) == (2 if status == 200 else 0)


@pytest.mark.parametrize("timestamp,reason", [
    ("1600112502", "seconds old"), ("4102444800", "seconds in the future"),
    ("soon", "not a number"), ("1e9", "not a number"), ("9" * 13, "not a number"),
])
def test_stale_reason(timestamp, reason):
    assert reason in webhooks.stale_reason(timestamp, 600, now=1_765_000_000)
    assert webhooks.stale_reason(timestamp, 0, now=1_765_000_000) is None
    assert webhooks.stale_reason("1765000600", 600, now=1_765_000_000) is None


@pytest.mark.parametrize("value", ["-1", "abc", "1.5", "86401", "600s"])
def test_a_bad_max_age_is_one_line_naming_the_variable(tmp_path, value):
    from campaigns.config import ConfigError, load_settings

    with pytest.raises(ConfigError) as err:
        load_settings({"HERALD_INSTANCE_DIR": str(tmp_path), "SECRET_KEY": "x" * 20, "SENDGRID_WEBHOOK_MAX_AGE": value})
    assert str(err.value).startswith("SENDGRID_WEBHOOK_MAX_AGE:") and "\n" not in str(err.value)


@pytest.mark.parametrize("value,expected", [(None, 600), ("0", 0), ("30", 30), (" 86400 ", 86400)])
def test_max_age_values(tmp_path, value, expected):
    from campaigns.config import load_settings

    env = {"HERALD_INSTANCE_DIR": str(tmp_path), "SECRET_KEY": "x" * 20}
    if value is not None:
        env["SENDGRID_WEBHOOK_MAX_AGE"] = value
    assert load_settings(env).webhook_max_age == expected
