"""The campaign engine against the real sink, with the queue stepped by hand (no consumer)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import redis
from sqlalchemy import event, func, select, text, update
from sqlalchemy.exc import OperationalError

import campaigns.providers as providers
from campaigns import engine, leases, queue_health, stats
from campaigns.db import get_engine, session_factory, session_scope, utcnow
from campaigns.errors import Conflict
from campaigns.models import Campaign, Enrollment, Event, JobLock, Message, MessageAttempt, Step
from campaigns.providers import get_mailer
from tasks import engine as task_engine
from tasks import huey
from tasks.engine import HOOKS, fanout_campaign, wake_dispatcher
from tests.helpers import (
    UiClient,
    campaign_status,
    drain,
    launched_campaign,
    make_contacts,
    make_workspace,
    run_through,
)


def _messages(db, cid, **filters):
    db.expire_all()
    stmt = select(Message).where(Message.campaign_id == cid)
    for k, v in filters.items():
        stmt = stmt.where(getattr(Message, k) == v)
    return db.scalars(stmt.order_by(Message.id)).all()


def _dispatched_by_hand(api, n: int):
    """A launched one-step campaign to n contacts, fanned out and dispatched in this process:
    (campaign id, the send batches the dispatcher queued, hooks that record instead of enqueue)."""
    list_id = make_contacts(api, n)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    with session_scope() as s:
        engine.fanout(s, cid)
    queued: list[list[int]] = []
    hooks = engine.Hooks(enqueue_send=lambda ids, p: queued.append(ids), wake_dispatcher=lambda at: None)
    engine.dispatch_once(engine.get_limiter(), hooks)
    return cid, queued, hooks


def _completed(api, cid):
    return lambda: campaign_status(api, cid) == "completed"


def test_two_step_campaign_sends_each_email_once_after_the_wait(api, sink, db):
    list_id = make_contacts(api, 200)
    cid = launched_campaign(api, list_id)
    drain(huey, until=_completed(api, cid), timeout=90)

    accepted = sink.accepted()
    assert len(accepted) == 400
    keys = sink.keys()
    assert len(keys) == 400 and max(keys.values()) == 1  # 0 repeated keys
    msgs = _messages(db, cid)
    assert len(msgs) == 400 and {m.status for m in msgs} == {"sent"}
    # the second email of each contact went out after the one-second wait
    by_contact: dict[int, list[Message]] = {}
    for m in msgs:
        by_contact.setdefault(m.contact_id, []).append(m)
    for pair in by_contact.values():
        first, second = sorted(pair, key=lambda m: m.sent_at)
        assert second.step_id != first.step_id
        assert (second.sent_at - first.sent_at).total_seconds() >= 1.0
    # what the sink received carries the key, the header and the unsubscribe headers
    sample = sink.messages(key=msgs[0].message_key)[0]
    assert sample["idempotency_key"] == msgs[0].message_key
    assert sample["custom_args"]["message_key"] == msgs[0].message_key
    assert sample["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    stats = api.get(f"/api/v1/campaigns/{cid}").json["stats"]
    assert stats["enrolled"] == 200 and stats["sent"] == 400 and stats["scheduled"] == 0


def test_launch_twice_is_launched_once(api, sink, db):
    list_id = make_contacts(api, 5)
    cid = launched_campaign(api, list_id)
    assert api.post(f"/api/v1/campaigns/{cid}/launch").status_code == 202

    fanout_campaign(cid)  # a repeated fan-out task changes nothing
    drain(huey, until=_completed(api, cid), timeout=60)
    assert len(sink.accepted()) == 10
    assert db.scalar(select(func.count()).select_from(Enrollment)) == 5


def test_fanout_gives_each_new_enrollment_one_first_message_in_one_statement(api, sink, db):
    list_id = make_contacts(api, 30)
    api.post("/api/v1/suppressions", json={"emails": ["person3@example.com"], "reason": "manual"})
    cid = launched_campaign(api, list_id)
    statements: list[str] = []

    def seen(conn, cursor, statement, *args):
        statements.append(statement)

    eng = get_engine()
    event.listen(eng, "before_cursor_execute", seen)
    try:
        with session_scope() as s:
            assert engine.fanout(s, cid) == 29
        with session_scope() as s:
            assert engine.fanout(s, cid) == 0  # again: nothing new
    finally:
        event.remove(eng, "before_cursor_execute", seen)
    msgs = _messages(db, cid)
    assert len(msgs) == 29 and len({m.enrollment_id for m in msgs}) == 29 and len({m.message_key for m in msgs}) == 29
    assert "person3@example.com" not in {m.email for m in msgs}
    assert {(m.status, m.is_test, m.attempts, m.priority, m.resends) for m in msgs} == {("scheduled", False, 0, 0, 0)}
    if eng.dialect.name == "postgresql":
        # The enrollments' INSERT ... RETURNING feeds the messages: no anti-join against messages,
        # whose plan on a young, growing table went quadratic (40,000 contacts: 18 s instead of 5 s).
        inserts = [st.split("INSERT INTO messages", 1)[1] for st in statements if "INSERT INTO messages" in st]
        assert inserts and all("new_enrollments" in st and "EXISTS" not in st for st in inserts)


def test_launch_fanout_runs_in_parts_and_sends_start_after_the_first(api, db):
    """The launch fan-out commits the list in parts (contact-id order), waking the dispatcher
    after each; the campaign counts as fanned out only after the last part."""

    list_id = make_contacts(api, 12)
    api.post("/api/v1/suppressions", json={"emails": ["person4@example.com"], "reason": "manual"})
    cid = launched_campaign(api, list_id)
    seen: list[tuple[int, int, bool]] = []

    def on_part(n: int) -> None:
        db.expire_all()
        seen.append((n, len(_messages(db, cid)), db.get(Campaign, cid).fanout_done_at is not None))

    assert engine.fanout_in_parts(cid, on_part=on_part, first_part=3, part=5) == 11
    # 3 | 5 (one suppressed: 4) | 4 = the rest; committed part by part, finished at the last.
    assert seen == [(3, 3, False), (4, 7, False), (4, 11, True)]
    msgs = _messages(db, cid)
    assert len({m.enrollment_id for m in msgs}) == 11 and "person4@example.com" not in {m.email for m in msgs}
    assert engine.fanout_in_parts(cid, first_part=3, part=5) == 0  # again: nothing new
    # A run holding the lease keeps a second one (and the reconciler) out.
    assert leases.acquire(session_factory(), engine.fanout_lease(cid), "someone-else", ttl=60)
    assert engine.fanout_in_parts(cid) is None


def test_a_fanout_cancelled_midway_stops_and_a_dead_one_is_finished_by_the_reconciler(api, db):
    list_id = make_contacts(api, 10)
    cid = launched_campaign(api, list_id)
    ws_id = db.get(Campaign, cid).workspace_id

    def cancel_after_first(n: int) -> None:
        with session_scope() as s:
            engine.cancel(s, ws_id, cid)

    assert engine.fanout_in_parts(cid, on_part=cancel_after_first, first_part=4, part=4) == 4
    db.expire_all()
    assert db.scalar(select(func.count()).select_from(Enrollment).where(Enrollment.campaign_id == cid)) == 4

    # A run that died after its first part: the reconciler leaves it while its lease lives...
    other = launched_campaign(api, list_id)
    with session_scope() as s:
        assert engine.fanout(s, other, contacts=(None, db.scalars(select(Enrollment.contact_id).where(
            Enrollment.campaign_id == cid).order_by(Enrollment.contact_id)).all()[2])) == 3
    assert leases.acquire(session_factory(), engine.fanout_lease(other), "dead-consumer", ttl=60)
    engine.reconcile(HOOKS, owner="reconciler-test")
    db.expire_all()
    assert len(_messages(db, other)) == 3 and db.get(Campaign, other).fanout_done_at is None
    # ...and finishes it once the lease has run out.
    with session_scope() as s:
        s.execute(update(JobLock).where(JobLock.name == engine.fanout_lease(other)).values(
            expires_at=utcnow() - timedelta(seconds=1)))
    engine.reconcile(HOOKS, owner="reconciler-test-2")
    db.expire_all()
    assert len(_messages(db, other)) == 10 and db.get(Campaign, other).fanout_done_at is not None


def _plan_of(conn, stmt, params: dict) -> str:
    """PostgreSQL's plan for an engine statement, as the engine binds it (EXPLAIN run on the same
    cursor just before the statement itself)."""

    plans: list[str] = []

    def explain(_conn, cursor, statement, parameters, _context, _many):
        cursor.execute("EXPLAIN " + statement, parameters)
        plans.append("\n".join(r[0] for r in cursor.fetchall()))

    event.listen(conn, "before_cursor_execute", explain)
    try:
        conn.execute(stmt, params)
    finally:
        event.remove(conn, "before_cursor_execute", explain)
    return plans[0]


@pytest.mark.postgres_only
def test_the_send_path_finds_its_rows_by_id_whatever_the_statistics(api, db, monkeypatch):
    """The send path names its rows by id and re-checks their status. On statistics older than a
    fan-out (none here: the ANALYZE after it is switched off), PostgreSQL drove these statements
    from the status indexes or a sequential scan, reading every row of the status (and, through
    bitmap scans, the dead entries of every message sent before) for each claim and record."""

    monkeypatch.setattr(engine.enrollment, "_refresh_statistics", lambda session, added: None)
    list_id = make_contacts(api, 1500)
    cid = launched_campaign(api, list_id)
    with session_scope() as s:
        assert engine.fanout(s, cid) == 1500
    now = utcnow()
    with get_engine().connect() as conn:
        ids = [r[0] for r in conn.execute(text("SELECT id FROM messages ORDER BY id LIMIT 40"))]
        conn.execute(text("UPDATE messages SET status = 'sending' WHERE id = ANY(:ids)"), {"ids": ids[:20]})
        plans = {
            "queue": _plan_of(conn, engine._queue_stmt(True), {"ids": ids, "now": now}),
            "claim": _plan_of(conn, engine._claim_stmt(True), {"ids": ids, "owner": "w", "lease_until": now,
                                                               "now": now}),
            "release": _plan_of(conn, engine._release_stmt(True), {"ids": ids, "owner": "w"}),
            "complete": _plan_of(conn, engine._complete_enrollments_stmt(True), {"ids": ids, "now": now}),
            "record": _plan_of(conn, engine._PG_RECORD_SENT, {
                "ids": ids[:20], "now": now,
                "rows": json.dumps([{"id": i, "sent_at": now.isoformat(), "pid": "x"} for i in ids[:20]])}),
        }
        conn.rollback()
    for name, plan in plans.items():  # (a small table may be read whole: that is the planner's call)
        assert "ix_messages_status_due" not in plan and "ix_enrollments_campaign_status" not in plan, (name, plan)


@pytest.mark.postgres_only
def test_the_next_due_probe_reads_each_campaign_by_its_own_index(api, db):
    """Every dispatcher pass asks for the next due time of each running campaign. For a small
    campaign launched after a big one, PostgreSQL could plan ``min(due_at)`` as a walk of
    ``ix_messages_status_due`` in due order, filtered on the campaign: through every scheduled
    row of the big one, on every pass. The probe now asks for an order only the campaign's index
    gives, and gives the same answers. (At this size the planner picks the right index for the
    old statement too; bench/dispatch_scale.py shows the flip, at 500,000 scheduled rows.)"""

    big = launched_campaign(api, make_contacts(api, 3000, list_name="Big"))
    with session_scope() as s:
        assert engine.fanout(s, big) == 3000
    small = launched_campaign(api, make_contacts(api, 5, list_name="Small", prefix="small"))
    with session_scope() as s:
        assert engine.fanout(s, small) == 5
    now = utcnow()
    # The big campaign's work is all due before the small one's, a retry is due later still.
    db.execute(update(Message).where(Message.campaign_id == big).values(due_at=now - timedelta(hours=1)))
    db.execute(update(Message).where(Message.campaign_id == small).values(due_at=now + timedelta(minutes=5)))
    retry = db.scalar(select(Message.id).where(Message.campaign_id == big).limit(1))
    db.execute(update(Message).where(Message.id == retry).values(due_at=now + timedelta(minutes=10)))
    db.commit()
    with get_engine().connect() as conn:
        conn.execute(text("ANALYZE messages"))
        plan = _plan_of(conn, engine._next_due_stmt(True), {"after": now})
        conn.rollback()
    assert "ix_messages_status_due" not in plan and "Sort" not in plan, plan
    assert "ix_messages_campaign_status" in plan and "Index Cond: ((campaign_id = ANY" in plan, plan
    assert engine._next_due(now) == now - timedelta(hours=1)
    assert engine._next_due(now, after=now) == now + timedelta(minutes=5)
    assert engine._next_due(now, after=now + timedelta(minutes=5)) == now + timedelta(minutes=10)
    assert engine._next_due(now, after=now + timedelta(minutes=10)) is None
    db.execute(update(Campaign).where(Campaign.id == big).values(status="paused"))
    db.commit()
    assert engine._next_due(now) == now + timedelta(minutes=5)  # a paused campaign's work is not looked at


@pytest.mark.postgres_only
def test_a_large_fanout_refreshes_the_statistics(api, db):
    """A fan-out that adds >= 1,000 rows and 10% of the table runs ANALYZE (as autovacuum would,
    a minute later): the planner's row count for messages is the fan-out's, at once."""

    list_id = make_contacts(api, 1200)
    cid = launched_campaign(api, list_id)
    with session_scope() as s:
        assert engine.fanout(s, cid) == 1200
    with get_engine().connect() as conn:
        counts = dict(conn.execute(text(
            "SELECT relname, reltuples FROM pg_class WHERE relname IN ('messages', 'enrollments')")).all())
    assert counts == {"messages": 1200, "enrollments": 1200}


def test_retries_on_503_then_429_honour_reset_and_back_off(api, sink, db):
    list_id = make_contacts(api, 3)
    sink.behaviour(mode="5xx", status=503, count=4)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    drain(huey, until=lambda: len(sink.accepted()) >= 1 or not _messages(db, cid, status="scheduled"), timeout=30)
    sink.behaviour(mode="429", count=2, reset_in=2)
    t0 = time.time()
    drain(huey, until=_completed(api, cid), timeout=60)
    msgs = _messages(db, cid)
    assert {m.status for m in msgs} == {"sent"}
    assert len(sink.accepted()) == 3 and max(sink.keys().values()) >= 1
    outcomes = Counter(db.scalars(select(MessageAttempt.outcome)).all())
    assert outcomes["retry"] >= 1 and outcomes["sent"] == 3
    # retries were spread by backoff: each retry carried a future retry time or waited
    retry_rows = db.scalars(select(MessageAttempt).where(MessageAttempt.outcome.in_(("retry", "rate_limited")))).all()
    assert retry_rows
    if outcomes["rate_limited"]:
        # the reset was honoured: nothing was accepted before it
        first_ok_after = min(m["time"] for m in sink.accepted() if m["time"] >= t0) if sink.accepted() else None
        limited = [a for a in retry_rows if a.outcome == "rate_limited"]
        assert all(a.retry_at is not None for a in limited)
        assert first_ok_after is not None


def test_permanent_error_goes_to_dead_letters_after_one_attempt_and_replays(api, sink, db):
    list_id = make_contacts(api, 3)
    sink.fail_addresses(["person1@example.com"], status=400)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    drain(huey, until=_completed(api, cid), timeout=60)
    failed = _messages(db, cid, status="failed")
    assert len(failed) == 1 and failed[0].attempts == 1 and failed[0].email == "person1@example.com"
    assert "400" in failed[0].last_error and failed[0].last_response
    assert api.get(f"/api/v1/campaigns/{cid}").json["stats"]["failed"] == 1
    key = failed[0].message_key
    # replay it (the address is fixed now): same key, sent
    sink.clear_fail_addresses()
    resp = api.post(f"/api/v1/messages/{failed[0].id}/replay")
    assert resp.status_code == 202
    drain(huey, until=_completed(api, cid), timeout=60)
    db.expire_all()
    assert db.get(Message, failed[0].id).status == "sent"
    assert db.get(Message, failed[0].id).message_key == key
    assert sink.keys()[key] == 2  # one refused call, one accepted: the same key both times
    # statistics never decrease: it failed once and was sent since; no dead letter is left
    stats = api.get(f"/api/v1/campaigns/{cid}").json["stats"]
    assert (stats["failed"], stats["dead_letters"], stats["sent"]) == (1, 0, 3)


def test_replay_failed_for_a_whole_campaign(api, sink, db, app):
    list_id = make_contacts(api, 4)
    sink.fail_addresses(["person0@example.com", "person2@example.com"], status=400)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    drain(huey, until=_completed(api, cid), timeout=60)
    assert len(_messages(db, cid, status="failed")) == 2
    sink.clear_fail_addresses()
    result = app.test_cli_runner().invoke(args=["replay-failed", "--campaign", str(cid)])
    assert result.exit_code == 0, result.output
    assert "2" in result.output
    drain(huey, until=_completed(api, cid), timeout=60)
    assert {m.status for m in _messages(db, cid)} == {"sent"}


def _queue_dead_letters(api):
    return api.get("/api/v1/queue").json["dead_letters"]


def test_a_dead_letter_is_deleted_and_nothing_else(api, sink, db):
    list_id = make_contacts(api, 4)
    sink.fail_addresses(["person0@example.com", "person1@example.com"], status=400)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    drain(huey, until=_completed(api, cid), timeout=60)
    dead = _messages(db, cid, status="failed")
    sent = _messages(db, cid, status="sent")
    assert len(dead) == 2 and len(sent) == 2 and _queue_dead_letters(api) == 2
    victim, kept = dead
    victim_id, victim_enrollment, kept_id = victim.id, victim.enrollment_id, kept.id
    assert db.scalar(select(func.count()).select_from(MessageAttempt).where(MessageAttempt.message_id == victim.id))

    # only a dead letter can be deleted: a sent message answers 409 and stays as it was
    resp = api.delete(f"/api/v1/messages/{sent[0].id}")
    assert resp.status_code == 409 and "this one is sent" in resp.json["error"]["message"]
    assert api.get(f"/api/v1/messages/{sent[0].id}").json["status"] == "sent"
    assert api.delete("/api/v1/messages/99999999999999999999999").status_code == 404

    sent_ids = {m.id for m in sent}
    resp = api.delete(f"/api/v1/messages/{victim_id}")
    assert resp.status_code == 204 and resp.get_data() == b""
    assert api.get(f"/api/v1/messages/{victim_id}").status_code == 404
    assert api.delete(f"/api/v1/messages/{victim_id}").status_code == 404  # gone: a second delete finds nothing
    db.expunge_all()
    assert not db.scalar(select(func.count()).select_from(Message).where(Message.id == victim_id))
    assert not db.scalar(select(func.count()).select_from(MessageAttempt).where(MessageAttempt.message_id == victim_id))
    # its attempt is kept, of no message now (the failure rate and /metrics never go backwards)
    assert db.scalar(select(func.count()).select_from(MessageAttempt).where(MessageAttempt.message_id.is_(None))) == 1
    # the other dead letter, the sent messages and their attempts are untouched; the sequence stays stopped
    assert [m.id for m in _messages(db, cid, status="failed")] == [kept_id]
    assert {m.id for m in _messages(db, cid, status="sent")} == sent_ids
    attempts_of_sent = select(func.count()).select_from(MessageAttempt).where(MessageAttempt.message_id.in_(sent_ids))
    assert db.scalar(attempts_of_sent) == 2
    assert db.get(Enrollment, victim_enrollment).status == "failed"
    # statistics never decrease: both still counted as failed (the deleted one in its step), one left
    campaign = api.get(f"/api/v1/campaigns/{cid}").json
    assert (campaign["stats"]["failed"], campaign["stats"]["dead_letters"]) == (2, 1)
    assert (campaign["steps"][0]["stats"]["failed"], campaign["steps"][0]["stats"]["dead_letters"]) == (2, 1)
    assert _queue_dead_letters(api) == 1
    assert campaign_status(api, cid) == "completed"


def test_a_dead_letter_replayed_first_is_not_deleted(api, sink, db):
    list_id = make_contacts(api, 2)
    sink.fail_addresses(["person0@example.com"], status=400)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    drain(huey, until=_completed(api, cid), timeout=60)
    (dead,) = _messages(db, cid, status="failed")
    # A delete has read the dead letter (its session still holds it as failed) when a replay
    # commits: the DELETE re-checks the status, deletes nothing and says why.
    deleting = session_factory()(expire_on_commit=False)
    try:
        held = deleting.get(Message, dead.id)  # held: the identity map keeps it only while referenced
        assert held.status == "failed"
        deleting.commit()
        with session_scope() as s:
            assert engine.replay_message(s, dead.workspace_id, dead.id).status == "scheduled"
        with pytest.raises(Conflict, match="replayed meanwhile"):
            engine.delete_dead_letter(deleting, dead.workspace_id, dead.id)
        deleting.rollback()
    finally:
        deleting.close()
    db.expire_all()
    assert db.get(Message, dead.id).status == "scheduled"


def test_a_cancelled_campaigns_dead_letters_are_not_replayed(api, sink, db, app):
    list_id = make_contacts(api, 3)
    sink.fail_addresses(["person0@example.com"], status=400)
    step = [{"type": "email", "subject": "Hi", "html": "<p>x</p>"}, {"type": "wait", "seconds": 3600},
            {"type": "email", "subject": "Again", "html": "<p>y</p>"}]
    cid = launched_campaign(api, list_id, steps=step)
    drain(huey, until=lambda: len(_messages(db, cid, status="failed")) == 1 and len(sink.accepted()) == 2, timeout=60)
    assert api.post(f"/api/v1/campaigns/{cid}/cancel").json["status"] == "cancelled"
    (dead,) = _messages(db, cid, status="failed")
    # replayed, it would have waited forever as scheduled (a cancelled campaign sends nothing)
    resp = api.post(f"/api/v1/messages/{dead.id}/replay")
    assert resp.status_code == 409 and "cancelled" in resp.json["error"]["message"]
    assert api.post(f"/api/v1/campaigns/{cid}/replay-failed").status_code == 409
    result = app.test_cli_runner().invoke(args=["replay-failed", "--campaign", str(cid)])
    assert result.exit_code != 0 and "cancelled" in result.output
    assert [m.id for m in _messages(db, cid, status="failed")] == [dead.id]
    stats = api.get(f"/api/v1/campaigns/{cid}").json["stats"]
    assert (stats["dead_letters"], stats["scheduled"]) == (1, 0)
    assert api.delete(f"/api/v1/messages/{dead.id}").status_code == 204  # what can be done with it


def test_the_message_log_filter_takes_any_address(api, sink, db):
    list_id = make_contacts(api, 1)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    drain(huey, until=_completed(api, cid), timeout=30)
    assert len(api.get("/api/v1/messages?email=PERSON0@example.com").json["items"]) == 1
    for odd in ("%00", "a%00b%40example.com", "%ED%A0%80"):  # NUL (PostgreSQL refused it: a 500), a surrogate
        resp = api.get(f"/api/v1/messages?email={odd}")
        assert resp.status_code == 200 and resp.json["items"] == [], odd


def test_delete_failed_deletes_one_campaigns_dead_letters_by_api_and_command(api, sink, db, app):
    list_id = make_contacts(api, 4)
    sink.fail_addresses(["person0@example.com", "person2@example.com"], status=400)
    step = [{"type": "email", "subject": "Hi", "html": "<p>x</p>"}]
    first = launched_campaign(api, list_id, steps=step)
    drain(huey, until=_completed(api, first), timeout=60)
    second = launched_campaign(api, list_id, steps=step)
    drain(huey, until=_completed(api, second), timeout=60)
    # a test send refused too: a dead letter of the campaign, but in no statistic
    assert api.post(f"/api/v1/campaigns/{first}/test-send", json={"email": "person0@example.com"}).status_code == 202
    drain(huey, until=lambda: len(_messages(db, first, status="failed")) == 3, timeout=30)
    assert len(_messages(db, second, status="failed")) == 2

    resp = api.post(f"/api/v1/campaigns/{first}/delete-failed")
    assert resp.status_code == 200 and resp.json == {"deleted": 3}
    stats = api.get(f"/api/v1/campaigns/{first}").json["stats"]
    assert (stats["failed"], stats["dead_letters"], stats["sent"]) == (2, 0, 2)
    assert _messages(db, first, status="failed") == [] and len(_messages(db, first, status="sent")) == 2
    assert len(_messages(db, second, status="failed")) == 2  # another campaign's dead letters stay
    assert api.post(f"/api/v1/campaigns/{first}/delete-failed").json == {"deleted": 0}
    assert api.post("/api/v1/campaigns/99999999999999999999999/delete-failed").status_code == 404

    runner = app.test_cli_runner()
    result = runner.invoke(args=["delete-failed", "--campaign", str(second)], input="n\n")
    assert result.exit_code == 1 and "Delete 2 dead letter(s)" in result.output and "Aborted" in result.output
    assert len(_messages(db, second, status="failed")) == 2  # answered no: nothing deleted
    result = runner.invoke(args=["delete-failed", "--campaign", str(second)], input="y\n")
    assert result.exit_code == 0, result.output
    assert "deleted 2 dead letter(s)" in result.output and _messages(db, second, status="failed") == []
    result = runner.invoke(args=["delete-failed", "--campaign", str(second), "--yes"])
    assert result.exit_code == 0 and "no dead letters" in result.output
    result = runner.invoke(args=["delete-failed", "--campaign", "987654"])
    assert result.exit_code != 0 and "no campaign with id 987654" in result.output
    assert _queue_dead_letters(api) == 0


def test_pause_stops_new_sends_and_resume_finishes(api, sink, db):
    list_id = make_contacts(api, 30)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    # fan-out only, then pause before anything is sent
    from tests.helpers import run_ready_tasks

    with session_scope() as s:
        engine.fanout(s, cid)
    assert api.post(f"/api/v1/campaigns/{cid}/pause").json["status"] == "paused"
    drain(huey, timeout=30)
    assert sink.accepted() == []
    assert len(_messages(db, cid, status="scheduled")) == 30
    resp = api.post(f"/api/v1/campaigns/{cid}/resume")
    assert resp.json["status"] == "running"
    run_ready_tasks(huey)
    drain(huey, until=_completed(api, cid), timeout=60)
    assert len(sink.accepted()) == 30


def test_pause_between_claim_and_send_sends_nothing(api, sink, db):
    """A batch already queued when pause returns is handed back, not sent."""
    cid, queued, hooks = _dispatched_by_hand(api, 5)
    assert sum(len(b) for b in queued) == 5
    api.post(f"/api/v1/campaigns/{cid}/pause")
    for ids in queued:
        engine.send_batch(ids, hooks)
    assert sink.accepted() == []
    assert len(_messages(db, cid, status="scheduled")) == 5


def test_cancel_cancels_pending_work(api, sink, db):
    list_id = make_contacts(api, 10)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    with session_scope() as s:
        engine.fanout(s, cid)
    assert api.post(f"/api/v1/campaigns/{cid}/cancel").json["status"] == "cancelled"
    drain(huey, timeout=30)
    assert sink.accepted() == []
    assert {m.status for m in _messages(db, cid)} == {"cancelled"}
    assert api.post(f"/api/v1/campaigns/{cid}/launch").status_code == 409


def test_launching_a_paused_campaign_is_refused_with_the_reason(api, sink, db):
    """Launch does not resume: a paused campaign answers 409 saying why it is paused, and stays
    paused with its work kept (resume sends it)."""
    list_id = make_contacts(api, 3)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    with session_scope() as s:
        engine.fanout(s, cid)
    api.post(f"/api/v1/campaigns/{cid}/pause")
    r = api.post(f"/api/v1/campaigns/{cid}/launch")
    assert r.status_code == 409
    assert r.json["error"]["code"] == "conflict"
    assert "paused (paused by a user)" in r.json["error"]["message"]
    assert "resume" in r.json["error"]["message"]
    assert api.get(f"/api/v1/campaigns/{cid}").json["status"] == "paused"
    drain(huey, timeout=30)
    assert sink.accepted() == []
    assert api.post(f"/api/v1/campaigns/{cid}/resume").json["status"] == "running"
    drain(huey, until=_completed(api, cid), timeout=60)
    assert len(sink.accepted()) == 3


def test_a_corrected_address_reaches_the_rest_of_the_sequence(api, sink, db):
    # The follow-ups kept the address copied at enrollment: a typo fixed after the first email
    # still got every later one (and a late bounce of the old address left the campaign running).
    list_id = make_contacts(api, 1)
    cid = launched_campaign(api, list_id, steps=[
        {"type": "email", "subject": "One", "html": "<p>1</p>"}, {"type": "wait", "seconds": 2},
        {"type": "email", "subject": "Two", "html": "<p>2</p>"}])
    drain(huey, until=lambda: len(sink.accepted()) == 1, timeout=30)
    contact_id = api.get("/api/v1/contacts?email=person0@example.com").json["items"][0]["id"]
    resp = api.patch(f"/api/v1/contacts/{contact_id}", json={"email": "fixed@example.com"})
    assert resp.status_code == 200, resp.json
    drain(huey, until=_completed(api, cid), timeout=30)
    assert [m["to"][0] for m in sink.accepted()] == ["person0@example.com", "fixed@example.com"]
    assert [m.email for m in _messages(db, cid)] == ["person0@example.com", "fixed@example.com"]


def test_a_campaign_whose_last_sequences_are_stopped_completes_at_once(api, sink, db):
    # It waited for the reconciler's next minute.
    list_id = make_contacts(api, 2)
    cid = launched_campaign(api, list_id, steps=[
        {"type": "email", "subject": "One", "html": "<p>1</p>"}, {"type": "wait", "seconds": 3600},
        {"type": "email", "subject": "Two", "html": "<p>2</p>"}])
    drain(huey, until=lambda: len(sink.accepted()) == 2, timeout=30)
    assert campaign_status(api, cid) == "running"
    resp = api.post("/api/v1/suppressions", json={"emails": ["person0@example.com"], "reason": "unsubscribe"})
    assert resp.status_code in (200, 201) and campaign_status(api, cid) == "running"  # one sequence left
    resp = api.post("/api/v1/suppressions", json={"emails": ["person1@example.com"], "reason": "unsubscribe"})
    assert resp.status_code in (200, 201) and campaign_status(api, cid) == "completed"
    assert {m.status for m in _messages(db, cid) if m.step_id != _messages(db, cid)[0].step_id} == {"cancelled"}


def test_send_window_moves_work_to_the_next_opening(api, sink, db):
    list_id = make_contacts(api, 3)
    now = utcnow()
    # a window that opened and closed before now (UTC), every day: the next opening is tomorrow
    start = (now - timedelta(hours=3)).strftime("%H:%M")
    end = (now - timedelta(hours=2)).strftime("%H:%M")
    window = {"start": start, "end": end, "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
              "timezone": "UTC"}
    cid = launched_campaign(api, list_id, send_window=window,
                            steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    drain(huey, timeout=30)
    assert sink.accepted() == []
    msgs = _messages(db, cid)
    assert len(msgs) == 3
    for m in msgs:
        assert m.status == "scheduled"
        hours = (m.due_at - now).total_seconds() / 3600
        assert 20 < hours < 22.1, hours
    # a window open now sends at once
    open_window = dict(window, start=(now - timedelta(hours=1)).strftime("%H:%M"),
                       end=(now + timedelta(hours=1)).strftime("%H:%M"))
    cid2 = launched_campaign(api, list_id, send_window=open_window, name="now",
                             steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    drain(huey, until=_completed(api, cid2), timeout=30)
    assert len(sink.accepted()) == 3


def test_suppressed_contacts_are_skipped_and_suppression_stops_sequences(api, sink, db):
    list_id = make_contacts(api, 6)
    api.post("/api/v1/suppressions", json={"emails": ["person0@example.com"], "reason": "manual"})
    cid = launched_campaign(api, list_id, steps=[
        {"type": "email", "subject": "One", "html": "<p>1</p>"},
        {"type": "wait", "seconds": 30},
        {"type": "email", "subject": "Two", "html": "<p>2</p>"},
    ])
    drain(huey, until=lambda: len(sink.accepted()) == 5, timeout=30)
    assert all(m["to"][0] != "person0@example.com" for m in sink.accepted())
    assert db.scalar(select(func.count()).select_from(Enrollment).where(Enrollment.campaign_id == cid)) == 5
    # person1 is suppressed (e.g. unsubscribed) while its second email waits: it never goes
    api.post("/api/v1/suppressions", json={"emails": ["person1@example.com"], "reason": "unsubscribe"})
    with session_scope() as s:
        s.execute(update(Message).where(Message.status == "scheduled").values(due_at=utcnow()))

    wake_dispatcher(None)
    drain(huey, until=_completed(api, cid), timeout=30)
    to = [m["to"][0] for m in sink.accepted()]
    assert to.count("person1@example.com") == 1 and len(to) == 9


def test_test_send_goes_first_and_stays_out_of_stats(api, sink, db):
    list_id = make_contacts(api, 50)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi {{ contact.first_name }}",
                                                  "html": "<p>x</p>"}])
    # the bulk work is queued first ...
    run_through(huey, "dispatch")  # the fan-out, then the dispatcher: it queues every send batch
    bulk_waiting = huey.pending_count()
    assert bulk_waiting >= 2
    resp = api.post(f"/api/v1/campaigns/{cid}/test-send", json={"email": "boss@example.com"})
    assert resp.status_code == 202, resp.json
    # ... and the test send is the very next task to run
    task = huey.dequeue()
    huey.execute(task)
    received = sink.accepted()
    assert [m["to"][0] for m in received] == ["boss@example.com"]
    # no contact has that address: rendered for the sample contact, as the builder's preview is
    assert received[0]["subject"] == "[Test] Hi Jane"
    drain(huey, until=_completed(api, cid), timeout=60)
    stats = api.get(f"/api/v1/campaigns/{cid}").json["stats"]
    assert stats["sent"] == 50  # the test send is not counted


def test_a_draft_s_test_sends_render_its_latest_edit_while_launched_steps_are_kept(api, sink, db):
    """Send batches keep a launched campaign's steps per process (they cannot change); a draft's
    steps are read for every test send, so an edit shows in the next one."""
    list_id = make_contacts(api, 1)
    cid = api.post("/api/v1/campaigns", json={
        "name": "x", "list_id": list_id, "from_email": "a@example.com",
        "steps": [{"type": "email", "subject": "First draft", "html": "<p>1</p>"}]}).json["id"]
    for subject in ("First draft", "Second draft"):
        if subject != "First draft":
            resp = api.patch(f"/api/v1/campaigns/{cid}", json={
                "steps": [{"type": "email", "subject": subject, "html": "<p>2</p>"}]})
            assert resp.status_code == 200, resp.json
        assert api.post(f"/api/v1/campaigns/{cid}/test-send", json={"email": "me@example.com"}).status_code == 202
        drain(huey, until=lambda s=subject: any(m["subject"] == f"[Test] {s}" for m in sink.accepted()), timeout=30)
    assert [m["subject"] for m in sink.accepted()] == ["[Test] First draft", "[Test] Second draft"]
    assert not engine.sequence._steps  # nothing of a draft is kept
    launched = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Live", "html": "<p>x</p>"}])
    drain(huey, until=_completed(api, launched), timeout=60)
    assert {st.campaign_id for st in engine.sequence._steps.values()} == {launched}


def test_a_draft_s_test_sends_outlive_the_edits_of_its_steps(api, sink, db):
    """Saving a draft's steps replaces their rows; its test sends used to go with them (ON DELETE
    CASCADE), out of the message log and the outbox. They stay, of no step now."""
    list_id = make_contacts(api, 1)
    cid = api.post("/api/v1/campaigns", json={
        "name": "x", "list_id": list_id, "from_email": "a@example.com",
        "steps": [{"type": "email", "subject": "First", "html": "<p>1</p>"}]}).json["id"]
    sent = api.post(f"/api/v1/campaigns/{cid}/test-send", json={"email": "me@example.com"}).json
    drain(huey, until=lambda: len(sink.accepted()) == 1, timeout=30)
    waiting = api.post(f"/api/v1/campaigns/{cid}/test-send", json={"email": "later@example.com"}).json
    edit = {"steps": [{"type": "email", "subject": "Second", "html": "<p>2</p>"}]}
    assert api.patch(f"/api/v1/campaigns/{cid}", json=edit).status_code == 200
    drain(huey, timeout=30)  # the waiting test finds its step gone
    items = {m["id"]: m for m in api.get(f"/api/v1/messages?campaign_id={cid}").json["items"]}
    assert set(items) == {sent["id"], waiting["id"]}
    first = items[sent["id"]]
    assert (first["status"], first["step_id"], first["is_test"]) == ("sent", None, True)
    assert items[waiting["id"]]["status"] == "failed"
    assert items[waiting["id"]]["last_error"] == "its step was removed from the draft before it was sent"
    assert len(sink.accepted()) == 1  # nothing was sent for it
    resp = api.post(f"/api/v1/messages/{waiting['id']}/replay")
    assert resp.status_code == 409 and "send a new test" in resp.json["error"]["message"]
    assert api.post(f"/api/v1/campaigns/{cid}/replay-failed").json["replayed"] == 0
    assert api.get(f"/api/v1/messages/{sent['id']}").json["step_id"] is None


def test_test_send_validates_input(api, sink):
    list_id = make_contacts(api, 1)
    cid = api.post("/api/v1/campaigns", json={
        "name": "x", "list_id": list_id, "from_email": "a@example.com",
        "steps": [{"type": "email", "subject": "s", "html": "h"}]}).json["id"]
    assert api.post(f"/api/v1/campaigns/{cid}/test-send", json={"email": "nope"}).status_code == 422
    assert api.post(f"/api/v1/campaigns/{cid}/test-send", json={"email": "a@b.com", "step": 7}).status_code == 422
    assert api.post(f"/api/v1/campaigns/{cid}/test-send", data="x").status_code == 400


def test_timeout_after_the_request_left_is_ambiguous_then_resent_once(api, sink, db):
    list_id = make_contacts(api, 1)
    sink.behaviour(mode="hang", count=1, delay=4)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    drain(huey, until=lambda: bool(_messages(db, cid, status="ambiguous")), timeout=30)
    msg = _messages(db, cid)[0]
    assert msg.status == "ambiguous"
    # not resent before the window
    engine.reconcile(HOOKS)
    drain(huey, timeout=10)
    assert _messages(db, cid)[0].status == "ambiguous"
    time.sleep(3.2)  # HERALD_AMBIGUOUS_WINDOW = 3 s in the tests
    report = engine.reconcile(HOOKS)
    assert report.resent_ambiguous == 1
    drain(huey, until=_completed(api, cid), timeout=30)
    msg = _messages(db, cid)[0]
    assert msg.status == "sent" and msg.resends == 1
    assert sink.keys()[msg.message_key] == 2  # the hung call and the resend, same key


def test_ambiguous_settled_by_an_event_is_never_resent(api, sink, db):
    list_id = make_contacts(api, 1)
    sink.behaviour(mode="hang", count=1, delay=4)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    drain(huey, until=lambda: bool(_messages(db, cid, status="ambiguous")), timeout=30)
    msg = _messages(db, cid)[0]
    with session_scope() as s:
        s.add(Event(workspace_id=msg.workspace_id, message_id=msg.id, message_key=msg.message_key,
                    dedupe_key="test-processed", event="processed", payload={}))
    time.sleep(3.2)
    report = engine.reconcile(HOOKS)
    assert report.settled_ambiguous == 1 and report.resent_ambiguous == 0
    assert _messages(db, cid)[0].status == "sent"
    assert sink.keys()[msg.message_key] == 1


def test_expired_lease_becomes_ambiguous(api, sink, db):
    list_id = make_contacts(api, 2)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    with session_scope() as s:
        engine.fanout(s, cid)
    # a consumer claimed both and died before recording anything
    with session_scope() as s:
        s.execute(update(Message).where(Message.campaign_id == cid).values(
            status="sending", lease_owner="dead", lease_expires_at=utcnow() - timedelta(seconds=1), attempts=1))
    report = engine.reconcile(HOOKS)
    assert report.ambiguous_marked == 2
    assert {m.status for m in _messages(db, cid)} == {"ambiguous"}
    resp = api.get("/api/v1/queue").json
    assert resp["ambiguous"] == 2


def test_account_error_pauses_the_campaign_with_the_reason(api, sink, db):
    list_id = make_contacts(api, 5)
    sink.behaviour(mode="5xx", status=401, count=100)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    drain(huey, until=lambda: campaign_status(api, cid) == "paused", timeout=30)
    c = api.get(f"/api/v1/campaigns/{cid}").json
    assert c["status"] == "paused" and "401" in c["status_reason"]
    drain(huey, timeout=10)
    msgs = _messages(db, cid)
    assert all(m.status in ("scheduled", "queued") for m in msgs)
    assert sum(1 for m in msgs if m.status == "failed") == 0  # nothing burned


def test_consecutive_failures_pause_the_campaign(api, sink, db, monkeypatch):
    monkeypatch.setattr(engine.record, "CONSECUTIVE_FAILURES_PAUSE", 5)
    list_id = make_contacts(api, 12)
    sink.behaviour(mode="5xx", status=500, count=1000)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    drain(huey, until=lambda: campaign_status(api, cid) == "paused", timeout=60)
    assert "consecutive" in api.get(f"/api/v1/campaigns/{cid}").json["status_reason"]


def test_capped_attempts_then_dead_letter(api, sink, db):
    list_id = make_contacts(api, 1)
    sink.behaviour(mode="5xx", status=502, count=1000)
    cid = launched_campaign(api, list_id, max_attempts=2,
                            steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    drain(huey, until=lambda: bool(_messages(db, cid, status="failed")), timeout=60)
    msg = _messages(db, cid)[0]
    assert msg.attempts == 2 and "502" in msg.last_error
    assert [a.outcome for a in db.scalars(select(MessageAttempt).order_by(MessageAttempt.id))] == ["retry", "retry"]


def test_redis_loss_is_recovered_from_the_ledger(api, sink, db):
    list_id = make_contacts(api, 20)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    run_through(huey, "dispatch")  # fan-out, then the dispatcher: 20 messages queued in the store
    assert len(_messages(db, cid, status="queued")) == 20
    huey.storage.flush_all()  # the queue store loses everything
    with session_scope() as s:  # ... and enough time passes for the reconciler to notice
        s.execute(update(Message).values(queued_at=utcnow() - timedelta(minutes=5)))
    report = engine.reconcile(HOOKS)
    assert report.requeued_stale == 20
    drain(huey, until=_completed(api, cid), timeout=60)
    keys = sink.keys()
    assert len(keys) == 20 and max(keys.values()) == 1


def test_duplicate_send_task_sends_once(api, sink, db):
    cid, queued, hooks = _dispatched_by_hand(api, 3)
    for ids in queued + queued:  # every batch twice
        engine.send_batch(ids, hooks)
    assert len(sink.accepted()) == 3 and max(sink.keys().values()) == 1


def test_contacts_added_to_a_running_campaign_are_enrolled(api, sink, db):
    list_id = make_contacts(api, 2)
    cid = launched_campaign(api, list_id, steps=[
        {"type": "email", "subject": "One", "html": "<p>1</p>"},
        {"type": "wait", "seconds": 3600},
        {"type": "email", "subject": "Two", "html": "<p>2</p>"},
    ])
    drain(huey, until=lambda: len(sink.accepted()) == 2, timeout=30)
    resp = api.post(f"/api/v1/lists/{list_id}/members", json={"emails": ["late@example.com"]})
    assert resp.status_code in (200, 201), resp.json
    drain(huey, until=lambda: len(sink.accepted()) == 3, timeout=30)
    assert sink.accepted()[-1]["to"][0] == "late@example.com"
    assert db.scalar(select(func.count()).select_from(Enrollment).where(Enrollment.campaign_id == cid)) == 3


def test_an_address_taken_off_the_suppression_list_is_enrolled_in_running_campaigns(app, sink, db):
    """Skipped at launch while suppressed, then un-suppressed (a mistaken bounce): its running
    campaigns enroll it, as they would a member added now. A sequence the suppression stopped
    stays stopped, and a campaign of another list is not touched."""

    ws_id, name, key, email = make_workspace(password="correct horse")
    ui = UiClient(app, email, "correct horse", ws_id, key, name)
    api = ui.api
    list_id = make_contacts(api, 4)  # person3 is never suppressed: its wait keeps the campaign running
    api.post("/api/v1/suppressions", json={"emails": ["person0@example.com", "person2@example.com"],
                                           "reason": "bounce"})
    two_steps = [{"type": "email", "subject": "One", "html": "<p>1</p>"}, {"type": "wait", "seconds": 3600},
                 {"type": "email", "subject": "Two", "html": "<p>2</p>"}]
    cid = launched_campaign(api, list_id, steps=two_steps)
    other_list = make_contacts(api, 1, list_name="Other", prefix="other")
    other = launched_campaign(api, other_list, steps=two_steps)
    drain(huey, until=lambda: len(sink.accepted()) == 3, timeout=30)  # person1, person3 and other0
    # person1 is suppressed mid-sequence: its sequence stops, and un-suppressing does not restart it
    api.post("/api/v1/suppressions", json={"emails": ["person1@example.com"], "reason": "unsubscribe"})
    assert api.delete("/api/v1/suppressions/person1@example.com").status_code == 204
    assert api.delete("/api/v1/suppressions/PERSON0@example.com").status_code == 204  # the API
    resp = ui.post("/suppressions/remove", {"email": "person2@example.com"}, follow_redirects=True)  # the UI
    html = resp.get_data(as_text=True)
    assert resp.status_code == 200 and "Enrolled in 1 running campaign of its lists" in html
    drain(huey, until=lambda: len(sink.accepted()) == 5, timeout=30)
    assert sorted(m["to"][0] for m in sink.accepted()[3:]) == ["person0@example.com", "person2@example.com"]
    db.expire_all()
    enrolled = db.scalars(select(Enrollment.status).where(Enrollment.campaign_id == cid)).all()
    assert sorted(enrolled) == ["active", "active", "active", "stopped"]
    assert db.scalar(select(func.count()).select_from(Enrollment).where(Enrollment.campaign_id == other)) == 1
    assert db.scalar(select(func.count()).select_from(Message).where(Message.campaign_id == cid,
                                                                      Message.status == "sent")) == 4
    # a completed campaign is not reopened: its list's members are no longer enrolled
    api.post("/api/v1/suppressions", json={"emails": ["other9@example.com"], "reason": "manual"})
    with session_scope() as s:
        s.execute(update(Campaign).where(Campaign.id == other).values(status="completed"))
    assert api.post(f"/api/v1/lists/{other_list}/members", json={"emails": ["other9@example.com"]}).status_code \
        in (200, 201)
    assert api.delete("/api/v1/suppressions/other9@example.com").status_code == 204
    assert db.scalar(select(func.count()).select_from(Enrollment).where(Enrollment.campaign_id == other)) == 1


def test_stream_reports_progress(api, sink, app):
    list_id = make_contacts(api, 3)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    drain(huey, until=_completed(api, cid), timeout=30)
    resp = api.get(f"/api/v1/campaigns/{cid}/stream?lifetime=3&interval=0.2")
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    body = resp.get_data(as_text=True)
    assert "event: progress" in body and '"sent": 3' in body and "event: end" in body
    assert "id: 1" in body
    resumed = api.get(f"/api/v1/campaigns/{cid}/stream?lifetime=1", headers={"Last-Event-ID": "7"})
    assert "id: 8" in resumed.get_data(as_text=True)
    # an id that is no number of ours starts again at 1; numbers that are no numbers are refused
    # (NaN or infinity reached time.sleep inside the open stream, after its 200)
    for foreign in ("\u00b2", "x", "-3", "9" * 40):
        resumed = api.get(f"/api/v1/campaigns/{cid}/stream?lifetime=1", headers={"Last-Event-ID": foreign})
        assert resumed.status_code == 200 and "id: 1\n" in resumed.get_data(as_text=True), foreign
    for query in ("interval=nan", "interval=inf", "lifetime=nan", "lifetime=-inf", "interval=abc"):
        resp = api.get(f"/api/v1/campaigns/{cid}/stream?{query}")
        assert resp.status_code == 400 and resp.json["error"]["message"], query


def test_stream_keeps_going_through_a_database_that_stops_answering(api, sink, monkeypatch):
    """An error in the open stream (after its 200) would cut it; the browser's reconnect would
    then meet a 503 and stop for good. The stream says so in a comment and tries again."""

    list_id = make_contacts(api, 1)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    drain(huey, until=_completed(api, cid), timeout=30)
    real, calls = stats.shared_campaign_stats, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise OperationalError("SELECT", {}, Exception("server closed the connection unexpectedly"))
        return real(*args, **kwargs)

    monkeypatch.setattr(stats, "shared_campaign_stats", flaky)
    body = api.get(f"/api/v1/campaigns/{cid}/stream?lifetime=3&interval=0.2").get_data(as_text=True)
    assert body.count(": the database is not answering") == 2
    assert "event: progress" in body and '"sent": 1' in body and "event: end" in body


def test_queue_and_metrics_reflect_the_ledger(api, sink, client):
    list_id = make_contacts(api, 3)
    sink.fail_addresses(["person2@example.com"])
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    drain(huey, until=_completed(api, cid), timeout=30)
    q = api.get("/api/v1/queue").json
    for key in ("depth", "scheduled", "in_flight", "stalled", "dead_letters", "failure_rate_5m", "duration_ms"):
        assert key in q
    assert q["dead_letters"] == 1 and q["failure_rate_5m"] == pytest.approx(1 / 3, abs=0.01)
    assert q["duration_ms"]["p50"] is not None and q["duration_ms"]["p95"] >= q["duration_ms"]["p50"]
    text = client.get("/metrics").get_data(as_text=True)
    assert 'herald_send_attempts_total{outcome="sent"} 2.0' in text
    assert 'herald_send_attempts_total{outcome="failed"} 1.0' in text
    assert "herald_dead_letters 1.0" in text
    assert "herald_send_duration_seconds_bucket" in text
    assert "herald_queue_depth" in text
    assert 'herald_messages{status="sent"} 2.0' in text and 'herald_messages{status="failed"} 1.0' in text
    assert 'herald_messages{status="sending"} 0.0' in text  # open statuses are there at 0 too


def test_metrics_count_open_messages_at_every_scrape_and_settled_ones_at_most_once_a_minute(
        api, sink, client, monkeypatch):
    """The settled statuses grow with the whole history: /metrics reuses their count for
    SETTLED_MAX_AGE seconds; the open ones (work to do, dead letters) are counted each time."""

    list_id = make_contacts(api, 3)
    sink.fail_addresses(["person2@example.com"])
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    drain(huey, until=_completed(api, cid), timeout=30)

    def scraped() -> dict[str, float]:
        text = client.get("/metrics").get_data(as_text=True)
        return {line.split('"')[1]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line.startswith("herald_messages{status=")}

    assert scraped() == {"scheduled": 0, "queued": 0, "sending": 0, "ambiguous": 0, "failed": 1, "sent": 2}
    with session_scope() as s:  # the dead letter settles, and the sent ones are cancelled (a stand-in)
        failed = s.scalar(select(Message).where(Message.campaign_id == cid, Message.status == "failed"))
        failed.status = "sent"
        s.execute(update(Message).where(Message.campaign_id == cid, Message.id != failed.id)
                  .values(status="cancelled"))
    assert scraped() == {"scheduled": 0, "queued": 0, "sending": 0, "ambiguous": 0, "failed": 0, "sent": 2}
    monkeypatch.setattr(queue_health, "SETTLED_MAX_AGE", 0.0)
    assert scraped() == {"scheduled": 0, "queued": 0, "sending": 0, "ambiguous": 0, "failed": 0, "sent": 1,
                         "cancelled": 2}


def test_messages_api_filters_and_detail(api, sink, other_api):
    list_id = make_contacts(api, 3)
    sink.fail_addresses(["person0@example.com"])
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    drain(huey, until=_completed(api, cid), timeout=30)
    page = api.get(f"/api/v1/messages?campaign_id={cid}&status=failed").json
    assert [m["email"] for m in page["items"]] == ["person0@example.com"]
    detail = api.get(f"/api/v1/messages/{page['items'][0]['id']}").json
    assert detail["attempts_log"][0]["outcome"] == "failed" and detail["attempts_log"][0]["http_status"] == 400
    assert api.get("/api/v1/messages?status=bogus").status_code == 400
    assert other_api.get(f"/api/v1/messages/{page['items'][0]['id']}").status_code == 404
    assert other_api.get(f"/api/v1/messages?campaign_id={cid}").json["items"] == []


@pytest.mark.parametrize("lost", ["the connection", "the COMMIT's answer"])
def test_recording_outcomes_waits_out_a_database_that_stops_answering(api, sink, db, monkeypatch, lost):
    """A sent message left unrecorded would become ambiguous and be sent again: the recording is
    tried again, and a try whose COMMIT went through unanswered leaves no second attempt row and
    no second next message."""

    list_id = make_contacts(api, 4)
    cid = launched_campaign(api, list_id, steps=[
        {"type": "email", "subject": "Hi", "html": "<p>x</p>"}, {"type": "wait", "seconds": 3600},
        {"type": "email", "subject": "Again", "html": "<p>y</p>"}])
    with session_scope() as s:
        engine.fanout(s, cid)
    queued: list[list[int]] = []
    hooks = engine.Hooks(enqueue_send=lambda ids, p: queued.append(ids), wake_dispatcher=lambda at: None)
    engine.dispatch_once(engine.get_limiter(), hooks)
    record_once, failures = engine.record._record_once, []

    def flaky(outcomes, owner, again=False):
        if len(failures) < 2:  # two tries in a row fail
            failures.append(again)
            if lost == "the COMMIT's answer":
                record_once(outcomes, owner, again)
            raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))
        return record_once(outcomes, owner, again)

    monkeypatch.setattr(engine.record, "_record_once", flaky)
    counts = engine.send_batch([i for ids in queued for i in ids], hooks)
    assert counts == {"sent": 4} and failures == [False, True]
    assert len(sink.keys()) == 4 and max(sink.keys().values()) == 1
    db.expire_all()
    first_step, second_step = _step_ids(db, cid)
    first = db.scalars(select(Message).where(Message.campaign_id == cid, Message.step_id == first_step)).all()
    assert [m.status for m in first] == ["sent"] * 4
    assert db.scalar(select(func.count()).select_from(MessageAttempt)
                     .where(MessageAttempt.message_id.in_([m.id for m in first]))) == 4
    second = db.scalars(select(Message).where(Message.campaign_id == cid, Message.step_id == second_step))
    assert [m.status for m in second.all()] == ["scheduled"] * 4


def test_a_claim_whose_answer_was_lost_is_recognised_when_tried_again(api, sink, db, monkeypatch):
    """The claim's COMMIT went through but its answer was lost: the next try finds the messages
    no longer queued, and takes them as its own (same owner, same lease end) instead of leaving
    them to run out their lease and be resent as ambiguous."""
    cid, queued, hooks = _dispatched_by_hand(api, 3)
    retry_transient = engine.send.retry_transient

    def answer_lost(work, what, seconds, **kw):
        if what == "claiming messages to send":
            pg, rows = work(0)  # committed; its answer never came back
            assert len(rows) == 3
            with session_scope() as s:  # as if that try had claimed two of the three
                s.execute(update(Message).where(Message.id == rows[0].id).values(
                    status="queued", attempts=Message.attempts - 1, lease_owner=None, lease_expires_at=None))
            pg, rows = work(1)
            assert sorted(r.id for r in rows) == sorted({r.id for r in rows}) and len(rows) == 3
            return pg, rows
        return retry_transient(work, what, seconds, **kw)

    monkeypatch.setattr(engine.send, "retry_transient", answer_lost)
    assert engine.send_batch([i for ids in queued for i in ids], hooks) == {"sent": 3}
    assert len(sink.keys()) == 3
    db.expire_all()
    assert [(m.status, m.attempts) for m in _messages(db, cid)] == [("sent", 1)] * 3


def test_a_batch_that_fails_midway_hands_back_what_it_had_not_sent(api, sink, db, monkeypatch):
    """An unexpected error after the first group of calls (here in the pacing): the batch fails,
    the sends made are recorded, and the rest goes back to the ledger at once (scheduled, no
    attempt spent), instead of staying claimed until its lease runs out, then resent as ambiguous."""
    cid, queued, hooks = _dispatched_by_hand(api, 20)
    pace, paced = engine.send.pace, []

    def failing_pace(*args, **kwargs):
        paced.append(1)
        if len(paced) > 1:
            raise RuntimeError("a bug")
        return pace(*args, **kwargs)

    monkeypatch.setattr(engine.send, "pace", failing_pace)
    with pytest.raises(RuntimeError):
        engine.send_batch([i for ids in queued for i in ids], hooks)
    sent = len(sink.keys())
    assert sent == engine.SEND_GROUP
    statuses = Counter((m.status, m.attempts) for m in _messages(db, cid))
    assert statuses == {("sent", 1): sent, ("scheduled", 0): 20 - sent}


def test_a_test_send_that_fails_before_its_call_goes_back_to_the_ledger(api, sink, db, monkeypatch):
    """The priority lane runs in the send pool: an error there before the call (its pacing) is
    not lost with the thread, the message is handed back unsent."""
    list_id = make_contacts(api, 1)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    with session_scope() as s:
        msg = engine.test_send(s, api.workspace_id, cid, "me@example.com")
        msg_id = msg.id

    def failing_pace(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(engine.send, "pace", failing_pace)
    hooks = engine.Hooks(enqueue_send=lambda ids, p: None, wake_dispatcher=lambda at: None)
    assert engine.send_batch([msg_id], hooks) == {"released": 1}
    assert sink.keys() == {}
    db.expire_all()
    m = db.get(Message, msg_id)
    assert (m.status, m.attempts, m.lease_owner) == ("scheduled", 0, None)


def test_a_dispatch_the_database_failed_runs_again_in_seconds(monkeypatch):
    """Not at the reconciler's next minute: a restart of the database stalls sending for seconds."""

    def down(*args, **kwargs):
        raise OperationalError("SELECT", {}, Exception("connection refused"))

    monkeypatch.setattr(engine, "run_dispatcher", down)
    before = utcnow()
    task_engine.dispatch.call_local()  # logs and schedules itself; does not raise
    etas = [(t.eta - before).total_seconds() for t in huey.pending() if t.name == "dispatch"]
    assert len(etas) == 1 and task_engine.DISPATCH_RETRY <= etas[0] <= 2 * task_engine.DISPATCH_RETRY + 1, etas


def test_a_dispatch_the_queue_store_failed_hands_back_and_tries_again(api, db, monkeypatch):
    """Redis refuses the send tasks midway: the messages it did not take go back to scheduled at
    once (not after the stale-queue sweep), and the dispatch task tries again in a few seconds,
    in its own worker while Redis cannot even take a delayed task."""

    list_id = make_contacts(api, 30)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    with session_scope() as s:
        engine.fanout(s, cid)
    monkeypatch.setattr(engine.dispatch, "SEND_BATCH", 10)
    taken: list[list[int]] = []

    def enqueue(ids, priority):
        if taken:
            raise redis.ConnectionError("Connection refused")
        taken.append(ids)

    hooks = engine.Hooks(enqueue_send=enqueue, wake_dispatcher=lambda at: None)
    with pytest.raises(redis.ConnectionError):
        engine.dispatch_once(engine.get_limiter(), hooks)
    assert Counter(m.status for m in _messages(db, cid)) == {"queued": 10, "scheduled": 20}
    assert {m.id for m in _messages(db, cid, status="queued")} == set(taken[0])

    # a send task that cannot read the stop generation hands its messages back, unclaimed
    monkeypatch.setattr(engine.send.stopgen, "current", lambda: (_ for _ in ()).throw(redis.ConnectionError("refused")))
    with pytest.raises(redis.ConnectionError):
        engine.send_batch(taken[0], hooks)
    assert Counter((m.status, m.attempts) for m in _messages(db, cid)) == {("scheduled", 0): 30}

    runs, sleeps, scheduled = [], [], []

    def run_dispatcher(*args, **kwargs):
        runs.append(1)
        if len(runs) < 3:
            raise redis.ConnectionError("Connection refused")

    def schedule(delay):
        scheduled.append(delay)
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(engine, "run_dispatcher", run_dispatcher)
    monkeypatch.setattr(task_engine.dispatch, "schedule", schedule)
    monkeypatch.setattr(task_engine.time, "sleep", sleeps.append)
    task_engine.dispatch.call_local()
    assert len(runs) == 3 and len(sleeps) == 2 and len(scheduled) == 2
    assert all(task_engine.DISPATCH_RETRY <= d <= 2 * task_engine.DISPATCH_RETRY for d in sleeps)


def _step_ids(db, cid: int) -> list[int]:
    return db.scalars(select(Step.id).where(Step.campaign_id == cid, Step.type == "email")
                      .order_by(Step.position)).all()


def test_completed_campaign_status(api, sink, db):
    list_id = make_contacts(api, 2)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    drain(huey, until=_completed(api, cid), timeout=30)
    c = db.get(Campaign, cid)
    assert c.status == "completed" and c.finished_at is not None


def test_dispatcher_with_sends_in_flight_looks_again_when_the_next_message_falls_due(api, db):
    """Work falling due while sends are in flight is dispatched when it falls due, not at the
    in-flight poll (INFLIGHT_POLL, 2.5 s): that poll made p99 lateness ~3 s."""
    cid, queued, hooks = _dispatched_by_hand(api, 3)
    assert sum(map(len, queued)) == 3  # all three queued: sends in flight
    later = _messages(db, cid)[-1]
    due = utcnow() + timedelta(seconds=0.5)
    with session_scope() as s:
        s.execute(update(Message).where(Message.id == later.id)
                  .values(status="scheduled", queued_at=None, due_at=due))
    result = engine.dispatch_once(engine.get_limiter(), hooks)
    assert result.queued == 0
    assert result.next_wake == due


def test_bulk_batches_take_turns_but_test_sends_never_wait(monkeypatch):
    """HERALD_SEND_BATCHES caps the bulk batches running at once in a process; a test send
    (urgent, enqueued through HOOKS at PRIORITY_TEST) goes past a full gate."""

    gate = threading.BoundedSemaphore(1)
    monkeypatch.setattr(task_engine, "_bulk_batches", gate)
    ran = []
    monkeypatch.setattr(task_engine.engine, "send_batch", lambda ids, hooks: ran.append(ids))
    gate.acquire()  # the one bulk slot is taken by a batch still running
    bulk = threading.Thread(target=task_engine.send_messages.call_local, args=([1],))
    bulk.start()
    task_engine.send_messages.call_local([2], True)
    bulk.join(0.3)
    assert ran == [[2]] and bulk.is_alive()  # the test send went; the bulk batch waits its turn
    gate.release()
    bulk.join(5)
    assert ran == [[2], [1]]
    enqueued = []
    monkeypatch.setattr(task_engine.huey, "enqueue", enqueued.append)
    task_engine.HOOKS.enqueue_send([3], task_engine.PRIORITY_TEST)
    task_engine.HOOKS.enqueue_send([4], task_engine.PRIORITY_BULK)
    task_engine.HOOKS.enqueue_send([5], engine.TEST_PRIORITY)  # the reconciler's, from the ledger's scale
    assert [(t.args, t.priority) for t in enqueued] == [(([3], True), task_engine.PRIORITY_TEST),
                                                        (([4], False), task_engine.PRIORITY_BULK),
                                                        (([5], True), task_engine.PRIORITY_TEST)]


def test_pause_mid_batch_stops_the_rest_of_the_batch(api, sink, db, monkeypatch):
    """Once pause has returned, no further call of the batch starts (the stop generation)."""

    cid, queued, hooks = _dispatched_by_hand(api, 5)
    monkeypatch.setattr(engine.send, "_pool", ThreadPoolExecutor(1))  # one call at a time, in order
    real = get_mailer()
    calls = []

    class PausingMailer:
        def send(self, email):
            result = real.send(email)
            calls.append(email.to_email)
            if len(calls) == 1:
                assert api.post(f"/api/v1/campaigns/{cid}/pause").json["status"] == "paused"
            return result

    for ids in queued:
        engine.send_batch(ids, hooks, mailer=PausingMailer())
    assert len(calls) == 1 and len(sink.accepted()) == 1
    msgs = _messages(db, cid)
    assert sorted(m.status for m in msgs) == ["scheduled"] * 4 + ["sent"]
    assert all(m.attempts == 0 for m in msgs if m.status == "scheduled")  # nothing spent


def test_unsubscribe_mid_batch_is_honoured_before_the_next_call(api, sink, db, monkeypatch):
    cid, queued, hooks = _dispatched_by_hand(api, 3)
    monkeypatch.setattr(engine.send, "_pool", ThreadPoolExecutor(1))
    real = get_mailer()
    order = [m.email for m in _messages(db, cid)]

    class SuppressingMailer:
        def send(self, email):
            result = real.send(email)
            if email.to_email == order[0]:
                resp = api.post("/api/v1/suppressions", json={"emails": [order[1]], "reason": "unsubscribe"})
                assert resp.status_code in (200, 201)
            return result

    for ids in queued:
        engine.send_batch(ids, hooks, mailer=SuppressingMailer())
    sent_to = [m["to"][0] for m in sink.accepted()]
    assert order[1] not in sent_to and len(sent_to) == 2
    # it was claimed when its address was suppressed: cancelled, not back in line (it cycled
    # scheduled -> queued -> refused -> stale -> scheduled for ever, and the campaign never ended)
    (skipped,) = [m for m in _messages(db, cid) if m.email == order[1]]
    assert (skipped.status, skipped.last_error) == ("cancelled", "address is suppressed")
    assert campaign_status(api, cid) == "completed"


def test_a_retry_or_a_cancel_mid_batch_never_leaves_work_that_cannot_go(api, sink, db, monkeypatch):
    cid, queued, hooks = _dispatched_by_hand(api, 4)
    monkeypatch.setattr(engine.send, "_pool", ThreadPoolExecutor(1))
    real = get_mailer()
    order = [m.email for m in _messages(db, cid)]
    sink.behaviour(mode="5xx", status=503, count=1)  # the first call fails, retryable

    class StoppingMailer:
        def send(self, email):
            if email.to_email == order[0]:  # unsubscribed while its (failing) call is in flight
                assert api.post("/api/v1/suppressions", json={"emails": [order[0]]}).status_code in (200, 201)
                return real.send(email)
            result = real.send(email)
            assert api.post(f"/api/v1/campaigns/{cid}/cancel").json["status"] == "cancelled"
            return result

    for ids in queued:
        engine.send_batch(ids, hooks, mailer=StoppingMailer())
    by_email = {m.email: m for m in _messages(db, cid)}
    assert (by_email[order[0]].status, by_email[order[0]].last_error) == ("cancelled", "address is suppressed")
    assert by_email[order[1]].status == "sent"
    for email in order[2:]:  # released after the cancel: cancelled, not scheduled in a cancelled campaign
        assert (by_email[email].status, by_email[email].last_error) == ("cancelled", "campaign cancelled")
    assert api.get(f"/api/v1/campaigns/{cid}").json["stats"]["scheduled"] == 0


def test_work_claimed_by_a_dispatcher_racing_a_pause_goes_at_once_after_resume(api, sink, db):
    cid, queued, hooks = _dispatched_by_hand(api, 3)
    assert api.post(f"/api/v1/campaigns/{cid}/pause").json["status"] == "paused"
    with session_scope() as s:  # the dispatcher's claim landed just after the pause committed
        s.execute(update(Message).where(Message.campaign_id == cid).values(status="queued", queued_at=utcnow()))
    for ids in queued:
        engine.send_batch(ids, hooks)  # refused (paused): back to scheduled, not left queued for 90 s
    assert {m.status for m in _messages(db, cid)} == {"scheduled"} and sink.accepted() == []
    assert api.post(f"/api/v1/campaigns/{cid}/resume").json["status"] == "running"
    drain(huey, until=_completed(api, cid), timeout=30)
    assert len(sink.accepted()) == 3


def test_a_test_send_to_a_suppressed_address_is_refused(api, sink, db):
    list_id = make_contacts(api, 1)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    assert api.post("/api/v1/suppressions", json={"emails": ["gone@example.com"]}).status_code in (200, 201)
    resp = api.post(f"/api/v1/campaigns/{cid}/test-send", json={"email": "Gone@Example.com"})
    assert resp.status_code == 409 and "suppression list" in resp.json["error"]["message"]
    assert not _messages(db, cid, is_test=True)


def test_late_event_after_the_window_cancels_the_pending_resend(api, sink, db):
    list_id = make_contacts(api, 1)
    sink.behaviour(mode="hang", count=1, delay=4)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    drain(huey, until=lambda: bool(_messages(db, cid, status="ambiguous")), timeout=30)
    time.sleep(3.2)
    with session_scope() as s:  # the window passes: back in line for a resend ...
        s.execute(update(Message).where(Message.campaign_id == cid).values(
            ambiguous_at=utcnow() - timedelta(seconds=10)))
    engine.reconcile(HOOKS)
    msg = _messages(db, cid)[0]
    assert msg.status == "scheduled" and msg.resends == 1
    with session_scope() as s:  # ... when the provider's event finally arrives
        assert engine.settle_ambiguous(s, [msg.id]) == 1
    drain(huey, timeout=10)
    assert _messages(db, cid)[0].status == "sent"
    assert sink.keys()[msg.message_key] == 1  # only the hung call: no resend


def test_consumer_start_loads_the_mailer_and_templates_before_the_first_send():
    saved = providers._mailer
    providers.set_mailer(None)
    try:
        task_engine._warm_up()
        assert providers._mailer is not None  # the HTTP pool exists before the first batch claims anything
    finally:
        providers.set_mailer(saved)
