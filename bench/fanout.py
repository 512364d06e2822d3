"""Launch fan-out to 1,000,000 contacts on PostgreSQL: seconds and peak memory, beside the floor.

The floor is a plain ``INSERT … SELECT`` of the same rows (the enrollments and their first
messages) with no conflict handling and no suppression check, measured in the same run on the
same data. Herald's fan-out (``campaigns.engine.fanout_in_parts``, what a launch runs: the list in
parts of 1,000 then 20,000 contacts, one set-based statement and commit each) is measured
whole, with the time its first part took (when the first sends may start); the target is at most
2 x the floor and under 300 MB peak RSS of the process that runs it (memory must stay flat:
no row is brought into Python).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import text

from bench import common


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=1_000_000, help="contacts (default 1,000,000)")
    args = ap.parse_args()
    common.setup_environment("fanout")

    from campaigns import engine
    from campaigns.db import get_engine, session_scope

    n = args.n
    print(f"machine: {common.machine()}; contacts = {n:,}")
    t0 = time.perf_counter()
    ws_id, list_id = common.seed_contacts(n)
    # 1% of the list is suppressed, as in real lists
    with get_engine().begin() as conn:
        conn.execute(text("INSERT INTO suppressions (workspace_id, email, reason, created_at) "
                          "SELECT workspace_id, email, 'bounce', now() FROM contacts WHERE id % 100 = 0"))
        conn.execute(text("ANALYZE"))
    print(f"seeded in {time.perf_counter() - t0:.1f} s")
    steps = [{"type": "email", "subject": "Hi", "html": "<p>Hi</p>"}]
    floor_cid = common.make_campaign(ws_id, list_id, steps=steps, name="floor")
    cid = common.make_campaign(ws_id, list_id, steps=steps, name="herald")

    # The floor: the same rows, plain INSERT … SELECT, nothing checked.
    with get_engine().begin() as conn:
        step_id = conn.scalar(text("SELECT id FROM steps WHERE campaign_id = :c"), {"c": floor_cid})
        t0 = time.perf_counter()
        conn.execute(text(
            "INSERT INTO enrollments (workspace_id, campaign_id, contact_id, status, created_at) "
            "SELECT c.workspace_id, :cid, lm.contact_id, 'active', now() FROM list_members lm "
            "JOIN contacts c ON c.id = lm.contact_id WHERE lm.list_id = :list"), {"cid": floor_cid, "list": list_id})
        conn.execute(text(
            "INSERT INTO messages (workspace_id, campaign_id, enrollment_id, step_id, contact_id, email, message_key, "
            "status, due_at, max_attempts, created_at, updated_at, attempts, resends, priority, is_test) "
            "SELECT e.workspace_id, e.campaign_id, e.id, :step, e.contact_id, c.email, "
            "replace(gen_random_uuid()::text, '-', ''), 'scheduled', now(), 5, now(), now(), 0, 0, 0, false "
            "FROM enrollments e JOIN contacts c ON c.id = e.contact_id WHERE e.campaign_id = :cid"),
            {"cid": floor_cid, "step": step_id})
        floor = time.perf_counter() - t0
    print(f"floor (plain INSERT … SELECT of the same rows):  {floor:6.1f} s")

    rss_before = rss_mb()
    with session_scope() as s:
        engine.launch(s, ws_id, cid)
    t0 = time.perf_counter()
    parts: list[float] = []
    enrolled = engine.fanout_in_parts(cid, on_part=lambda n: parts.append(time.perf_counter() - t0))
    took = time.perf_counter() - t0
    with get_engine().connect() as conn:
        msgs = conn.scalar(text("SELECT count(*) FROM messages WHERE campaign_id = :c"), {"c": cid})
    print(f"Herald fan-out (suppression-aware, idempotent): {took:6.1f} s  enrolled {enrolled:,}, "
          f"first messages {msgs:,}")
    print(f"first part committed (first sends may start) after {parts[0]:.2f} s; {len(parts)} parts")
    print(f"peak RSS of this process: {rss_mb():.0f} MB (before the fan-out: {rss_before:.0f} MB); target < 300 MB")
    t0 = time.perf_counter()
    again = engine.fanout_in_parts(cid)
    print(f"second fan-out (launch twice): {time.perf_counter() - t0:.1f} s, enrolled {again}")
    print(f"ratio Herald/floor = {took / floor:.2f} (target <= 2)")


if __name__ == "__main__":
    main()
