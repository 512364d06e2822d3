"""The queue's health and Prometheus metrics, computed at read time from the ledger and the
shared stores, so they cover what every consumer did (not what this process saw).

The send attempts' counters (by outcome, retries, the duration histogram) are totals kept in
``counters`` (names ``metrics:…``) up to a watermark attempt id, plus the attempts after it,
counted at each scrape. Attempt rows are never changed or deleted, so the figures only grow.
Scrapes move the watermark (``roll_up``): an attempt id is rolled into the totals once it has
been the newest for ``ROLLUP_AGE`` seconds, so a transaction that took a lower id has long
committed; a scrape counts the last few minutes of attempts, not the whole history.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import case, func, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from . import engine
from .counters import METRICS, add_totals
from .db import dialect_insert, session_factory, utcnow
from .models import Campaign, Counter, Message, MessageAttempt
from .stats import shared

# Fixed: the totals hold one count per bucket (migration 0009 has the same list; changing it
# needs a migration that rolls the totals up again).
DURATION_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
FAILED_OUTCOMES = ("retry", "failed", "ambiguous", "account")
UPTO, PENDING, PENDING_AT = (METRICS + n for n in ("attempts_upto", "attempts_pending_id", "attempts_pending_at"))
ROLLUP_AGE = 300.0  # seconds an attempt id waits before it is rolled up (tests set 0)
ROLLUP_CHUNK = 200_000  # attempts rolled up by one scrape at most
log = logging.getLogger("herald.queue")


def attempt_sums(s: Session, *where) -> dict[str, int]:
    """Counts of the attempts ``where`` selects: ``attempts:<outcome>``, ``retries``,
    ``duration_count``, ``duration_sum_us`` and ``duration_le:<ms>`` (cumulative buckets)."""
    a = MessageAttempt
    rows = s.execute(
        select(a.outcome, func.count(), func.coalesce(func.sum(a.duration_ms), 0.0),
               func.coalesce(func.sum(case((a.number > 1, 1), else_=0)), 0),
               *(func.coalesce(func.sum(case((a.duration_ms <= b, 1), else_=0)), 0) for b in DURATION_BUCKETS_MS))
        .where(*where).group_by(a.outcome)
    ).all()
    out = {"duration_count": 0, "duration_sum_us": 0, "retries": 0}
    out.update({f"duration_le:{b}": 0 for b in DURATION_BUCKETS_MS})
    for outcome, n, total_ms, retries, *buckets in rows:
        out[f"attempts:{outcome}"] = int(n)
        out["duration_count"] += int(n)
        out["duration_sum_us"] += round(float(total_ms) * 1000)
        out["retries"] += int(retries)
        for b, v in zip(DURATION_BUCKETS_MS, buckets, strict=True):
            out[f"duration_le:{b}"] += int(v)
    return out


def _set(s: Session, values: dict[str, int]) -> None:
    stmt = dialect_insert(s)(Counter)
    s.execute(stmt.on_conflict_do_update(index_elements=["name"], set_={"value": stmt.excluded.value}),
              [{"name": k, "value": int(v)} for k, v in values.items()])


def roll_up(now: float | None = None) -> int:
    """Move the attempts' watermark forward, in its own transaction; how many attempts it
    added to the totals. The newest attempt id is noted first; once it is ``ROLLUP_AGE`` old, the attempts
    up to it go into the totals (``ROLLUP_CHUNK`` at most per call). Several web processes may
    call this at once: the watermark moves only from the value read (a conditional update), so
    one of them adds the attempts and the others change nothing."""
    now = time.time() if now is None else now
    try:
        with session_factory()() as s:
            got = dict(s.execute(select(Counter.name, Counter.value)
                                 .where(Counter.name.in_((UPTO, PENDING, PENDING_AT)))).all())
            upto, pending = got.get(UPTO), got.get(PENDING)
            if upto is None:  # a schema not made by the migrations: totals start from nothing
                s.execute(dialect_insert(s)(Counter).on_conflict_do_nothing(index_elements=["name"]),
                          [{"name": UPTO, "value": 0}])
                s.commit()
                return 0
            if pending is None or pending <= upto:
                newest = s.scalar(select(func.max(MessageAttempt.id))) or 0
                if newest > upto:
                    _set(s, {PENDING: newest, PENDING_AT: int(now)})
                    s.commit()
                return 0
            if now - got.get(PENDING_AT, 0) < ROLLUP_AGE:
                return 0
            first = s.scalar(select(func.min(MessageAttempt.id)).where(MessageAttempt.id > upto)) or upto + 1
            new = min(pending, first + ROLLUP_CHUNK - 1)
            moved = s.execute(update(Counter).where(Counter.name == UPTO, Counter.value == upto)
                              .values(value=new)).rowcount
            if moved != 1:
                s.rollback()  # another process rolled this range up
                return 0
            sums = attempt_sums(s, MessageAttempt.id > upto, MessageAttempt.id <= new)
            add_totals(s, sums)
            s.commit()
            return sums["duration_count"]
    except DBAPIError as exc:  # e.g. SQLite busy: the next scrape tries again; the figures stay exact
        log.info("attempt totals not rolled up this time: %s", exc.orig)
        return 0


def attempt_figures(s: Session) -> dict[str, int]:
    """Every attempt ever recorded, counted (``attempt_sums``' names) and ``ambiguous_resends``:
    the totals, then the attempts after the watermark read with them (a roll-up committing in
    between moves attempts the totals read do not have, and this count has)."""
    totals = {name[len(METRICS):]: int(v) for name, v in
              s.execute(select(Counter.name, Counter.value).where(Counter.name.startswith(METRICS))).all()}
    for key, v in attempt_sums(s, MessageAttempt.id > totals.get("attempts_upto", 0)).items():
        totals[key] = totals.get(key, 0) + v
    return totals


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    idx = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return round(sorted_values[idx], 1)


def _scoped(stmt, model, workspace_id):
    return stmt.where(model.workspace_id == workspace_id) if workspace_id is not None else stmt


def snapshot(s: Session, queue, workspace_id: int | None = None) -> dict:
    """The contract's ``/api/v1/queue`` figures. Ledger figures are the workspace's; ``depth``
    (tasks waiting in the shared Huey queue) is the installation's."""
    now = utcnow()
    m = Message
    row = s.execute(
        _scoped(
            select(
                func.coalesce(func.sum(case((m.status.in_(("scheduled", "queued")), 1), else_=0)), 0),
                func.coalesce(func.sum(case((m.status == "sending", 1), else_=0)), 0),
                func.coalesce(func.sum(case(((m.status == "sending") & (m.lease_expires_at < now), 1), else_=0)), 0),
                func.coalesce(func.sum(case((m.status == "failed", 1), else_=0)), 0),
                func.coalesce(func.sum(case((m.status == "ambiguous", 1), else_=0)), 0),
                func.coalesce(func.sum(case(((m.status == "queued"), 1), else_=0)), 0),
            ).where(m.status.in_(("scheduled", "queued", "sending", "failed", "ambiguous"))),
            m,
            workspace_id,
        )
    ).one()
    scheduled, in_flight, stalled, dead, ambiguous, queued = (int(x) for x in row)
    since = now - timedelta(minutes=5)
    recent = s.execute(
        _scoped(
            select(MessageAttempt.outcome, MessageAttempt.duration_ms)
            .where(MessageAttempt.finished_at >= since)
            .order_by(MessageAttempt.id.desc())
            .limit(20000),
            MessageAttempt,
            workspace_id,
        )
    ).all()
    total = len(recent)
    failures = sum(1 for r in recent if r.outcome in FAILED_OUTCOMES)
    durations = sorted(r.duration_ms for r in recent)
    try:
        depth = int(queue.pending_count())
    except Exception:  # the queue store being down is itself a finding
        depth = -1
    return {
        "depth": depth,
        "scheduled": scheduled,
        "waiting": waiting_on_limits(s, workspace_id),
        "queued": queued,
        "in_flight": in_flight,
        "stalled": stalled,
        "dead_letters": dead,
        "ambiguous": ambiguous,
        "failure_rate_5m": round(failures / total, 4) if total else 0.0,
        "attempts_5m": total,
        "duration_ms": {"p50": _percentile(durations, 0.5), "p95": _percentile(durations, 0.95)},
    }


def waiting_on_limits(s: Session, workspace_id: int | None = None) -> dict[str, int]:
    """Due messages held back, per limit (``account``, ``campaign:<id>:minute|day``,
    ``sender:<workspace>:<address>:day|gap``, ``workspace:<id>:concurrency``), as the dispatcher
    sees them now: from the ledger and the limiter's shared store, not this process's memory."""
    try:
        return dict(sorted(engine.waiting_on_limits(s, workspace_id=workspace_id).items()))
    except Exception:  # the limiter's store being down must not hide the rest
        log.exception("could not read the limits")
        return {}


OPEN_STATUSES = ("scheduled", "queued", "sending", "ambiguous", "failed")
SETTLED_MAX_AGE = 60.0  # seconds a count of the settled messages is reused by /metrics


def open_by_status(snap: dict) -> dict[str, int]:
    """The open statuses' counts in a ``snapshot``."""
    return {"scheduled": snap["scheduled"] - snap["queued"], "queued": snap["queued"], "sending": snap["in_flight"],
            "ambiguous": snap["ambiguous"], "failed": snap["dead_letters"]}


def messages_by_status(s: Session, open_counts: dict[str, int] | None = None) -> dict[str, int]:
    """The ledger's messages by status, for ``herald_messages``. The open statuses (work still to
    do or to look at) are counted at every call through the status index (or taken from
    ``open_counts``, a snapshot's); the settled ones (sent, cancelled, ...), which grow with the
    whole history, come from a count shared by this process's scrapes and redone once it is
    ``SETTLED_MAX_AGE`` seconds old (or ``stats.REUSE_FACTOR`` times its own cost, on a ledger so
    large that the count is slow)."""
    def count(where) -> dict[str, int]:
        rows = s.execute(select(Message.status, func.count()).where(where).group_by(Message.status)).all()
        return {status: int(n) for status, n in rows}

    figures = {status: 0 for status in OPEN_STATUSES}
    figures.update(open_counts if open_counts is not None else count(Message.status.in_(OPEN_STATUSES)))
    figures.update(shared(("metrics", "settled_messages"), lambda: count(Message.status.not_in(OPEN_STATUSES)),
                          max_age=SETTLED_MAX_AGE))
    return figures


def collect_metrics(s: Session, queue, counters: dict[str, int]):
    """Prometheus metric families from the ledger (``prometheus_client`` core types). Call it
    before ``s`` has begun a transaction: the roll-up writes in its own, and on SQLite the
    request's session holds the write lock once it has begun."""
    roll_up()
    now = utcnow()
    fams = _queue_families(queue)
    snap = snapshot(s, queue)
    fams += _ledger_families(s, snap)
    fams += _attempt_families(attempt_figures(s))
    fams += _limit_families(counters, snap)
    fams += _campaign_families(s, now)
    return fams


def _queue_families(queue) -> list:
    """The Huey queue's depth and delayed tasks (-1 when the queue store does not answer)."""
    fams = []
    for name, help_, count in (
        ("herald_queue_depth", "Tasks waiting in the Huey queue", queue.pending_count),
        ("herald_queue_scheduled_tasks", "Delayed Huey tasks (wake-ups, retries)", queue.scheduled_count),
    ):
        g = GaugeMetricFamily(name, help_)
        try:
            g.add_metric([], int(count()))
        except Exception:
            g.add_metric([], -1)
        fams.append(g)
    return fams


def _ledger_families(s: Session, snap: dict) -> list:
    """Messages by status and the snapshot's gauges."""
    by_status = GaugeMetricFamily("herald_messages", "Messages in the ledger by status", labels=["status"])
    for status, n in sorted(messages_by_status(s, open_by_status(snap)).items()):
        by_status.add_metric([status], n)
    fams = [by_status]
    for name, key, help_ in (
        ("herald_messages_scheduled", "scheduled", "Messages due or waiting (scheduled or queued)"),
        ("herald_messages_in_flight", "in_flight", "Messages being sent (under a lease)"),
        ("herald_messages_stalled", "stalled", "Messages whose send lease expired (consumer died?)"),
        ("herald_dead_letters", "dead_letters", "Failed messages kept for inspection and replay"),
        ("herald_messages_ambiguous", "ambiguous", "Messages whose send outcome is unknown"),
    ):
        g = GaugeMetricFamily(name, help_)
        g.add_metric([], snap[key])
        fams.append(g)
    g = GaugeMetricFamily("herald_failure_rate_5m", "Share of send attempts that failed in the last 5 minutes")
    g.add_metric([], snap["failure_rate_5m"])
    fams.append(g)
    return fams


def _attempt_families(figures: dict[str, int]) -> list:
    """Send attempts by outcome, retries, ambiguous resends and the duration histogram."""
    outcomes = CounterMetricFamily("herald_send_attempts", "Send attempts by outcome", labels=["outcome"])
    for key, n in sorted(figures.items()):
        if key.startswith("attempts:"):
            outcomes.add_metric([key.split(":", 1)[1]], n)
    retries = CounterMetricFamily("herald_send_retries", "Send attempts after the first")
    retries.add_metric([], figures.get("retries", 0))
    resends = CounterMetricFamily("herald_ambiguous_resends", "Ambiguous messages resent after the window")
    resends.add_metric([], figures.get("ambiguous_resends", 0))

    buckets = [(str(b / 1000.0), figures.get(f"duration_le:{b}", 0)) for b in DURATION_BUCKETS_MS]
    buckets.append(("+Inf", figures.get("duration_count", 0)))
    hist = HistogramMetricFamily("herald_send_duration_seconds", "Provider call duration per attempt")
    hist.add_metric([], buckets, sum_value=figures.get("duration_sum_us", 0) / 1e6)
    return [outcomes, retries, resends, hist]


def _limit_families(counters: dict[str, int], snap: dict) -> list:
    """Rate-limit waits and hand-backs (shared counters), rejected events, and what waits now."""
    waits = CounterMetricFamily("herald_rate_limit_waits", "Sends that waited for their turn under a limit, by kind",
                                labels=["limit"])
    released = CounterMetricFamily("herald_rate_limit_released",
                                   "Sends handed back to the ledger because a limit's wait was long, by kind",
                                   labels=["limit"])
    for name, value in sorted(counters.items()):
        if name.startswith("rate_limit_waits:"):
            waits.add_metric([name.split(":", 1)[1]], value)
        elif name.startswith("rate_limit_released:"):
            released.add_metric([name.split(":", 1)[1]], value)
    rejected = CounterMetricFamily("herald_events_rejected",
                                   "Event Webhook items skipped because they were not events")
    rejected.add_metric([], counters.get("events_rejected", 0))
    waiting_now = GaugeMetricFamily("herald_rate_limit_waiting", "Due messages held back now, per limit",
                                    labels=["limit"])
    for key, n in snap["waiting"].items():
        waiting_now.add_metric([key], n)
    return [waits, released, rejected, waiting_now]


def _campaign_families(s: Session, now) -> list:
    """Campaigns by status and the scheduled messages already due."""
    running = GaugeMetricFamily("herald_campaigns", "Campaigns by status", labels=["status"])
    for status, n in s.execute(select(Campaign.status, func.count()).group_by(Campaign.status)).all():
        running.add_metric([status], int(n))
    waiting = GaugeMetricFamily(
        "herald_due_messages", "Scheduled messages already due (waiting on a limit or a worker)"
    )
    waiting.add_metric([], int(s.scalar(select(func.count()).where(Message.status == "scheduled",
                                                                   Message.due_at <= now)) or 0))
    return [running, waiting]
