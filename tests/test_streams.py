"""The bound on open live-progress streams (web/streams.py): per workspace and in total, per web
process, against a real gunicorn started with the shipped gunicorn.conf.py."""

from __future__ import annotations

import dataclasses
import http.client
import json
import sys
import time
from pathlib import Path

import pytest

from campaigns.config import ConfigError, load_settings
from tests.helpers import ServiceProcess, free_port, make_workspace
from web.streams import StreamLimiter, bounds

BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- the limiter alone


def test_the_limiter_counts_per_workspace_and_in_total():
    lim = StreamLimiter(total=3, per_workspace=2)
    a1, a2 = lim.acquire(1), lim.acquire(1)
    assert a1 and a2 and lim.acquire(1) is None  # workspace 1 is at its bound
    b1 = lim.acquire(2)
    assert b1 and lim.acquire(3) is None  # the process is at its bound
    a1()
    a1()  # a second release changes nothing
    assert lim.open_streams() == 2 and lim.open_streams(1) == 1
    assert lim.acquire(3) and lim.acquire(1) is None


def test_the_default_bounds_are_half_the_threads_and_a_quarter_of_that(tmp_path):
    s = load_settings({"HERALD_INSTANCE_DIR": str(tmp_path), "SECRET_KEY": "x" * 20})
    assert bounds(s, threads=16) == (8, 2)
    assert bounds(s, threads=8) == (4, 1)
    assert bounds(s, threads=1) == (1, 1)
    assert bounds(dataclasses.replace(s, max_streams=10, max_streams_per_workspace=5), threads=16) == (10, 5)


@pytest.mark.parametrize("env", [{"HERALD_MAX_STREAMS": "0"}, {"HERALD_MAX_STREAMS": "many"},
                                 {"HERALD_MAX_STREAMS_PER_WORKSPACE": "-1"},
                                 {"HERALD_MAX_STREAMS": "4", "HERALD_MAX_STREAMS_PER_WORKSPACE": "5"}])
def test_a_bad_bound_is_one_line_naming_the_variable(tmp_path, env):
    with pytest.raises(ConfigError) as err:
        load_settings({"HERALD_INSTANCE_DIR": str(tmp_path), "SECRET_KEY": "x" * 20, **env})
    assert str(err.value).split(":")[0] in env and "\n" not in str(err.value)


# --------------------------------------------------------------------------- a real gunicorn


@pytest.fixture
def server(database):
    """gunicorn with the shipped gunicorn.conf.py and the contract's worker shape, in one process
    (16 threads: a bound of 8 streams, 2 per workspace). The bound is per process; one process
    makes the count exact. Stopped when its test ends: its open streams keep reading the
    database, and the next test's clean-up (TRUNCATE) must not run beside them."""
    port = free_port()
    web = ServiceProcess("web-streams", [str(BIN / "gunicorn"), "-k", "gthread", "-w", "1", "--threads", "16",
                                         "-b", f"127.0.0.1:{port}", "wsgi:app"])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if get(port, "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert web.proc.poll() is None and time.monotonic() < deadline, web.tail()
            time.sleep(0.1)
        yield port
    finally:
        web.stop()


def get(port: int, path: str, key: str | None = None) -> tuple[int, dict, float]:
    """(status, JSON body, seconds taken) of a plain request on a new connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    started = time.monotonic()
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, json.loads(body) if body.startswith(b"{") else {}, time.monotonic() - started
    finally:
        conn.close()


def open_stream(port: int, key: str, campaign_id: int) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", f"/api/v1/campaigns/{campaign_id}/stream?interval=0.2",
                 headers={"Authorization": f"Bearer {key}", "Accept": "text/event-stream"})
    return conn, conn.getresponse()


def workspace_with_a_campaign() -> tuple[str, int]:
    from campaigns import campaign_rules, contacts
    from campaigns.db import session_scope

    ws_id, _, key, _ = make_workspace()
    with session_scope() as s:
        lst = contacts.create_list(s, ws_id, "Streams")
        cid = campaign_rules.create_campaign(s, ws_id, {
            "name": "Streamed", "list_id": lst.id, "from_email": "team@example.com",
            "steps": [{"type": "email", "subject": "Hi", "html": "<p>1</p>"}]}).id
    return key, cid


def test_one_workspace_s_streams_leave_threads_for_everyone_else(server):
    """Issue 18: 40 streams from one API key took every thread; /healthz timed out at 30 s and
    another workspace's call took 23 s. Now the key gets its bound and 429s past it, and the rest
    of the server answers within a second."""
    port = server
    (a_key, a_cid), (b_key, b_cid) = workspace_with_a_campaign(), workspace_with_a_campaign()
    others = [workspace_with_a_campaign() for _ in range(3)]
    held = []
    try:
        answers = []
        for _ in range(40):
            conn, resp = open_stream(port, a_key, a_cid)
            answers.append(resp.status)
            if resp.status == 200:
                held.append(conn)
            else:
                assert resp.getheader("Retry-After") == "15"
                error = json.loads(resp.read())["error"]
                assert error["code"] == "too_many_streams" and error["details"] == {"limit": 2, "scope": "workspace"}
                conn.close()
        assert answers.count(200) == 2 and answers.count(429) == 38
        for path, key in [("/healthz", None), ("/api/v1/campaigns", b_key), (f"/api/v1/campaigns/{b_cid}", b_key)]:
            status, _, took = get(port, path, key)
            assert status == 200 and took < 1.0, (path, status, took)

        # the process's bound: 8 in all (A's 2 and 2 for each of three more workspaces)
        for key, cid in others:
            for _ in range(2):
                conn, resp = open_stream(port, key, cid)
                assert resp.status == 200
                held.append(conn)
        conn, resp = open_stream(port, b_key, b_cid)
        assert resp.status == 429 and resp.getheader("Retry-After") == "15"
        assert json.loads(resp.read())["error"]["details"] == {"limit": 8, "scope": "server"}
        conn.close()
        for path, key in [("/healthz", None), ("/api/v1/campaigns", b_key), (f"/api/v1/campaigns/{b_cid}", b_key)]:
            status, _, took = get(port, path, key)
            assert status == 200 and took < 1.0, (path, status, took)

        # a stream that ends gives its place back (the server sees the client gone at its next write)
        held.pop(0).close()
        deadline = time.monotonic() + 20
        while True:
            conn, resp = open_stream(port, b_key, b_cid)
            if resp.status == 200:
                held.append(conn)
                break
            conn.close()
            assert time.monotonic() < deadline, "a closed stream's place was never given back"
            time.sleep(0.2)
    finally:
        for conn in held:
            conn.close()


def test_a_stream_read_to_its_end_gives_its_place_back(app):
    """Werkzeug's test client reads a stream without closing the response: the end of the
    events gives the place back, so one workspace can watch again and again."""
    key, cid = workspace_with_a_campaign()
    client = app.test_client()
    for _ in range(5):
        resp = client.get(f"/api/v1/campaigns/{cid}/stream?lifetime=0.3&interval=0.2",
                          headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 200 and "event: progress" in resp.get_data(as_text=True)
