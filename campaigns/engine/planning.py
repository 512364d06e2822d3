"""The dispatcher's pure arithmetic: backoff delays, each limit's room, and who gets the room
(``_allocate``: fair shares across workspaces, campaigns and senders). No I/O here."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

from ..config import get_settings
from ..models import Campaign
from ..ratelimit import Rule


def retry_base() -> float:
    return get_settings().retry_base  # HERALD_RETRY_BASE, validated with the other settings at start


def retry_cap() -> float:
    return get_settings().retry_cap  # HERALD_RETRY_CAP


def backoff_delay(attempt: int, base: float | None = None, cap: float | None = None) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**(attempt-1))), at least 0.5 s."""
    base = retry_base() if base is None else base
    cap = retry_cap() if cap is None else cap
    ceiling = min(cap, base * (2 ** max(0, attempt - 1)))
    return max(0.5, random.uniform(0, ceiling))


BATCH_SECONDS = 0.25  # a send task carries about this much of the account budget; also the pace of passes


INFLIGHT_POLL = 2.5  # while sends are in flight, look again at least this often (a safety net: not slept)


def sender_key(c: Campaign) -> str:
    return f"sender:{c.workspace_id}:{c.from_email.strip().lower()}"


def _fair_share(demands: dict, budget: int, order: list) -> dict:
    """Water-filling: split ``budget`` across keys round-robin, none above its demand."""
    alloc = dict.fromkeys(demands, 0)
    active = [k for k in order if demands.get(k, 0) > 0]
    while budget > 0 and active:
        share = max(1, budget // len(active))
        nxt = []
        for k in active:
            if budget <= 0:
                break
            give = min(share, demands[k] - alloc[k], budget)
            alloc[k] += give
            budget -= give
            if alloc[k] < demands[k]:
                nxt.append(k)
        active = nxt
    return alloc


@dataclass
class _Room:
    """One limit as the dispatcher sees it: messages it still lets into the horizon, and when
    (seconds from now) it lets in at least one more when it is full."""

    key: str
    room: int
    wait: float = 0.0


def _room(rule: Rule, allowed: int, next_free: float, outstanding: int) -> _Room:
    room = (min(allowed, 1) if rule.kind == "gap" else allowed) - outstanding
    if room > 0:
        return _Room(rule.key, room)
    if rule.kind == "gcra":  # sends already queued use the room up; then one unit per interval
        wait = next_free + (-room) * rule.interval
    elif allowed <= 0:  # a spent cap (a bucket must leave the window), a gap still running
        wait = next_free
    else:  # what is queued will use the rest: look again once it is sent
        wait = INFLIGHT_POLL
    return _Room(rule.key, room, max(wait, 0.0))


@dataclass
class _Limits:
    account: _Room
    own: dict[int, list[_Room]]  # campaign -> its own limits
    sender: dict[int, list[_Room]]  # campaign -> its sender's limits (shared with other campaigns)
    workspace: dict[int, _Room]
    outstanding: int


@dataclass
class _Plan:
    alloc: dict[int, int]  # campaign -> messages to queue now
    held: dict[int, dict[str, int]]  # campaign -> limit key -> due messages that limit holds back
    waits: list[float]  # seconds until each holding limit lets more in


def _allocate(campaigns: list[Campaign], due: dict[int, int], lim: _Limits, max_total: int, offset: int = 0) -> _Plan:
    """Who gets the room: each campaign up to its own limits; a sender's room shared fairly by its
    campaigns; a workspace's concurrency by its campaigns; the account's room round-robin across
    workspaces with work ready, then across their campaigns (water-filling: a share nobody needs
    goes to whoever has work). ``offset`` rotates the order from pass to pass."""
    held: dict[int, dict[str, int]] = defaultdict(dict)
    waits: list[float] = []

    def hold(cid: int, room: _Room, n: int, wait: float | None = None) -> None:
        if n > 0:
            held[cid][room.key] = held[cid].get(room.key, 0) + n
            waits.append(max(room.wait if wait is None else wait, 0.0) or BATCH_SECONDS)

    def rotate(items: list) -> list:
        if not items:
            return items
        k = offset % len(items)
        return items[k:] + items[:k]

    order = rotate(sorted((c for c in campaigns if due.get(c.id)), key=lambda c: c.id))
    want: dict[int, int] = {}
    for c in order:
        d = due[c.id]
        tight = min(lim.own.get(c.id) or [], key=lambda r: r.room, default=None)
        if tight is not None and tight.room < d:
            hold(c.id, tight, d - max(tight.room, 0))
            d = max(tight.room, 0)
        want[c.id] = d

    def squeeze(groups: dict, room_of) -> None:
        for key, cids in groups.items():
            room = room_of(key, cids)
            if room is None or sum(want[c] for c in cids) <= room.room:
                continue
            share = _fair_share({c: want[c] for c in cids}, max(room.room, 0), cids)
            for c in cids:
                hold(c, room, want[c] - share[c], room.wait if room.room <= 0 else BATCH_SECONDS)
                want[c] = share[c]

    by_sender: dict[str, list[int]] = defaultdict(list)
    for c in order:
        if lim.sender.get(c.id):
            by_sender[sender_key(c)].append(c.id)
    squeeze(by_sender, lambda key, cids: min((r for c in cids for r in lim.sender[c]), key=lambda r: r.room))
    by_ws: dict[int, list[int]] = defaultdict(list)
    for c in order:
        by_ws[c.workspace_id].append(c.id)
    squeeze(by_ws, lambda ws, cids: lim.workspace.get(ws))

    budget = min(max(lim.account.room, 0), max_total)
    ws_order = rotate(sorted(by_ws))
    ws_alloc = _fair_share({ws: sum(want[c] for c in cids) for ws, cids in by_ws.items()}, budget, ws_order)
    alloc: dict[int, int] = {}
    for ws, cids in by_ws.items():
        share = _fair_share({c: want[c] for c in cids}, ws_alloc[ws], cids)
        for c in cids:
            # Full now: the horizon moves on by itself, so come back in a moment for the next slice.
            hold(c, lim.account, want[c] - share[c],
                 lim.account.wait if lim.account.room <= 0 else max(BATCH_SECONDS, lim.account.wait))
            alloc[c] = share[c]
    return _Plan(alloc, held, waits)


def _jittered(wait: float) -> float:
    """Spread wake-ups over a little time, so campaigns held by limits do not all come back at
    the instant capacity returns (no jitter on the short waits of a steady flow)."""
    return wait + (random.uniform(0, min(1.0, 0.1 * wait)) if wait >= 1.0 else 0.0)
