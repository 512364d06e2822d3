"""Engine and sessions. Nothing connects until a session is first used.

SQLite (the embedded default) is shared by the web app and the consumers, so every connection
turns on WAL mode, a busy timeout and foreign keys. ``session_scope`` is the unit of work for
tasks and commands; the web app keeps one session per request (``web.db``).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TypeVar

from sqlalchemy import BigInteger, Integer, String, Text, any_, bindparam, create_engine, event, make_url, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from .config import ConfigError, get_settings

log = logging.getLogger("herald.db")
T = TypeVar("T")
# Errors that say nothing about the statement itself: the connection was lost (a restart, a
# failover, a network cut), the pool had none to give, a deadlock or serialization failure,
# SQLite's lock stayed busy. The same work may succeed when tried again.
TRANSIENT_ERRORS = (OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError)
# Seconds a SQLite connection waits for another's write lock (the database's and the SQLite
# queue's: the web app and the consumers share both files).
SQLITE_BUSY_TIMEOUT = 30

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_factories: dict[str, sessionmaker] = {}


def utcnow() -> datetime:
    """Naive UTC, the one convention for every timestamp column (same on SQLite and PG)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _sqlite_pragmas(dbapi_conn, _record):
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT * 1000}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_begin(conn):
    # pysqlite's own transaction handling is off (see below); take the write lock up front so
    # that two writers queue on the busy timeout instead of failing on upgrade (a deferred
    # transaction that read a WAL snapshot cannot become a writer once another commit landed).
    # A connection in AUTOCOMMIT (read-only tools, tests' inspection sessions) takes no lock.
    if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def private_file(path: str | os.PathLike) -> None:
    """Create the SQLite file ``path`` readable by its owner only (0600, as ``instance/secret_key``),
    and take the group and other bits off it and its ``-wal``/``-shm`` files if they have them (an
    older install). SQLite creates ``-wal`` and ``-shm`` with the database file's mode. A file
    that cannot be created or changed is left for SQLite to report."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT, 0o600))
    except OSError:
        return
    for name in (os.fspath(path), f"{os.fspath(path)}-wal", f"{os.fspath(path)}-shm"):
        try:
            mode = os.stat(name).st_mode
            if mode & 0o077:
                os.chmod(name, mode & 0o700)
        except OSError:  # absent, or another user's file
            pass


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:" and not database.startswith("file:"):
            private_file(database)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30, "isolation_level": None},
            pool_size=20,
            max_overflow=20,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_size=20, max_overflow=20, pool_pre_ping=True)


def get_engine(url: str | None = None) -> Engine:
    url = url or get_settings().database_url
    engine = _engines.get(url)
    if engine is None:
        with _lock:
            engine = _engines.get(url)
            if engine is None:
                engine = _engines[url] = make_engine(url)
                _factories[url] = sessionmaker(engine, expire_on_commit=False)
    return engine


def session_factory(url: str | None = None) -> sessionmaker:
    url = url or get_settings().database_url
    get_engine(url)
    return _factories[url]


def new_session() -> Session:
    return session_factory()()


@contextmanager
def session_scope():
    """A session that commits on success and rolls back on error."""
    session = new_session()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_engines() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _factories.clear()


def check_database(url: str | None = None) -> None:
    """Connect once; raise ConfigError naming DATABASE_URL when the database does not answer."""
    try:
        with get_engine(url).connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error means "does not answer"
        raise ConfigError(f"DATABASE_URL: cannot connect to the database ({error_reason(exc)})") from None


def error_reason(exc: BaseException) -> str:
    """A database error's first line, from the driver's own message when there is one."""
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def retry_transient(work: Callable[[int], T], what: str, seconds: float, base: float = 0.1, cap: float = 2.0) -> T:
    """``work(n)`` (``n``: the tries before this one) until it returns. After a transient database
    error it is tried again, after a full-jitter backoff, for up to ``seconds``; then, or on any
    other error, the error is raised. ``work`` runs its own transaction, so a failed try left
    nothing behind, unless its COMMIT went through and only the answer was lost: ``work`` must
    be safe to run again after that (``n > 0`` tells it to look)."""
    started = time.monotonic()
    n = 0
    while True:
        try:
            return work(n)
        except TRANSIENT_ERRORS as exc:
            delay = random.uniform(0, min(cap, base * 2 ** n))
            if time.monotonic() - started + delay > seconds:
                raise
            log.warning("%s: the database did not answer (%s); trying again in %.2f s", what, error_reason(exc), delay)
            time.sleep(delay)
            n += 1


def is_postgres(session_or_engine) -> bool:
    bind = session_or_engine.get_bind() if isinstance(session_or_engine, Session) else session_or_engine
    return bind.dialect.name == "postgresql"


# --- set-based writes that behave the same on both backends ------------------------------------

CHUNK = 1_000  # rows per set-based statement (well under both backends' bind-parameter limits)


def dialect_insert(session: Session):
    """The dialect's insert (it has ``on_conflict_do_nothing/do_update`` on both backends)."""
    return postgresql.insert if is_postgres(session) else sqlite.insert


def one_of(session: Session, column, values: list):
    """``column IN (values)``; on PostgreSQL ``column = ANY(:array)``, one short statement that
    the driver does not have to re-parse for every batch (a 1,000-item IN list is 1,000
    placeholders)."""
    if is_postgres(session):
        item = column.type if isinstance(column.type, String | BigInteger | Integer) else Text()
        return column == any_(bindparam(None, list(values), type_=postgresql.ARRAY(item)))
    return column.in_(list(values))


def insert_many(session: Session, stmt, rows: list[dict]) -> list:
    """Run an ``INSERT ... RETURNING`` for many rows; returns the rows RETURNING gave back.

    One executemany: SQLAlchemy's "insertmanyvalues" sends it as multi-row VALUES statements
    that are compiled once and cached (a ``.values([...])`` list is recompiled every time)."""
    if not rows:
        return []
    return session.execute(stmt, rows).all()


def chunks(items: list, size: int = CHUNK):
    """``items`` in slices of ``size`` (one set-based statement each)."""
    for i in range(0, len(items), size):
        yield items[i : i + size]
