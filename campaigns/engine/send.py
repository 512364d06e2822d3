"""The send path: claim a batch under a lease, render it, hand it to the provider in paced
groups on a per-process thread pool, and record the outcomes as they come."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from functools import lru_cache

from sqlalchemy import bindparam, select, update

from .. import stopgen
from ..completion import maybe_complete
from ..config import get_settings
from ..db import TRANSIENT_ERRORS, is_postgres, retry_transient, session_factory, utcnow
from ..models import Campaign
from ..providers import (
    AccountError,
    AmbiguousSendError,
    OutgoingEmail,
    PermanentSendError,
    RetryableSendError,
    get_mailer,
)
from ..ratelimit import Limiter, get_limiter
from .common import _C, _M, Hooks, _epoch, _id_match, _not_by_index, log, worker_id
from .ledger import _claimable, _hand_back, _StopGuard
from .limits import ACCOUNT_RULE_KEY
from .pacing import _give_back, pace
from .record import Outcome, _outcome, _record
from .render import build_email
from .sequence import _steps_of

FLUSH_EVERY = 80


FLUSH_SECONDS = 0.25


# What a send needs of a claimed message, returned by the claim itself.
_CLAIMED_COLUMNS = (_M.c.id, _M.c.workspace_id, _M.c.campaign_id, _M.c.enrollment_id, _M.c.step_id,
                    _M.c.contact_id, _M.c.email, _M.c.message_key, _M.c.attempts, _M.c.is_test, _M.c.priority)


_CONTACT_COLUMNS = (_C.c.id, _C.c.email, _C.c.first_name, _C.c.last_name, _C.c.timezone, _C.c.fields)


# The send path's statements, built once per dialect (a batch runs each with new parameters).
@lru_cache(maxsize=4)
def _claim_stmt(pg: bool):
    return (
        update(_M)
        .where(_id_match(_M.c.id, pg), _not_by_index(_M.c.status) == "queued", _claimable())
        .values(status="sending", lease_owner=bindparam("owner"), lease_expires_at=bindparam("lease_until"),
                attempts=_M.c.attempts + 1, updated_at=bindparam("now"))
        .returning(*_CLAIMED_COLUMNS)
    )


@lru_cache(maxsize=4)
def _claimed_before_stmt(pg: bool):
    """The messages a claim with these very parameters took (its lease ends at that instant)."""
    return select(*_CLAIMED_COLUMNS).where(
        _id_match(_M.c.id, pg), _not_by_index(_M.c.status) == "sending", _M.c.lease_owner == bindparam("owner"),
        _M.c.lease_expires_at == bindparam("lease_until"))


@lru_cache(maxsize=4)
def _contacts_stmt(pg: bool):
    return select(*_CONTACT_COLUMNS).where(_id_match(_C.c.id, pg))


def send_batch(ids: list[int], hooks: Hooks, mailer=None, limiter: Limiter | None = None,
               owner: str | None = None) -> dict[str, int]:
    """Claim these messages under a lease, hand each to the provider, record the outcomes.

    The claim is one conditional UPDATE: a message already claimed (by a duplicate task, a
    re-queue after Redis loss, another consumer) is not claimed twice. The batch is rendered,
    then handed to the provider in groups: each group takes its rate-limit units (and reads
    the stop generation) in one step right before its calls, which run in a per-process pool
    only as far as the pool has idle threads (a granted unit never waits for a thread).
    Outcomes are recorded in small groups, so a consumer killed mid-batch leaves at most a few
    sends unrecorded; those, still ``sending`` when their lease runs out, become ``ambiguous``.
    """
    mailer = mailer or get_mailer()
    limiter = limiter or get_limiter()
    owner = owner or worker_id()
    try:
        generation = stopgen.current()  # before the claim: a stop committed after the claim's check bumps it
    except Exception:
        # The shared store (the stop generation, the limits) does not answer: nothing can be sent
        # safely. Back to the ledger now, for the dispatcher, rather than after the stale-queue sweep.
        _hand_back(list(ids))
        raise
    pg, claimed = _claim(ids, owner)
    counts: dict[str, int] = defaultdict(int)
    refused = set(ids) - {r.id for r in claimed}
    if refused:
        _hand_back(sorted(refused))
    if not claimed:
        return dict(counts)
    claimed.sort(key=lambda r: (-r.priority, r.id))
    contacts, campaigns, steps = _read_needs(claimed, pg)
    check = session_factory()()
    run = _BatchRun(hooks, owner, counts)
    guard = _StopGuard(check, [r.id for r in claimed], generation)
    try:
        emails = _render(claimed, contacts, campaigns, steps, guard, run)
        _hand_over(claimed, emails, campaigns, guard, mailer, limiter, run)
    except BaseException:
        # (the limiter's store or the database gone for good, a SIGKILL-less shutdown...): what had
        # not reached the provider goes back to the ledger now, not once its lease has run out
        rest = guard.withdraw()
        for r in claimed:
            if r.id in rest:
                run.add(_outcome(r, "released"))
        raise
    finally:
        try:
            run.finish()
        finally:
            check.close()
    return dict(counts)


def _claim(ids: list[int], owner: str) -> tuple[bool, list]:
    """queued -> sending under this owner's lease, for the ids still queued and sendable: whether
    the database is PostgreSQL, and the claimed rows (what a send needs of each)."""
    lease_seconds = get_settings().lease_seconds
    now = utcnow()
    params = {"ids": list(ids), "owner": owner, "lease_until": now + timedelta(seconds=lease_seconds), "now": now}

    def claim(tries: int) -> tuple[bool, list]:
        with session_factory()() as s, s.begin():
            pg = is_postgres(s)
            # an earlier try's COMMIT may have gone through unanswered: what it claimed is ours
            before = s.connection().execute(_claimed_before_stmt(pg), params).all() if tries else []
            return pg, before + s.connection().execute(_claim_stmt(pg), params).all()

    # A database that stops answering is waited for (a while): what it did not claim stays
    # queued for the reconciler, but what it claimed would wait for its lease, then be resent.
    return retry_transient(claim, "claiming messages to send", lease_seconds / 2)


def _read_needs(claimed: list, pg: bool) -> tuple[dict, dict, dict]:
    """The claimed messages' contacts, campaigns and steps, detached from their session."""

    def read(_tries: int) -> tuple[dict, dict, dict]:
        with session_factory()() as s:
            contact_ids = sorted({r.contact_id for r in claimed if r.contact_id is not None})
            contacts = {c.id: c for c in s.connection().execute(_contacts_stmt(pg), {"ids": contact_ids})}
            campaigns = {c.id: c for c in s.scalars(select(Campaign).where(
                Campaign.id.in_(sorted({r.campaign_id for r in claimed}))))}
            steps = _steps_of(s, claimed, campaigns)
            s.expunge_all()
            s.rollback()
            return contacts, campaigns, steps

    return retry_transient(read, "reading what the claimed messages need", get_settings().lease_seconds / 2)


def _render(claimed: list, contacts: dict, campaigns: dict, steps: dict, guard: _StopGuard,
            run: _BatchRun) -> dict[int, OutgoingEmail]:
    """Each claimed message's email; one that cannot be rendered fails (a dead letter)."""
    emails: dict[int, OutgoingEmail] = {}
    for r in claimed:
        if r.step_id is None:  # a test send whose step was edited away while it waited
            guard.allows(r.id)
            run.add(_outcome(r, "failed", error="its step was removed from the draft before it was sent"))
            continue
        try:
            emails[r.id] = build_email(r, steps[r.step_id], campaigns[r.campaign_id], contacts.get(r.contact_id))
        except Exception as exc:  # a template that cannot render fails the message
            guard.allows(r.id)
            run.add(_outcome(r, "failed", error=f"render: {exc}"))
    return emails


def _hand_over(claimed: list, emails: dict, campaigns: dict, guard: _StopGuard, mailer, limiter: Limiter,
               run: _BatchRun) -> None:
    """Test sends first, one at a time (the priority lane); then each campaign's part of the batch."""
    for r in claimed:
        if r.is_test and r.id in emails:
            run.submit(_send_one, r, emails.pop(r.id), campaigns[r.campaign_id], guard, mailer, limiter)
    group: list = []
    for r in claimed:
        if r.id not in emails:
            continue
        if group and group[0].campaign_id != r.campaign_id:
            _send_group(group, campaigns[group[0].campaign_id], emails, guard, mailer, limiter, run)
            group = []
        group.append(r)
    if group:
        _send_group(group, campaigns[group[0].campaign_id], emails, guard, mailer, limiter, run)


class _BatchRun:
    """A batch's calls in flight and its outcomes: recorded every FLUSH_EVERY outcomes or
    FLUSH_SECONDS; campaigns whose last sequence may have ended are checked once at the end."""

    def __init__(self, hooks: Hooks, owner: str, counts: dict):
        self.hooks, self.owner, self.counts = hooks, owner, counts
        self.inflight: list = []
        self.pending: list[Outcome] = []
        self.last_flush = time.monotonic()
        self.check_complete: set[int] = set()

    def add(self, outcome: Outcome) -> None:
        self.pending.append(outcome)

    def submit(self, fn, r, *args) -> None:
        self.inflight.append((_send_pool().submit(fn, r, *args), r))

    @staticmethod
    def _result(fut, r) -> Outcome:
        try:
            return fut.result()
        except Exception:  # a call itself never raises: this failed before it, so nothing was sent
            log.exception("message %s was not sent; it goes back to the ledger", r.id)
            return _outcome(r, "released")

    def collect(self) -> None:
        """Take the finished calls' outcomes, and record them when a flush is due."""
        still = []
        for fut, r in self.inflight:
            if fut.done():
                self.pending.append(self._result(fut, r))
            else:
                still.append((fut, r))
        self.inflight = still
        if self.pending and (len(self.pending) >= FLUSH_EVERY or time.monotonic() - self.last_flush > FLUSH_SECONDS):
            self.flush()

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        self.last_flush = time.monotonic()
        if pending:
            self.check_complete |= _record(pending, self.hooks, self.owner, self.counts)

    def finish(self) -> None:
        for fut, r in self.inflight:
            self.pending.append(self._result(fut, r))
            if len(self.pending) >= FLUSH_EVERY:
                self.flush()
        self.inflight = []
        self.flush()
        if self.check_complete:
            try:
                retry_transient(lambda _: self._complete(sorted(self.check_complete)),
                                "checking campaigns for completion", 10.0)
            except TRANSIENT_ERRORS:  # the reconciler checks running campaigns too
                log.warning("could not check campaigns %s for completion; the reconciler will", self.check_complete)

    @staticmethod
    def _complete(campaign_ids: list[int]) -> None:
        with session_factory()() as s, s.begin():
            for cid in campaign_ids:
                maybe_complete(s, cid)


class _Slots:
    """Idle threads of the send pool: a group takes only as many units as it can start at once."""

    def __init__(self, n: int):
        self.free = n
        self.cond = threading.Condition()

    def take_up_to(self, n: int, timeout: float = 0.05) -> int:
        """At least one slot (0 when none frees within ``timeout``), at most ``n``."""
        with self.cond:
            if not self.free:
                self.cond.wait(timeout)
            k = min(n, self.free)
            self.free -= k
            return k

    def give(self, n: int = 1) -> None:
        with self.cond:
            self.free += n
            self.cond.notify(n)


# The process's send pool, made at its first send (its size is a setting): a process resource
# like a connection pool, the one module-level state of the send path (tests swap it).
_pool = None
_pool_lock = threading.Lock()
SEND_GROUP = 8  # calls started together after one limiter take


def _send_pool():
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                size = get_settings().send_concurrency
                _pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="herald-send")
    return _pool


def _pool_slots(pool) -> _Slots:
    """The idle threads of ``pool`` (kept with it, so a pool swapped in has slots of its size)."""
    slots = getattr(pool, "herald_slots", None)
    if slots is None:
        with _pool_lock:
            slots = getattr(pool, "herald_slots", None)
            if slots is None:
                slots = pool.herald_slots = _Slots(getattr(pool, "_max_workers", 16))
    return slots


def _send_group(group: list, campaign: Campaign, emails: dict, guard: _StopGuard, mailer, limiter: Limiter,
                run: _BatchRun) -> None:
    """Hand one campaign's part of a batch to the provider, a few calls at a time, each few
    under one limiter take (which also reads the stop generation)."""
    slots = _pool_slots(_send_pool())
    i = 0
    while i < len(group):
        run.collect()
        k = slots.take_up_to(min(SEND_GROUP, len(group) - i))
        if not k:
            continue
        granted = pace(limiter, campaign, k, guard)
        if granted < k:
            slots.give(k - granted)
        if not granted:  # a long wait: the rest of this campaign's part goes back to the ledger
            for r in group[i:]:
                guard.allows(r.id)
                run.add(_outcome(r, "released"))
            return
        stopped = 0
        for r in group[i : i + granted]:
            if guard.allows(r.id):
                run.submit(_deliver, r, emails.pop(r.id), mailer, limiter, slots)
            else:
                stopped += 1
                slots.give(1)
                run.add(_outcome(r, "released"))
        if stopped:
            _give_back(limiter, campaign, stopped)
        i += granted


def _send_one(r, email: OutgoingEmail, campaign: Campaign, guard: _StopGuard, mailer, limiter: Limiter) -> Outcome:
    """A test send (the priority lane): its own stop check and pace, then the call; never raises."""
    guard.observe(None)
    if not guard.allows(r.id):
        return _outcome(r, "released")
    if not pace(limiter, campaign, 1, urgent=True):
        return _outcome(r, "released")
    return _call(r, email, mailer, limiter)


def _deliver(r, email: OutgoingEmail, mailer, limiter: Limiter, slots: _Slots) -> Outcome:
    """A bulk call whose unit was taken and whose stop check passed; frees its pool slot."""
    try:
        return _call(r, email, mailer, limiter)
    finally:
        slots.give(1)


def _call(r, email: OutgoingEmail, mailer, limiter: Limiter) -> Outcome:
    """Hand one email to the provider and classify the answer; never raises."""
    started = utcnow()
    t0 = time.perf_counter()
    try:
        res = mailer.send(email)
        out = _outcome(r, "sent", started=started, status=res.status, provider_id=res.provider_message_id)
    except RetryableSendError as exc:
        out = _outcome(r, "rate_limited" if exc.status == 429 else "retry", started=started, status=exc.status,
                       error=str(exc), body=exc.body, retry_at=exc.retry_at)
        if exc.status == 429:
            until = exc.retry_at or (utcnow() + timedelta(seconds=1))
            try:
                limiter.hold(ACCOUNT_RULE_KEY, _epoch(until))
            except Exception:  # the message is rescheduled either way
                log.exception("could not hold the account budget after a 429")
    except AccountError as exc:
        out = _outcome(r, "account", started=started, status=exc.status, error=str(exc), body=exc.body)
    except PermanentSendError as exc:
        out = _outcome(r, "failed", started=started, status=exc.status, error=str(exc), body=exc.body)
    except AmbiguousSendError as exc:
        out = _outcome(r, "ambiguous", started=started, error=str(exc))
    except Exception as exc:  # an unexpected client error: the request may have left
        out = _outcome(r, "ambiguous", started=started, error=f"unexpected: {exc!r}")
    out.finished = started + timedelta(seconds=time.perf_counter() - t0)
    return out
