"""Herald's tasks: thin wrappers that take ids and call ``campaigns``."""

from __future__ import annotations

import logging

from . import engine

log = logging.getLogger(__name__)


def notify_list_changed(list_id: int) -> None:
    """Members were added to a list: running campaigns of that list enroll them."""
    engine.enroll_list_members(list_id)


def notify_enrolled(enrolled: int) -> None:
    """``enrolled`` enrollments were committed (an address taken off the suppression list): wake
    the dispatcher for their first sends (nothing to do for 0). A queue failure is logged, not
    raised: the enrollments are stored, and the reconciler finds their due messages within a
    minute."""
    if not enrolled:
        return
    try:
        engine.wake_dispatcher(None)
    except Exception:
        log.exception("could not wake the dispatcher after an enrollment")
