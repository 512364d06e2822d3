"""Shared by the engine's stages: message status groups, the statements' id helpers, the
hooks ``tasks`` fills in, campaign lookup, and small helpers (keys, worker ids, inserts)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import BigInteger, Text, any_, bindparam, func, literal
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from ..contacts import valid_id
from ..db import is_postgres, session_factory
from ..errors import NotFound
from ..models import Campaign, Contact, Message, Step
from ..ratelimit import Limiter

log = logging.getLogger("herald.engine")


PENDING = ("scheduled", "queued")


# Message.priority and the queue priority handed to Hooks.enqueue_send: bulk work, and a test
# send, above it: its place in its batch (claimed first) and its queue priority when the
# reconciler queues it again.
BULK_PRIORITY = 0
TEST_PRIORITY = 10


# Messages per send task, and outcomes recorded together: once per batch, or every FLUSH_SECONDS
# when it takes longer (a batch under a slow budget). Each batch and each record costs a dozen
# statements and a commit whatever its size: 40/20 -> 80/80 took 10,000 sends from 1.22 to
# 1.05 ms of CPU each, all processes (bench/RESULTS.md). Under a budget below 320/s a batch is
# smaller anyway (BATCH_SECONDS of the budget), and a consumer killed mid-batch leaves at most
# FLUSH_SECONDS of its sends unrecorded (they become ambiguous; events settle them).
SEND_BATCH = 80


_M = Message.__table__


_C = Contact.__table__


def _not_by_index(status_col):
    """``status_col`` in a form no index matches, for a statement whose rows are given by id.

    The send path names its rows by id and re-checks their status. PostgreSQL, planning from
    statistics older than the work (a fan-out that made ``scheduled`` messages and ``active``
    enrollments most of the table; ``queued``/``sending`` thought rare), drove these statements
    from the status index instead of the primary key, through bitmap scans, which do not skip
    the index entries of dead row versions: every message passes through ``queued`` and
    ``sending``, so each claim and each record read an entry for every message sent so far
    (10,000 messages: 4 M index entries read, ~40% of the database's time). Written this way,
    the ids are the only way in, whatever the statistics say.
    """
    return status_col.op("||")(literal(""))


def _id_match(col, pg: bool, name: str = "ids"):
    """``col`` is one of the list bound as ``name``: one array parameter on PostgreSQL (the same
    statement text for any length, prepared once), an expanding IN elsewhere."""
    if pg:
        return col == any_(bindparam(name, type_=ARRAY(BigInteger)))
    return col.in_(bindparam(name, expanding=True))


@dataclass
class Hooks:
    """How the engine hands work to the queue (``tasks`` fills these in)."""

    enqueue_send: Callable[[list[int], int], None]
    wake_dispatcher: Callable[[datetime | None], None]


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def new_message_key() -> str:
    return uuid.uuid4().hex


def _random_key_sql(session: Session):
    if is_postgres(session):
        return func.replace(func.cast(func.gen_random_uuid(), Text()), "-", "")
    return func.lower(func.hex(func.randomblob(16)))


def _insert(session: Session, table):
    return (pg_insert if is_postgres(session) else sqlite_insert)(table)


def get_campaign(session: Session, workspace_id: int, campaign_id: int) -> Campaign:
    c = session.get(Campaign, campaign_id) if valid_id(campaign_id) else None
    if c is None or c.workspace_id != workspace_id:
        raise NotFound("no such campaign")
    return c


def _email_steps(campaign: Campaign) -> list[Step]:
    return [s for s in campaign.steps if s.type == "email"]


def _memo(limiter: Limiter, name: str) -> dict:
    """A dict kept with the limiter, this process only (forgotten with it)."""
    return limiter.local.setdefault(name, {})


def _read_session() -> Session:
    """A session for reads that takes no lock (SQLite: no BEGIN IMMEDIATE), so it may run while
    the caller's own transaction holds the write lock."""
    engine = session_factory().kw["bind"]
    return Session(engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False)


def _epoch(naive_utc: datetime) -> float:

    return naive_utc.replace(tzinfo=UTC).timestamp()
