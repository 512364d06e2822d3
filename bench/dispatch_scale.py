"""The dispatcher's per-pass reads on a big ledger: does a pass get slower as messages pile up?

Every dispatcher pass counts the messages queued or sending (the room left under each budget)
through ``ix_messages_status_due``. Each message passes through those two states once, and every
pass of a row leaves an index entry behind until VACUUM removes it, so the question is what a
pass costs after 1,000,000 sends when autovacuum has not run yet (the worst case; it is turned
off for the ledger tables here) and after it has.

The sends are simulated in SQL, in the engine's own order and with its own statements' effect
(scheduled -> queued -> sending -> sent, 1,000 rows a step, each step its own commit), so the
table and its indexes carry the same row versions a real run leaves; no HTTP is involved. A
second, small campaign keeps 500 messages due, as a live tenant would, and its due rows are read
by every pass as well.

Printed for each point: the median time of the pass's limit read (``engine._read_limits``, the
statement in question plus the limiter), the median time of the whole read side of a pass (the
limit read, the due rows of every running campaign, the next due time), and the index pages the
count touched (``EXPLAIN (ANALYZE, BUFFERS)``, a figure that does not depend on the machine).
The baseline is the same figures before the first send, in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import event, select, text

from bench import common

COUNT_SQL = ("SELECT workspace_id, campaign_id, is_test, count(*) FROM messages "
             "WHERE status IN ('queued', 'sending') GROUP BY workspace_id, campaign_id, is_test")


EXPLAIN = False
DUE_SQL = ("SELECT id FROM messages WHERE campaign_id = (SELECT min(id) FROM campaigns) AND status = 'scheduled' "
           "AND due_at <= now() ORDER BY due_at, id LIMIT 500")


def explain_next_due(conn) -> None:
    """The plan of the engine's own next-due statement, as the engine binds it."""

    from campaigns import engine

    def explain(_conn, cursor, statement, parameters, _context, _many):
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
        print("\n".join("    " + r[0] for r in cursor.fetchall()))

    event.listen(conn, "before_cursor_execute", explain)
    try:
        now = engine.utcnow()
        conn.execute(engine._next_due_stmt(True), {"after": now})
    finally:
        event.remove(conn, "before_cursor_execute", explain)


def measure(repeat: int = 15) -> dict:
    from campaigns import engine
    from campaigns.db import get_engine, session_scope
    from campaigns.models import Campaign
    from campaigns.ratelimit import get_limiter

    limiter = get_limiter()
    limits, passes = [], []
    for _ in range(repeat):
        with session_scope() as s:
            campaigns = s.scalars(select(Campaign).where(Campaign.status == "running")).all()
            t0 = time.perf_counter()
            engine._read_limits(s, limiter, campaigns, 1.0)
            limits.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            engine._read_limits(s, limiter, campaigns, 1.0)
            for c in campaigns:
                s.execute(text("SELECT id FROM messages WHERE campaign_id = :c AND status = 'scheduled' "
                               "AND due_at <= now() ORDER BY due_at, id LIMIT 500"), {"c": c.id}).all()
            now = engine.utcnow()
            engine._next_due(now, after=now)
            passes.append(time.perf_counter() - t0)
    with get_engine().connect() as conn:
        plan = "\n".join(r[0] for r in conn.execute(text("EXPLAIN (ANALYZE, BUFFERS) " + COUNT_SQL)))
    buffers = 0
    for line in plan.splitlines():
        if "Buffers:" in line and buffers == 0:
            for part in line.split("Buffers:")[1].replace(",", " ").split():
                if "=" in part:
                    buffers += int(part.split("=")[1])
    if EXPLAIN:
        with get_engine().connect() as conn:
            print("\n".join("    " + r[0] for r in conn.execute(text("EXPLAIN (ANALYZE, BUFFERS) " + DUE_SQL))))
            explain_next_due(conn)
    return {"limits_ms": statistics.median(limits) * 1000, "pass_ms": statistics.median(passes) * 1000,
            "pages": buffers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=1_000_000, help="messages sent (default 1,000,000)")
    ap.add_argument("--chunk", type=int, default=1000, help="rows per simulated step (default 1,000)")
    ap.add_argument("--explain", action="store_true", help="print the plans of a pass's due-row reads at each point")
    args = ap.parse_args()
    global EXPLAIN
    EXPLAIN = args.explain
    common.setup_environment("dispatch_scale")

    from campaigns import engine
    from campaigns.db import get_engine, session_scope

    n = args.n
    print(f"machine: {common.machine()}; messages = {n:,}")
    with get_engine().begin() as conn:
        for table in ("messages", "enrollments", "message_attempts"):
            conn.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = off)"))
    ws_id, list_id = common.seed_contacts(n, workspace="big")
    big = common.make_campaign(ws_id, list_id, name="big")
    small_ws, small_list = common.seed_contacts(500, workspace="small")
    small = common.make_campaign(small_ws, small_list, name="small")
    for ws, cid in ((ws_id, big), (small_ws, small)):
        with session_scope() as s:
            engine.launch(s, ws, cid)
        engine.fanout_in_parts(cid)
    with get_engine().connect() as conn:
        conn.execute(text("ANALYZE messages"))
        conn.commit()
        lo, hi = conn.execute(text("SELECT min(id), max(id) FROM messages WHERE campaign_id = :c"), {"c": big}).one()

    def row(label: str, m: dict, base: dict) -> None:
        print(f"{label:<44} limit read {m['limits_ms']:7.2f} ms ({m['limits_ms'] / base['limits_ms']:5.2f}x)   "
              f"pass reads {m['pass_ms']:7.2f} ms ({m['pass_ms'] / base['pass_ms']:5.2f}x)   "
              f"count touched {m['pages']:6d} pages", flush=True)

    base = measure()
    row("before any send (baseline)", base, base)
    checkpoints = sorted({n // 10, n // 4, n // 2, n})
    done = 0
    step = args.chunk
    t_sim = time.perf_counter()
    # The engine's transitions, a chunk at a time, each its own transaction.
    statements = [
        "UPDATE messages SET status = 'queued', queued_at = now() WHERE id BETWEEN :a AND :b "
        "AND (status || '') = 'scheduled'",
        "UPDATE messages SET status = 'sending', lease_owner = 'bench', lease_expires_at = now() + interval '60 s', "
        "attempts = attempts + 1, updated_at = now() WHERE id BETWEEN :a AND :b AND (status || '') = 'queued'",
        "UPDATE messages SET status = 'sent', sent_at = now(), provider_message_id = 'p' || id, lease_owner = NULL, "
        "lease_expires_at = NULL, updated_at = now() WHERE id BETWEEN :a AND :b AND (status || '') = 'sending'",
    ]
    for upto in checkpoints:
        while done < upto:
            a, b = lo + done, lo + min(upto, done + step) - 1
            for sql in statements:
                with get_engine().begin() as conn:
                    conn.execute(text(sql), {"a": a, "b": b})
            done = b - lo + 1
        row(f"after {done:,} sends, autovacuum not yet run", measure(), base)
    print(f"(simulating the sends took {time.perf_counter() - t_sim:.0f} s)")
    with get_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        t0 = time.perf_counter()
        conn.execute(text("VACUUM (ANALYZE) messages"))
        vac = time.perf_counter() - t0
    row(f"after VACUUM of messages ({vac:.1f} s)", measure(), base)


if __name__ == "__main__":
    main()
