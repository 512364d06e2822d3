"""The limiter on both stores: the same suite against Redis (Lua) and SQL (SQLite or PostgreSQL).

Most tests drive a fake clock (``Limiter.clock``), so a day-long window is checked in
milliseconds; the concurrency tests use the real clock and real threads.
"""

from __future__ import annotations

import os
import secrets
import threading
import time

import pytest
import redis

from campaigns.config import parse_rate
from campaigns.ratelimit import BUCKET_SECONDS, DAY, RedisLimiter, Rule, SqlLimiter, _plan

T0 = 1_800_000_000.0  # a fixed epoch for the fake clock (a bucket boundary: T0 % 300 == 0)


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def _redis_limiter(clock):
    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/15"
    client = redis.Redis.from_url(url)
    prefix = f"herald-rl-test-{secrets.token_hex(4)}:"
    return RedisLimiter(client, prefix=prefix, clock=clock), client, prefix


@pytest.fixture(params=["sql", pytest.param("redis", marks=pytest.mark.postgres_only)])
def make(request):
    """make(clock=None) -> a limiter on this parameter's store (real clock when None)."""
    cleanup = []

    def build(clock=None):
        if request.param == "sql":
            from campaigns.db import session_factory

            return SqlLimiter(session_factory(), clock=clock)
        limiter, client, prefix = _redis_limiter(clock)
        cleanup.append((client, prefix))
        return limiter

    yield build
    for client, prefix in cleanup:
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
        client.close()


def rate(spec: str, key: str = "account") -> Rule:
    return Rule.from_rate(key, parse_rate(spec))


def test_gcra_grants_the_burst_then_the_rate(make):
    clock = Clock()
    lim = make(clock)
    r = rate("10/second;burst=2")
    g = lim.take([r], 10)
    assert (g.granted, g.blocked_by) == (2, "account")
    assert g.wait == pytest.approx(0.1)
    assert lim.take([r], 1).granted == 0
    clock.advance(0.1)
    assert lim.take([r], 5).granted == 1
    clock.advance(10)  # idle time buys the burst, never more
    assert lim.take([r], 50).granted == 2


def test_gcra_never_exceeds_count_plus_burst_in_any_period(make):
    clock = Clock()
    lim = make(clock)
    r = rate("20/second;burst=3")
    grants = []
    for i in range(400):  # takes at uneven moments over about 10 s
        clock.advance(0.005 + (i % 7) * 0.006)
        g = lim.take([r], 1 + i % 3)
        grants += [clock.t] * g.granted
    assert len(grants) >= 0.97 * 20 * (clock.t - T0)
    j = 0
    for i, t in enumerate(grants):
        while grants[j] <= t - 1.0:
            j += 1
        assert i - j + 1 <= 23


def test_rolling_day_cap_comes_back_bucket_by_bucket(make):
    clock = Clock()
    lim = make(clock)
    cap = Rule.per_day("campaign:1:day", 5)
    assert lim.take([cap], 3).granted == 3
    clock.advance(2 * 3600)
    g = lim.take([cap], 3)
    assert (g.granted, g.blocked_by) == (2, "campaign:1:day")
    # one more unit frees when the first bucket leaves the window: 24 h (+ at most a bucket) later
    assert DAY - 2 * 3600 <= g.wait <= DAY - 2 * 3600 + BUCKET_SECONDS
    clock.advance(DAY - 2 * 3600 - 1)  # not yet: the first three are still inside the last 24 h
    assert lim.take([cap], 1).granted == 0
    clock.advance(BUCKET_SECONDS + 1)
    assert lim.take([cap], 5).granted == 3  # the first three came back, the later two did not
    assert lim.take([cap], 1).granted == 0


def test_a_raised_cap_allows_more_at_once(make):
    """The warm-up ramp passes a bigger cap each day over the same state."""
    clock = Clock()
    lim = make(clock)
    assert lim.take([Rule.per_day("sender:1:a@x.io:day", 5)], 10).granted == 5
    assert lim.take([Rule.per_day("sender:1:a@x.io:day", 8)], 10).granted == 3


def test_gap_sends_one_at_a_time_with_a_pause(make):
    clock = Clock()
    lim = make(clock)
    g = lim.take([Rule.gap("sender:1:a@x.io:gap", 30)], 3)
    assert g.granted == 1
    g = lim.take([Rule.gap("sender:1:a@x.io:gap", 50)], 1)
    assert g.granted == 0 and g.wait == pytest.approx(30)
    clock.advance(30)
    assert lim.take([Rule.gap("sender:1:a@x.io:gap", 50)], 1).granted == 1
    clock.advance(49)
    assert lim.take([Rule.gap("sender:1:a@x.io:gap", 50)], 1).granted == 0


def test_all_rules_are_charged_together_and_only_for_the_grant(make):
    clock = Clock()
    lim = make(clock)
    fast = rate("100/second;burst=10")
    cap = Rule.per_day("campaign:7:day", 3)
    g = lim.take([fast, cap], 8)
    assert (g.granted, g.blocked_by) == (3, "campaign:7:day")
    # the account was charged 3, not 8: 7 of its burst are left
    assert lim.take([fast], 20).granted == 7


def test_hold_blocks_everyone_until_the_reset(make):
    clock = Clock()
    lim = make(clock)
    r = rate("10/second;burst=2")
    lim.hold("account", T0 + 2.0)
    g = lim.take([r], 1)
    assert (g.granted, g.blocked_by) == (0, "account") and g.wait == pytest.approx(2.0)
    lim.hold("account", T0 + 1.0)  # an earlier reset does not shorten the hold
    clock.advance(1.5)
    assert lim.take([r], 1).granted == 0
    clock.advance(0.5)
    assert lim.take([r], 5).granted == 2


def test_a_gate_shuts_only_while_held(make):
    """The priority lane: bulk sends pass a gate that a waiting priority send holds shut."""
    clock = Clock()
    lim = make(clock)
    r = rate("10/second;burst=5")
    gate = Rule.gate("priority")
    assert lim.take([r, gate], 2).granted == 2  # open: the gate costs nothing
    lim.hold("priority", T0 + 0.3)
    g = lim.take([r, gate], 1)
    assert (g.granted, g.blocked_by) == (0, "priority") and g.wait == pytest.approx(0.3)
    assert lim.take([r], 1).granted == 1  # the priority send itself is not behind the gate
    lim.release("priority")
    assert lim.take([r, gate], 5).granted == 2


def test_peek_reads_without_taking(make):
    clock = Clock()
    lim = make(clock)
    r = rate("10/second;burst=2")
    (cap,) = lim.peek([r], horizon=1.0)
    assert cap.allowed == 12  # the burst now, plus a second's worth
    (cap,) = lim.peek([r], horizon=0.0)
    assert cap.allowed == 2 and cap.next_free == pytest.approx(0.1)
    assert lim.take([r], 2).granted == 2
    (cap,) = lim.peek([r], horizon=0.0)
    assert cap.allowed == 0 and cap.next_free == pytest.approx(0.1)
    lim.hold("account", T0 + 5)
    (cap,) = lim.peek([r], horizon=1.0)
    assert cap.allowed == 0 and cap.held_until == pytest.approx(T0 + 5) and cap.next_free == pytest.approx(4.0)
    caps = lim.peek([Rule.per_day("campaign:2:day", 4), Rule.gap("sender:2:g", 9)], horizon=1.0)
    assert [c.allowed for c in caps] == [4, 1]


def test_give_back_returns_unused_units(make):
    clock = Clock()
    lim = make(clock)
    r = rate("10/second;burst=4")
    cap = Rule.per_day("campaign:3:day", 4)
    assert lim.take([r, cap], 4).granted == 4
    lim.give_back([r, cap], 2)
    assert lim.take([r, cap], 4).granted == 2


def test_first_mark_wins(make):
    lim = make(Clock())
    assert lim.read_mark("sender:1:a@x.io:first") is None
    assert lim.mark("sender:1:a@x.io:first", 100.0) == 100.0
    assert lim.mark("sender:1:a@x.io:first", 50.0) == 100.0
    assert lim.read_mark("sender:1:a@x.io:first") == 100.0


def test_counters(make):
    lim = make()
    lim.incr("rate_limit_waits:account", 2)
    lim.incr("rate_limit_waits:account")
    assert lim.counters("rate_limit_waits:")["rate_limit_waits:account"] == 3


@pytest.mark.parametrize("threads", [8])
def test_takes_are_atomic_across_threads(make, threads):
    """Many takers at once, real clock: the sum of grants stays within the rule."""
    lim = make()
    r = Rule.from_rate(f"account-{secrets.token_hex(3)}", parse_rate("50/second;burst=5"))
    cap = Rule.per_day(f"campaign:{secrets.token_hex(3)}:day", 60)
    granted = []
    stop = time.monotonic() + 1.5
    start = time.time()

    def worker():
        while time.monotonic() < stop:
            g = lim.take([r, cap], 1)
            if g.granted:
                granted.append(time.time())
            else:
                time.sleep(min(g.wait, 0.02))

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.time() - start
    assert len(granted) <= min(60, 5 + 50 * elapsed + 1)
    assert len(granted) >= min(60, 0.8 * 50 * 1.5)


def test_python_plan_matches_the_documented_bound():
    """The pure arithmetic the SQL store uses: GCRA over a simulated minute."""
    r = Rule.from_rate("x", parse_rate("6/minute;burst=2"))
    state: dict = {}
    now = T0
    got = []
    for _ in range(600):
        now += 0.5
        k, _wait, _b, new = _plan([r], state, {}, 1, now)
        if k:
            state = new
            got.append(now)
    assert len(got) == 2 + 6 * 5 - 1 or len(got) == 2 + 6 * 5  # burst, then one per 10 s
