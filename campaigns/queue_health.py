"""The queue's health and Prometheus metrics, computed at read time from the ledger and the
shared stores, so they cover what every consumer did (not what this process saw)."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from .db import utcnow
from .models import Campaign, Message, MessageAttempt

DURATION_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
FAILED_OUTCOMES = ("retry", "failed", "ambiguous", "account")
log = logging.getLogger("herald.queue")


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
    except Exception:  # noqa: BLE001 - the queue store being down is itself a finding
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
    from .engine import waiting_on_limits as compute

    try:
        return dict(sorted(compute(s, workspace_id=workspace_id).items()))
    except Exception:  # noqa: BLE001 - the limiter's store being down must not hide the rest
        log.exception("could not read the limits")
        return {}


def collect_metrics(s: Session, queue, counters: dict[str, int]):
    """Prometheus metric families from the ledger (``prometheus_client`` core types)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    now = utcnow()
    fams = []
    g = GaugeMetricFamily("herald_queue_depth", "Tasks waiting in the Huey queue")
    try:
        g.add_metric([], int(queue.pending_count()))
    except Exception:  # noqa: BLE001
        g.add_metric([], -1)
    fams.append(g)
    g = GaugeMetricFamily("herald_queue_scheduled_tasks", "Delayed Huey tasks (wake-ups, retries)")
    try:
        g.add_metric([], int(queue.scheduled_count()))
    except Exception:  # noqa: BLE001
        g.add_metric([], -1)
    fams.append(g)

    by_status = GaugeMetricFamily("herald_messages", "Messages in the ledger by status", labels=["status"])
    for status, n in s.execute(select(Message.status, func.count()).group_by(Message.status)).all():
        by_status.add_metric([status], int(n))
    fams.append(by_status)

    snap = snapshot(s, queue)
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

    outcomes = CounterMetricFamily("herald_send_attempts", "Send attempts by outcome", labels=["outcome"])
    for outcome, n in s.execute(select(MessageAttempt.outcome, func.count()).group_by(MessageAttempt.outcome)).all():
        outcomes.add_metric([outcome], int(n))
    fams.append(outcomes)
    retries = CounterMetricFamily("herald_send_retries", "Send attempts after the first")
    retries.add_metric([], int(s.scalar(select(func.count()).where(MessageAttempt.number > 1)) or 0))
    fams.append(retries)
    resends = CounterMetricFamily("herald_ambiguous_resends", "Ambiguous messages resent after the window")
    resends.add_metric([], int(s.scalar(select(func.coalesce(func.sum(Message.resends), 0))) or 0))
    fams.append(resends)

    cols = [
        func.coalesce(func.sum(case((MessageAttempt.duration_ms <= b, 1), else_=0)), 0) for b in DURATION_BUCKETS_MS
    ]
    row = s.execute(
        select(func.count(), func.coalesce(func.sum(MessageAttempt.duration_ms), 0.0), *cols)
    ).one()
    count, total_ms = int(row[0]), float(row[1])
    buckets = [(str(b / 1000.0), int(v)) for b, v in zip(DURATION_BUCKETS_MS, row[2:], strict=True)]
    buckets.append(("+Inf", count))
    hist = HistogramMetricFamily("herald_send_duration_seconds", "Provider call duration per attempt")
    hist.add_metric([], buckets, sum_value=total_ms / 1000.0)
    fams.append(hist)

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
    fams += [waits, released]
    rejected = CounterMetricFamily("herald_events_rejected",
                                   "Event Webhook items skipped because they were not events")
    rejected.add_metric([], counters.get("events_rejected", 0))
    fams.append(rejected)
    waiting_now = GaugeMetricFamily("herald_rate_limit_waiting", "Due messages held back now, per limit",
                                    labels=["limit"])
    for key, n in snap["waiting"].items():
        waiting_now.add_metric([key], n)
    fams.append(waiting_now)

    running = GaugeMetricFamily("herald_campaigns", "Campaigns by status", labels=["status"])
    for status, n in s.execute(select(Campaign.status, func.count()).group_by(Campaign.status)).all():
        running.add_metric([status], int(n))
    fams.append(running)
    waiting = GaugeMetricFamily(
        "herald_due_messages", "Scheduled messages already due (waiting on a limit or a worker)"
    )
    waiting.add_metric([], int(s.scalar(select(func.count()).where(Message.status == "scheduled",
                                                                   Message.due_at <= now)) or 0))
    fams.append(waiting)
    return fams
