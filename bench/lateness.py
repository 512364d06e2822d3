"""Lateness: 10,000 messages due within the same minute; how late does each start?

A one-step campaign's messages get due times spread over one minute starting a few seconds
ahead; two consumers run (Redis + PostgreSQL, limits lifted). Lateness is the first attempt's
start minus the due time. Target: p99 <= 2 s when limits allow.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import text

from bench import common


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=10_000)
    ap.add_argument("--spread", type=float, default=60.0, help="seconds the due times spread over")
    args = ap.parse_args()
    common.setup_environment("lateness")
    sink = common.start_sink()

    from campaigns import engine
    from campaigns.db import get_engine, session_scope

    print(f"machine: {common.machine()}; n = {args.n}, due within {args.spread:.0f} s")
    ws_id, list_id = common.seed_contacts(args.n)
    cid = common.make_campaign(ws_id, list_id)
    with session_scope() as s:
        engine.launch(s, ws_id, cid)
    with session_scope() as s:
        engine.fanout(s, cid)
    lead = 8.0
    with get_engine().begin() as conn:
        conn.execute(text(
            "UPDATE messages SET due_at = (now() at time zone 'utc') "
            "+ make_interval(secs => :lead + random() * :spread) WHERE campaign_id = :c"),
            {"lead": lead, "spread": args.spread, "c": cid})
    common.start_consumers(2, 8)
    from tasks.engine import wake_dispatcher

    wake_dispatcher(None)
    common.wait_for_accepted(sink, args.n, timeout=lead + args.spread + 300)
    with get_engine().connect() as conn:
        rows = conn.execute(text(
            "SELECT extract(epoch FROM a.started_at - m.due_at) FROM messages m "
            "JOIN message_attempts a ON a.message_id = m.id AND a.number = 1 WHERE m.campaign_id = :c"),
            {"c": cid}).scalars().all()
    late = [float(x) for x in rows]
    common.stop_consumers()
    print(f"messages measured: {len(late)}")
    print(f"lateness p50 = {pct(late, 0.5):.3f} s, p99 = {pct(late, 0.99):.3f} s, max = {max(late):.3f} s, "
          f"mean = {statistics.mean(late):.3f} s (target p99 <= 2 s)")


if __name__ == "__main__":
    main()
