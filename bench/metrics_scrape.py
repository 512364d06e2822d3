"""/metrics' attempt counters on a long history: a scrape's cost as the attempts table grows.

On PostgreSQL, the attempts table is filled to each size with ``generate_series`` (random
outcomes and durations, one row per attempt; the last ``--recent`` rows are the minutes not
yet rolled up). At each size the script times, median of ``--repeat`` runs:

- full count: the statements /metrics ran before migration 0009 (every attempt counted by
  outcome, retries, the duration histogram): the baseline;
- Herald: ``queue_health.attempt_figures`` once the roll-up has caught up (the totals plus the
  attempts after the watermark), i.e. a scrape's attempt counters now;
- the whole ``GET /metrics`` response (the ledger gauges included).

It also checks that both give the same figures. Target: a scrape's cost stays flat while the
history grows (Herald / full count falls with the size).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402


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
    from sqlalchemy import text

    from campaigns import queue_health
    from campaigns.db import get_engine, session_scope
    from web import create_app

    print(f"machine: {common.machine()}; PostgreSQL; {args.recent:,} attempts not yet rolled up; "
          f"median of {args.repeat}")
    from campaigns.accounts import create_workspace

    with session_scope() as s:
        ws = create_workspace(s, "bench").id
    client = create_app({"TESTING": True}).test_client()
    print(f"{'attempts':>10} | {'full count (ms)':>15} | {'Herald (ms)':>11} | {'Herald / full':>13} | "
          f"{'GET /metrics (ms)':>17}")
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
        # (the duration sum is kept in whole microseconds per part: totals and tail round apart)
        differ = {k: (figures.get(k, 0), v) for k, v in full.items()
                  if abs(figures.get(k, 0) - v) > (1 if k == "duration_sum_us" else 0)}
        scrape_ms, _ = _timed(lambda: client.get("/metrics"), args.repeat)
        print(f"{size:>10,} | {full_ms:>15.1f} | {herald_ms:>11.1f} | {herald_ms / full_ms:>13.3f} | "
              f"{scrape_ms:>17.1f}{f'  FIGURES DIFFER: {differ}' if differ else ''}")


if __name__ == "__main__":
    main()
