"""Smooth, atomic rate limits shared by every consumer.

Each limit is a ``Rule`` naming a piece of shared state:

- ``gcra``: the generic cell rate algorithm, a token bucket kept as one timestamp (the
  theoretical arrival time ``tat``): ``count`` per ``period`` seconds, up to ``burst`` at once.
  In any window of ``period`` seconds at most ``count + burst`` pass; idle time never buys
  more than ``burst``. The account budget (``SENDGRID_RATE_LIMIT``) and ``per_minute``.
- ``window``: a cap over a rolling window (``period``, 24 h for ``per_day`` and the sender's
  daily cap), counted in 5-minute buckets: a unit is granted when the buckets that overlap the
  last ``period`` seconds hold fewer than ``count``. Strict (never more than ``count`` in any
  ``period`` seconds), no reset at midnight and so no herd at one: capacity comes back bucket
  by bucket, ``period`` (+ at most one bucket) after it was used. The cap may change between
  calls (the warm-up ramp passes today's cap).
- ``gap``: one unit at a time with a pause after each: a grant sets the next allowed time to
  now + ``gap_seconds`` (the caller draws it at random between the sender's min and max gap).
- ``gate``: no state of its own, shut only while held (the priority lane shuts bulk work out of
  the account budget for a moment while a priority send waits for its turn).

``take(rules, n)`` grants ``k <= n`` units against *all* rules at once (the smallest grant,
committed to every rule together) and says how long until one more unit frees. On Redis it is
one Lua script (atomic across consumers, on the server's clock); on SQL (the embedded SQLite
default, or PostgreSQL without Redis) it is one transaction holding the state rows' locks.
``peek(rules, horizon)`` reads, without taking, how many units each rule allows by
``now + horizon`` (the dispatcher's look ahead). ``hold(key, until)`` blocks a rule for everyone
until a time (a provider's 429 with ``X-RateLimit-Reset``).

The arithmetic lives once in Python (``rules.py``: ``_allowed``, ``_need``, ``_commit``); the
Lua script in ``redis_store.py`` is the same arithmetic, ``sql_store.py`` runs the Python, and
tests/test_ratelimit.py runs one suite against both stores. ``base.py`` holds the contract.
"""

from __future__ import annotations

import threading

from ..config import get_settings
from ..db import session_factory
from .base import Limiter
from .redis_store import RedisLimiter
from .rules import BUCKET_SECONDS, DAY, FAR, Capacity, Grant, Rule, _plan
from .sql_store import SqlLimiter

__all__ = [
    "BUCKET_SECONDS", "DAY", "FAR", "Capacity", "Grant", "Limiter", "RedisLimiter", "Rule",
    "SqlLimiter", "_plan", "get_limiter", "reset_limiter",
]

_limiter: Limiter | None = None
_limiter_lock = threading.Lock()


def get_limiter() -> Limiter:
    """Redis when ``REDIS_URL`` is set, else the database (built lazily, once per process)."""
    global _limiter
    if _limiter is None:
        with _limiter_lock:
            if _limiter is None:
                s = get_settings()
                if s.redis_url:
                    import redis

                    client = redis.Redis.from_url(s.redis_url, socket_timeout=5, socket_connect_timeout=5)
                    _limiter = RedisLimiter(client, prefix=f"{s.queue_name}:rl:")
                else:
                    _limiter = SqlLimiter(session_factory())
    return _limiter


def reset_limiter() -> None:
    global _limiter
    _limiter = None
