"""Send throughput: the raw floor, a naive baseline and Herald end to end, in one run.

- floor: the same HTTP client (``SendGridMailer``: the library's payload helpers over a pooled
  urllib3 client) posting the same payloads to the sink from 2 processes, no queue, no database;
- library path: the same, but through the ``sendgrid`` library's own HTTP client (a new
  connection per call), to show what the pooled client buys;
- naive: one plain Huey task per email (no ledger), 2 consumers, run two ways (``naive``);
- naive engine: one Huey task per email that reads the contact, step and campaign and renders
  the email as Herald does, then posts it (no ledger; ``naive_engine``);
- Herald: launch a one-step campaign to N contacts on PostgreSQL + Redis, 2 consumers, until the
  sink has accepted N; ``SENDGRID_RATE_LIMIT`` lifted out of the way.

Targets (issue 3): Herald >= 0.5 x floor and >= 1.5 x naive.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import json
import urllib.request

from sqlalchemy import select

from bench import common


def _client_proc(args):
    host, start, count, threads, library = args
    from bench.library_transport import LibraryTransportMailer
    from bench.naive_tasks import email_for
    from campaigns.providers.sendgrid import SendGridMailer

    mailer = LibraryTransportMailer("bench", host) if library else SendGridMailer("bench", host)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: mailer.send(email_for(i)), range(start, start + count)))


def floor(host: str, n: int, procs: int = 2, threads: int = 8, library: bool = False) -> float:
    per = n // procs
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(procs) as pool:
        pool.map(_client_proc, [(host, p * per, per, threads, library) for p in range(procs)])
    return per * procs / (time.perf_counter() - t0)


def _accept_times(sink: str) -> list[float]:
    url = sink + "/_sink/messages?fields=summary&status=202&limit=1000000"
    return sorted(m["time"] for m in json.loads(urllib.request.urlopen(url, timeout=60).read())["messages"])


def _filled_first(sink: str, tasks: list) -> float:
    """Sends/s of naive tasks when the queue is filled first, then drained by 2 consumers: the
    enqueueing plus the drain (first to last accept at the sink, plus one interval)."""
    from bench.naive_tasks import huey

    n = len(tasks)
    common.reset_sink(sink)
    huey.storage.flush_all()
    t0 = time.perf_counter()
    for task in tasks:
        huey.enqueue(task)
    enqueue_secs = time.perf_counter() - t0
    common.start_consumers(2, 8, module="bench.naive_tasks.huey")
    common.wait_for_accepted(sink, n)
    common.stop_consumers()
    times = _accept_times(sink)
    return n / (enqueue_secs + (times[-1] - times[0]) * n / max(1, n - 1))


def naive(sink: str, n: int) -> tuple[float, float]:
    """Two ways to run the naive baseline; both leave the consumers' process start-up out:

    - filled first: the producer enqueues every task, then 2 consumers drain the queue; the time
      is the enqueueing plus the drain (first to last accept at the sink, plus one interval);
    - overlapped: 2 consumers are up, the producer enqueues while they drain; the time runs from
      the first enqueue to the last accept.
    """
    from bench.naive_tasks import huey, send_one

    filled_first = _filled_first(sink, [send_one.s(i) for i in range(n)])

    common.reset_sink(sink)
    huey.storage.flush_all()
    tasks = [send_one.s(n + i) for i in range(n)]
    common.start_consumers(2, 8, module="bench.naive_tasks.huey")
    time.sleep(1.5)  # consumers up, as for Herald
    t0 = time.perf_counter()
    for task in tasks:
        huey.enqueue(task)
    common.wait_for_accepted(sink, n)
    overlapped = n / (time.perf_counter() - t0)
    common.stop_consumers()
    return filled_first, overlapped


def naive_engine(sink: str, n: int, round_no: int = 0) -> float:
    """One task per email doing a send's own work (read, render, post) without the ledger:
    queue filled first, then drained by 2 consumers (time = enqueueing + first to last accept)."""

    from bench.naive_tasks import send_rendered
    from campaigns.db import session_scope
    from campaigns.models import ListMember, Step

    ws_id, list_id = common.seed_contacts(n, workspace=f"naive{round_no}")
    cid = common.make_campaign(ws_id, list_id)
    with session_scope() as s:
        step_id = s.scalar(select(Step.id).where(Step.campaign_id == cid))
        contact_ids = s.scalars(select(ListMember.contact_id).where(ListMember.list_id == list_id)).all()
    return _filled_first(sink, [send_rendered.s(c, cid, step_id) for c in contact_ids])


def herald(sink: str, n: int, round_no: int = 0) -> tuple[float, dict]:
    from campaigns import engine
    from campaigns.db import session_scope

    ws_id, list_id = common.seed_contacts(n, workspace=f"bench{round_no}")
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
    ap.add_argument("-r", "--repeat", type=int, default=3,
                    help="rounds; each figure is the median of its rounds (default 3: one run moves by 10-20%%)")
    args = ap.parse_args()
    common.setup_environment("throughput")
    sink = common.start_sink()
    n = args.n
    print(f"machine: {common.machine()}; n = {n}; {args.repeat} rounds, medians")
    figures: dict[str, list[float]] = {k: [] for k in ("floor", "library", "naive", "naive_overlap", "naive_engine",
                                                       "herald")}
    repeated = 0
    for r in range(args.repeat):
        # One round measures every path back to back, so a slow patch of the machine hits all.
        figures["floor"].append(floor(sink, n))
        figures["library"].append(floor(sink, min(n, 4000), library=True))
        nv, nvo = naive(sink, n)
        figures["naive"].append(nv)
        figures["naive_overlap"].append(nvo)
        figures["naive_engine"].append(naive_engine(sink, n, r))
        h, stats = herald(sink, n, r)
        figures["herald"].append(h)
        repeated += stats["keys"]["repeated"]
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in figures.items()), flush=True)
    f, lib, nv, nvo, nve, h = (statistics.median(v) for v in figures.values())
    print(f"floor (pooled client, 2 processes x 8 threads, no queue, no db):        {f:8.0f} sends/s")
    print(f"library's own HTTP path (new connection per call):                    {lib:8.0f} sends/s")
    print(f"naive, queue filled first then drained by 2 consumers:                {nv:8.0f} sends/s")
    print(f"naive, enqueued while 2 consumers drain:                               {nvo:8.0f} sends/s")
    print(f"naive engine (read + render + post per task), filled first:           {nve:8.0f} sends/s")
    print(f"Herald end to end (ledger, leases, PostgreSQL + Redis, 2 consumers):  {h:8.0f} sends/s")
    print(f"  repeated keys at the sink, all rounds: {repeated}")
    print(f"ratios of the medians: Herald/floor = {h / f:.2f} (target >= 0.5); Herald/naive = {h / nv:.2f} filled "
          f"first, {h / nvo:.2f} overlapped (target >= 1.5); Herald/naive engine = {h / nve:.2f}; "
          f"pooled/library = {f / lib:.2f}")
    # The machine's speed drifts between rounds (a shared host): each round's own ratios, too.
    per_round = {name: statistics.median(a / b for a, b in zip(figures["herald"], figures[base], strict=True))
                 for name, base in (("floor", "floor"), ("naive filled first", "naive"),
                                    ("naive overlapped", "naive_overlap"), ("naive engine", "naive_engine"))}
    print("medians of the per-round ratios: " + "; ".join(f"Herald/{k} = {v:.2f}" for k, v in per_round.items()))


if __name__ == "__main__":
    main()
