"""Pacing at send time: right before its calls a group of sends takes one unit of every limit
it is under (one atomic take), waits a moment for it, or goes back to the ledger."""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict

from .. import stopgen
from ..config import get_settings
from ..models import Campaign
from ..ratelimit import Limiter, Rule
from .common import _memo, log
from .ledger import _StopGuard
from .limits import _note_first_send, account_rule, campaign_rules, sender_rules

PACE_MAX_WAIT = 2.0  # a send waits at most this long for its turn; a longer wait: back to the ledger


PRIORITY_GATE = "priority"  # held while a priority send waits for the account budget: bulk steps aside


PACE_EARLY = 0.002  # a waiting send wakes this much before its unit frees, and asks again


class _WaitCounter:
    """Counts sends that waited on a limit, by kind, and adds them to the shared counters at
    most once a second (a counter write per send would cost a transaction on SQLite)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.pending: dict[str, int] = defaultdict(int)
        self.flushed = float("-inf")  # the first wait is counted at once

    def add(self, limiter: Limiter, name: str, n: int = 1) -> None:
        with self.lock:
            self.pending[name] += n
            if time.monotonic() - self.flushed < 1.0:
                return
            pending, self.pending, self.flushed = dict(self.pending), defaultdict(int), time.monotonic()
        try:
            for k, n in pending.items():
                limiter.incr(k, n)
        except Exception:  # a counter must never stop a send
            log.exception("could not count rate-limit waits")




def _waits(limiter: Limiter) -> _WaitCounter:
    """The wait counter of this process, kept with the limiter."""
    counter = limiter.local.get("wait_counter")
    if counter is None:
        counter = limiter.local.setdefault("wait_counter", _WaitCounter())
    return counter


def _limit_kind(key: str | None) -> str:
    if not key:
        return "unknown"
    parts = key.split(":")
    if parts[0] == "campaign":
        return f"campaign_{parts[-1]}"
    if parts[0] == "sender":
        return f"sender_{parts[-1]}"
    return parts[0]


def _bulk_rules(limiter: Limiter, campaign: Campaign) -> list[Rule]:
    return [account_rule(), Rule.gate(PRIORITY_GATE)] + campaign_rules(campaign) + sender_rules(campaign, limiter)


def _give_back(limiter: Limiter, campaign: Campaign, n: int) -> None:
    try:
        limiter.give_back(_bulk_rules(limiter, campaign), n)
    except Exception:  # a unit lost is a unit lost, not a reason to stop
        log.exception("could not give back %s limiter units", n)


def pace(limiter: Limiter, campaign: Campaign, n: int, guard: _StopGuard | None = None, urgent: bool = False) -> int:
    """Wait for the turn of up to ``n`` sends of this campaign under every limit they are under,
    right before the calls; how many units were taken (0: the wait is long, a 429 hold, a spent
    daily cap, a campaign's per-minute pace: the messages go back to the ledger, unspent, and the
    dispatcher queues them again when the limit frees).

    ``guard``: the same limiter round trip reads the stop generation, and the guard re-checks the
    batch when it moved, before any of these is sent.

    ``urgent`` (test sends, the priority lane) is under the account budget only, and while it waits
    for it it holds PRIORITY_GATE, which every bulk send also passes: the next unit is the test
    send's, not the first of the many bulk sends waiting beside it.
    """
    max_wait = min(PACE_MAX_WAIT, get_settings().lease_seconds / 4)
    deadline = time.monotonic() + 1.5 * max_wait
    shut = _memo(limiter, "shut")  # limit key -> monotonic time until which a send need not ask
    watch = stopgen.watch_key() if guard is not None else None
    waited = None
    while True:
        rules = [account_rule()] if urgent else _bulk_rules(limiter, campaign)
        mono = time.monotonic()
        blocked = next((r.key for r in rules if shut.get(r.key, 0.0) > mono), None)
        if blocked:
            _waits(limiter).add(limiter, f"rate_limit_released:{_limit_kind(blocked)}", n)
            return 0
        try:
            g = limiter.take(rules, n, watch=watch)
        except Exception:  # no limiter, no send: the ledger keeps the messages
            log.exception("the limiter did not answer; %s messages go back to the ledger", n)
            return 0
        if guard is not None:
            guard.observe(g.watched)
        if g.granted:
            if waited:
                _waits(limiter).add(limiter, f"rate_limit_waits:{_limit_kind(waited)}", g.granted)
            if urgent and waited:
                limiter.release(PRIORITY_GATE)
            if not urgent:
                _note_first_send(limiter, campaign, time.time())
            return g.granted
        waited = waited or g.blocked_by
        if g.wait > max_wait or mono + g.wait > deadline:
            if g.blocked_by and g.wait > max_wait:
                shut[g.blocked_by] = mono + min(g.wait, 5.0) - 0.05
            _waits(limiter).add(limiter, f"rate_limit_released:{_limit_kind(g.blocked_by)}", n)
            return 0
        if urgent:
            limiter.hold(PRIORITY_GATE, time.time() + g.wait + 0.1)
        # Wake a moment early and ask again: with a burst of one, every millisecond a unit waits
        # for its taker is lost for good. Spread only the longer waits (many senders at once).
        time.sleep(max(0.0, g.wait - PACE_EARLY) + (random.uniform(0, 0.01) if g.wait > 0.2 else 0.0))
