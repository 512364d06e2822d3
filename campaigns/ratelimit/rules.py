"""Rate-limit rules and their arithmetic: pure functions of a rule, its state and the time.

The state per kind is described in the package docstring; ``_allowed``, ``_need`` and
``_commit`` are the one Python copy of the arithmetic, which the Redis Lua script mirrors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import Rate

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
