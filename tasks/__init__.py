"""The Huey instance (``tasks.huey``) and Herald's tasks.

``REDIS_URL`` set: ``PriorityRedisExpireHuey`` on Redis. Unset: ``SqliteHuey`` under
``instance/`` (WAL, busy timeout), shared by the web app and the consumers. Creating the
instance connects to nothing; tasks carry ids only, and the database is the source of truth.

Run consumers with ``huey_consumer tasks.huey -k thread -w 8 -g TERM -t 30``. A consumer first
connects once to the database and the queue store, and stops with one line naming the variable
when either does not answer (``create_consumer`` is called only by ``huey_consumer``, so importing
``tasks`` in the web app or the tests stays offline).
"""

from __future__ import annotations

from . import engine, events, imports, jobs  # noqa: F401  (registers the tasks and the effects' handlers)
from .queue import (  # noqa: F401  (the package's interface: tasks.huey, tasks.STORE_ERRORS...)
    STORE_ERRORS,
    check_services,
    consumer_workers,
    huey,
    make_huey,
    queue_store_ok,
)
