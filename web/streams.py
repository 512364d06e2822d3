"""The bound on open live-progress streams (``GET /api/v1/campaigns/<id>/stream``, which the
campaign page's live view uses too), per web process: in total and per workspace.

A stream holds one of gunicorn's threads for up to a minute. Unbounded, one API key's 40 streams
took all 32 threads of two workers and ``/healthz`` timed out. Past a bound the answer is 429
with ``Retry-After`` (the live view falls back to polling). Defaults: half the process's threads
in total (gunicorn.conf.py passes the thread count as ``HERALD_WEB_THREADS``; 16 otherwise), a
quarter of that per workspace; ``HERALD_MAX_STREAMS`` and ``HERALD_MAX_STREAMS_PER_WORKSPACE``
set them. docs/security.md gives the capacity.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator

from flask import current_app

from .errors import error_response

RETRY_AFTER = 15  # seconds: streams close within 55 s, so a slot frees up often


class StreamLimiter:
    """Counts open streams; ``acquire`` gives a release function, or None past a bound."""

    def __init__(self, total: int, per_workspace: int):
        self.total = total
        self.per_workspace = min(per_workspace, total)
        self._lock = threading.Lock()
        self._open = 0
        self._by_workspace: Counter[int] = Counter()

    def acquire(self, workspace_id: int) -> Callable[[], None] | None:
        with self._lock:
            if self._open >= self.total or self._by_workspace[workspace_id] >= self.per_workspace:
                return None
            self._open += 1
            self._by_workspace[workspace_id] += 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if released.is_set():
                    return
                released.set()
                self._open -= 1
                self._by_workspace[workspace_id] -= 1
                if not self._by_workspace[workspace_id]:
                    del self._by_workspace[workspace_id]

        return release

    def open_streams(self, workspace_id: int | None = None) -> int:
        with self._lock:
            return self._open if workspace_id is None else self._by_workspace[workspace_id]


def releasing(events: Iterator[str], release: Callable[[], None]) -> Iterator[str]:
    """``events``, giving the stream's place back as soon as they end. The server's close of the
    response (``call_on_close``) covers a stream that never started or whose client went; a
    client that reads to the end without closing (Werkzeug's test client) is covered here."""
    try:
        yield from events
    finally:
        release()


def bounds(settings, threads: int | None = None) -> tuple[int, int]:
    """(total, per workspace) for a process with ``threads`` request threads."""
    if threads is None:
        threads = int(os.environ.get("HERALD_WEB_THREADS") or 16)
    total = settings.max_streams or max(1, threads // 2)
    per_workspace = settings.max_streams_per_workspace or max(1, total // 4)
    return total, min(per_workspace, total)


def limiter() -> StreamLimiter:
    """The app's limiter (one per process: gunicorn forks before any request)."""
    found = current_app.extensions.get("herald.streams")
    if found is None:
        found = current_app.extensions.setdefault(
            "herald.streams", StreamLimiter(*bounds(current_app.config["HERALD_SETTINGS"])))
    return found


def busy_response(workspace_id: int):
    """429: this workspace's, or the process's, streams are all in use."""
    lim = limiter()
    mine = lim.open_streams(workspace_id) >= lim.per_workspace
    resp = error_response(
        429, "too_many_streams",
        f"too many live-progress streams open {'for this workspace' if mine else 'on this server'}; "
        f"poll GET /api/v1/campaigns/<id> or try again in {RETRY_AFTER} seconds",
        {"limit": lim.per_workspace if mine else lim.total, "scope": "workspace" if mine else "server"},
    )
    resp.headers["Retry-After"] = str(RETRY_AFTER)
    return resp
