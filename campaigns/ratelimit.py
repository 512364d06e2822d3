"""Smooth, atomic rate limits shared by every consumer.

Each limit is a ``Rule``:

- ``gcra``: the generic cell rate algorithm (a token bucket stated as one timestamp, the
  theoretical arrival time ``tat``): ``count`` per ``period`` seconds, with up to ``burst``
  at once. In any window of ``period`` seconds at most ``count + burst`` pass.
- ``window``: a fixed calendar window (a UTC day for ``per_day`` caps): at most ``count``
  in the window whose start ``window_start`` names.

``take(rules, n)`` grants ``k <= n`` units against *all* rules at once (the smallest grant,
committed to every rule together) and says how long until the next unit frees. On Redis it is
one Lua script (atomic across consumers, using the server's clock); on SQL (the embedded
SQLite default) it is one transaction holding the state rows' locks. ``hold(key, until)``
blocks a rule until a time for everyone (a provider's 429 with ``X-RateLimit-Reset``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from .config import Rate


@dataclass(frozen=True)
class Rule:
    key: str
    kind: str  # gcra | window
    count: int
    period: float  # gcra: seconds per ``count``; window: the window's length
    burst: int = 1
    window_start: float = 0.0  # window: epoch seconds the current window began

    @classmethod
    def from_rate(cls, key: str, rate: Rate) -> Rule:
        return cls(key=key, kind="gcra", count=rate.count, period=rate.period, burst=rate.burst)

    @classmethod
    def per_day(cls, key: str, count: int, now: float | None = None) -> Rule:
        now = time.time() if now is None else now
        start = math.floor(now / 86400) * 86400
        return cls(key=f"{key}:{int(start)}", kind="window", count=count, period=86400, window_start=start)


@dataclass(frozen=True)
class Grant:
    granted: int
    wait: float  # seconds until at least one more unit frees (0 when all n were granted)
    blocked_by: str | None = None  # the rule that limited the grant


def _plan(rules: list[Rule], states: dict[str, float], holds: dict[str, float], n: int, now: float):
    """The pure GCRA/window arithmetic shared by both stores: (granted, wait, blocker, new states)."""
    k = n
    wait = 0.0
    blocker = None
    for r in rules:
        hold = holds.get(r.key, 0.0)
        if hold > now:
            if k > 0 or hold - now > wait:
                blocker = r.key
            k, wait = 0, max(wait, hold - now)
            continue
        if r.kind == "gcra":
            t = r.period / r.count
            tau = t * r.burst
            tat = max(states.get(r.key, 0.0), now)
            allowed = max(0, math.floor((now + tau - tat) / t + 1e-9))
            if allowed < k:
                k, blocker = allowed, r.key
        else:
            used = states.get(r.key, 0.0)
            allowed = max(0, int(r.count - used))
            if allowed < k:
                k, blocker = allowed, r.key
    new_states = {}
    for r in rules:
        if r.kind == "gcra":
            t = r.period / r.count
            tau = t * r.burst
            tat = max(states.get(r.key, 0.0), now) + k * t
            new_states[r.key] = tat
            if k < n:
                wait = max(wait, tat + t - tau - now)
        else:
            used = states.get(r.key, 0.0) + k
            new_states[r.key] = used
            if k < n and used >= r.count:
                wait = max(wait, r.window_start + r.period - now)
    return k, max(0.0, wait), (blocker if k < n else None), new_states


class Limiter:
    """Contract: ``take`` grants up to n units against every rule atomically."""

    def take(self, rules: list[Rule], n: int) -> Grant:
        raise NotImplementedError

    def give_back(self, rules: list[Rule], n: int) -> None:
        """Return units that were granted but not used (no message was there to send)."""
        raise NotImplementedError

    def hold(self, key: str, until: float) -> None:
        raise NotImplementedError

    def incr(self, name: str, by: int = 1) -> None:
        """Bump a shared counter (for /metrics)."""
        raise NotImplementedError

    def counters(self, prefix: str = "") -> dict[str, int]:
        raise NotImplementedError


_LUA_TAKE = """
local n = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local k = n
local wait = 0
local blocker = ''
local nrules = #KEYS
for i = 1, nrules do
  local base = 1 + (i - 1) * 4
  local kind = ARGV[base + 1]
  local count = tonumber(ARGV[base + 2])
  local period = tonumber(ARGV[base + 3])
  local burst = tonumber(ARGV[base + 4])
  local hold = tonumber(redis.call('GET', KEYS[i] .. ':hold') or '0')
  if hold > now then
    if hold - now > wait then wait = hold - now end
    k = 0
    blocker = KEYS[i]
  elseif kind == 'gcra' then
    local ti = period / count
    local tau = ti * burst
    local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
    if tat < now then tat = now end
    local allowed = math.floor((now + tau - tat) / ti + 1e-9)
    if allowed < 0 then allowed = 0 end
    if allowed < k then k = allowed; blocker = KEYS[i] end
  else
    local used = tonumber(redis.call('GET', KEYS[i]) or '0')
    local allowed = count - used
    if allowed < 0 then allowed = 0 end
    if allowed < k then k = allowed; blocker = KEYS[i] end
  end
end
for i = 1, nrules do
  local base = 1 + (i - 1) * 4
  local kind = ARGV[base + 1]
  local count = tonumber(ARGV[base + 2])
  local period = tonumber(ARGV[base + 3])
  local burst = tonumber(ARGV[base + 4])
  if kind == 'gcra' then
    local ti = period / count
    local tau = ti * burst
    local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
    if tat < now then tat = now end
    tat = tat + k * ti
    redis.call('SET', KEYS[i], tostring(tat), 'PX', math.ceil((tat - now + tau) * 1000) + 60000)
    if k < n then
      local w = tat + ti - tau - now
      if w > wait then wait = w end
    end
  else
    local used = redis.call('INCRBYFLOAT', KEYS[i], k)
    redis.call('EXPIRE', KEYS[i], math.ceil(period) + 3600)
    if k < n and tonumber(used) >= count then
      local w = tonumber(ARGV[1 + nrules * 4 + i]) + period - now
      if w > wait then wait = w end
    end
  end
end
if k >= n then blocker = '' end
return {k, tostring(wait), blocker}
"""

_LUA_GIVE_BACK = """
local n = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 1, #KEYS do
  local kind = ARGV[1 + (i - 1) * 2 + 1]
  local ti = tonumber(ARGV[1 + (i - 1) * 2 + 2])
  local cur = redis.call('GET', KEYS[i])
  if cur then
    if kind == 'gcra' then
      local tat = tonumber(cur) - n * ti
      if tat < now then tat = now end
      redis.call('SET', KEYS[i], tostring(tat), 'KEEPTTL')
    else
      local used = tonumber(cur) - n
      if used < 0 then used = 0 end
      redis.call('SET', KEYS[i], tostring(used), 'KEEPTTL')
    end
  end
end
return 1
"""


class RedisLimiter(Limiter):
    def __init__(self, client, prefix: str = "herald:rl:"):
        self.r = client
        self.prefix = prefix
        self._take = client.register_script(_LUA_TAKE)
        self._give = client.register_script(_LUA_GIVE_BACK)

    def take(self, rules: list[Rule], n: int) -> Grant:
        if n <= 0 or not rules:
            return Grant(max(n, 0), 0.0)
        keys = [self.prefix + r.key for r in rules]
        args: list = [n]
        for r in rules:
            args += [r.kind, r.count, r.period, r.burst]
        args += [r.window_start for r in rules]
        k, wait, blocker = self._take(keys=keys, args=args)
        blocker = blocker.decode() if isinstance(blocker, bytes) else blocker
        return Grant(int(k), float(wait), blocker[len(self.prefix):] if blocker else None)

    def give_back(self, rules: list[Rule], n: int) -> None:
        if n <= 0 or not rules:
            return
        args: list = [n]
        for r in rules:
            args += [r.kind, r.period / r.count if r.kind == "gcra" else 1]
        self._give(keys=[self.prefix + r.key for r in rules], args=args)

    def hold(self, key: str, until: float) -> None:
        ttl = max(1, math.ceil(until - time.time()) + 60)
        self.r.set(self.prefix + key + ":hold", repr(until), ex=ttl)

    def incr(self, name: str, by: int = 1) -> None:
        self.r.hincrby(self.prefix + "counters", name, by)

    def counters(self, prefix: str = "") -> dict[str, int]:
        raw = self.r.hgetall(self.prefix + "counters")
        out = {k.decode(): int(v) for k, v in raw.items()}
        return {k: v for k, v in out.items() if k.startswith(prefix)}


class SqlLimiter(Limiter):
    """The same arithmetic in the database (the embedded default: SQLite, BEGIN IMMEDIATE)."""

    def __init__(self, session_factory):
        self.session_factory = session_factory

    def _load(self, s: Session, keys: list[str]) -> dict[str, float]:
        from .models import RateLimitState

        stmt = select(RateLimitState).where(RateLimitState.key.in_(keys))
        if s.get_bind().dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        return {row.key: row.value for row in s.scalars(stmt)}

    def _store(self, s: Session, values: dict[str, float]) -> None:
        from .models import RateLimitState

        for key, value in values.items():
            row = s.get(RateLimitState, key)
            if row is None:
                s.add(RateLimitState(key=key, value=value))
            else:
                row.value = value

    def take(self, rules: list[Rule], n: int) -> Grant:
        if n <= 0 or not rules:
            return Grant(max(n, 0), 0.0)
        with self.session_factory() as s, s.begin():
            keys = [r.key for r in rules]
            hold_keys = [k + ":hold" for k in keys]
            loaded = self._load(s, keys + hold_keys)
            holds = {k: loaded.get(k + ":hold", 0.0) for k in keys}
            k, wait, blocker, new_states = _plan(rules, loaded, holds, n, time.time())
            self._store(s, new_states)
        return Grant(k, wait, blocker)

    def give_back(self, rules: list[Rule], n: int) -> None:
        if n <= 0 or not rules:
            return
        now = time.time()
        with self.session_factory() as s, s.begin():
            states = self._load(s, [r.key for r in rules])
            out = {}
            for r in rules:
                if r.key not in states:
                    continue
                if r.kind == "gcra":
                    out[r.key] = max(now, states[r.key] - n * r.period / r.count)
                else:
                    out[r.key] = max(0.0, states[r.key] - n)
            self._store(s, out)

    def hold(self, key: str, until: float) -> None:
        with self.session_factory() as s, s.begin():
            cur = self._load(s, [key + ":hold"]).get(key + ":hold", 0.0)
            self._store(s, {key + ":hold": max(cur, until)})

    def incr(self, name: str, by: int = 1) -> None:
        from .models import Counter

        with self.session_factory() as s, s.begin():
            row = s.get(Counter, name, with_for_update=s.get_bind().dialect.name == "postgresql")
            if row is None:
                s.add(Counter(name=name, value=by))
            else:
                row.value += by

    def counters(self, prefix: str = "") -> dict[str, int]:
        from .models import Counter

        with self.session_factory() as s:
            return {c.name: c.value for c in s.scalars(select(Counter).where(Counter.name.startswith(prefix)))}


_limiter: Limiter | None = None


def get_limiter() -> Limiter:
    """Redis when ``REDIS_URL`` is set, else the database (built lazily, once per process)."""
    global _limiter
    if _limiter is None:
        from .config import get_settings
        from .db import session_factory

        s = get_settings()
        if s.redis_url:
            import redis

            _limiter = RedisLimiter(redis.Redis.from_url(s.redis_url), prefix=f"{s.queue_name}:rl:")
        else:
            _limiter = SqlLimiter(session_factory())
    return _limiter


def reset_limiter() -> None:
    global _limiter
    _limiter = None
