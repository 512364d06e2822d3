"""Test helpers: the sink's control client, stepping the Huey queue by hand, building campaigns,
workspaces with an API client, and the suite's subprocesses.

``tests/conftest.py`` imports this module before it sets the environment, so nothing here
imports ``campaigns``, ``web`` or ``tasks`` at module level.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import create_engine, func, select, text

BACKEND = os.environ.get("HERALD_TEST_BACKEND", "postgres")
PG_ADMIN_URL = os.environ.get("HERALD_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def instance_dir() -> Path:
    """This run's instance folder (conftest makes it and names it in HERALD_INSTANCE_DIR)."""
    return Path(os.environ["HERALD_INSTANCE_DIR"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def admin_execute(sql: str) -> None:
    """One statement on the PostgreSQL server's admin database (CREATE / DROP DATABASE)."""
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(sql))
    engine.dispose()


class ApiClient:
    """The test client with a workspace's Bearer key; ``.get/.post/...`` return responses."""

    def __init__(self, client, key: str, workspace_id: int, workspace_name: str):
        self.client = client
        self.key = key
        self.workspace_id = workspace_id
        self.workspace_name = workspace_name

    def _call(self, method, path, **kwargs):
        headers = dict(kwargs.pop("headers", None) or {})
        headers.setdefault("Authorization", f"Bearer {self.key}")
        return getattr(self.client, method)(path, headers=headers, **kwargs)

    def get(self, path, **kw):
        return self._call("get", path, **kw)

    def post(self, path, **kw):
        return self._call("post", path, **kw)

    def put(self, path, **kw):
        return self._call("put", path, **kw)

    def patch(self, path, **kw):
        return self._call("patch", path, **kw)

    def delete(self, path, **kw):
        return self._call("delete", path, **kw)


def make_workspace(name: str | None = None, email: str | None = None, password: str = "correct horse"):
    """A workspace with a user and an API key: (workspace_id, name, key, user email)."""
    # Imported when called: the environment is not set yet when conftest imports this module.
    from campaigns import accounts
    from campaigns.db import session_scope

    name = name or f"ws-{uuid.uuid4().hex[:8]}"
    email = email or f"owner-{uuid.uuid4().hex[:6]}@example.com"
    with session_scope() as s:
        ws = accounts.create_workspace(s, name)
        accounts.create_user(s, email, password, ws)
        _, key = accounts.create_api_key(s, ws, "test")
        return ws.id, ws.name, key, email


class SinkClient:
    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def _call(self, method: str, path: str, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            return json.loads(raw) if raw else None

    def reset(self):
        return self._call("POST", "/_sink/reset", {})

    def behaviour(self, **kw):
        return self._call("POST", "/_sink/behaviour", kw)

    def fail_addresses(self, emails, status=400):
        return self._call("POST", "/_sink/fail-addresses", {"emails": emails, "status": status})

    def clear_fail_addresses(self):
        return self._call("DELETE", "/_sink/fail-addresses")

    def stats(self):
        return self._call("GET", "/_sink/stats")

    def keys(self) -> dict[str, int]:
        return self._call("GET", "/_sink/keys")

    def messages(self, **params):
        qs = "&".join(f"{k}={v}" for k, v in params.items())
        return self._call("GET", "/_sink/messages" + (f"?{qs}" if qs else ""))["messages"]

    def accepted(self) -> list[dict]:
        return [m for m in self.messages() if m.get("status") == 202]


CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


class UiClient:
    """A signed-in test client; ``post`` adds the page's CSRF token unless told not to."""

    def __init__(self, app, email: str, password: str, workspace_id: int, key: str, name: str):
        self.client = app.test_client()
        self.workspace_id = workspace_id
        self.email = email
        self.api = ApiClient(self.client, key, workspace_id, name)
        page = self.client.get("/login")
        token = CSRF_META.search(page.get_data(as_text=True)).group(1)
        resp = self.client.post("/login", data={"email": email, "password": password, "csrf_token": token})
        assert resp.status_code == 302, resp.get_data(as_text=True)
        self._token = None

    @property
    def token(self) -> str:
        if self._token is None:
            self._token = CSRF_META.search(self.client.get("/settings").get_data(as_text=True)).group(1)
        return self._token

    def get(self, path, **kw):
        return self.client.get(path, **kw)

    def post(self, path, data=None, csrf=True, **kw):
        data = dict(data or {})
        if csrf:
            data.setdefault("csrf_token", self.token)
        return self.client.post(path, data=data, **kw)

    def text(self, path, status=200, **kw) -> str:
        resp = self.get(path, **kw)
        assert resp.status_code == status, (path, resp.status_code, resp.get_data(as_text=True)[:2000])
        return resp.get_data(as_text=True)


def location(resp) -> str:
    return resp.headers["Location"]


def flashes(html: str) -> list[str]:
    return re.findall(r'<p class="flash flash-\w+"[^>]*>(.*?)</p>', html, re.S)


def campaign_stats(api, cid) -> dict:
    return api.get(f"/api/v1/campaigns/{cid}").json["stats"]


def count_rows(db, model, *where) -> int:
    """Rows of ``model`` matching ``where``, read afresh through the test's session."""
    db.expire_all()
    return db.scalar(select(func.count()).select_from(model).where(*where)) or 0


def post_csv(api, body: bytes, content_type="text/csv", **params):
    return api.post("/api/v1/contacts/import", data=body, content_type=content_type, query_string=params)


def contacts_by_email(workspace_id) -> dict:
    from campaigns.db import session_scope
    from campaigns.models import Contact

    with session_scope() as s:
        rows = s.scalars(select(Contact).where(Contact.workspace_id == workspace_id)).all()
        return {c.email: c for c in rows}


def run_queued_imports() -> int:
    """Step the queue by hand: run the queued import tasks in this process (errors surface)."""
    from tasks import huey
    from tasks.imports import run_import

    ran = 0
    while huey.pending_count() and (task := huey.dequeue()) is not None:  # dequeue blocks when empty
        if isinstance(task, run_import.task_class):
            task.execute()
            ran += 1
    return ran


def wait_for(predicate, timeout: float, reconcile_every: float | None = 2.0):
    """Poll until ``predicate()``; run the reconciler now and then, as the periodic task would."""
    from campaigns import engine
    from tasks.engine import HOOKS

    deadline = time.monotonic() + timeout
    last = 0.0
    while time.monotonic() < deadline:
        if predicate():
            return
        if reconcile_every and time.monotonic() - last > reconcile_every:
            engine.reconcile(HOOKS)
            last = time.monotonic()
        time.sleep(0.2)
    raise AssertionError("timed out")


def run_ready_tasks(huey, limit: int = 10_000) -> int:
    """Execute, in this process, every task that is ready now, as a consumer would: a task
    whose ``eta`` is still ahead goes to the schedule, and due scheduled tasks are run."""
    ran = 0
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    for task in huey.read_schedule(now):
        huey.enqueue(task)
    while ran < limit:
        task = huey.dequeue()
        if task is None:
            break
        if not huey.ready_to_run(task, datetime.now(timezone.utc).replace(tzinfo=None)):
            huey.add_schedule(task)
            continue
        huey.execute(task)
        ran += 1
    return ran


def drain(huey, until=None, timeout: float = 60.0, idle: float = 0.3) -> None:
    """Step the queue by hand until ``until()`` holds (or, without it, until nothing is left).

    Delayed tasks (wake-ups, waits) run when their time comes, so a test with a 1-second wait
    takes about a second, never a sleep chosen by guess.
    """
    deadline = time.monotonic() + timeout
    quiet_since = None
    while time.monotonic() < deadline:
        ran = run_ready_tasks(huey)
        if until is not None and until():
            return
        if ran:
            quiet_since = None
            continue
        if until is None:
            soon = datetime.now(timezone.utc).replace(tzinfo=None).timestamp() + 2
            later_only = all(t.eta is not None and t.eta.timestamp() > soon for t in huey.scheduled())
            if later_only and huey.pending_count() == 0:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= idle:
                    return
        time.sleep(0.02)
    raise AssertionError(f"the queue did not settle within {timeout} s: {ledger_summary(huey)}")


def ledger_summary(huey) -> str:
    """What the ledger and the queue hold, for a failing test's message."""
    from sqlalchemy import func, select

    from campaigns.db import new_session
    from campaigns.models import Campaign, Message

    with new_session() as s:
        statuses = dict(s.execute(select(Message.status, func.count()).group_by(Message.status)).all())
        campaigns = s.execute(select(Campaign.id, Campaign.status, Campaign.status_reason)).all()
        due = s.execute(select(Message.id, Message.status, Message.due_at, Message.last_error)
                        .order_by(Message.id).limit(5)).all()
    return (f"messages {statuses}; campaigns {campaigns}; first rows {due}; "
            f"queue pending {huey.pending_count()} scheduled {[(t.name, t.eta) for t in huey.scheduled()]}")


def campaign_body(list_id: int, steps=None, **extra) -> dict:
    body = {
        "name": "Spring outreach",
        "list_id": list_id,
        "from_email": "team@example.com",
        "from_name": "Herald Team",
        "steps": steps or [
            {"type": "email", "subject": "Hello {{ contact.first_name }}", "html": "<p>Hi {{ contact.first_name }}</p>"
             "<p><a href=\"{{ unsubscribe_url }}\">Unsubscribe</a></p>"},
            {"type": "wait", "seconds": 1},
            {"type": "email", "subject": "Following up", "html": "<p>Any thoughts, {{ contact.first_name }}?</p>"},
        ],
    }
    body.update(extra)
    return body


def make_contacts(api, n: int, list_name: str = "Prospects", prefix: str = "person") -> int:
    """n contacts in a new list (through the CSV import API); returns the list id."""
    resp = api.post("/api/v1/lists", json={"name": list_name})
    assert resp.status_code == 201, resp.json
    list_id = resp.json["id"]
    rows = ["email,first_name,timezone"] + [f"{prefix}{i}@example.com,P{i},Europe/Berlin" for i in range(n)]
    resp = api.post(f"/api/v1/contacts/import?list_id={list_id}", data="\n".join(rows) + "\n",
                    headers={"Content-Type": "text/csv"})
    assert resp.status_code == 200, resp.json
    assert resp.json["created"] == n, resp.json
    return list_id


def launched_campaign(api, list_id: int, **extra) -> int:
    resp = api.post("/api/v1/campaigns", json=campaign_body(list_id, **extra))
    assert resp.status_code == 201, resp.json
    cid = resp.json["id"]
    resp = api.post(f"/api/v1/campaigns/{cid}/launch")
    assert resp.status_code == 202, resp.json
    return cid


def campaign_status(api, cid: int) -> str:
    return api.get(f"/api/v1/campaigns/{cid}").json["status"]


def run_through(huey, name: str, limit: int = 100) -> None:
    """Run queued tasks in order, up to and including the first one called ``name``."""
    for _ in range(limit):
        task = huey.dequeue()
        assert task is not None, f"no {name} task was queued"
        huey.execute(task)
        if task.name == name:
            return
    raise AssertionError(f"no {name} task within {limit} tasks")


class ServiceProcess:
    """A subprocess of the suite's (consumer, web server) with its output in a log file under
    the test instance folder; ``stop`` sends SIGTERM (then SIGKILL), ``kill9`` kills it outright."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str] | None = None):
        root = Path(__file__).resolve().parent.parent
        env = dict(os.environ, **(env or {}), PYTHONPATH=str(root))
        self.log_path = instance_dir() / f"{name}-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "wb")  # closed in stop()/kill9()
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def consumer_command(workers: int = 4) -> list[str]:
    """The contract's consumer command, polling promptly (the SQLite queue is polled)."""
    return [str(Path(sys.executable).parent / "huey_consumer"), "tasks.huey", "-k", "thread", "-w", str(workers),
            "-g", "TERM", "-t", "30", "-d", "0.05", "-m", "0.3"]
