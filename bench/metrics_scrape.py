"""/metrics' attempt counters on a long history: a scrape's cost as the attempts table grows.

On PostgreSQL, the attempts table is filled to each size with ``generate_series`` (random
outcomes and durations, one row per attempt; the last ``--recent`` rows are the minutes not
yet rolled up). At each size the script times, median of ``--repeat`` runs:

- full count: the statements /metrics ran before migration 0009 (every attempt counted by
  outcome, retries, the duration histogram): the baseline;
- Herald: ``queue_health.attempt_figures`` once the roll-up has caught up (the totals plus the
  attempts after the watermark), i.e. a scrape's attempt counters now;
- the ``herald_messages`` by-status gauge on a ledger of the same size (nearly all of it sent,
  1% of it open: scheduled, failed, ambiguous): the whole ledger grouped by status, as a scrape
  did before (baseline), and ``queue_health.messages_by_status`` as a scrape now runs it (the open
  statuses counted, the settled ones reused from a count at most a minute old);
- the whole ``GET /metrics`` response (the ledger gauges included).

It also checks that each pair gives the same figures. Target: a scrape's cost stays flat while the
history grows (Herald / full count falls with the size).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import func, select, text

from bench import common


def _timed(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), result


def full_count(s) -> dict[str, int]:
    """The pre-0009 scrape: everything counted, every time (same names as attempt_figures)."""
    from campaigns.queue_health import attempt_sums

    return attempt_sums(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000,3000000", help="attempt rows at each step")
    ap.add_argument("--recent", type=int, default=30000,
                    help="attempts not yet rolled up at each step (default: 5 minutes at 100 sends/s)")
    ap.add_argument("-r", "--repeat", type=int, default=5)
    args = ap.parse_args()
    common.setup_environment("metrics")

    from campaigns import queue_health, stats
    from campaigns.db import get_engine, session_scope
    from campaigns.models import Message
    from web import create_app

    print(f"machine: {common.machine()}; PostgreSQL; {args.recent:,} attempts not yet rolled up; "
          f"median of {args.repeat}")
    from campaigns.accounts import create_workspace

    with session_scope() as s:
        ws = create_workspace(s, "bench").id
    ws_id, list_id = common.seed_contacts(1, workspace="bench-ledger")
    campaign_id = common.make_campaign(ws_id, list_id)
    client = create_app({"TESTING": True}).test_client()
    print(f"{'rows':>10} | {'attempts: full count (ms)':>25} | {'Herald (ms)':>11} | {'Herald / full':>13} | "
          f"{'ledger by status: full (ms)':>27} | {'Herald (ms)':>11} | {'GET /metrics (ms)':>17}")
    have = 0
    for size in (int(x) for x in args.sizes.split(",")):
        with get_engine().begin() as conn:
            conn.execute(text(
                "INSERT INTO message_attempts (workspace_id, number, started_at, finished_at, duration_ms, outcome)"
                " SELECT :ws, 1 + (random() < 0.1)::int, now() - interval '1 day', now() - interval '1 day',"
                " random() * 2000,"
                " (ARRAY['sent','sent','sent','sent','retry','failed','ambiguous','rate_limited'])"
                "[1 + floor(random() * 8)::int] FROM generate_series(1, :n)"), {"ws": ws, "n": size - have})
            # the last `recent` attempts finished within the last minutes (the 5-minute figures read them)
            conn.execute(text("UPDATE message_attempts SET finished_at = now() - interval '1 day'"
                              " WHERE finished_at > now() - interval '1 hour'"))
            conn.execute(text("UPDATE message_attempts SET finished_at = now() WHERE id > (SELECT max(id)"
                              " FROM message_attempts) - :recent"), {"recent": args.recent})
            conn.execute(text("ANALYZE message_attempts"))
            conn.execute(text(
                "INSERT INTO messages (workspace_id, campaign_id, email, message_key, status, due_at, created_at,"
                " updated_at) SELECT :ws, :cid, 'c' || g || '@bench.example.com', 'k' || g || '-' || :have,"
                " CASE WHEN g % 100 = 0 THEN (ARRAY['scheduled','failed','ambiguous'])[1 + g / 100 % 3]"
                " ELSE 'sent' END, now() - interval '1 day', now(), now() FROM generate_series(1, :n) AS g"),
                {"ws": ws_id, "cid": campaign_id, "n": size - have, "have": have})
            conn.execute(text("ANALYZE messages"))
        have = size
        # roll everything up but the last `recent` attempts, as the scrapes of the last minutes would have
        with session_scope() as s:
            top = s.execute(text("SELECT max(id) FROM message_attempts")).scalar()
            s.execute(text("DELETE FROM counters WHERE name LIKE 'metrics:%'"))
            upto = max(0, top - args.recent)
            sums = queue_health.attempt_sums(s, queue_health.MessageAttempt.id <= upto)
            queue_health.add_totals(s, sums)
            s.execute(text("INSERT INTO counters (name, value) VALUES (:n, :v)"), {"n": queue_health.UPTO, "v": upto})
        with session_scope() as s:
            full_ms, full = _timed(lambda: full_count(s), args.repeat)
            herald_ms, figures = _timed(lambda: queue_health.attempt_figures(s), args.repeat)
        # (the duration sum is rounded to whole microseconds per outcome, in the totals, the tail and
        # the full count alike: they may part by up to half a microsecond per outcome and part)
        slack = 1.5 * sum(1 for k in full if k.startswith("attempts:"))
        differ = {k: (figures.get(k, 0), v) for k, v in full.items()
                  if abs(figures.get(k, 0) - v) > (slack if k == "duration_sum_us" else 0)}
        with session_scope() as s:
            ledger_ms, by_status = _timed(lambda: dict(s.execute(
                select(Message.status, func.count()).group_by(Message.status)).all()), args.repeat)
            stats.clear_shared()  # the settled count, as the scrape before this one left it at this size
            queue_health.messages_by_status(s)
            herald_ledger_ms, figures = _timed(lambda: queue_health.messages_by_status(s), args.repeat)
        differ.update({k: (figures.get(k, 0), v) for k, v in by_status.items() if figures.get(k, 0) != v})
        scrape_ms, _ = _timed(lambda: client.get("/metrics"), args.repeat)
        print(f"{size:>10,} | {full_ms:>25.1f} | {herald_ms:>11.1f} | {herald_ms / full_ms:>13.3f} | "
              f"{ledger_ms:>27.1f} | {herald_ledger_ms:>11.1f} | "
              f"{scrape_ms:>17.1f}{f'  FIGURES DIFFER: {differ}' if differ else ''}")


if __name__ == "__main__":
    main()
