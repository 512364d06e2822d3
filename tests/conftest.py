"""Test set-up: real PostgreSQL and Redis (or the embedded SQLite path), never mocks.

``HERALD_TEST_BACKEND=postgres`` (the default) creates a throw-away PostgreSQL database and
uses Redis db ``HERALD_TEST_REDIS_DB`` (15) with a queue name unique to this run, so several
runs on one machine do not collide. ``HERALD_TEST_BACKEND=sqlite`` runs on the embedded
defaults (SQLite + SqliteHuey) in a temporary instance folder.

The environment is set here, before anything imports ``web`` or ``tasks``.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

import pytest

from tests.helpers import (
    BACKEND,
    PG_ADMIN_URL,
    ApiClient,
    ServiceProcess,
    SinkClient,
    UiClient,
    admin_execute,
    consumer_command,
    free_port,
    make_workspace,
)

REDIS_DB = int(os.environ.get("HERALD_TEST_REDIS_DB", "15"))
RUN_ID = f"{os.getpid()}_{secrets.token_hex(3)}"
INSTANCE = Path(tempfile.mkdtemp(prefix=f"herald-test-{RUN_ID}-"))


SINK_PORT = free_port()

_env = {
    "HERALD_INSTANCE_DIR": str(INSTANCE),
    "SECRET_KEY": "test-secret-key-" + secrets.token_hex(8),
    "HERALD_QUEUE_NAME": f"herald-test-{RUN_ID}",
    "PUBLIC_URL": "http://127.0.0.1:5000",
    # The engine's clocks, shortened so tests drive retries, leases and ambiguity in seconds.
    "SENDGRID_API_HOST": f"http://127.0.0.1:{SINK_PORT}",
    "SENDGRID_RATE_LIMIT": "10000/second",
    "HERALD_SEND_TIMEOUT": "2",
    "HERALD_LEASE_SECONDS": "6",
    "HERALD_AMBIGUOUS_WINDOW": "3",
    "HERALD_RETRY_BASE": "0.3",
    "HERALD_RETRY_CAP": "1.5",
    "HERALD_STALE_QUEUED_SECONDS": "4",
}
for _k in ("SENDGRID_API_KEY", "SENDGRID_WEBHOOK_PUBLIC_KEY", "INBOUND_PARSE_SECRET", "INBOUND_DOMAIN",
           "SENDGRID_RATE_LIMIT", "DATABASE_URL", "REDIS_URL"):
    os.environ.pop(_k, None)
if BACKEND == "postgres":
    TEST_DB_NAME = f"herald_test_{RUN_ID}"
    _env["DATABASE_URL"] = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + TEST_DB_NAME
    _env["REDIS_URL"] = f"redis://127.0.0.1:6379/{REDIS_DB}"
elif BACKEND != "sqlite":
    raise SystemExit(f"HERALD_TEST_BACKEND: {BACKEND!r} is neither postgres nor sqlite")
os.environ.update(_env)


@pytest.fixture(scope="session", autouse=True)
def cheap_password_hashes():
    """The suite makes a user for most tests and signs in hundreds of times: werkzeug's default
    (scrypt, ~150 ms a hash or a check on a 2-core machine) cost minutes per run. Users made here
    get a one-round PBKDF2 hash instead; checking goes through werkzeug the same way (the method
    is read from the hash). A server run as a subprocess (browser tests) checks these as quickly,
    and still hashes with the default what it makes itself."""
    import functools

    from werkzeug.security import generate_password_hash

    from campaigns import accounts

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(accounts, "generate_password_hash",
                   functools.partial(generate_password_hash, method="pbkdf2:sha256:1"))
        accounts._decoy_hash.cache_clear()
        yield
    accounts._decoy_hash.cache_clear()


@pytest.fixture(scope="session", autouse=True)
def database():
    """Create the schema through the real migrations once per run; drop it at the end."""
    from campaigns.config import reset_settings
    from campaigns.db import dispose_engines
    from campaigns.migrate import upgrade

    reset_settings()
    if BACKEND == "postgres":
        admin_execute(f'CREATE DATABASE "{TEST_DB_NAME}"')
    upgrade()
    yield os.environ.get("DATABASE_URL") or "sqlite"
    dispose_engines()
    if BACKEND == "postgres":
        admin_execute(f'DROP DATABASE IF EXISTS "{TEST_DB_NAME}" WITH (FORCE)')


def _clean_tables():
    from sqlalchemy import text

    from campaigns.db import get_engine
    from campaigns.models import Base

    engine = get_engine()
    names = [t.name for t in reversed(Base.metadata.sorted_tables)]
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text(f"TRUNCATE {', '.join(names)} RESTART IDENTITY CASCADE"))
        else:
            for name in names:
                conn.execute(text(f"DELETE FROM {name}"))


def _flush_queue():
    from campaigns.ratelimit import reset_limiter
    from tasks import huey

    huey.storage.flush_all()
    if BACKEND == "postgres":
        import redis

        r = redis.Redis.from_url(os.environ["REDIS_URL"])
        keys = list(r.scan_iter(match=os.environ["HERALD_QUEUE_NAME"] + ":rl:*", count=1000))
        keys += list(r.scan_iter(match="herald:dispatch-wake*", count=1000))
        if keys:
            r.delete(*keys)
        r.close()
    reset_limiter()


@pytest.fixture(autouse=True)
def clean_state(database):
    """Every test starts on empty tables and an empty queue (and no per-process caches keyed by
    ids, which RESTART IDENTITY hands out again)."""
    from campaigns import engine, stats

    _clean_tables()
    _flush_queue()
    engine.clear_caches()
    stats.clear_shared()
    yield


@pytest.fixture(scope="session")
def sink_server():
    """The local SendGrid sink, on the port SENDGRID_API_HOST names, for the whole run."""
    from sendgrid_sink import SinkServer

    server = SinkServer("127.0.0.1", SINK_PORT).start()
    yield server
    server.shutdown()


@pytest.fixture
def sink(sink_server):
    """A reset sink and a small client for its control endpoints."""
    client = SinkClient(sink_server.url)
    client.reset()
    return client


@pytest.fixture(scope="session")
def app(database):
    from web import create_app

    app = create_app({"TESTING": True})
    return app


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def db():
    """A session for arranging and checking state directly."""
    from sqlalchemy.orm import Session

    from campaigns.db import get_engine

    engine = get_engine()
    if engine.dialect.name == "sqlite":
        # Each statement on its own: an open SQLite transaction here would hold the write lock.
        engine = engine.execution_options(isolation_level="AUTOCOMMIT")
    session = Session(engine, expire_on_commit=False)
    yield session
    session.close()


@pytest.fixture
def api(client):
    ws_id, name, key, _ = make_workspace()
    return ApiClient(client, key, ws_id, name)


@pytest.fixture
def other_api(app):
    ws_id, name, key, _ = make_workspace()
    return ApiClient(app.test_client(), key, ws_id, name)


@pytest.fixture
def consumers():
    """Start real ``huey_consumer`` processes: ``consumers(n, workers)``; stopped (SIGTERM) after."""
    started: list[ServiceProcess] = []

    def start(n: int = 1, workers: int = 4):
        for _ in range(n):
            started.append(ServiceProcess("consumer", consumer_command(workers)))
        return started[-n:]

    yield start
    for c in started:
        c.stop()


@pytest.fixture
def ui(app):
    """A signed-in UI client of a fresh workspace."""
    ws_id, name, key, email = make_workspace(password="correct horse")
    return UiClient(app, email, "correct horse", ws_id, key, name)


@pytest.fixture
def spec(client):
    """The API's OpenAPI document."""
    return client.get("/api/v1/openapi.json").json
