"""Herald's tasks: thin wrappers that take ids and call ``campaigns``."""

from __future__ import annotations

from . import engine, events, imports  # noqa: F401


def notify_list_changed(list_id: int) -> None:
    """Members were added to a list: running campaigns of that list enroll them."""
    engine.enroll_list_members(list_id)
