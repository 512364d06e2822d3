"""Issue 18's hardening: files under instance/ readable by their owner only, security headers."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from sqlalchemy import text

from campaigns import config
from campaigns.db import make_engine, private_file

# --------------------------------------------------------------------------- instance/ files are 0600


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)  # the usual umask, which made herald.db 0644
    yield
    os.umask(old)


def test_the_sqlite_database_and_its_wal_and_shm_are_created_0600(tmp_path, umask_022):
    engine = make_engine(f"sqlite:///{tmp_path / 'herald.db'}")
    try:
        with engine.begin() as conn:
            conn.execute(text("create table t (x integer)"))
            conn.execute(text("insert into t values (1)"))
        with engine.connect() as conn:  # the WAL and its index exist while a connection is open
            assert conn.execute(text("select x from t")).scalar() == 1
            names = sorted(p.name for p in tmp_path.iterdir())
            assert names == ["herald.db", "herald.db-shm", "herald.db-wal"]
            assert {name: mode(tmp_path / name) for name in names} == dict.fromkeys(names, 0o600)
    finally:
        engine.dispose()


def test_an_older_install_s_0644_files_are_made_0600(tmp_path, umask_022):
    for name in ("herald.db", "herald.db-wal", "herald.db-shm"):
        (tmp_path / name).touch()
        os.chmod(tmp_path / name, 0o644)
    private_file(tmp_path / "herald.db")
    assert [mode(tmp_path / n) for n in ("herald.db", "herald.db-wal", "herald.db-shm")] == [0o600] * 3


def test_the_sqlite_queue_and_the_secret_key_are_0600(tmp_path, umask_022):
    from tasks.queue import LazySqliteStorage

    storage = LazySqliteStorage("q", filename=str(tmp_path / "huey.db"))
    storage.enqueue(b"task")
    assert storage.queue_size() == 1
    assert mode(tmp_path / "huey.db") == 0o600
    assert all(mode(p) == 0o600 for p in tmp_path.glob("huey.db-*"))
    config.load_settings({"HERALD_INSTANCE_DIR": str(tmp_path)})
    assert mode(tmp_path / "secret_key") == 0o600


# --------------------------------------------------------------------------- security headers

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


@pytest.fixture
def signed_in(app):
    from tests.helpers import make_workspace
    from tests.test_ui import UiClient

    ws_id, name, key, email = make_workspace(password="correct horse")
    return UiClient(app, email, "correct horse", ws_id, key, name)


def assert_security_headers(resp, path):
    h = resp.headers
    assert h.get("X-Content-Type-Options") == "nosniff", path
    assert h.get("X-Frame-Options") == "DENY", path
    assert h.get("Referrer-Policy") in ("same-origin", "no-referrer"), path  # /u/<token>: no-referrer
    csp = dict(part.strip().split(" ", 1) for part in h["Content-Security-Policy"].split(";"))
    assert csp["script-src"] == "'self'", path  # no 'unsafe-inline', no 'unsafe-eval'
    assert csp["frame-ancestors"] == "'none'" and csp["object-src"] == "'none'", path
    assert "Strict-Transport-Security" not in h, path  # PUBLIC_URL is http here


@pytest.mark.parametrize("path", ["/", "/campaigns/new", "/contacts", "/lists", "/suppressions", "/messages",
                                  "/dead-letters", "/queue", "/settings", "/contacts/import"])
def test_every_ui_page_has_the_security_headers(signed_in, path):
    resp = signed_in.get(path)
    assert resp.status_code == 200, path
    assert_security_headers(resp, path)


@pytest.mark.parametrize("path", ["/login", "/u/not-a-token", "/healthz", "/api/v1/openapi.json", "/nowhere",
                                  "/static/herald.js", "/api/v1/campaigns"])
def test_public_pages_the_api_and_errors_have_them_too(client, path):
    resp = client.get(path)
    resp.close()  # the static file
    assert_security_headers(resp, path)


def test_webhooks_answer_nosniff(client):
    resp = client.post("/webhooks/sendgrid/events", data=b"not json", headers={"Content-Type": "application/json"})
    assert resp.status_code == 400
    assert_security_headers(resp, "webhook")


def test_hsts_when_public_url_is_https(monkeypatch, database):
    from web import create_app

    monkeypatch.setenv("PUBLIC_URL", "https://herald.example.com")
    config.reset_settings()
    try:
        app = create_app({"TESTING": True})
    finally:
        monkeypatch.undo()
        config.reset_settings()
    resp = app.test_client().get("/login")
    assert resp.headers["Strict-Transport-Security"] == "max-age=31536000"


@pytest.mark.parametrize("template", sorted(p.name for p in TEMPLATES.glob("*.html")))
def test_templates_hold_no_inline_script(template):
    """The policy allows no inline script: every <script> has a src, no on*= handler, no javascript: URL."""
    html = (TEMPLATES / template).read_text()
    for tag in re.findall(r"<script\b[^>]*>", html, re.I):
        assert "src=" in tag, tag
    assert not re.search(r"\son[a-z]+\s*=", html, re.I), template
    assert "javascript:" not in html.lower(), template
