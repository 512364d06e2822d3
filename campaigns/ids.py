"""Row ids that come from outside (URLs, forms, bodies): what a valid one is, and how to read one.

Ids are BIGINT: a number past :data:`MAX_ID` names no row and must never reach the driver
(PostgreSQL refuses it: a 500). Used by the domain and by both web surfaces.
"""

from __future__ import annotations

MAX_ID = 2**63 - 1


def valid_id(value) -> bool:
    """An int (not a bool) that can name a row: 1..MAX_ID."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_ID


def is_digits(raw: str) -> bool:
    """ASCII digits only: ``str.isdigit()`` also says yes to '²', which ``int()`` refuses (a 500)."""
    return raw.isascii() and raw.isdigit()


def parse_id(raw: str | None) -> int | None:
    """A positive id typed in a form or a query string; anything else (junk, too large) is None."""
    raw = (raw or "").strip()
    if not is_digits(raw):
        return None
    value = int(raw)
    return value if valid_id(value) else None
