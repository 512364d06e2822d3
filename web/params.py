"""Query-string parameters and paging shared by the UI and the API.

One scheme for both surfaces: keyset pagination by id (:func:`keyset`). The API walks oldest
first with an opaque ``?cursor=`` (:func:`paginate`); the UI walks newest first with
``?before=<id>`` (:func:`keyset_page`). Ids are read with :func:`int_arg`; dates are written
with :func:`iso`.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime

from flask import request

from campaigns.errors import BadRequest
from campaigns.ids import MAX_ID, is_digits, parse_id, valid_id

__all__ = ["MAX_ID", "PAGE_SIZE", "decode_cursor", "encode_cursor", "int_arg", "is_digits", "iso", "keyset",
           "keyset_page", "page_limit", "paginate", "parse_id", "valid_id"]

PAGE_SIZE = 50  # rows per page, both surfaces
MAX_PAGE = 500  # the API's largest ?limit=


def iso(dt: datetime | None, timespec: str = "seconds") -> str | None:
    """Naive UTC as ISO 8601 with a ``Z`` (``timespec="auto"``: with the microseconds, if any)."""
    return None if dt is None else dt.isoformat(timespec=timespec) + "Z"


def int_arg(name: str, *, strict: bool = True) -> int | None:
    """A whole number from the query string; None when it is missing or empty.

    ``strict`` (the API): anything but a whole number in BIGINT's range is a 400 naming the
    argument. Not strict (the UI's filters and pages): anything but an id (1..MAX_ID) is None,
    so a bad filter is ignored.
    """
    raw = request.args.get(name)
    if not strict:
        return parse_id(raw)
    if raw in (None, ""):
        return None
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number") from None
    if not -MAX_ID <= value <= MAX_ID:
        raise BadRequest(f"{name} is out of range")
    return value


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(str(last_id).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    """The id a ``next_cursor`` carries, or a 400 for anything else."""
    if not cursor:
        return None
    try:
        value = int(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode())
    except (binascii.Error, ValueError, UnicodeDecodeError):
        value = -1
    if not 0 <= value <= MAX_ID:
        raise BadRequest("cursor is not valid; use the next_cursor of a previous page")
    return value


def page_limit(default: int = PAGE_SIZE, maximum: int = MAX_PAGE) -> int:
    raw = request.args.get("limit")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest("limit must be a whole number") from None
    if not 1 <= value <= maximum:
        raise BadRequest(f"limit must be between 1 and {maximum}")
    return value


def keyset(session, stmt, model, *, limit: int, start: int | None = None, newest_first: bool = False):
    """One page by id, after ``start`` (oldest first) or before it (``newest_first``).
    Returns ``(rows, the last row's id when there is a next page | None)``."""
    if start is not None:
        stmt = stmt.where(model.id < start if newest_first else model.id > start)
    rows = list(session.scalars(stmt.order_by(model.id.desc() if newest_first else model.id).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].id if more and rows else None)


def paginate(session, stmt, model, limit: int | None = None) -> dict:
    """The API's page, oldest first: ``{"items": [rows], "next_cursor": str | None}`` (the
    caller dumps it through its page schema)."""
    limit = limit or page_limit()
    rows, last = keyset(session, stmt, model, limit=limit, start=decode_cursor(request.args.get("cursor")))
    return {"items": rows, "next_cursor": encode_cursor(last) if last is not None else None}


def keyset_page(session, stmt, model, limit: int = PAGE_SIZE):
    """The UI's page, newest first, ``?before=<id>`` for the next (older) one:
    ``(rows, next_before | None)``."""
    return keyset(session, stmt, model, limit=limit, start=int_arg("before", strict=False), newest_first=True)
