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

The arithmetic lives once in Python (``_allowed``, ``_need``, ``_commit``); the Lua script is
the same arithmetic, and tests/test_ratelimit.py runs one suite against both stores.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from .config import Rate

BUCKET_SECONDS = 300  # a rolling window's granularity
DAY = 86400.0
FAR = 10 * DAY  # "never" for a wait (a cap of 0)


@dataclass(frozen=True)
class Rule:
    key: str
    kind: str  # gcra | window | gap | gate
    count: int = 1  # gcra: units per period; window: the cap
    period: float = 1.0  # gcra: seconds per ``count``; window: the window's length
    burst: float = 1  # gcra only (fractional when a lateness allowance is kept out of it)
    gap_seconds: float = 0.0  # gap: the pause after the unit granted now

    @classmethod
    def from_rate(cls, key: str, rate: Rate, allowance: float = 0.0) -> Rule:
        """``allowance``: seconds by which a granted call may reach the provider late (thread
        scheduling, the HTTP client); kept out of the burst, never below one unit, so that at the
        provider too no window of ``period`` sees more than count + burst."""
        t = rate.period / rate.count
        burst = max(1.0, rate.burst - allowance / t) if allowance else rate.burst
        return cls(key=key, kind="gcra", count=rate.count, period=rate.period, burst=burst)

    @classmethod
    def per_day(cls, key: str, count: int) -> Rule:
        """At most ``count`` in any 24 hours (rolling)."""
        return cls(key=key, kind="window", count=max(0, int(count)), period=DAY)

    @classmethod
    def gap(cls, key: str, seconds: float) -> Rule:
        return cls(key=key, kind="gap", gap_seconds=max(0.0, float(seconds)))

    @classmethod
    def gate(cls, key: str) -> Rule:
        return cls(key=key, kind="gate")

    @property
    def interval(self) -> float:
        """Seconds per unit at the sustained rate (0 when the rule has no rate)."""
        return self.period / self.count if self.kind == "gcra" else 0.0


@dataclass(frozen=True)
class Grant:
    granted: int
    wait: float  # seconds until at least one more unit frees (0 when all n were granted)
    blocked_by: str | None = None  # the rule that limited the grant
    watched: int | None = None  # the watched counter's value, read in the same step (Redis only)


@dataclass(frozen=True)
class Capacity:
    """What one rule allows by ``now + horizon`` (``peek``)."""

    key: str
    allowed: int
    next_free: float  # seconds from now until it allows ``allowed + 1`` by its horizon
    held_until: float = 0.0  # epoch seconds of a hold (429) still running, else 0


# --------------------------------------------------------------------------- the arithmetic
# State per rule: gcra -> tat (epoch s); window -> {bucket index: count}; gap -> next allowed.


def _window_used(rule: Rule, buckets: dict[int, float], now: float) -> tuple[int, float]:
    """(units counted in the rolling window, the first bucket index still inside it)."""
    first = math.floor(now / BUCKET_SECONDS) - math.ceil(rule.period / BUCKET_SECONDS)
    return int(sum(v for b, v in buckets.items() if b >= first)), first


def _allowed(rule: Rule, state, hold: float, now: float, at: float) -> int:
    if hold > at:
        return 0
    if rule.kind == "gcra":
        t = rule.interval
        tat = max(state or 0.0, now, hold)
        return max(0, math.floor((at + t * rule.burst - tat + 1e-6) / t))
    if rule.kind == "window":
        used, _ = _window_used(rule, state or {}, now)
        return max(0, rule.count - used)
    if rule.kind == "gate":
        return 1 << 30
    return 1 if (state or 0.0) <= at else 0  # gap


def _need(rule: Rule, state, hold: float, now: float, m: int) -> float:
    """Seconds from now until the rule allows ``m`` units at once (state before any commit)."""
    base = max(0.0, hold - now)
    if rule.kind == "gcra":
        t = rule.interval
        tat = max(state or 0.0, now, hold)
        return max(base, tat + m * t - t * rule.burst - now)
    return max(base, _need_unheld(rule, state, now, m))


def _need_unheld(rule: Rule, state, now: float, m: int) -> float:
    if rule.kind == "gate":
        return 0.0
    if rule.kind == "window":
        buckets = state or {}
        used, first = _window_used(rule, buckets, now)
        excess = used + m - rule.count
        if excess <= 0:
            return 0.0
        if m > rule.count:
            return FAR
        span = math.ceil(rule.period / BUCKET_SECONDS)
        for b in sorted(b for b in buckets if b >= first):
            excess -= buckets[b]
            if excess <= 0:
                return max(0.0, (b + span + 1) * BUCKET_SECONDS - now)
        return FAR
    nxt = max(0.0, (state or 0.0) - now)  # gap: one at a time
    return nxt if m <= 1 else nxt + rule.gap_seconds


def _commit(rule: Rule, state, now: float, k: int):
    if rule.kind == "gcra":
        return max(state or 0.0, now) + k * rule.interval
    if rule.kind == "window":
        buckets = dict(state or {})
        _, first = _window_used(rule, buckets, now)
        buckets = {b: v for b, v in buckets.items() if b >= first}
        cur = math.floor(now / BUCKET_SECONDS)
        buckets[cur] = buckets.get(cur, 0) + k
        return buckets
    if rule.kind == "gate":
        return None
    return now + rule.gap_seconds if k else state  # gap


def _plan(rules: list[Rule], states: dict, holds: dict[str, float], n: int, now: float):
    """One take: (granted, wait, blocker, new states). Shared by the SQL store and the tests."""
    k, blocker = n, None
    for r in rules:
        a = _allowed(r, states.get(r.key), holds.get(r.key, 0.0), now, now)
        if r.kind == "gap":
            a = min(a, 1)
        if a < k:
            k, blocker = a, r.key
    wait = 0.0
    if k < n:
        wait = max(_need(r, states.get(r.key), holds.get(r.key, 0.0), now, k + 1) for r in rules)
    new_states = {r.key: _commit(r, states.get(r.key), now, k) for r in rules if r.kind != "gate"} if k else {}
    return k, wait, blocker, new_states


def _capacities(rules: list[Rule], states: dict, holds: dict[str, float], now: float, horizon: float):
    out = []
    at = now + horizon
    for r in rules:
        state, hold = states.get(r.key), holds.get(r.key, 0.0)
        a = _allowed(r, state, hold, now, at)
        nf = max(0.0, _need(r, state, hold, now, a + 1) - horizon)
        out.append(Capacity(r.key, a, nf, hold if hold > now else 0.0))
    return out


# --------------------------------------------------------------------------- the contract


class Limiter:
    """Contract: ``take`` grants up to n units against every rule atomically.

    ``clock`` (tests only) replaces the store's clock (Redis ``TIME``, or ``time.time``).
    ``local`` is this process's memo for callers (e.g. limits known to be shut for a while),
    forgotten with the limiter (``reset_limiter``).
    """

    clock: Callable[[], float] | None = None
    local: dict

    def take(self, rules: list[Rule], n: int = 1, watch: str | None = None) -> Grant:
        """Up to ``n`` units of every rule at once (fewer when a rule has less room now).

        ``watch``: a raw Redis key of an integer counter (the stop generation) to read in the same
        atomic step, returned as ``Grant.watched``; stores that cannot do that ignore it (None)."""
        raise NotImplementedError

    def peek(self, rules: list[Rule], horizon: float = 0.0) -> list[Capacity]:
        """How many units each rule allows by now + horizon, without taking any."""
        raise NotImplementedError

    def give_back(self, rules: list[Rule], n: int) -> None:
        """Return units that were granted but not used (the call never left)."""
        raise NotImplementedError

    def hold(self, key: str, until: float) -> None:
        """Nothing passes ``key`` until ``until`` (epoch seconds), for every consumer. The later of
        two holds wins."""
        raise NotImplementedError

    def release(self, key: str) -> None:
        """End a hold at once."""
        raise NotImplementedError

    def mark(self, key: str, value: float) -> float:
        """Store ``value`` under ``key`` unless a value is there already; return the stored one."""
        raise NotImplementedError

    def read_mark(self, key: str) -> float | None:
        raise NotImplementedError

    def incr(self, name: str, by: int = 1) -> None:
        """Bump a shared counter (for /metrics)."""
        raise NotImplementedError

    def counters(self, prefix: str = "") -> dict[str, int]:
        raise NotImplementedError


# --------------------------------------------------------------------------- Redis

# KEYS: one per rule, then optionally a watched key. ARGV: n, now (0: the server's clock), watch
# (1: the last key is watched), then 5 per rule: kind, count, period, burst, gap_seconds.
# Returns {granted, wait, blocker, the watched key's value or ''}.
_LUA_COMMON = """
local BUCKET = 300
local function window_state(key)
  local raw = redis.call('HGETALL', key)
  local b = {}
  for i = 1, #raw, 2 do b[tonumber(raw[i])] = tonumber(raw[i + 1]) end
  return b
end
local function window_used(period, b, now)
  local first = math.floor(now / BUCKET) - math.ceil(period / BUCKET)
  local used = 0
  for idx, v in pairs(b) do if idx >= first then used = used + v end end
  return used, first
end
local function allowed(kind, count, period, burst, state, hold, now, at)
  if hold > at then return 0 end
  if kind == 'gcra' then
    local t = period / count
    local tat = math.max(state, now, hold)
    local a = math.floor((at + t * burst - tat + 1e-6) / t)
    if a < 0 then a = 0 end
    return a
  elseif kind == 'window' then
    local used = window_used(period, state, now)
    local a = count - used
    if a < 0 then a = 0 end
    return a
  elseif kind == 'gate' then
    return 1073741824
  else
    if state <= at then return 1 else return 0 end
  end
end
local function need(kind, count, period, burst, gap, state, hold, now, m)
  local base = math.max(0, hold - now)
  local r = 0
  if kind == 'gcra' then
    local t = period / count
    local tat = math.max(state, now, hold)
    r = math.max(0, tat + m * t - t * burst - now)
  elseif kind == 'gate' then
    r = 0
  elseif kind == 'window' then
    local used, first = window_used(period, state, now)
    local excess = used + m - count
    if excess <= 0 then
      r = 0
    elseif m > count then
      r = 864000
    else
      local span = math.ceil(period / BUCKET)
      local idxs = {}
      for idx, v in pairs(state) do if idx >= first then table.insert(idxs, idx) end end
      table.sort(idxs)
      r = 864000
      for _, idx in ipairs(idxs) do
        excess = excess - state[idx]
        if excess <= 0 then r = math.max(0, (idx + span + 1) * BUCKET - now); break end
      end
    end
  else
    r = math.max(0, state - now)
    if m > 1 then r = r + gap end
  end
  return math.max(base, r)
end
"""

_LUA_TAKE = _LUA_COMMON + """
local n = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
if now <= 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local nr = #KEYS
local watched = ''
if ARGV[3] == '1' then
  nr = nr - 1
  watched = redis.call('GET', KEYS[#KEYS]) or '0'
end
local R = {}
for i = 1, nr do
  local base = 3 + (i - 1) * 5
  local r = {kind = ARGV[base + 1], count = tonumber(ARGV[base + 2]), period = tonumber(ARGV[base + 3]),
             burst = tonumber(ARGV[base + 4]), gap = tonumber(ARGV[base + 5])}
  r.hold = tonumber(redis.call('GET', KEYS[i] .. ':hold') or '0')
  if r.kind == 'window' then r.state = window_state(KEYS[i])
  elseif r.kind == 'gate' then r.state = 0
  else r.state = tonumber(redis.call('GET', KEYS[i]) or '0') end
  R[i] = r
end
local k = n
local blocker = ''
for i = 1, nr do
  local r = R[i]
  local a = allowed(r.kind, r.count, r.period, r.burst, r.state, r.hold, now, now)
  if r.kind == 'gap' and a > 1 then a = 1 end
  if a < k then k = a; blocker = KEYS[i] end
end
local wait = 0
if k < n then
  for i = 1, nr do
    local r = R[i]
    local w = need(r.kind, r.count, r.period, r.burst, r.gap, r.state, r.hold, now, k + 1)
    if w > wait then wait = w end
  end
end
if k > 0 then
  for i = 1, nr do
    local r = R[i]
    if r.kind == 'gcra' then
      local t = r.period / r.count
      local tat = math.max(r.state, now) + k * t
      redis.call('SET', KEYS[i], tostring(tat), 'PX', math.ceil((tat - now + t * r.burst) * 1000) + 60000)
    elseif r.kind == 'gate' then
      -- no state
    elseif r.kind == 'window' then
      local _, first = window_used(r.period, r.state, now)
      for idx, _ in pairs(r.state) do
        if idx < first then redis.call('HDEL', KEYS[i], tostring(idx)) end
      end
      redis.call('HINCRBY', KEYS[i], tostring(math.floor(now / BUCKET)), k)
      redis.call('EXPIRE', KEYS[i], math.ceil(r.period) + 2 * BUCKET)
    else
      redis.call('SET', KEYS[i], tostring(now + r.gap), 'PX', math.ceil(r.gap * 1000) + 60000)
    end
  end
end
return {k, tostring(wait), blocker, watched}
"""

# KEYS: one per rule; ARGV: now (0: the server's clock), kinds. Returns now and raw states.
_LUA_READ = """
local now = tonumber(ARGV[1])
if now <= 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local out = {tostring(now)}
for i = 1, #KEYS do
  table.insert(out, redis.call('GET', KEYS[i] .. ':hold') or '0')
  if ARGV[1 + i] == 'window' then
    table.insert(out, redis.call('HGETALL', KEYS[i]))
  else
    table.insert(out, redis.call('GET', KEYS[i]) or '0')
  end
end
return out
"""

_LUA_GIVE_BACK = """
local n = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
if now <= 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
for i = 1, #KEYS do
  local kind = ARGV[2 + (i - 1) * 2 + 1]
  local ti = tonumber(ARGV[2 + (i - 1) * 2 + 2])
  if kind == 'gcra' then
    local cur = redis.call('GET', KEYS[i])
    if cur then
      local tat = math.max(tonumber(cur) - n * ti, now)
      redis.call('SET', KEYS[i], tostring(tat), 'KEEPTTL')
    end
  elseif kind == 'window' then
    local field = tostring(math.floor(now / 300))
    local left = n
    local cur = tonumber(redis.call('HGET', KEYS[i], field) or '0')
    local back = math.min(cur, left)
    if back > 0 then redis.call('HINCRBY', KEYS[i], field, -back) end
  end
end
return 1
"""


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class RedisLimiter(Limiter):
    def __init__(self, client, prefix: str = "herald:rl:", clock: Callable[[], float] | None = None):
        self.r = client
        self.prefix = prefix
        self.clock = clock
        self.local = {}
        self._take = client.register_script(_LUA_TAKE)
        self._read = client.register_script(_LUA_READ)
        self._give = client.register_script(_LUA_GIVE_BACK)

    def _now_arg(self) -> float:
        return self.clock() if self.clock else 0

    def take(self, rules: list[Rule], n: int = 1, watch: str | None = None) -> Grant:
        if n <= 0 or not rules:
            return Grant(max(n, 0), 0.0)
        args: list = [n, self._now_arg(), 1 if watch else 0]
        for r in rules:
            args += [r.kind, r.count, r.period, r.burst, r.gap_seconds]
        keys = [self.prefix + r.key for r in rules] + ([watch] if watch else [])
        k, wait, blocker, watched = self._take(keys=keys, args=args)
        blocker = _text(blocker)
        return Grant(int(k), float(_text(wait)), blocker[len(self.prefix):] if blocker else None,
                     int(_text(watched)) if watch else None)

    def _states(self, rules: list[Rule]) -> tuple[float, dict, dict]:
        raw = self._read(keys=[self.prefix + r.key for r in rules], args=[self._now_arg()] + [r.kind for r in rules])
        now = float(_text(raw[0]))
        states, holds = {}, {}
        for i, r in enumerate(rules):
            holds[r.key] = float(_text(raw[1 + 2 * i]))
            value = raw[2 + 2 * i]
            if r.kind == "window":
                pairs = [_text(x) for x in value]
                states[r.key] = {int(pairs[j]): float(pairs[j + 1]) for j in range(0, len(pairs), 2)}
            else:
                states[r.key] = float(_text(value))
        return now, states, holds

    def peek(self, rules: list[Rule], horizon: float = 0.0) -> list[Capacity]:
        if not rules:
            return []
        now, states, holds = self._states(rules)
        return _capacities(rules, states, holds, now, horizon)

    def give_back(self, rules: list[Rule], n: int) -> None:
        if n <= 0 or not rules:
            return
        args: list = [n, self._now_arg()]
        for r in rules:
            args += [r.kind, r.interval]
        self._give(keys=[self.prefix + r.key for r in rules], args=args)

    def hold(self, key: str, until: float) -> None:
        now = self.clock() if self.clock else time.time()
        ttl = max(1, math.ceil(until - now) + 60)
        k = self.prefix + key + ":hold"
        # Keep the later of two holds (two consumers may see different resets).
        cur = self.r.get(k)
        if cur is None or float(_text(cur)) < until:
            self.r.set(k, repr(float(until)), ex=ttl)

    def release(self, key: str) -> None:
        self.r.delete(self.prefix + key + ":hold")

    def mark(self, key: str, value: float) -> float:
        k = self.prefix + "mark:" + key
        pipe = self.r.pipeline()
        pipe.set(k, repr(float(value)), nx=True)
        pipe.get(k)
        _, stored = pipe.execute()
        return float(_text(stored))

    def read_mark(self, key: str) -> float | None:
        v = self.r.get(self.prefix + "mark:" + key)
        return None if v is None else float(_text(v))

    def incr(self, name: str, by: int = 1) -> None:
        self.r.hincrby(self.prefix + "counters", name, by)

    def counters(self, prefix: str = "") -> dict[str, int]:
        raw = self.r.hgetall(self.prefix + "counters")
        out = {_text(k): int(v) for k, v in raw.items()}
        return {k: v for k, v in out.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- SQL

_SEP = "#"  # window buckets are rows "<key>#<bucket index>"


class SqlLimiter(Limiter):
    """The same arithmetic in the database (the embedded default: SQLite, BEGIN IMMEDIATE).

    A take is one short write transaction of three statements (lock, read, upsert): on SQLite
    the write lock (BEGIN IMMEDIATE) serialises takes across processes; on PostgreSQL each rule
    is locked with an advisory transaction lock (taken in one statement, in a fixed order), which
    also covers a rule's rows before the first exists, so two first takes cannot both pass.
    """

    def __init__(self, session_factory, clock: Callable[[], float] | None = None):
        self.session_factory = session_factory
        self.clock = clock
        self.local = {}

    def _now(self) -> float:
        return self.clock() if self.clock else time.time()

    @staticmethod
    def _pg(s: Session) -> bool:
        return s.get_bind().dialect.name == "postgresql"

    def _lock(self, s: Session, rules: list[Rule]) -> None:
        if self._pg(s):
            from sqlalchemy import text

            s.execute(text(
                "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtext('herald:rl:' || k) AS h "
                "FROM unnest(CAST(:keys AS text[])) AS k ORDER BY 1) AS locks"
            ), {"keys": sorted({r.key for r in rules})})

    def _load(self, s: Session, rules: list[Rule]) -> tuple[dict, dict]:
        """Every rule's state and hold, in one query (window buckets by key range)."""
        from sqlalchemy import and_, or_

        from .models import RateLimitState

        key = RateLimitState.key
        plain = [r.key for r in rules if r.kind not in ("window", "gate")] + [r.key + ":hold" for r in rules]
        ranges = [(r.key + _SEP, r.key + chr(ord(_SEP) + 1)) for r in rules if r.kind == "window"]
        where = or_(key.in_(plain), *(and_(key >= lo, key < hi) for lo, hi in ranges))
        values = dict(s.execute(select(RateLimitState.key, RateLimitState.value).where(where)).all())
        states: dict = {}
        for r in rules:
            if r.kind == "window":
                lo = r.key + _SEP
                states[r.key] = {int(k[len(lo):]): v for k, v in values.items() if k.startswith(lo)}
            else:
                states[r.key] = values.get(r.key, 0.0)
        holds = {r.key: values.get(r.key + ":hold", 0.0) for r in rules}
        return states, holds

    def _store(self, s: Session, values: dict[str, float]) -> None:
        """One upsert for every changed row."""
        from .models import RateLimitState

        if not values:
            return
        if self._pg(s):
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        stmt = insert(RateLimitState)
        s.execute(stmt.on_conflict_do_update(index_elements=["key"], set_={"value": stmt.excluded.value}),
                  [{"key": k, "value": v} for k, v in values.items()])

    def _store_states(self, s: Session, rules: list[Rule], old: dict, new: dict) -> None:
        from .models import RateLimitState

        flat: dict[str, float] = {}
        for r in rules:
            if r.key not in new:
                continue
            if r.kind == "window":
                gone = [b for b in old.get(r.key, {}) if b not in new[r.key]]
                if gone:
                    s.execute(delete(RateLimitState).where(
                        RateLimitState.key.in_([f"{r.key}{_SEP}{b:012d}" for b in gone])))
                for b, v in new[r.key].items():
                    if old.get(r.key, {}).get(b) != v:
                        flat[f"{r.key}{_SEP}{b:012d}"] = v
            else:
                flat[r.key] = new[r.key]
        self._store(s, flat)

    def take(self, rules: list[Rule], n: int = 1, watch: str | None = None) -> Grant:
        if n <= 0 or not rules:
            return Grant(max(n, 0), 0.0)
        with self.session_factory() as s, s.begin():
            self._lock(s, rules)
            states, holds = self._load(s, rules)
            k, wait, blocker, new = _plan(rules, states, holds, n, self._now())
            if k:
                self._store_states(s, rules, states, new)
        return Grant(k, wait, blocker)

    def _reader(self) -> Session:
        """A session that takes no lock (SQLite: no BEGIN IMMEDIATE for a read)."""
        engine = self.session_factory.kw["bind"]
        return Session(engine.execution_options(isolation_level="AUTOCOMMIT"))

    def peek(self, rules: list[Rule], horizon: float = 0.0) -> list[Capacity]:
        if not rules:
            return []
        with self._reader() as s:
            states, holds = self._load(s, rules)
        return _capacities(rules, states, holds, self._now(), horizon)

    def give_back(self, rules: list[Rule], n: int) -> None:
        if n <= 0 or not rules:
            return
        now = self._now()
        with self.session_factory() as s, s.begin():
            self._lock(s, rules)
            states, _ = self._load(s, rules)
            new = {}
            for r in rules:
                if r.kind == "gcra" and states[r.key]:
                    new[r.key] = max(now, states[r.key] - n * r.interval)
                elif r.kind == "window":
                    buckets = dict(states[r.key])
                    cur = math.floor(now / BUCKET_SECONDS)
                    if buckets.get(cur):
                        buckets[cur] = max(0.0, buckets[cur] - n)
                        new[r.key] = buckets
            self._store_states(s, rules, states, new)

    def hold(self, key: str, until: float) -> None:
        from .models import RateLimitState

        with self.session_factory() as s, s.begin():
            self._lock(s, [Rule(key=key + ":hold", kind="gap")])
            row = s.get(RateLimitState, key + ":hold")
            self._store(s, {key + ":hold": max(row.value if row else 0.0, until)})

    def release(self, key: str) -> None:
        from .models import RateLimitState

        with self.session_factory() as s, s.begin():
            s.execute(delete(RateLimitState).where(RateLimitState.key == key + ":hold"))

    def mark(self, key: str, value: float) -> float:
        from .models import RateLimitState

        k = "mark:" + key
        with self.session_factory() as s, s.begin():
            self._lock(s, [Rule(key=k, kind="gap")])
            row = s.get(RateLimitState, k)
            if row is not None:
                return row.value
            s.add(RateLimitState(key=k, value=value))
            return value

    def read_mark(self, key: str) -> float | None:
        from .models import RateLimitState

        with self._reader() as s:
            row = s.get(RateLimitState, "mark:" + key)
            return None if row is None else row.value

    def incr(self, name: str, by: int = 1) -> None:
        from .models import Counter

        with self.session_factory() as s, s.begin():
            self._lock(s, [Rule(key="counter:" + name, kind="gap")])
            row = s.get(Counter, name, with_for_update=self._pg(s))
            if row is None:
                s.add(Counter(name=name, value=by))
            else:
                row.value += by

    def counters(self, prefix: str = "") -> dict[str, int]:
        from .models import Counter

        with self._reader() as s:
            return {c.name: c.value for c in s.scalars(select(Counter).where(Counter.name.startswith(prefix)))}


_limiter: Limiter | None = None
_limiter_lock = threading.Lock()


def get_limiter() -> Limiter:
    """Redis when ``REDIS_URL`` is set, else the database (built lazily, once per process)."""
    global _limiter
    if _limiter is None:
        with _limiter_lock:
            if _limiter is None:
                from .config import get_settings
                from .db import session_factory

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
