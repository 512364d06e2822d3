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
        opens = datetime.combine(day, start, tzinfo=tz)
        closes = datetime.combine(day + timedelta(days=1) if end <= start else day, end, tzinfo=tz)
        # Normalise through UTC so DST gaps and folds resolve to real instants.
        opens_utc = opens.astimezone(UTC)
        closes_utc = closes.astimezone(UTC)
        at_utc = local.astimezone(UTC)
        if opens_utc <= at_utc < closes_utc:
            return at
        if opens_utc > at_utc:
            return opens_utc.replace(tzinfo=None)
    return at  # no weekday selected at all: validation prevents it; never block forever
