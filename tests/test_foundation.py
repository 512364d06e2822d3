"""App factory, configuration, sign-in and health."""

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from campaigns.config import ConfigError, load_settings, parse_rate
from tests.helpers import make_workspace

ROOT = Path(__file__).resolve().parent.parent


def _env(**overrides):
    env = {k: v for k, v in os.environ.items()}
    env.update(overrides)
    return env


@pytest.mark.parametrize(
    "name,value",
    [
        ("DATABASE_URL", "nonsense"),
        ("DATABASE_URL", "mysql://x@y/z"),
        ("REDIS_URL", "http://127.0.0.1:6379"),
        ("SENDGRID_RATE_LIMIT", "100/fortnight"),
        ("SENDGRID_RATE_LIMIT", "fast"),
        ("SENDGRID_API_HOST", "ftp://x"),
        ("PUBLIC_URL", "nowhere"),
        ("HERALD_SEND_CONCURRENCY", "0"),
        ("HERALD_SEND_BATCHES", "three"),
        ("HERALD_LEASE_SECONDS", "-5"),
    ],
)
def test_bad_setting_names_the_variable(name, value, tmp_path):
    env = {"HERALD_INSTANCE_DIR": str(tmp_path), "SECRET_KEY": "x" * 20, name: value}
    with pytest.raises(ConfigError) as err:
        load_settings(env)
    assert str(err.value).startswith(name + ":")
    assert "\n" not in str(err.value)


def test_rate_parsing():
    r = parse_rate("20/second")
    assert (r.count, r.period, r.burst) == (20, 1.0, 2)
    r = parse_rate("600/minute;burst=50")
    assert (r.count, r.period, r.burst) == (600, 60.0, 50)
    assert parse_rate("1/day").burst == 1


def test_embedded_defaults(tmp_path):
    s = load_settings({"HERALD_INSTANCE_DIR": str(tmp_path)})
    assert s.database_url == f"sqlite:///{tmp_path / 'herald.db'}"
    assert s.redis_url is None
    assert s.uses_sink and s.sendgrid_api_host == "http://127.0.0.1:3030"
    # the generated secret key is kept, so a restart keeps sessions valid
    assert load_settings({"HERALD_INSTANCE_DIR": str(tmp_path)}).secret_key == s.secret_key


def test_secret_key_required_with_database_url(tmp_path):
    with pytest.raises(ConfigError, match="^SECRET_KEY:"):
        load_settings({"HERALD_INSTANCE_DIR": str(tmp_path), "DATABASE_URL": "postgresql://u@h/d"})


def test_cli_bad_database_url_is_one_line(tmp_path):
    env = _env(DATABASE_URL="nonsense", HERALD_INSTANCE_DIR=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "migrate"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode != 0
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert "DATABASE_URL" in lines[0]


def test_cli_unreachable_database_is_one_line(tmp_path):
    env = _env(DATABASE_URL="postgresql+psycopg://nobody@127.0.0.1:1/none", HERALD_INSTANCE_DIR=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "migrate"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode != 0
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: DATABASE_URL:"), lines


def test_healthz(client):
    resp = client.get("/healthz")
    assert resp.status_code == 200, resp.json
    assert resp.json["checks"] == {"database": "ok", "queue": "ok"}


def test_login_flow_and_csrf(app):
    _, _, _, email = make_workspace(password="s3cret-pass")
    client = app.test_client()
    assert client.get("/").status_code == 302
    page = client.get("/login")
    assert page.status_code == 200 and b'name="csrf_token"' in page.data
    # a form without the CSRF token is refused
    assert client.post("/login", data={"email": email, "password": "s3cret-pass"}).status_code == 400
    token = page.data.split(b'name="csrf_token" value="')[1].split(b'"')[0].decode()
    bad = client.post("/login", data={"email": email, "password": "nope", "csrf_token": token})
    assert bad.status_code == 401 and b"Wrong email or password" in bad.data
    ok = client.post("/login", data={"email": email, "password": "s3cret-pass", "csrf_token": token})
    assert ok.status_code == 302
    home = client.get("/")
    assert home.status_code == 200
    # signing in starts a new session, so the page carries a new token
    token = home.data.split(b'name="csrf_token" value="')[1].split(b'"')[0].decode()
    # the session can use the API; unsafe calls need the CSRF token (header or form)
    assert client.get("/api/v1/lists").status_code == 200
    refused = client.post("/api/v1/lists", json={"name": "x"})
    assert refused.status_code == 400 and refused.json["error"]["code"] == "csrf_failed"
    assert client.post("/api/v1/lists", json={"name": "x"}, headers={"X-CSRFToken": token}).status_code == 201
    assert client.post("/logout").status_code == 400  # no token: refused, still signed in
    assert client.get("/").status_code == 200
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302
    assert client.get("/").status_code == 302


def test_api_requires_auth(client):
    resp = client.get("/api/v1/contacts")
    assert resp.status_code == 401
    assert resp.json["error"]["code"] == "unauthorized"
    resp = client.get("/api/v1/contacts", headers={"Authorization": "Bearer wrong"})
    assert resp.status_code == 401


def test_api_bad_bodies_and_cursors_are_4xx(api):
    assert api.post("/api/v1/lists", data="[" * 100000, headers={"Content-Type": "application/json"}).status_code == 400
    assert api.get("/api/v1/lists?cursor=" + "9" * 40).status_code == 400

    huge = base64.urlsafe_b64encode(str(2**70).encode()).decode().rstrip("=")
    assert api.get(f"/api/v1/lists?cursor={huge}").status_code == 400
    assert api.get("/api/v1/messages?campaign_id=" + "9" * 30).status_code == 400
