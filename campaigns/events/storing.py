"""Storing parsed events: deduplicated, mapped to their messages, in one statement a batch."""

from __future__ import annotations

import json

from sqlalchemy import select, text
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session

from ..db import is_postgres, one_of
from ..models import Event, Message
from .parsing import provider_id_of


def _match(session: Session, keys: set[str], provider_ids: set[str]) -> tuple[dict, dict]:
    """({message_key: (id, workspace_id)}, {provider_message_id: (id, workspace_id, message_key)})."""
    by_key: dict[str, tuple[int, int]] = {}
    by_provider: dict[str, tuple[int, int, str]] = {}
    if keys:
        for mid, ws, key in session.execute(
            select(Message.id, Message.workspace_id, Message.message_key).where(
                one_of(session, Message.message_key, sorted(keys))
            )
        ):
            by_key[key] = (mid, ws)
    if provider_ids:
        for mid, ws, key, pid in session.execute(
            select(Message.id, Message.workspace_id, Message.message_key, Message.provider_message_id)
            .where(one_of(session, Message.provider_message_id, sorted(provider_ids)))
            .order_by(Message.id)
        ):
            by_provider.setdefault(pid, (mid, ws, key))
    return by_key, by_provider


def map_rows(session: Session, rows: list[dict]) -> int:
    """Fill ``message_id``/``workspace_id`` (and ``message_key``) of rows; returns how many matched."""
    keys = {r["message_key"] for r in rows if r["message_key"]}
    by_key, _ = _match(session, keys, set())
    rest = []
    for r in rows:
        hit = by_key.get(r["message_key"]) if r["message_key"] else None
        if hit:
            r["message_id"], r["workspace_id"] = hit
        else:
            rest.append(r)
    pids = {p for p in (provider_id_of(r["sg_message_id"]) for r in rest) if p}
    if pids:
        _, by_provider = _match(session, set(), pids)
        for r in rest:
            hit = by_provider.get(provider_id_of(r["sg_message_id"]) or "")
            if hit:
                r["message_id"], r["workspace_id"], key = hit
                r["message_key"] = r["message_key"] or key
    return sum(1 for r in rows if r["message_id"])


# PostgreSQL: one statement maps and inserts the whole batch. The rows' columns travel as one JSON
# array of arrays (cheaper to send and split than one array parameter per column); messages are
# found by message_key, else by the X-Message-Id prefix of sg_message_id.
_PG_INSERT_SQL = """
    INSERT INTO events (workspace_id, message_id, message_key, dedupe_key, sg_event_id, sg_message_id,
                        event, email, "timestamp", url, payload, received_at)
    SELECT COALESCE(m.workspace_id, m2.workspace_id), COALESCE(m.id, m2.id), COALESCE(e.message_key, m2.message_key),
           e.dedupe_key, e.sg_event_id, e.sg_message_id, e.event, e.email, e.ts, e.url, {payload}, :received_at
    FROM (
        SELECT r.n, r.x->>0 AS message_key, r.x->>1 AS dedupe_key, r.x->>2 AS sg_event_id,
               r.x->>3 AS sg_message_id, r.x->>4 AS event, r.x->>5 AS email, CAST(r.x->>6 AS timestamp) AS ts,
               r.x->>7 AS url, r.x->8 AS payload
        FROM json_array_elements(CAST(:rows AS json)) WITH ORDINALITY AS r(x, n)
    ) e
    {join}
    LEFT JOIN messages m ON m.message_key = e.message_key
    LEFT JOIN LATERAL (
        SELECT x.id, x.workspace_id, x.message_key FROM messages x
        WHERE m.id IS NULL AND x.provider_message_id = split_part(e.sg_message_id, '.', 1)
        ORDER BY x.id LIMIT 1
    ) m2 ON true
    ORDER BY e.n
    ON CONFLICT DO NOTHING
"""
# The payloads are the elements of the body itself, split by PostgreSQL's JSON parser, rather
# than sent a second time.
_PG_INSERT_FROM_BODY = text(_PG_INSERT_SQL.format(
    payload="p.payload",
    join="JOIN json_array_elements(CAST(:body AS json)) WITH ORDINALITY AS p(payload, n) ON p.n = e.n"))
_PG_INSERT = text(_PG_INSERT_SQL.format(payload="e.payload", join=""))


def _body_text(body: bytes | None) -> str | None:
    """The body as text PostgreSQL's json type reads exactly as Python did, or None."""
    if not body or body.startswith(b"\xef\xbb\xbf"):
        return None
    try:
        return body.decode("utf-8")  # strict: Python's own parse allowed surrogates and other encodings
    except UnicodeDecodeError:
        return None


def insert_rows(session: Session, rows: list[dict], body: bytes | None = None) -> int:
    """One bulk INSERT ... ON CONFLICT DO NOTHING; returns how many rows were new.

    On PostgreSQL the statement also maps each row to its message. On SQLite the rows must be
    mapped already (:func:`map_rows`). ``body``, when given, is the raw JSON array the rows were
    parsed from (same order): PostgreSQL then takes the payloads from it directly.
    """
    if not rows:
        return 0
    if is_postgres(session):
        text_body = _body_text(body)
        data = [
            [r["message_key"], r["dedupe_key"], r["sg_event_id"], r["sg_message_id"], r["event"], r["email"],
             r["timestamp"].isoformat() if r["timestamp"] else None, r["url"]]
            + ([] if text_body is not None else [r["payload"]])
            for r in rows
        ]
        # ensure_ascii: every string an escape PostgreSQL decodes (the columns are cleaned of NUL
        # and lone surrogates; a payload may hold them, and json keeps them as written).
        params = {"received_at": rows[0]["received_at"], "rows": json.dumps(data, separators=(",", ":"))}
        if text_body is not None:
            params["body"] = text_body
            return session.execute(_PG_INSERT_FROM_BODY, params).rowcount or 0
        return session.execute(_PG_INSERT, params).rowcount or 0
    stmt = sqlite.insert(Event.__table__).on_conflict_do_nothing()
    before = session.execute(text("SELECT total_changes()")).scalar_one()
    session.execute(stmt, rows)
    return session.execute(text("SELECT total_changes()")).scalar_one() - before


def store_batch(session: Session, rows: list[dict], body: bytes | None = None) -> int:
    """Map the rows to messages and insert them (deduplicated), in one statement on PostgreSQL.
    The caller commits. ``body``: the raw JSON array the rows came from, if at hand and only when
    its elements are the rows one for one (none skipped by :func:`parse_batch`)."""
    if not rows:
        return 0
    if not is_postgres(session):
        map_rows(session, rows)
    return insert_rows(session, rows, body)
