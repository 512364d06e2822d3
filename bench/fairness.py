"""Fairness: tenant B's wait while tenant A has 50,000 queued, and Jain's fairness index over the
throughput of the workspaces with work ready.

Scenario (Redis + PostgreSQL, 2 consumers x 8 workers, ``SENDGRID_RATE_LIMIT`` lifted, so the
machine is the bottleneck and only Herald's fairness stands between the tenants):

1. tenant A launches a campaign to 50,000 contacts; once its fan-out is done and it is sending,
2. tenant B launches one to 100 and tenant C one to 5,000, at the same moment.

Figures: B's wait (launch -> the sink received each of B's emails) p50/p95/max (target p95
<= 5 s), and Jain's index J = (sum x)^2 / (n * sum x^2) over the per-second sends of the
backlogged workspaces (A and C: both always have work ready until C is done; B's 100 are
demand-limited, so B is judged by its wait, not its share). J = 1 is an even split; 1/n is one
tenant getting everything.

Baseline, same run: the naive design, one plain Huey task per email enqueued in launch order (A's
50,000, then B's and C's), FIFO in one priority: B waits behind everything A queued.

Run: ``.venv/bin/python bench/fairness.py`` (about three minutes on 2 cores; it creates and
drops its own database, uses its own Redis key prefix, and stops everything it starts).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
from huey import PriorityRedisExpireHuey
from sqlalchemy import func, select

# The baseline's tasks: huey_consumer imports this module as ``bench.fairness``; nothing below
# runs at import time except these definitions (no connection is made until a task runs).
huey = PriorityRedisExpireHuey(
    os.environ.get("HERALD_QUEUE_NAME", "bench") + "-fifo",
    connection_pool=redis.ConnectionPool.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14")),
    results=False,
)


@huey.task()
def send_plain(tenant: str, i: int) -> None:
    from bench.naive_tasks import mailer
    from campaigns.providers import OutgoingEmail

    mailer().send(OutgoingEmail(
        message_key=f"fifo-{tenant}-{i}", to_email=f"c{i}@{tenant}.example.com", to_name=None,
        from_email="bench@example.com", from_name=None, subject=f"Hello C{i}",
        html=f"<p>Hi C{i}, a short note.</p>", text=f"Hi C{i}, a short note.",
    ))


def enqueue_many(h, tasks) -> None:
    """Enqueue in pipelined chunks (one ZADD per task, as Huey's own enqueue, in order)."""
    conn = h.storage.conn
    base = int(time.time() * 1e6)
    for start in range(0, len(tasks), 2000):
        pipe = conn.pipeline(transaction=False)
        for k, task in enumerate(tasks[start:start + 2000]):
            data = h.serialize_task(task)
            pipe.zadd(h.storage.queue_key, {struct.pack(">Q", base + start + k) + data: 0})
        pipe.execute()


def sink_summary(url: str) -> list[dict]:
    raw = urllib.request.urlopen(url + "/_sink/messages?fields=summary&status=202", timeout=120).read()
    return json.loads(raw)["messages"]


def by_tenant(url: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for m in sink_summary(url):
        tenant = m["to"][0].split("@", 1)[1].split(".", 1)[0]
        out.setdefault(tenant, []).append(m["time"])
    return {k: sorted(v) for k, v in out.items()}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def jain(times: dict[str, list[float]], tenants: list[str], start: float, end: float) -> tuple[float, float]:
    """(mean of per-second J, J of the totals) over [start, end)."""
    per_second = []
    t = start
    while t + 1.0 <= end:
        xs = [sum(1 for x in times.get(k, []) if t <= x < t + 1.0) for k in tenants]
        if sum(xs):
            per_second.append(sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)))
        t += 1.0
    totals = [sum(1 for x in times.get(k, []) if start <= x < end) for k in tenants]
    overall = sum(totals) ** 2 / (len(totals) * sum(x * x for x in totals)) if sum(totals) else 0.0
    return (sum(per_second) / len(per_second) if per_second else 0.0), overall


def wait_until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def run_herald(sink: str, a_n: int, b_n: int, c_n: int) -> dict:
    from bench import common
    from campaigns import engine
    from campaigns.db import session_scope
    from campaigns.models import Message
    from tasks.engine import fanout_campaign, wake_dispatcher

    tenants = {}
    for name, n in (("tenanta", a_n), ("tenantb", b_n), ("tenantc", c_n)):
        ws_id, list_id = common.seed_contacts(n, workspace=name)
        tenants[name] = (ws_id, common.make_campaign(ws_id, list_id))
    common.reset_sink(sink)
    common.start_consumers(2, 8)
    time.sleep(1.5)

    def launch(name):
        ws_id, cid = tenants[name]
        with session_scope() as s:
            engine.launch(s, ws_id, cid)
        fanout_campaign(cid)

    def count(cid, *statuses):
        with session_scope() as s:
            return s.scalar(select(func.count()).select_from(Message).where(
                Message.campaign_id == cid, *( [Message.status.in_(statuses)] if statuses else []))) or 0

    launch("tenanta")
    a_cid = tenants["tenanta"][1]
    wait_until(lambda: count(a_cid) == a_n and common.sink_stats(sink)["accepted"] >= 2000, 180, "A to get going")
    a_waiting = count(a_cid, "scheduled", "queued")
    t_launch = time.time()
    launch("tenantb")
    launch("tenantc")
    wait_until(lambda: len(by_tenant(sink).get("tenantb", [])) >= b_n, 120, "B's emails")
    wait_until(lambda: len(by_tenant(sink).get("tenantc", [])) >= c_n, 300, "C's emails")
    with session_scope() as s:
        engine.cancel(s, tenants["tenanta"][0], a_cid)
    wake_dispatcher(None)
    common.stop_consumers()
    times = by_tenant(sink)
    b_waits = [t - t_launch for t in times["tenantb"]]
    c_end = times["tenantc"][-1]
    j_mean, j_all = jain(times, ["tenanta", "tenantc"], times["tenantc"][0], c_end)
    a_rate = sum(1 for t in times["tenanta"] if t_launch <= t < c_end) / (c_end - t_launch)
    c_rate = c_n / (c_end - t_launch)
    return {"a_waiting": a_waiting, "b_p50": pct(b_waits, 0.5), "b_p95": pct(b_waits, 0.95), "b_max": max(b_waits),
            "jain_mean": j_mean, "jain_all": j_all, "a_rate": a_rate, "c_rate": c_rate}


def run_fifo(sink: str, a_n: int, b_n: int, c_n: int) -> dict:
    from bench import common
    from bench import fairness as mod  # the module the consumers import, named for this run's queue

    common.reset_sink(sink)
    mod.huey.storage.flush_all()
    enqueue_many(mod.huey, [mod.send_plain.s("tenanta", i) for i in range(a_n)])
    common.start_consumers(2, 8, module="bench.fairness.huey")
    wait_until(lambda: common.sink_stats(sink)["accepted"] >= 2000, 180, "A to get going")
    a_waiting = mod.huey.pending_count()
    t_launch = time.time()
    enqueue_many(mod.huey, [mod.send_plain.s("tenantb", i) for i in range(b_n)]
                 + [mod.send_plain.s("tenantc", i) for i in range(c_n)])
    wait_until(lambda: len(by_tenant(sink).get("tenantb", [])) >= b_n, 600, "B's emails (FIFO)")
    t_b_done = time.time()
    times = by_tenant(sink)
    common.stop_consumers()
    mod.huey.storage.flush_all()
    b_waits = [t - t_launch for t in times["tenantb"]]
    j_mean, j_all = jain(times, ["tenanta", "tenantc"], t_launch, min(t_b_done, times["tenanta"][-1]))
    a_rate = sum(1 for t in times["tenanta"] if t >= t_launch) / max(1e-9, times["tenanta"][-1] - t_launch)
    return {"a_waiting": a_waiting, "b_p50": pct(b_waits, 0.5), "b_p95": pct(b_waits, 0.95), "b_max": max(b_waits),
            "jain_mean": j_mean, "jain_all": j_all, "a_rate": a_rate, "c_rate": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=int, default=50_000, help="tenant A's messages (%(default)s)")
    parser.add_argument("--b", type=int, default=100, help="tenant B's messages (%(default)s)")
    parser.add_argument("--c", type=int, default=5_000, help="tenant C's messages (%(default)s)")
    args = parser.parse_args()
    from bench import common

    common.setup_environment("fair")
    sink = common.start_sink()
    print(f"machine: {common.machine()}")
    rows = [("Herald (round-robin, concurrency budget, 1 s horizon)", run_herald(sink, args.a, args.b, args.c)),
            ("naive FIFO (one Huey task per email)", run_fifo(sink, args.a, args.b, args.c))]
    print("| design | A waiting at B's launch | B wait p50 (s) | B wait p95 (s) | B wait max (s) "
          "| Jain A/C (mean of 1 s) | Jain A/C (totals) | A sends/s | C sends/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows:
        print(f"| {name} | {r['a_waiting']} | {r['b_p50']:.2f} | {r['b_p95']:.2f} | {r['b_max']:.2f} "
              f"| {r['jain_mean']:.3f} | {r['jain_all']:.3f} | {r['a_rate']:.0f} | {r['c_rate']:.0f} |", flush=True)
    herald, fifo = rows[0][1], rows[1][1]
    print(f"B's p95 wait: Herald {herald['b_p95']:.2f} s vs FIFO {fifo['b_p95']:.2f} s "
          f"({fifo['b_p95'] / max(herald['b_p95'], 1e-9):.0f}x shorter); target <= 5 s: "
          f"{'ok' if herald['b_p95'] <= 5 else 'MISSED'}")
    common.stop_all()


if __name__ == "__main__":
    main()
