"""Send windows around daylight-saving changes (pure functions: no database, no queue)."""

from __future__ import annotations

from datetime import datetime

import pytest

from campaigns.windows import next_opening

BERLIN = {"start": "02:30", "end": "04:00", "timezone": "Europe/Berlin"}
NEW_YORK_SUNDAY = {"start": "02:30", "end": "03:30", "timezone": "America/New_York", "days": ["sun"]}
BERLIN_SATURDAY_NIGHT = {"start": "22:00", "end": "02:30", "timezone": "Europe/Berlin", "days": ["sat"]}


@pytest.mark.parametrize("window,at,expected", [
    # Spring, Berlin (29 March 2026, 02:00 CET -> 03:00 CEST): 02:30 never happens. The window is
    # open from the jump (03:00 CEST = 01:00 UTC); it opened at 03:30 CEST, and 03:05 was "outside".
    (BERLIN, datetime(2026, 3, 29, 1, 5), datetime(2026, 3, 29, 1, 5)),
    (BERLIN, datetime(2026, 3, 29, 0, 30), datetime(2026, 3, 29, 1, 0)),
    # Spring, New York (8 March 2026): 02:30-03:30 on that Sunday is 03:00-03:30 EDT; it used to
    # "open" at its own close and the Sunday was skipped for the next one.
    (NEW_YORK_SUNDAY, datetime(2026, 3, 8, 5, 0), datetime(2026, 3, 8, 7, 0)),
    (NEW_YORK_SUNDAY, datetime(2026, 3, 8, 7, 10), datetime(2026, 3, 8, 7, 10)),
    # Autumn, Berlin (25 October 2026, 03:00 CEST -> 02:00 CET): the repeated hour is inside a
    # window closing at 02:30 on both passes; the second 02:00 was deferred a week.
    (BERLIN_SATURDAY_NIGHT, datetime(2026, 10, 25, 0, 10), datetime(2026, 10, 25, 0, 10)),
    (BERLIN_SATURDAY_NIGHT, datetime(2026, 10, 25, 1, 0), datetime(2026, 10, 25, 1, 0)),
    (BERLIN_SATURDAY_NIGHT, datetime(2026, 10, 25, 1, 31), datetime(2026, 10, 31, 21, 0)),
    # An ordinary day is unchanged.
    ({"start": "09:00", "end": "17:00", "timezone": "Europe/Berlin"}, datetime(2026, 6, 1, 18, 0),
     datetime(2026, 6, 2, 7, 0)),
])
def test_windows_follow_the_wall_clock_across_dst_changes(window, at, expected):
    assert next_opening(window, None, at) == expected
