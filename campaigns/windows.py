"""Send windows: hours and weekdays in the contact's timezone (or a fixed IANA zone).

``next_opening(window, tz_name, at)`` is ``at`` itself when it falls inside the window, else
the next instant the window opens. Times are naive UTC in and out, like every column.
A window whose end is before its start crosses midnight (22:00-06:00); its weekday is the day
it opens.
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@lru_cache(maxsize=1024)
def zone(name: str | None, fallback: str = "UTC") -> ZoneInfo:
    for candidate in (name, fallback, "UTC"):
        if candidate:
            try:
                return ZoneInfo(candidate)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return ZoneInfo("UTC")


def _hhmm(value: str) -> time:
    h, m = value.split(":")
    return time(int(h), int(m))


def window_zone(window: dict, contact_tz: str | None) -> ZoneInfo:
    fallback = window.get("fallback_timezone") or "UTC"
    tz = window.get("timezone") or "contact"
    return zone(contact_tz, fallback) if tz == "contact" else zone(tz, fallback)


def _instant(day, t: time, tz: ZoneInfo, last: bool) -> datetime:
    """The UTC instant at which the wall clock in ``tz`` reads ``t`` on ``day``.

    Around a DST change a wall time can happen twice (autumn: the earlier for an opening, the
    later for a closing, so the repeated hour is inside a window on both passes) or never
    (spring: the instant the clock jumps past it, where plain ``combine`` read it in the old
    offset and opened a 02:30 window at 03:30)."""
    naive = datetime.combine(day, t)
    found = [x for x in (naive.replace(tzinfo=tz, fold=f).astimezone(UTC) for f in (0, 1))
             if x.astimezone(tz).replace(tzinfo=None) == naive]
    if found:
        return max(found) if last else min(found)
    # In the gap: the first whole second whose wall time is past it (transitions fall on seconds).
    lo, hi = sorted(int(naive.replace(tzinfo=tz, fold=f).astimezone(UTC).timestamp()) for f in (0, 1))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, tz).replace(tzinfo=None) >= naive:
            hi = mid
        else:
            lo = mid
    return datetime.fromtimestamp(hi, UTC)


def next_opening(window: dict | None, contact_tz: str | None, at: datetime) -> datetime:
    if not window:
        return at
    tz = window_zone(window, contact_tz)
    start, end = _hhmm(window.get("start", "00:00")), _hhmm(window.get("end", "23:59"))
    days = {DAYS.index(d) for d in (window.get("days") or DAYS)}
    local = at.replace(tzinfo=UTC).astimezone(tz)
    # Look at the openings of the previous day (a window crossing midnight), today and the next week.
    for offset in range(-1, 9):
        day = (local + timedelta(days=offset)).date()
        if day.weekday() not in days:
            continue
        opens_utc = _instant(day, start, tz, last=False)
        closes_utc = _instant(day + timedelta(days=1) if end <= start else day, end, tz, last=True)
        at_utc = local.astimezone(UTC)
        if opens_utc <= at_utc < closes_utc:
            return at
        if opens_utc > at_utc:
            return opens_utc.replace(tzinfo=None)
    return at  # no weekday selected at all: validation prevents it; never block forever
