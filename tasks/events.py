"""Event tasks: apply stored delivery events (``campaigns.events.process_pending``).

The webhook stores a batch and calls :func:`events_stored`, which queues one
``process_events`` task unless one is already queued (a marker in the queue store, set with
``put_if_empty``); the task clears the marker first, so a batch stored while it runs queues
the next run. The processor holds a database lease, so a second run only asks the holder to
go round once more. ``sweep_events`` runs every minute as the safety net (a lost task, a
queue store that was down when the batch arrived). Tasks carry no payload: the database is
the source of truth.
"""

from __future__ import annotations

import logging

from huey import crontab

from campaigns import events

from .engine import PRIORITY_DISPATCH, wake_dispatcher
from .queue import huey

log = logging.getLogger("herald.tasks.events")
PENDING_KEY = "herald:events-pending"
MARKER_TTL = 120  # seconds (Redis only): a marker whose task was lost clears itself


def _run() -> None:
    report = events.process_pending()
    if report is None:
        return  # another run holds the lease; it was asked to go round once more
    if report.events:
        log.info("events: %s", report)
    if report.wake_at is not None:
        wake_dispatcher(report.wake_at)
    if report.more:
        process_events()


@huey.task(retries=3, retry_delay=2, priority=PRIORITY_DISPATCH)
def process_events() -> None:
    try:
        huey.storage.delete_data(PENDING_KEY)
    except Exception:  # the sweep clears it too
        log.exception("could not clear the events marker")
    _run()


@huey.periodic_task(crontab(minute="*"), priority=PRIORITY_DISPATCH)
def sweep_events() -> None:
    try:
        huey.storage.delete_data(PENDING_KEY)
    except Exception:
        pass
    _run()


def events_stored() -> None:
    """A batch was stored: make sure a processor runs soon. Never raises (the sweep catches up)."""
    try:
        try:
            first = huey.storage.put_if_empty(PENDING_KEY, b"1", ttl=MARKER_TTL)
        except NotImplementedError:  # SqliteHuey: no TTL
            first = huey.storage.put_if_empty(PENDING_KEY, b"1")
        if first:
            process_events()
    except Exception:  # the events are stored; the minute sweep applies them
        log.exception("could not queue event processing")
