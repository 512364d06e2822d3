"""/metrics' send-attempt counters: exact, never going backwards (deleting dead letters or a
campaign takes nothing back), and read from rolled-up totals plus the recent attempts
(``campaigns.queue_health.roll_up``) instead of the whole history at every scrape."""

from __future__ import annotations

import random
import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, insert, select

from campaigns import engine, queue_health
from campaigns.db import session_scope, utcnow
from campaigns.models import Counter, Message, MessageAttempt
from tasks import huey
from tasks.engine import HOOKS
from tests.helpers import drain, launched_campaign, make_contacts

ATTEMPT_FAMILIES = ("herald_send_attempts_total", "herald_send_retries_total", "herald_send_duration_seconds",
                    "herald_ambiguous_resends_total")


def scrape(client) -> dict[str, float]:
    out = {}
    for line in client.get("/metrics").get_data(as_text=True).splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def attempt_metrics(client) -> dict[str, float]:
    return {k: v for k, v in scrape(client).items() if k.startswith(ATTEMPT_FAMILIES)}


def expected(rows: list[dict]) -> dict[str, float]:
    """The figures /metrics should give for these attempt rows, computed here."""
    out = {"herald_send_retries_total": float(sum(1 for r in rows if r["number"] > 1)),
           "herald_send_duration_seconds_count": float(len(rows)),
           'herald_send_duration_seconds_bucket{le="+Inf"}': float(len(rows))}
    for r in rows:
        key = f'herald_send_attempts_total{{outcome="{r["outcome"]}"}}'
        out[key] = out.get(key, 0.0) + 1
    for b in queue_health.DURATION_BUCKETS_MS:
        out[f'herald_send_duration_seconds_bucket{{le="{b / 1000.0}"}}'] = float(
            sum(1 for r in rows if r["duration_ms"] <= b))
    out["herald_send_duration_seconds_sum"] = round(sum(r["duration_ms"] for r in rows) * 1000) / 1e6
    return out


def add_attempts(workspace_id: int, n: int, seed: int) -> list[dict]:
    """n attempt rows of no message (as a deleted dead letter's are), random outcomes and durations."""
    rng = random.Random(seed)
    now = utcnow()
    rows = [dict(workspace_id=workspace_id, campaign_id=None, message_id=None, number=rng.choice((1, 1, 2, 3)),
                 started_at=now, finished_at=now, duration_ms=round(rng.uniform(1, 40000), 3),
                 outcome=rng.choice(("sent", "sent", "retry", "failed", "ambiguous", "rate_limited")))
            for _ in range(n)]
    with session_scope() as s:
        s.execute(insert(MessageAttempt), rows)
    return rows


def check(client, rows: list[dict]) -> None:
    got = attempt_metrics(client)
    want = expected(rows)
    assert {k: got.get(k) for k in want} == pytest.approx(want, abs=1e-6)
    outcomes = {k for k in got if k.startswith("herald_send_attempts_total")}
    assert outcomes == {k for k in want if k.startswith("herald_send_attempts_total")}


def totals() -> dict[str, int]:
    with session_scope() as s:
        return {n: v for n, v in s.execute(select(Counter.name, Counter.value)
                                           .where(Counter.name.startswith(queue_health.METRICS))).all()}


def test_counters_are_exact_before_and_after_each_roll_up(api, client, monkeypatch):
    monkeypatch.setattr(queue_health, "ROLLUP_AGE", 0.0)
    monkeypatch.setattr(queue_health, "ROLLUP_CHUNK", 700)
    rows = add_attempts(api.workspace_id, 1000, seed=1)
    check(client, rows)  # first scrape: the watermark row is made; everything is counted live
    check(client, rows)  # notes the newest attempt id
    assert totals().get(queue_health.UPTO) == 0
    check(client, rows)  # rolls up the first 700 (the chunk)
    assert totals()[queue_health.UPTO] == totals()[queue_health.PENDING] - 300
    check(client, rows)  # the other 300
    rows += add_attempts(api.workspace_id, 400, seed=2)
    with session_scope() as s:
        newest = s.scalar(select(func.max(MessageAttempt.id)))
    for _ in range(4):  # new attempts counted live, noted, then rolled up: exact at every scrape
        check(client, rows)
    assert totals()[queue_health.UPTO] == newest
    assert totals()[queue_health.METRICS + "duration_count"] == 1400


def test_an_attempt_id_is_rolled_up_only_once_it_has_been_the_newest_for_a_while(api):
    add_attempts(api.workspace_id, 10, seed=3)
    assert queue_health.roll_up(now=1000.0) == 0  # makes the watermark row
    assert queue_health.roll_up(now=1000.0) == 0  # notes the newest id at t = 1000
    assert queue_health.roll_up(now=1000.0 + queue_health.ROLLUP_AGE - 1) == 0
    add_attempts(api.workspace_id, 5, seed=4)  # newer than the note: waits for the next one
    assert queue_health.roll_up(now=1000.0 + queue_health.ROLLUP_AGE) == 10
    assert queue_health.roll_up(now=5000.0) == 0  # notes the 5 newer ones
    assert queue_health.roll_up(now=5000.0 + queue_health.ROLLUP_AGE) == 5


def test_concurrent_roll_ups_add_each_attempt_once(api, client, monkeypatch):
    monkeypatch.setattr(queue_health, "ROLLUP_CHUNK", 37)
    rows = add_attempts(api.workspace_id, 600, seed=5)
    queue_health.roll_up(now=0.0)
    queue_health.roll_up(now=0.0)  # noted
    errors = []

    def roll():
        try:
            for _ in range(40):
                queue_health.roll_up(now=1e9)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=roll) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    while queue_health.roll_up(now=1e9):
        pass
    t = totals()
    assert t[queue_health.UPTO] == t[queue_health.PENDING]  # all of it rolled up
    assert t[queue_health.METRICS + "duration_count"] == 600  # each attempt once
    check(client, rows)


def test_deleting_dead_letters_and_campaigns_takes_nothing_back(api, sink, client, db, monkeypatch):
    monkeypatch.setattr(queue_health, "ROLLUP_AGE", 0.0)
    list_id = make_contacts(api, 4)
    sink.fail_addresses(["person0@example.com", "person1@example.com"], status=400)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    drain(huey, until=lambda: api.get(f"/api/v1/campaigns/{cid}").json["status"] == "completed", timeout=60)
    before = attempt_metrics(client)
    assert before['herald_send_attempts_total{outcome="failed"}'] == 2
    assert before['herald_send_attempts_total{outcome="sent"}'] == 2
    queue = api.get("/api/v1/queue").json
    assert (queue["failure_rate_5m"], queue["attempts_5m"]) == (0.5, 4)

    dead = api.get(f"/api/v1/messages?campaign_id={cid}&status=failed").json["items"]
    assert api.delete(f"/api/v1/messages/{dead[0]['id']}").status_code == 204
    assert attempt_metrics(client) == before  # scrapes roll up in between: still the same
    assert api.post(f"/api/v1/campaigns/{cid}/delete-failed").json == {"deleted": 1}
    assert attempt_metrics(client) == before
    assert api.delete(f"/api/v1/campaigns/{cid}").status_code == 204
    assert attempt_metrics(client) == before
    queue = api.get("/api/v1/queue").json
    assert (queue["failure_rate_5m"], queue["attempts_5m"]) == (0.5, 4)  # the deleted ones still count
    # the attempts are kept, with no message and no campaign any more
    assert db.scalar(select(func.count()).select_from(MessageAttempt)
                     .where(MessageAttempt.message_id.is_(None), MessageAttempt.campaign_id.is_(None))) == 4


def test_ambiguous_resends_are_counted_by_the_reconciler_and_kept(api, sink, client, db, monkeypatch):
    list_id = make_contacts(api, 1)
    cid = launched_campaign(api, list_id, steps=[{"type": "email", "subject": "Hi", "html": "<p>x</p>"}])
    with session_scope() as s:
        engine.fanout(s, cid)
    long_ago = utcnow() - timedelta(hours=1)
    db.execute(Message.__table__.update().where(Message.campaign_id == cid)
               .values(status="ambiguous", ambiguous_at=long_ago, attempts=1))
    db.commit()
    assert scrape(client)["herald_ambiguous_resends_total"] == 0
    assert engine.reconcile(HOOKS).resent_ambiguous == 1
    assert scrape(client)["herald_ambiguous_resends_total"] == 1
    drain(huey, until=lambda: api.get(f"/api/v1/campaigns/{cid}").json["status"] == "completed", timeout=30)
    assert api.delete(f"/api/v1/campaigns/{cid}").status_code == 204
    assert scrape(client)["herald_ambiguous_resends_total"] == 1
