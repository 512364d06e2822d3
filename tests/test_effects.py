"""After-commit effects (campaigns/effects.py): the domain queues the work that must follow a
commit; it runs once the transaction has committed, never after a rollback."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from campaigns import effects, engine
from campaigns.db import new_session, session_factory, session_scope
from campaigns.models import Campaign, Message
from tasks import huey
from tests.helpers import campaign_body, make_contacts


@pytest.fixture
def recorded(monkeypatch):
    """Handlers that record what ran, and (a fan-out) the campaign's status another connection saw then."""
    calls = []

    def handler(kind):
        def run(*args):
            with new_session() as s:  # another connection: sees only committed rows
                fanout = kind == effects.FANOUT
                status = s.scalar(select(Campaign.status).where(Campaign.id == args[0])) if fanout else None
            calls.append((kind, args, status))
        return run

    for kind in (effects.FANOUT, effects.WAKE_DISPATCHER, effects.SEND_TEST):
        monkeypatch.setitem(effects._handlers, kind, handler(kind))
    return calls


def _draft(api) -> int:
    list_id = make_contacts(api, 2)
    return api.post("/api/v1/campaigns", json=campaign_body(list_id)).json["id"]


def test_a_launch_fans_out_after_its_commit_and_not_before(api, recorded):
    cid = _draft(api)
    with session_factory()() as s:
        engine.launch(s, api.workspace_id, cid)
        s.flush()
        assert recorded == []  # nothing runs before the commit
        s.commit()
    assert recorded == [(effects.FANOUT, (cid,), "running")]  # the committed state was visible


def test_a_rollback_discards_the_effects(api, recorded):
    cid = _draft(api)
    with session_factory()() as s:
        engine.launch(s, api.workspace_id, cid)
        s.rollback()
        s.execute(select(1))
        s.commit()  # a later transaction of the same session does not run them either
    assert recorded == []
    with new_session() as s:
        assert s.get(Campaign, cid).status == "draft"


def test_an_effect_recorded_twice_runs_once(api, recorded):
    cid = _draft(api)
    with session_scope() as s:
        engine.launch(s, api.workspace_id, cid)
        engine.launch(s, api.workspace_id, cid)
    assert recorded == [(effects.FANOUT, (cid,), "running")]


def test_a_failing_effect_raises_after_the_others_ran_and_the_session_stays_usable(api, recorded, monkeypatch):
    cid = _draft(api)

    def refused(*args):
        raise ConnectionError("queue store away")

    monkeypatch.setitem(effects._handlers, effects.FANOUT, refused)
    with session_factory()() as s:
        engine.launch(s, api.workspace_id, cid)
        msg = engine.test_send(s, api.workspace_id, cid, "me@example.com")
        with pytest.raises(ConnectionError):
            s.commit()
        assert recorded == [(effects.SEND_TEST, (msg.id,), None)]
        assert s.get(Campaign, cid).status == "running"  # committed, and the session still answers


def test_resume_and_test_send_queue_their_work_after_the_commit(api, recorded):
    cid = _draft(api)
    assert api.post(f"/api/v1/campaigns/{cid}/launch").status_code == 202
    api.post(f"/api/v1/campaigns/{cid}/pause")
    recorded.clear()
    assert api.post(f"/api/v1/campaigns/{cid}/resume").json["status"] == "running"
    assert recorded == [(effects.WAKE_DISPATCHER, (), None)]
    resp = api.post(f"/api/v1/campaigns/{cid}/test-send", json={"email": "me@example.com"})
    assert resp.status_code == 202
    assert recorded[1:] == [(effects.SEND_TEST, (resp.json["id"],), None)]


def test_launch_and_test_send_through_the_api_queue_their_tasks(api):
    """The handlers tasks/ registers: the API no longer enqueues anything itself."""
    cid = _draft(api)
    assert api.post(f"/api/v1/campaigns/{cid}/launch").status_code == 202
    msg_id = api.post(f"/api/v1/campaigns/{cid}/test-send", json={"email": "me@example.com"}).json["id"]
    queued = [(t.name, t.args) for t in huey.pending()]
    assert ("fanout_campaign", (cid,)) in queued
    assert ("send_messages", ([msg_id], True)) in queued
    with new_session() as s:
        assert s.scalar(select(Message.status).where(Message.id == msg_id)) == "queued"


def test_a_savepoint_rolled_back_keeps_the_transactions_effects(api, recorded):
    """A savepoint's rollback is not the transaction's (contacts' upserts use savepoints)."""
    cid = _draft(api)
    with session_scope() as s:
        engine.launch(s, api.workspace_id, cid)
        with pytest.raises(RuntimeError), s.begin_nested():
            s.execute(select(1))
            raise RuntimeError("a failed upsert")
    assert recorded == [(effects.FANOUT, (cid,), "running")]


def test_a_session_closed_without_commit_drops_its_effects(api, recorded):
    cid = _draft(api)
    s = session_factory()()
    engine.launch(s, api.workspace_id, cid)
    s.close()
    with session_scope() as s:
        s.execute(select(1))
    assert recorded == []
