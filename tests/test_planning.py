"""The dispatcher's pure arithmetic (campaigns/engine/planning.py) and send windows'
(campaigns/windows.py): no database, no queue, no consumer."""

from __future__ import annotations

import random
from datetime import datetime

import pytest

from campaigns.config import Rate
from campaigns.engine.planning import (
    BATCH_SECONDS,
    INFLIGHT_POLL,
    _allocate,
    _fair_share,
    _jittered,
    _Limits,
    _Room,
    _room,
    backoff_delay,
)
from campaigns.models import Campaign
from campaigns.ratelimit import Rule
from campaigns.windows import next_opening


def campaign(cid: int, ws: int = 1, from_email: str = "a@example.com") -> Campaign:
    return Campaign(id=cid, workspace_id=ws, from_email=from_email, limits={})


def limits(account: int, campaigns, own=None, sender=None, ws_rooms=None, account_wait=0.5) -> _Limits:
    return _Limits(
        account=_Room("account", account, 0.0 if account > 0 else account_wait),
        own={c.id: (own or {}).get(c.id, []) for c in campaigns},
        sender={c.id: (sender or {}).get(c.id, []) for c in campaigns},
        workspace={c.workspace_id: _Room(f"workspace:{c.workspace_id}:concurrency",
                                         (ws_rooms or {}).get(c.workspace_id, 10**6)) for c in campaigns},
        outstanding=0,
    )


# --- water-filling


def test_fair_share_fills_small_demands_first_and_gives_the_rest_round_robin():
    assert _fair_share({"a": 2, "b": 100, "c": 100}, 50, ["a", "b", "c"]) == {"a": 2, "b": 24, "c": 24}
    assert _fair_share({"a": 5, "b": 5}, 100, ["a", "b"]) == {"a": 5, "b": 5}  # never above a demand
    assert _fair_share({"a": 10, "b": 10}, 0, ["a", "b"]) == {"a": 0, "b": 0}


def test_fair_share_gives_an_odd_unit_in_the_order_given():
    assert _fair_share({"a": 10, "b": 10}, 1, ["a", "b"]) == {"a": 1, "b": 0}
    assert _fair_share({"a": 10, "b": 10}, 1, ["b", "a"]) == {"a": 0, "b": 1}


# --- who gets the room


def test_the_offset_rotates_who_gets_the_odd_unit_from_pass_to_pass():
    a, b = campaign(1, ws=1), campaign(2, ws=2)
    firsts = set()
    for offset in range(4):
        plan = _allocate([a, b], {1: 10, 2: 10}, limits(1, [a, b]), max_total=2000, offset=offset)
        assert sum(plan.alloc.values()) == 1
        firsts.add(next(cid for cid, n in plan.alloc.items() if n))
    assert firsts == {1, 2}


def test_a_campaigns_own_limit_holds_its_work_with_that_limits_wait():
    a, b = campaign(1), campaign(2)
    minute = _Room("campaign:1:minute", 3, 0.0)
    plan = _allocate([a, b], {1: 10, 2: 10}, limits(1000, [a, b], own={1: [minute]}), max_total=2000)
    assert plan.alloc == {1: 3, 2: 10}
    assert plan.held == {1: {"campaign:1:minute": 7}}
    assert plan.waits == [BATCH_SECONDS]  # room left now: look again after a batch's worth

    full = _Room("campaign:1:minute", -2, 4.0)  # two queued beyond its room: 4 s until the next unit
    plan = _allocate([a], {1: 10}, limits(1000, [a], own={1: [full]}), max_total=2000)
    assert plan.alloc == {1: 0} and plan.held[1] == {"campaign:1:minute": 10} and plan.waits == [4.0]


def test_a_full_account_holds_everything_until_it_frees():
    a = campaign(1)
    plan = _allocate([a], {1: 5}, limits(0, [a], account_wait=1.5), max_total=2000)
    assert plan.alloc == {1: 0} and plan.held == {1: {"account": 5}} and plan.waits == [1.5]


def test_max_total_caps_a_pass_below_the_account_room():
    a, b = campaign(1, ws=1), campaign(2, ws=2)
    plan = _allocate([a, b], {1: 500, 2: 500}, limits(10**6, [a, b]), max_total=100)
    assert plan.alloc == {1: 50, 2: 50}


def test_campaigns_with_nothing_due_get_nothing_and_hold_nothing():
    a, b = campaign(1), campaign(2)
    plan = _allocate([a, b], {1: 4}, limits(100, [a, b]), max_total=2000)
    assert plan.alloc == {1: 4} and plan.held == {} and plan.waits == []


# --- one limit's room


def test_a_gcra_limit_full_waits_one_interval_per_message_queued_beyond_it():
    rule = Rule.from_rate("campaign:1:minute", Rate(60, 60.0, 1))  # one a second
    assert _room(rule, allowed=5, next_free=0.0, outstanding=2) == _Room("campaign:1:minute", 3)
    room = _room(rule, allowed=1, next_free=0.5, outstanding=3)
    assert room.room == -2 and room.wait == pytest.approx(0.5 + 2 * rule.interval)


def test_a_spent_cap_waits_for_its_window_and_a_cap_used_by_queued_work_for_the_sends():
    rule = Rule.per_day("sender:1:a@example.com:day", 100)
    assert _room(rule, allowed=0, next_free=3600.0, outstanding=0).wait == 3600.0
    assert _room(rule, allowed=4, next_free=0.0, outstanding=4).wait == INFLIGHT_POLL


def test_a_gap_lets_one_message_in_at_a_time():
    rule = Rule.gap("sender:1:a@example.com:gap", 30.0)
    assert _room(rule, allowed=7, next_free=0.0, outstanding=0).room == 1
    assert _room(rule, allowed=7, next_free=0.0, outstanding=1).room == 0


# --- retries and wake-ups


@pytest.mark.parametrize("attempt,ceiling", [(0, 2.0), (1, 2.0), (2, 4.0), (3, 8.0), (6, 50.0), (30, 50.0)])
def test_backoff_is_full_jitter_under_an_exponential_ceiling_capped(attempt, ceiling):
    random.seed(attempt)  # the same draws every run
    delays = [backoff_delay(attempt, base=2.0, cap=50.0) for _ in range(200)]
    assert all(0.5 <= d <= max(ceiling, 0.5) for d in delays)
    assert max(delays) > 0.8 * ceiling  # the whole range is used, up to the ceiling


def test_backoff_never_goes_below_half_a_second():
    assert all(backoff_delay(1, base=0.1, cap=0.2) == 0.5 for _ in range(50))


def test_jitter_spreads_long_waits_only():
    assert _jittered(0.25) == 0.25
    for wait in (1.0, 5.0, 60.0):
        assert all(wait <= _jittered(wait) <= wait + min(1.0, 0.1 * wait) for _ in range(100))


# --- send windows


OFFICE = {"start": "09:00", "end": "17:00", "timezone": "UTC", "days": ["mon", "tue", "wed", "thu", "fri"]}


@pytest.mark.parametrize("at,expected", [
    (datetime(2026, 6, 1, 10, 0), datetime(2026, 6, 1, 10, 0)),  # Monday, inside: now
    (datetime(2026, 6, 1, 8, 0), datetime(2026, 6, 1, 9, 0)),  # before the opening: the opening
    (datetime(2026, 6, 1, 17, 0), datetime(2026, 6, 2, 9, 0)),  # the end is outside: tomorrow
    (datetime(2026, 6, 5, 18, 0), datetime(2026, 6, 8, 9, 0)),  # Friday evening: Monday
    (datetime(2026, 6, 6, 12, 0), datetime(2026, 6, 8, 9, 0)),  # Saturday: Monday
])
def test_a_window_opens_on_its_next_weekday_at_its_start(at, expected):
    assert next_opening(OFFICE, None, at) == expected


def test_no_window_is_always_open():
    at = datetime(2026, 6, 6, 3, 0)
    assert next_opening(None, "Asia/Tokyo", at) == at and next_opening({}, None, at) == at


def test_a_window_crossing_midnight_belongs_to_the_day_it_opens():
    night = {"start": "22:00", "end": "06:00", "timezone": "UTC", "days": ["mon"]}
    assert next_opening(night, None, datetime(2026, 6, 2, 5, 0)) == datetime(2026, 6, 2, 5, 0)  # Tue 05:00
    assert next_opening(night, None, datetime(2026, 6, 2, 6, 0)) == datetime(2026, 6, 8, 22, 0)


def test_the_contacts_timezone_is_used_and_an_unknown_one_falls_back():
    window = {"start": "09:00", "end": "17:00", "timezone": "contact", "fallback_timezone": "Asia/Tokyo"}
    at = datetime(2026, 6, 1, 6, 0)  # 08:00 in Paris (CEST), 15:00 in Tokyo
    assert next_opening(window, "Europe/Paris", at) == datetime(2026, 6, 1, 7, 0)
    assert next_opening(window, "Not/AZone", at) == at
    assert next_opening(window, None, at) == at
