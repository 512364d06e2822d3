"""Engine tasks: thin, ids in, ``campaigns.engine`` does the work. Each stage has its own retry policy.

- ``fanout_campaign``: launch fan-out (set-based, in parts, idempotent); retried 5 times, 10 s apart.
- ``dispatch``: claims due work within the budgets and queues send batches; not retried (the
  next wake-up or the reconciler runs it again).
- ``send_messages``: one batch of message ids; the ledger decides retries (backoff with jitter,
  capped attempts), so the Huey task itself is never retried.
- ``reconcile``: every minute (stable id, a database lease stops overlaps) and at consumer start;
  it also queues again imports whose run is gone (``tasks.imports.requeue_stale_imports``).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from huey import crontab
from huey.constants import EmptyData

from campaigns import effects, engine
from campaigns.config import get_settings
from campaigns.db import TRANSIENT_ERRORS, error_reason

from .queue import STORE_ERRORS, consumer_workers, huey

log = logging.getLogger("herald.tasks")
WAKE_KEY = "herald:dispatch-wake"
EARLY = 1.0  # seconds a delayed dispatcher wake starts ahead of the due time (see _wake_dispatcher)
DISPATCH_RETRY = 2.0  # seconds (plus up to as much jitter) before a dispatch the database failed runs again
DISPATCH_RETRY_FOR = 60.0  # seconds a dispatch waits in its worker for a queue store that does not answer
PRIORITY_BULK = 0
PRIORITY_DISPATCH = 50
PRIORITY_TEST = 100


def _covered(ts: float, now: float) -> bool:
    """Whether an earlier (or equal) wake is already on its way; else ``ts`` is recorded as the
    next one, so later wakes do not pile up duplicate dispatcher tasks."""
    try:
        cur = huey.storage.peek_data(WAKE_KEY)
        if cur is not EmptyData and now < float(cur) <= ts:
            log.debug("wake at %.3f covered by the wake at %s", ts, cur)
            return True
        huey.storage.put_data(WAKE_KEY, repr(ts).encode())
    except Exception:  # a lost wake is found again by the reconciler
        log.exception("could not record the dispatcher wake")
    return False


def _wake_dispatcher(at: datetime | None) -> None:
    """Make sure a dispatcher runs at ``at`` (now when None), without piling up duplicate wakes."""
    now = time.time()
    ts = now if at is None else at.replace(tzinfo=UTC).timestamp()
    if _covered(ts, now):
        return
    log.debug("wake the dispatcher at %.3f (in %.3f s)", ts, ts - now)
    # Huey's consumer moves delayed tasks to the queue once a second, so a task scheduled for
    # ``ts`` starts up to a second late. Start the dispatcher up to EARLY seconds ahead instead:
    # it finds nothing due yet and sleeps until ``ts`` itself (run_dispatcher sleeps short waits).
    start = ts - EARLY
    if start <= now + 0.05:
        dispatch()
    else:
        # An aware eta: Huey turns a naive one into UTC through mktime, dropping the microseconds.
        dispatch.schedule(eta=datetime.fromtimestamp(start, UTC))


def _enqueue_send(ids: list[int], priority: int = engine.BULK_PRIORITY) -> None:
    """Queue a send task. Any priority above bulk (the ledger's ``engine.TEST_PRIORITY``, which
    the reconciler passes, or this module's PRIORITY_TEST) is the interactive lane: the task goes
    ahead of the dispatcher and of bulk sends in the queue."""
    interactive = priority > engine.BULK_PRIORITY
    huey.enqueue(send_messages.s(ids, interactive, priority=PRIORITY_TEST if interactive else PRIORITY_BULK))


HOOKS = engine.Hooks(enqueue_send=_enqueue_send, wake_dispatcher=_wake_dispatcher)
YIELD_SECONDS = 0.5  # a lone worker's dispatcher comes back at least this much later


def _yielding_wake(at: datetime | None) -> None:
    """The dispatcher's own next run when the consumer has one worker: always a delayed task.

    An immediate wake is queued at the dispatcher's priority, ahead of every send it queued: the
    lone worker would run dispatch after dispatch and never a send (nothing was ever sent with
    ``-w 1``). Delayed, it lets the worker take the sends first (Huey moves it to the queue
    within a second of its time)."""
    now = time.time()
    ts = max(now + YIELD_SECONDS, now if at is None else at.replace(tzinfo=UTC).timestamp())
    if not _covered(ts, now):
        dispatch.schedule(eta=datetime.fromtimestamp(ts, UTC))


YIELDING_HOOKS = dataclasses.replace(HOOKS, wake_dispatcher=_yielding_wake)


def _lone_worker() -> bool:
    return consumer_workers() == 1


def wake_dispatcher(at: datetime | None = None) -> None:
    _wake_dispatcher(at)


@huey.task(retries=5, retry_delay=10, priority=PRIORITY_DISPATCH)
def fanout_campaign(campaign_id: int) -> None:
    # In parts: the dispatcher is woken after each, so the first sends start after the first
    # part, not after the whole list (engine.fanout_in_parts).
    n = engine.fanout_in_parts(campaign_id, on_part=lambda _n: _wake_dispatcher(None))
    if n is None:
        log.info("campaign %s: a fan-out is already running", campaign_id)
        return
    log.info("campaign %s: %s contacts enrolled", campaign_id, n)
    _wake_dispatcher(None)


@huey.task(retries=3, retry_delay=5, priority=PRIORITY_DISPATCH)
def enroll_list_members(list_id: int) -> None:
    engine.enroll_new_members_of_list(list_id, HOOKS)


@huey.task(priority=PRIORITY_DISPATCH)
def dispatch() -> None:
    # This run honours the recorded wake when it is due within EARLY seconds (wakes start that
    # much ahead): forget it, so this run's own next wake is not taken as already on its way.
    try:
        cur = huey.storage.peek_data(WAKE_KEY)
        if cur is not EmptyData and float(cur) <= time.time() + EARLY + 0.05:
            huey.storage.delete_data(WAKE_KEY)
    except Exception:
        pass
    # The database or the queue store did not answer (a restart, a failover): dispatch again in a
    # moment, not at the reconciler's next minute; while the queue store cannot even take the
    # delayed task, in this worker, for up to DISPATCH_RETRY_FOR. The dispatcher's lease makes
    # an extra run harmless.
    deadline = time.monotonic() + DISPATCH_RETRY_FOR
    while True:
        try:
            if _lone_worker():
                # One pass, not a loop that sleeps short waits in the only worker, and a delayed next run.
                engine.run_dispatcher(YIELDING_HOOKS, budget_seconds=0)
            else:
                engine.run_dispatcher(HOOKS)
            return
        except (*TRANSIENT_ERRORS, *STORE_ERRORS) as exc:
            delay = DISPATCH_RETRY + random.uniform(0, DISPATCH_RETRY)
            what = "the queue store" if isinstance(exc, STORE_ERRORS) else "the database"
            log.warning("dispatch: %s did not answer (%s); dispatching again in %.1f s", what, error_reason(exc), delay)
            try:
                dispatch.schedule(delay=delay)
                return
            except STORE_ERRORS:
                if time.monotonic() + delay > deadline:
                    log.error("dispatch: the queue store is still down; the reconciler will dispatch once it is back")
                    return
                time.sleep(delay)


# Bulk send batches running at once in this process (HERALD_SEND_BATCHES, default 2). Their calls
# overlap in the process's send pool anyway; more batch threads than this only fight over the GIL
# (measured: 8 at once cost ~25% more consumer CPU per email than 2-3; with 80-message batches,
# 2 at once sent 1,767-1,860/s against 3's 1,678-1,740 and 4's 1,649-1,697, bench/RESULTS.md). A
# worker waiting here holds no lease (the batch claims its rows after it gets in); priority sends
# (test sends) never wait here.
_bulk_batches: threading.BoundedSemaphore | None = None
_bulk_lock = threading.Lock()


def _bulk_gate() -> threading.BoundedSemaphore:
    global _bulk_batches
    if _bulk_batches is None:
        with _bulk_lock:
            if _bulk_batches is None:
                _bulk_batches = threading.BoundedSemaphore(get_settings().send_batches)
    return _bulk_batches


@huey.task(priority=PRIORITY_BULK)
def send_messages(ids: list[int], urgent: bool = False) -> None:
    if urgent:
        engine.send_batch(ids, HOOKS)
        return
    with _bulk_gate():
        engine.send_batch(ids, HOOKS)


# Sweeps run after each reconcile this consumer held the lease for. The task modules above this
# one add theirs at import (tasks.imports: imports whose run is gone), so this one imports none.
RECONCILE_SWEEPS: list[Callable[[], object]] = []


@huey.periodic_task(crontab(minute="*"), priority=PRIORITY_DISPATCH)
def reconcile() -> None:
    report = engine.reconcile(HOOKS)
    if report is not None:  # this consumer held the reconciler's lease
        log.info("reconcile: %s", report)
        for sweep in RECONCILE_SWEEPS:
            sweep()


_started = threading.Lock()
_started_once: list[bool] = []


@huey.on_startup()
def _reconcile_at_start() -> None:
    # A restarted consumer looks for work left behind at once, not at the next minute. Huey
    # runs start-up hooks in every worker thread: queue the reconcile once per process.
    with _started:
        if _started_once:
            return
        _started_once.append(True)
    try:
        huey.enqueue(reconcile.s())
    except Exception:
        log.exception("could not queue the start-up reconcile")
    _warm_up()


def _warm_up() -> None:
    """Load what the first send needs (the template engine, the provider library and its HTTP
    pool) at start, so the first batch does not pay ~0.5 s of imports with its leases held."""
    try:
        from campaigns import templating, tokens  # noqa: F401
        from campaigns.providers import get_mailer

        get_mailer()
    except Exception:  # a bad setting shows at the first send, with its reason
        log.exception("warm-up failed")


# What the domain queues after a commit (campaigns.effects): looked up when they run, so a
# test that replaces a task replaces it here too.
effects.register(effects.FANOUT, lambda campaign_id: fanout_campaign(campaign_id))
effects.register(effects.WAKE_DISPATCHER, lambda: wake_dispatcher(None))
effects.register(effects.SEND_TEST, lambda message_id: HOOKS.enqueue_send([message_id], PRIORITY_TEST))
