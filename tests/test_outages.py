"""The web app while the database or the queue store does not answer: a 503 to retry (with
Retry-After), in the contract's error shape for the API and a plain page for the UI, never a 500."""

from __future__ import annotations

import re

import pytest

from campaigns import config
from campaigns.db import dispose_engines
from tests.helpers import make_contacts


@pytest.fixture
def database_down(app, monkeypatch):
    """The app's database URL now leads nowhere (a closed port): every connection is refused."""
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://herald@127.0.0.1:1/herald")
    config.reset_settings()
    dispose_engines()
    yield
    monkeypatch.undo()
    config.reset_settings()
    dispose_engines()


def test_the_api_answers_503_while_the_database_is_away(app, database_down):
    client = app.test_client()
    resp = client.get("/api/v1/campaigns", headers={"Authorization": "Bearer hk_whatever"})
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "5"
    error = resp.json["error"]
    assert error["code"] == "unavailable" and "database is not answering" in error["message"]
    assert "127.0.0.1" not in resp.get_data(as_text=True)  # the driver's words stay in the log


def test_the_ui_shows_a_plain_page_while_the_database_is_away(app, database_down):
    client = app.test_client()
    page = client.get("/login")
    assert page.status_code == 200  # the sign-in form itself needs nothing stored
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True)).group(1)
    resp = client.post("/login", data={"email": "a@example.com", "password": "x", "csrf_token": token})
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "5"
    html = resp.get_data(as_text=True)
    assert "Unavailable for a moment" in html and "database is not answering" in html


def test_a_launch_while_the_queue_store_is_away_is_a_503_and_launching_again_finishes_it(app, api, monkeypatch):
    import redis

    from tasks import engine as task_engine
    from tests.helpers import campaign_body

    list_id = make_contacts(api, 2)
    cid = api.post("/api/v1/campaigns", json=campaign_body(list_id)).json["id"]

    def refused(*args, **kwargs):
        raise redis.ConnectionError("Error 111 connecting to 10.0.0.7:6379. Connection refused.")

    monkeypatch.setattr(task_engine, "fanout_campaign", refused)
    resp = api.post(f"/api/v1/campaigns/{cid}/launch")
    assert resp.status_code == 503 and resp.json["error"]["code"] == "unavailable"
    assert "queue store (Redis) is not answering" in resp.json["error"]["message"]
    assert "10.0.0.7" not in resp.get_data(as_text=True)
    monkeypatch.undo()
    assert api.post(f"/api/v1/campaigns/{cid}/launch").status_code == 202  # launching twice launches once


def test_every_api_operation_documents_the_503(client):
    spec = client.get("/api/v1/openapi.json").json
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if method in ("get", "post", "put", "patch", "delete"):
                assert "503" in op["responses"], (method, path)


