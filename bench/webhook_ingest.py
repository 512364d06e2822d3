"""Event Webhook ingestion: signed batches through the real endpoint, beside the floor, in one run.

- set-up: a throw-away PostgreSQL database (migrated), Redis under a key prefix of its own,
  10,000 sent messages to map events to, and ``gunicorn -k gthread -w 2 --threads 16 wsgi:app``
  on a free port with ``SENDGRID_WEBHOOK_PUBLIC_KEY`` set (every post is verified);
- floor: in this process, no HTTP: verify + parse + map + one bulk insert + commit of batches
  of the same shape (the endpoint's own functions), one after another;
- endpoint: signed batches of 1,000 SendGrid-shaped events (~500 KB) posted by ``--clients``
  keep-alive connections at once: events/s, and p50/p99 time per batch; then the latency alone
  (one connection);
- 768 KB: signed batches as large as SendGrid sends (~2,000 events), p99 time per batch;
- apply: the task's work afterwards (``campaigns.events.process_pending``), events/s.

Targets (issue 5): >= 10,000 events/s through the endpoint; p99 < 300 ms per 768 KB batch.
Writes the figures into bench/RESULTS.md ("Delivery events"). Stops everything it starts.
Run: ``.venv/bin/python bench/webhook_ingest.py`` (about a minute).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import re
import statistics
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import func, select

from bench import common

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "Delivery events"
KINDS = ["processed"] * 25 + ["delivered"] * 25 + ["open"] * 25 + ["click"] * 15 + ["deferred"] * 5 + ["bounce"] * 5
MAX_768 = 768 * 1024


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    if not values:
        return 0.0
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


# --------------------------------------------------------------------------- data


def seed_messages(n: int) -> list[tuple]:
    """n sent messages (one per contact) to map events to: [(message_key, provider_id, email, ws, campaign)]."""
    from sqlalchemy import text

    from campaigns.db import get_engine

    ws_id, list_id = common.seed_contacts(n, workspace="events")
    cid = common.make_campaign(ws_id, list_id)
    with get_engine().begin() as conn:
        step = conn.scalar(text("SELECT id FROM steps WHERE campaign_id = :c ORDER BY position LIMIT 1"), {"c": cid})
        conn.execute(text(
            "INSERT INTO messages (workspace_id, campaign_id, step_id, contact_id, email, message_key, status, "
            "is_test, priority, due_at, attempts, max_attempts, resends, provider_message_id, sent_at, "
            "created_at, updated_at) "
            "SELECT c.workspace_id, :cid, :step, c.id, c.email, md5(random()::text || c.id), 'sent', false, 0, "
            "now(), 1, 5, 0, 'bench' || substr(md5(c.id::text), 1, 18), now(), now(), now() "
            "FROM contacts c WHERE c.workspace_id = :ws"), {"cid": cid, "step": step, "ws": ws_id})
        return conn.execute(text(
            "SELECT message_key, provider_message_id, email, workspace_id, campaign_id FROM messages")).all()


_seq = iter(range(1, 10**12))


def sg_event(msg: tuple, rnd: random.Random, ts: int) -> dict:
    key, pid, email, ws, cid = msg
    kind = rnd.choice(KINDS)
    n = next(_seq)
    event = {
        "email": email,
        "timestamp": ts - rnd.randrange(3 * 86400),  # events of the last three days
        "smtp-id": f"<{pid}@ismtpd0001p1iad2.sendgrid.net>",
        "event": kind,
        "category": ["outreach"],
        "sg_event_id": base64.urlsafe_b64encode(f"{kind[:4]}-{n}-{pid}".encode()).decode().rstrip("="),
        "sg_message_id": f"{pid}.filterdrecv-5645d9c87f-xl8j7-1-6560A9C3-2.0",
        "message_key": key,
        "herald_workspace": str(ws),
        "herald_campaign": str(cid),
    }
    if kind == "delivered":
        event.update(response="250 2.0.0 OK 1700000000 r6-20020a05", ip="149.72.123.24", tls=1)
    elif kind in ("open", "click"):
        event.update(useragent="Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)",
                     ip="203.0.113.42", sg_machine_open=False)
        if kind == "click":
            event["url"] = f"https://example.com/landing?utm_source=herald&utm_campaign={cid}&n={n}"
    elif kind == "deferred":
        event.update(response="451 4.7.1 Try again later", attempt="1", ip="149.72.123.24", tls=1)
    elif kind == "bounce":
        event.update(reason="550 5.1.1 The email account that you tried to reach does not exist.",
                     status="5.1.1", type="bounce", bounce_classification="Invalid Address", ip="149.72.123.24")
    return event


def encode(events: list[dict]) -> bytes:
    return json.dumps(events, separators=(",", ":"), ensure_ascii=False).encode() + b"\r\n"


def batches(msgs: list[tuple], count: int, size: int | None, seed: int, max_bytes: int | None = None) -> list[bytes]:
    """``count`` bodies of ``size`` events each (or as many as fit in ``max_bytes``)."""
    rnd = random.Random(seed)
    out = []
    ts = int(time.time())
    for _ in range(count):
        events, total = [], 2
        while True:
            e = sg_event(rnd.choice(msgs), rnd, ts)
            length = len(json.dumps(e, separators=(",", ":"), ensure_ascii=False)) + 1
            if (size is not None and len(events) >= size) or (max_bytes is not None and total + length > max_bytes):
                break
            events.append(e)
            total += length
        out.append(encode(events))
    return out


# --------------------------------------------------------------------------- measurements


def floor(bodies: list[bytes], private_key, public_key: str) -> tuple[float, list[float]]:
    """verify + parse + map + one bulk insert + commit, in this process; (events/s, per-batch seconds)."""
    from campaigns import events
    from campaigns.db import new_session
    from sendgrid_sink import sign_events
    from web.webhooks import signature_ok

    signed = []
    for body in bodies:
        ts = str(int(time.time()))
        signed.append((body, sign_events(private_key, body, ts), ts))
    times, total = [], 0
    session = new_session()
    t_all = time.perf_counter()
    for body, sig, ts in signed:
        t0 = time.perf_counter()
        assert signature_ok(public_key, body, sig, ts)
        rows = events.parse_batch(body)
        events.store_batch(session, rows, body)
        session.commit()
        times.append(time.perf_counter() - t0)
        total += len(rows)
    elapsed = time.perf_counter() - t_all
    session.close()
    return total / elapsed, times


class Poster:
    """Keep-alive HTTP posts of pre-signed bodies from several threads."""

    def __init__(self, port: int):
        self.port = port
        self.local = threading.local()

    def post(self, body: bytes, sig: str, ts: str) -> tuple[int, float]:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Content-Type": "application/json", "User-Agent": "SendGrid Event API",
                   "X-Twilio-Email-Event-Webhook-Signature": sig, "X-Twilio-Email-Event-Webhook-Timestamp": ts}
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/webhooks/sendgrid/events", body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
        except (http.client.HTTPException, OSError):
            conn.close()
            self.local.conn = None
            raise
        return resp.status, time.perf_counter() - t0


def through_endpoint(port: int, bodies: list[bytes], private_key, clients: int) -> tuple[float, list[float], int]:
    """(events/s, per-batch seconds, non-2xx answers) for posting ``bodies`` with ``clients`` at once."""
    from sendgrid_sink import sign_events

    ts = str(int(time.time()))
    signed = [(b, sign_events(private_key, b, ts), ts) for b in bodies]
    n_events = sum(b.count(b'"event":') for b in bodies)
    poster = Poster(port)
    with ThreadPoolExecutor(clients) as pool:
        t0 = time.perf_counter()
        results = list(pool.map(lambda x: poster.post(*x), signed))
        elapsed = time.perf_counter() - t0
    bad = sum(1 for status, _ in results if not 200 <= status < 300)
    return n_events / elapsed, [t for _, t in results], bad


# --------------------------------------------------------------------------- the run


def start_web(public_key: str) -> int:
    port = common.free_port()
    os.environ["SENDGRID_WEBHOOK_PUBLIC_KEY"] = public_key
    exe = str(Path(sys.executable).parent / "gunicorn")
    common.spawn([exe, "-k", "gthread", "-w", "2", "--threads", "16", "-b", f"127.0.0.1:{port}", "wsgi:app"], "web")
    for _ in range(200):
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).status == 200:
                return port
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the web app did not start (see its log under HERALD_INSTANCE_DIR)")


def write_results(text: str) -> None:
    """Replace (or add) the "Delivery events" section of bench/RESULTS.md, leaving the others alone."""
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nOne section per benchmark.\n"
    section = f"## {SECTION}\n\n{text.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(current):
        updated = pattern.sub(lambda _: section + "\n", current, count=1).rstrip() + "\n"
    else:
        updated = current.rstrip() + "\n\n" + section
    RESULTS.write_text(updated)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=150, help="1,000-event batches through the endpoint")
    ap.add_argument("--big", type=int, default=40, help="768 KB batches through the endpoint")
    ap.add_argument("--clients", type=int, default=8, help="concurrent posting connections")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args()

    from sendgrid_sink import generate_key_pair

    started = time.perf_counter()
    common.setup_environment("events")
    private_key, public_key = generate_key_pair()
    msgs = seed_messages(10_000)
    port = start_web(public_key)

    floor_bodies = batches(msgs, 40, 1000, seed=1)
    load_bodies = batches(msgs, args.batches, 1000, seed=2)
    big_bodies = batches(msgs, args.big, None, seed=3, max_bytes=MAX_768)
    warm = batches(msgs, 8, 1000, seed=4)
    through_endpoint(port, warm, private_key, args.clients)  # warm both workers and their pools

    load_before = os.getloadavg()[0]
    floor_rate, floor_times = floor(floor_bodies, private_key, public_key)
    _, solo_times, solo_bad = through_endpoint(port, batches(msgs, 30, 1000, seed=5), private_key, 1)
    rate, times, bad = through_endpoint(port, load_bodies, private_key, args.clients)
    big_rate, big_times, big_bad = through_endpoint(port, big_bodies, private_key, 2)
    big_sizes = [len(b) for b in big_bodies]
    big_events = statistics.mean(b.count(b'"event":') for b in big_bodies)


    from campaigns import events
    from campaigns.db import new_session
    from campaigns.models import Event

    posted = sum(b.count(b'"event":') for b in floor_bodies + load_bodies + big_bodies + warm) + 30_000
    with new_session() as s:
        stored = s.scalar(select(func.count()).select_from(Event))
        matched = s.scalar(select(func.count()).select_from(Event).where(Event.message_id.is_not(None)))
    t0 = time.perf_counter()
    report = events.process_pending(budget_seconds=15.0)
    apply_secs = time.perf_counter() - t0
    applied = report.events if report else 0

    body_kb = statistics.mean(len(b) for b in load_bodies) / 1024
    lines = [
        f"Machine: {common.machine()}; nproc {os.cpu_count()}; PostgreSQL (local), Redis; "
        f"`gunicorn -k gthread -w 2 --threads 16`; {args.clients} posting connections (same machine).",
        "",
        "| measure | figure |",
        "| --- | --- |",
        f"| floor: verify + parse + map + one bulk insert + commit, no HTTP (1,000-event batches, one at a time) "
        f"| {floor_rate:,.0f} events/s (p99 {percentile(floor_times, 99) * 1000:.0f} ms per batch) |",
        f"| endpoint: signed 1,000-event batches (~{body_kb:.0f} KB), {len(load_bodies)} batches "
        f"| {rate:,.0f} events/s; p50 {percentile(times, 50) * 1000:.0f} ms, "
        f"p99 {percentile(times, 99) * 1000:.0f} ms per batch |",
        f"| endpoint / floor | {rate / floor_rate:.2f} |",
        f"| endpoint, one connection (latency alone): 30 signed 1,000-event batches "
        f"| p50 {percentile(solo_times, 50) * 1000:.0f} ms, p99 {percentile(solo_times, 99) * 1000:.0f} ms per batch |",
        f"| 768 KB batches (~{big_events:,.0f} events, {min(big_sizes) // 1024}-{max(big_sizes) // 1024} KB), "
        f"{len(big_bodies)} posted, 2 at a time | p50 {percentile(big_times, 50) * 1000:.0f} ms, "
        f"p99 {percentile(big_times, 99) * 1000:.0f} ms per batch ({big_rate:,.0f} events/s) |",
        f"| non-2xx answers | {bad + big_bad + solo_bad} |",
        f"| stored / posted (a generated same-second repeat is stored once) | {stored:,} / {posted:,} "
        f"({matched:,} mapped to a message) |",
        f"| applying them afterwards (the task, `process_pending`) | {applied / apply_secs:,.0f} events/s "
        f"({applied:,} in {apply_secs:.1f} s) |",
        "",
        f"Load average (1 min) on the machine at the start / end: {load_before:.1f} / {os.getloadavg()[0]:.1f} "
        "(shared with other work; the figures move by about 20% from run to run).",
        f"Targets: >= 10,000 events/s through the endpoint ({'met' if rate >= 10_000 else 'NOT met'}); "
        f"p99 < 300 ms per 768 KB batch ({'met' if percentile(big_times, 99) < 0.3 else 'NOT met'}).",
        f"Run: `.venv/bin/python bench/webhook_ingest.py` ({time.perf_counter() - started:.0f} s, "
        f"{time.strftime('%Y-%m-%d')}).",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_results(text)
        print(f"\nwritten to {RESULTS.relative_to(common.ROOT)}")


def _clear_queue() -> None:
    """Drop what the run left in its own queue (the webhook queues event processing; nothing
    consumes it here). Huey names Redis keys after the queue name without its punctuation, so
    ``common``'s prefix sweep misses them."""
    if "HERALD_QUEUE_NAME" not in os.environ:
        return
    try:
        from tasks import huey

        huey.storage.flush_all()
    except Exception as exc:  # best effort at exit
        print(f"could not clear the bench queue: {exc}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    finally:
        common.stop_all()
        _clear_queue()
