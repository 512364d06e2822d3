"""The stop generation: a shared counter bumped after every commit that stops sending
(pause, cancel, a suppression, a stopped sequence).

A send loop checks its whole batch against the database once (when it claims it), then reads
only this counter before each group of calls (in the same Redis round trip as the rate-limit
take, or one tiny SQL read without Redis); when it moved, the loop checks the batch again.
Because the bump happens *after* the stopping transaction commits, a send that starts after a
pause or an unsubscribe has returned always sees the new value, and so the stop: no email is
handed to the provider once the stopping request has answered.
"""

from __future__ import annotations

import threading

import redis
from sqlalchemy import event, select, update
from sqlalchemy.orm import Session

from .config import get_settings
from .db import get_engine, session_factory
from .models import Counter

KEY = "stop_generation"
_redis = None
_lock = threading.Lock()


def mark(session: Session) -> None:
    """Bump the generation once this session's transaction commits."""
    session.info["herald_stop"] = True


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    if session.info.pop("herald_stop", False):
        bump()


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop("herald_stop", None)


def _client():
    global _redis
    settings = get_settings()
    if not settings.redis_url:
        return None
    if _redis is None:
        with _lock:
            if _redis is None:
                _redis = redis.Redis.from_url(settings.redis_url)
    return _redis


def _redis_key() -> str:
    return f"{get_settings().queue_name}:{KEY}"


def bump() -> None:
    r = _client()
    if r is not None:
        r.incr(_redis_key())
        return
    with session_factory()() as s, s.begin():
        if s.execute(update(Counter).where(Counter.name == KEY).values(value=Counter.value + 1)).rowcount == 0:
            s.add(Counter(name=KEY, value=1))


def watch_key() -> str | None:
    """The counter's Redis key when it lives in Redis (a limiter take can read it in the same
    round trip, ``Limiter.take(watch=...)``), else None."""
    return _redis_key() if _client() is not None else None


def current() -> int:
    r = _client()
    if r is not None:
        return int(r.get(_redis_key()) or 0)
    # A plain read: no transaction, so no SQLite write lock (see campaigns.db._sqlite_begin).
    with get_engine().execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
        return int(conn.scalar(select(Counter.value).where(Counter.name == KEY)) or 0)
