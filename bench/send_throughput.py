"""Send throughput: the raw floor, a naive baseline and Herald end to end, in one run.

- floor: the same HTTP client (``SendGridMailer``: the library's payload helpers over a pooled
  urllib3 client) posting the same payloads to the sink from 2 processes, no queue, no database;
- library path: the same, but through the ``sendgrid`` library's own HTTP client (a new
  connection per call), to show what the pooled client buys;
- naive: one plain Huey task per email (no ledger), 2 consumers;
- Herald: launch a one-step campaign to N contacts on PostgreSQL + Redis, 2 consumers, until the
  sink has accepted N; ``SENDGRID_RATE_LIMIT`` lifted out of the way.

Targets (issue 3): Herald >= 0.5 x floor and >= 1.5 x naive.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402


def _client_proc(args):
    host, start, count, threads, library = args
    from bench.naive_tasks import email_for
    from campaigns.providers.sendgrid import LibraryTransportMailer, SendGridMailer

    mailer = LibraryTransportMailer("bench", host) if library else SendGridMailer("bench", host)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: mailer.send(email_for(i)), range(start, start + count)))


def floor(host: str, n: int, procs: int = 2, threads: int = 8, library: bool = False) -> float:
    per = n // procs
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(procs) as pool:
        pool.map(_client_proc, [(host, p * per, per, threads, library) for p in range(procs)])
    return per * procs / (time.perf_counter() - t0)


def naive(sink: str, n: int) -> float:
    common.reset_sink(sink)
    from bench.naive_tasks import huey, send_one

    huey.storage.flush_all()
    pipe = []
    for i in range(n):
        pipe.append(send_one.s(i))
    t0 = time.perf_counter()
    for task in pipe:
        huey.enqueue(task)
    common.start_consumers(2, 8, module="bench.naive_tasks.huey")
    secs = common.wait_for_accepted(sink, n)
    common.stop_consumers()
    return n / (time.perf_counter() - t0) if secs else 0.0


def herald(sink: str, n: int) -> tuple[float, dict]:
    from campaigns import engine
    from campaigns.db import session_scope

    ws_id, list_id = common.seed_contacts(n)
    cid = common.make_campaign(ws_id, list_id)
    common.reset_sink(sink)
    common.start_consumers(2, 8)
    time.sleep(1.5)  # consumers up
    t0 = time.perf_counter()
    with session_scope() as s:
        engine.launch(s, ws_id, cid)
    from tasks.engine import fanout_campaign

    fanout_campaign(cid)
    common.wait_for_accepted(sink, n)
    rate = n / (time.perf_counter() - t0)
    stats = common.sink_stats(sink)
    common.stop_consumers()
    return rate, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=10000, help="emails per measurement (default 10000)")
    args = ap.parse_args()
    common.setup_environment("throughput")
    sink = common.start_sink()
    n = args.n
    print(f"machine: {common.machine()}; n = {n}")
    f = floor(sink, n)
    print(f"floor (pooled client, 2 processes x 8 threads, no queue, no db): {f:8.0f} sends/s")
    lib = floor(sink, min(n, 4000), library=True)
    print(f"library's own HTTP path (new connection per call):             {lib:8.0f} sends/s")
    nv = naive(sink, n)
    print(f"naive (one Huey task per email, no ledger, 2 consumers):         {nv:8.0f} sends/s")
    h, stats = herald(sink, n)
    print(f"Herald end to end (ledger, leases, PostgreSQL + Redis, 2 consumers): {h:8.0f} sends/s")
    print(f"  repeated keys at the sink: {stats['keys']['repeated']}")
    print(f"ratios: Herald/floor = {h / f:.2f} (target >= 0.5); Herald/naive = {h / nv:.2f} (target >= 1.5); "
          f"pooled/library = {f / lib:.2f}")


if __name__ == "__main__":
    main()
