"""Shared set-up for the benchmarks: a throw-away PostgreSQL database, a Redis key prefix of its
own, the local sink and huey consumers as subprocesses. Everything started is stopped on exit.

Benchmarks print their figures; they are not tests. Run them as ``.venv/bin/python bench/X.py``.
``HERALD_BENCH_VERBOSE=1`` keeps the consumers' logs (each task and its duration) in the run's
instance folder instead of starting them with ``-q``.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import redis
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("HERALD_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("HERALD_BENCH_REDIS", "redis://127.0.0.1:6379/14")
_children: list[subprocess.Popen] = []
_consumers: list[subprocess.Popen] = []


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _admin(sql: str) -> None:
    engine = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(sql))
    engine.dispose()


def setup_environment(name: str, rate: str = "1000000/second", extra: dict | None = None) -> dict:
    """Create a bench database and point this process's settings at it. Returns the env."""
    run = f"{name}_{os.getpid()}_{secrets.token_hex(3)}"
    db = f"herald_bench_{run}"
    _admin(f'CREATE DATABASE "{db}"')
    atexit.register(lambda: _admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
    sink_port = free_port()
    env = {
        "DATABASE_URL": PG_ADMIN.rsplit("/", 1)[0] + "/" + db,
        "REDIS_URL": REDIS_URL,
        "SECRET_KEY": "bench-secret-" + secrets.token_hex(8),
        "HERALD_QUEUE_NAME": f"herald-bench-{run}",
        "HERALD_INSTANCE_DIR": tempfile.mkdtemp(prefix="herald-bench-"),
        "SENDGRID_API_HOST": f"http://127.0.0.1:{sink_port}",
        "HERALD_SINK_PORT": str(sink_port),
        "SENDGRID_RATE_LIMIT": rate,
    }
    env.update(extra or {})
    for k in ("SENDGRID_API_KEY", "SENDGRID_WEBHOOK_PUBLIC_KEY", "HERALD_SINK_EVENTS_URL"):
        os.environ.pop(k, None)
    os.environ.update(env)
    from campaigns.config import reset_settings
    from campaigns.migrate import upgrade

    reset_settings()
    upgrade()
    atexit.register(_flush_redis, env["HERALD_QUEUE_NAME"])
    return env


def _flush_redis(prefix: str) -> None:
    r = redis.Redis.from_url(REDIS_URL)
    keys = set(r.scan_iter(match=f"*{prefix}*", count=1000))
    keys |= set(r.scan_iter(match=f"*{re.sub('[^A-Za-z0-9_]', '', prefix)}*", count=1000))  # Huey's names
    if keys:
        r.delete(*keys)


def spawn(cmd: list[str], log_name: str) -> subprocess.Popen:
    log = open(Path(os.environ["HERALD_INSTANCE_DIR"]) / f"{log_name}.log", "wb")  # the child writes to it
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=log,
                            stderr=subprocess.STDOUT)
    _children.append(proc)
    return proc


def start_sink() -> str:
    port = int(os.environ["HERALD_SINK_PORT"])
    spawn([sys.executable, "-c", f"from sendgrid_sink import run_sink; run_sink(port={port})"], "sink")
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/_sink/stats", timeout=1).read()
            return url
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the sink did not start")


def start_consumers(n: int = 2, workers: int = 8, module: str = "tasks.huey") -> None:
    exe = str(Path(sys.executable).parent / "huey_consumer")
    quiet = [] if os.environ.get("HERALD_BENCH_VERBOSE") else ["-q"]  # verbose: each task's timing in the logs
    for i in range(n):
        _consumers.append(spawn([exe, module, "-k", "thread", "-w", str(workers), "-g", "TERM", "-t", "30",
                                 "-d", "0.02", "-m", "0.2"] + quiet, f"consumer-{module}-{i}"))


def stop_consumers() -> None:
    _stop(_consumers)
    _consumers.clear()


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def stop_all() -> None:
    _stop(_children)
    _children.clear()


atexit.register(stop_all)


def sink_stats(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url + "/_sink/stats", timeout=10).read())


def reset_sink(url: str) -> None:
    req = urllib.request.Request(url + "/_sink/reset", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()


def wait_for_accepted(url: str, n: int, timeout: float = 600) -> float:
    """Seconds until the sink has accepted n messages."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if sink_stats(url)["accepted"] >= n:
            return time.perf_counter() - start
        time.sleep(0.05)
    raise SystemExit(f"the sink saw only {sink_stats(url)['accepted']} of {n} in {timeout} s")


def seed_contacts(n: int, workspace: str = "bench") -> tuple[int, int]:
    """A workspace and a list of n contacts, inserted set-based. Returns (workspace_id, list_id)."""

    from campaigns import accounts
    from campaigns.db import get_engine, session_scope
    from campaigns.models import ContactList

    with session_scope() as s:
        ws = accounts.create_workspace(s, workspace)
        lst = ContactList(workspace_id=ws.id, name=f"{workspace} list")
        s.add(lst)
        s.flush()
        ws_id, list_id = ws.id, lst.id
    with get_engine().begin() as conn:
        conn.execute(text(
            "INSERT INTO contacts (workspace_id, email, first_name, timezone, fields, status, created_at, updated_at) "
            "SELECT :ws, 'c' || g || '@" + workspace + ".example.com', 'C' || g, 'UTC', '{}', 'active', now(), now() "
            "FROM generate_series(1, :n) g"), {"ws": ws_id, "n": n})
        conn.execute(text(
            "INSERT INTO list_members (list_id, contact_id, workspace_id, added_at) "
            "SELECT :list, id, :ws, now() FROM contacts WHERE workspace_id = :ws"), {"list": list_id, "ws": ws_id})
    if get_engine().dialect.name == "postgresql":
        with get_engine().connect() as conn:  # as autovacuum would, long before a campaign runs
            conn.execute(text("ANALYZE contacts"))
            conn.execute(text("ANALYZE list_members"))
            conn.commit()
    return ws_id, list_id


def make_campaign(ws_id: int, list_id: int, steps: list[dict] | None = None, **extra) -> int:
    from campaigns.campaign_rules import create_campaign
    from campaigns.db import session_scope

    body = {"name": "bench", "list_id": list_id, "from_email": "bench@example.com",
            "steps": steps or [{"type": "email", "subject": "Hello {{ contact.first_name }}",
                                "html": "<p>Hi {{ contact.first_name }}, a short note.</p>",
                                "text": "Hi {{ contact.first_name }}, a short note."}]}
    body.update(extra)
    with session_scope() as s:
        return create_campaign(s, ws_id, body).id
