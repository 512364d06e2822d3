"""Gunicorn reads this file from the working directory (``gunicorn wsgi:app`` in the project).

Herald's settings and database are checked once in the master, before any worker starts: a bad
setting stops the server with one line naming it. Left to the workers, each failed to load the
app on its own, and their exits raced gunicorn's shutdown, which then printed tracebacks.
"""

import os
import sys


def on_starting(server):
    # web.streams bounds open live-progress streams to half of each worker's threads
    os.environ["HERALD_WEB_THREADS"] = str(server.cfg.threads)
    # Loaded when the server starts, not whenever gunicorn reads this file (gunicorn --check-config).
    from campaigns.config import ConfigError, load_settings
    from web import _check_database

    try:
        _check_database(load_settings().database_url)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(4) from None  # gunicorn's own status for "App failed to load"

# gunicorn's largest request line: the API answers URLs over its own limit (web.api.MAX_URL_BYTES,
# 4096 bytes) with a JSON 414 of its own instead of gunicorn's HTML one.
limit_request_line = 8190
