"""The Redis rate-limit store: each take is one Lua script, atomic on the server's clock."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from .base import Limiter
from .rules import Capacity, Grant, Rule, _capacities

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
