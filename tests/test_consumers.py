"""Real ``huey_consumer`` processes: several at once, kill -9 mid-campaign, the queue store lost."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select, text

from campaigns.db import get_engine
from campaigns.models import Message
from tasks import huey
from tests.helpers import BACKEND, campaign_status, launched_campaign, make_contacts, wait_for

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
ONE_STEP = [{"type": "email", "subject": "Hi {{ contact.first_name }}", "html": "<p>Hello</p>"}]


def test_two_consumers_send_everything_once(api, sink, consumers):
    list_id = make_contacts(api, 300)
    consumers(2)
    cid = launched_campaign(api, list_id, steps=[
        ONE_STEP[0], {"type": "wait", "seconds": 1}, {"type": "email", "subject": "Again", "html": "<p>2</p>"}])
    wait_for(lambda: campaign_status(api, cid) == "completed", timeout=120)
    keys = sink.keys()
    assert len(keys) == 600 and max(keys.values()) == 1


def test_a_consumer_with_one_worker_sends_everything(api, sink, consumers, monkeypatch):
    # Under a rate limit the dispatcher re-queued itself at its priority, ahead of the sends it
    # queued: the lone worker ran dispatch after dispatch and sent nothing (0 of 600 after 90 s).
    monkeypatch.setenv("SENDGRID_RATE_LIMIT", "50/second")  # the consumer's budget: 3 s of sends
    list_id = make_contacts(api, 150)
    consumers(1, workers=1)
    cid = launched_campaign(api, list_id, steps=ONE_STEP)
    wait_for(lambda: campaign_status(api, cid) == "completed", timeout=40, reconcile_every=None)
    keys = sink.keys()
    assert len(keys) == 150 and max(keys.values()) == 1


def test_kill_9_mid_campaign_then_restart(api, sink, db, consumers):
    list_id = make_contacts(api, 300)
    sink.behaviour(mode="slow", delay=0.02, seconds=600)
    (first,) = consumers(1)
    cid = launched_campaign(api, list_id, steps=ONE_STEP)
    wait_for(lambda: len(sink.keys()) >= 60, timeout=60, reconcile_every=None)
    first.kill9()
    db.expire_all()
    in_flight_at_kill = db.scalar(select(func.count()).where(Message.status == "sending"))
    consumers(1)
    wait_for(lambda: campaign_status(api, cid) == "completed", timeout=120)
    keys = sink.keys()
    assert len(keys) == 300  # every message reached the sink
    repeated = [k for k, n in keys.items() if n > 1]
    # a key reaches it twice only for a send cut off in flight, and each was marked ambiguous
    assert len(repeated) <= in_flight_at_kill
    db.expire_all()
    for key in repeated:
        msg = db.scalar(select(Message).where(Message.message_key == key))
        assert msg.resends >= 1
    assert db.scalar(select(func.count()).where(Message.status != "sent")) == 0


@pytest.mark.postgres_only
def test_queue_store_flushed_mid_campaign(api, sink, db, consumers):
    assert BACKEND == "postgres"

    list_id = make_contacts(api, 300)
    sink.behaviour(mode="slow", delay=0.01, seconds=600)
    consumers(1)
    cid = launched_campaign(api, list_id, steps=ONE_STEP)
    wait_for(lambda: len(sink.keys()) >= 50, timeout=60, reconcile_every=None)
    # Everything Herald keeps in Redis is gone (FLUSHALL, limited to this run's keys so that
    # other test runs sharing the server are not hit).
    r = redis.Redis.from_url(os.environ["REDIS_URL"])
    keys = set(r.scan_iter(match=f"*{os.environ['HERALD_QUEUE_NAME']}*", count=1000))
    keys |= set(r.scan_iter(match=f"*{huey.storage.name}*", count=1000))  # Huey strips punctuation
    assert any(k.startswith(b"huey.") for k in keys)
    r.delete(*keys)
    r.close()
    wait_for(lambda: campaign_status(api, cid) == "completed", timeout=120)
    keys = sink.keys()
    assert len(keys) == 300 and max(keys.values()) == 1  # all sent, none twice


def test_sigterm_lets_in_flight_sends_finish(api, sink, db, consumers):
    list_id = make_contacts(api, 40)
    sink.behaviour(mode="slow", delay=0.2, seconds=600)
    (c,) = consumers(1, workers=2)
    cid = launched_campaign(api, list_id, steps=ONE_STEP)
    wait_for(lambda: len(sink.keys()) >= 3, timeout=60, reconcile_every=None)
    c.stop()  # SIGTERM: running tasks finish, then the consumer exits
    assert c.proc.returncode is not None
    db.expire_all()
    # nothing was left claimed mid-call: every send that started was recorded
    assert db.scalar(select(func.count()).where(Message.status == "sending")) == 0
    assert db.scalar(select(func.count()).where(Message.campaign_id == cid, Message.status == "sent")) == len(
        sink.keys())
    huey.storage.flush_all()


@pytest.mark.postgres_only
def test_database_connections_cut_mid_campaign(api, sink, db, consumers):
    """PostgreSQL drops every connection mid-campaign (a restart, a failover): the consumer
    carries on once it answers again, and a send whose outcome it knew is recorded, not resent."""

    list_id = make_contacts(api, 600)
    sink.behaviour(mode="slow", delay=0.1, seconds=600)
    (c,) = consumers(1)
    cid = launched_campaign(api, list_id, steps=ONE_STEP)
    wait_for(lambda: len(sink.keys()) >= 50, timeout=60, reconcile_every=None)
    others = " FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    # The consumer spends most of its time in HTTP calls, so a cut can miss its queries (CI saw
    # a run where none hit): the first one is made while it waits on the ledger, mid-statement.
    with get_engine().connect() as conn:
        conn.execute(text("LOCK TABLE messages IN EXCLUSIVE MODE"))  # reads go on, writes wait
        wait_for(lambda: conn.scalar(text("SELECT count(*)" + others + " AND wait_event_type = 'Lock'")) > 0,
                 timeout=30, reconcile_every=None)
        conn.execute(text("SELECT pg_terminate_backend(pid)" + others))
        conn.rollback()
    for _ in range(40):  # then again and again for two seconds, as connections come back
        with get_engine().connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid)" + others))
        time.sleep(0.05)
    get_engine().dispose()
    db.close()
    # (no reconcile from here: the consumer finds its way back on its own)
    wait_for(lambda: campaign_status(api, cid) == "completed", timeout=120, reconcile_every=None)
    keys = sink.keys()
    assert len(keys) == 600
    assert max(keys.values()) == 1, [k for k, n in keys.items() if n > 1]  # (before: 131 of 300 sent twice)
    db.expire_all()
    assert db.scalar(select(func.count()).where(Message.campaign_id == cid, Message.resends > 0)) == 0
    assert c.proc.poll() is None  # the consumer is still running
    assert "the database did not answer" in c.log_path.read_text()  # the cuts did hit its work


@pytest.mark.postgres_only
def test_queue_store_connections_cut_mid_campaign(api, sink, db, consumers):
    """Redis drops every client connection again and again for two seconds (a restart, a
    failover): the consumer keeps running and comes back by itself, every message goes once.
    (Every client of the server is cut, other programs' too: the suite owns its Redis in CI.)"""

    list_id = make_contacts(api, 600)
    sink.behaviour(mode="slow", delay=0.1, seconds=600)
    (c,) = consumers(1)
    cid = launched_campaign(api, list_id, steps=ONE_STEP)
    wait_for(lambda: len(sink.keys()) >= 50, timeout=60, reconcile_every=None)
    r = redis.Redis.from_url(os.environ["REDIS_URL"])
    # A client killed while idle reconnects unseen, so a cut can miss every command the consumer
    # has in flight: the first one is made while a worker of it waits for a task (BZPOPMIN).
    wait_for(lambda: any("b" in c["flags"] and c["cmd"] == "bzpopmin" for c in r.client_list()),
             timeout=30, reconcile_every=None)
    for _ in range(40):
        r.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        time.sleep(0.05)
    r.close()
    # (no reconcile from here; a task Redis lost mid-read waits for the stale-queue sweep)
    wait_for(lambda: campaign_status(api, cid) == "completed", timeout=120, reconcile_every=None)
    keys = sink.keys()
    assert "ConnectionError" in c.log_path.read_text()  # the cuts did hit it
    assert len(keys) == 600
    assert max(keys.values()) == 1, [k for k, n in keys.items() if n > 1]
    assert c.proc.poll() is None
