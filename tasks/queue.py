"""The Huey instance and the queue store's checks (re-exported as ``tasks.huey`` etc.; see
the package's docstring). The task modules import this one, never the package itself."""

from __future__ import annotations

import redis
from huey import PriorityRedisExpireHuey, SqliteHuey
from huey.storage import SqliteStorage

from campaigns.config import ConfigError, get_settings
from campaigns.db import SQLITE_BUSY_TIMEOUT, check_database, dispose_engines, private_file

# The queue store (Redis) did not answer: a restart, a failover, a network cut.
STORE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
_consumer_workers: int | None = None


def consumer_workers() -> int | None:
    """This process's worker count when it is a consumer (``-w``), else None."""
    return _consumer_workers


class CheckedStart:
    """Huey mixin: a consumer checks its services before it starts (see the module docstring),
    and notes its worker count (a lone worker must not be held by the dispatcher: tasks.engine)."""

    def create_consumer(self, **options):
        global _consumer_workers
        check_services()
        _consumer_workers = int(options.get("workers") or 1)
        return super().create_consumer(**options)


class LazySqliteStorage(SqliteStorage):
    """SqliteStorage that creates its tables on first connection, not at construction."""

    def __init__(self, *args, **kwargs):
        kwargs["create_tables"] = False
        self._schema_ready = False
        super().__init__(*args, **kwargs)

    def _create_connection(self):
        private_file(self.filename)  # 0600, as the database (campaigns.db)
        conn = super()._create_connection()
        if not self._schema_ready:
            self._schema_ready = True
            conn.execute("begin exclusive")
            try:
                for sql in self.ddl:
                    conn.execute(sql)
                conn.execute("commit")
            except Exception:
                conn.execute("rollback")
                raise
        return conn


class LazySqliteHuey(CheckedStart, SqliteHuey):
    storage_class = LazySqliteStorage


class CheckedRedisHuey(CheckedStart, PriorityRedisExpireHuey):
    pass


def make_huey():
    try:
        settings = get_settings()
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    common = dict(results=False, store_none=False, utc=True)
    if settings.redis_url:
        pool = redis.ConnectionPool.from_url(
            settings.redis_url, health_check_interval=30, socket_connect_timeout=5, socket_keepalive=True
        )
        return CheckedRedisHuey(settings.queue_name, connection_pool=pool, **common)
    return LazySqliteHuey(
        settings.queue_name,
        filename=str(settings.instance_dir / "huey.db"),
        timeout=SQLITE_BUSY_TIMEOUT,
        **common,
    )


huey = make_huey()


def queue_store_ok() -> None:
    """Raise unless the queue store answers (used by /healthz)."""
    huey.storage.queue_size()


def check_services() -> None:
    """Connect once to the database and the queue store; stop the process with one line if either fails."""
    try:
        check_database()
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    finally:
        dispose_engines()  # no connection outlives the check (a process-mode consumer forks after it)
    try:
        queue_store_ok()
    except Exception as exc:  # any client error means "does not answer"
        name = "REDIS_URL" if get_settings().redis_url else "HERALD_INSTANCE_DIR"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SystemExit(f"error: {name}: cannot connect to the task queue ({reason})") from None

