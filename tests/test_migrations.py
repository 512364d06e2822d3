"""Migrations that move data, run on a throw-away database of the test backend."""

from __future__ import annotations

import uuid
from datetime import date, datetime

import pytest
from alembic import command
from sqlalchemy import JSON, Boolean, Date, DateTime, Float, Integer, MetaData, Numeric, String, text

from campaigns.db import get_engine
from campaigns.migrate import alembic_config
from tests.helpers import BACKEND, PG_ADMIN_URL, admin_execute, instance_dir


@pytest.fixture
def scratch_url():
    if BACKEND == "postgres":
        name = f"herald_migration_{uuid.uuid4().hex[:8]}"
        admin_execute(f'CREATE DATABASE "{name}"')
        url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
        yield url
        get_engine(url).dispose()
        admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    else:
        url = f"sqlite:///{instance_dir() / f'migration-{uuid.uuid4().hex[:8]}.db'}"
        yield url
        get_engine(url).dispose()


ROWS = """
INSERT INTO workspaces (id, name, created_at) VALUES (1, 'w', '2026-01-01');
INSERT INTO campaigns (id, workspace_id, name, from_email, limits, stop_on, tracking, status, created_at, updated_at)
  VALUES (1, 1, 'c', 'a@example.com', '{}', '[]', '{}', 'running', '2026-01-01', '2026-01-01');
INSERT INTO steps (id, workspace_id, campaign_id, position, type) VALUES (1, 1, 1, 0, 'email');
INSERT INTO messages (id, workspace_id, campaign_id, step_id, email, message_key, status, due_at, failed_at,
                      created_at, updated_at) VALUES
  (1, 1, 1, 1, 'refused-then-replayed@example.com', 'k1', 'sent', '2026-01-01', NULL, '2026-01-01', '2026-01-01'),
  (2, 1, 1, 1, 'dead-now@example.com', 'k2', 'failed', '2026-01-01', '2026-01-02 10:00', '2026-01-01', '2026-01-01'),
  (3, 1, 1, 1, 'retried-then-sent@example.com', 'k3', 'sent', '2026-01-01', NULL, '2026-01-01', '2026-01-01');
INSERT INTO message_attempts (workspace_id, campaign_id, message_id, number, started_at, finished_at, duration_ms,
                              outcome) VALUES
  (1, 1, 1, 1, '2026-01-02 09:00', '2026-01-02 09:00:01', 1000, 'failed'),
  (1, 1, 1, 1, '2026-01-03 09:00', '2026-01-03 09:00:01', 1000, 'sent'),
  (1, 1, 2, 1, '2026-01-02 10:00', '2026-01-02 10:00:00', 5, 'failed'),
  (1, 1, 3, 1, '2026-01-02 11:00', '2026-01-02 11:00:01', 1000, 'retry'),
  (1, 1, 3, 2, '2026-01-02 11:05', '2026-01-02 11:05:01', 1000, 'sent');
"""


def test_0006_gives_replayed_dead_letters_their_failed_at_back_and_counts_deleted_ones(scratch_url):
    cfg = alembic_config(scratch_url)
    command.upgrade(cfg, "0005")
    engine = get_engine(scratch_url)
    with engine.begin() as conn:
        for statement in filter(str.strip, ROWS.split(";")):
            conn.execute(text(statement))
    command.upgrade(cfg, "0006")
    with engine.connect() as conn:
        failed_at = dict(conn.execute(text("SELECT id, failed_at FROM messages ORDER BY id")).all())
        deleted = conn.execute(text("SELECT failed_deleted FROM steps")).scalar()
    # the replayed one gets the time of its refusal back; a current dead letter keeps its own;
    # retries that ended in a send were never a dead letter
    assert str(failed_at[1]).startswith("2026-01-02 09:00:01")
    assert str(failed_at[2]).startswith("2026-01-02 10:00")
    assert failed_at[3] is None
    assert deleted == 0

    command.downgrade(cfg, "0005")
    with engine.connect() as conn:
        failed_at = dict(conn.execute(text("SELECT id, failed_at FROM messages ORDER BY id")).all())
        columns = conn.execute(text("SELECT * FROM steps")).keys()
    assert failed_at[1] is None and failed_at[2] is not None and "failed_deleted" not in columns


def _one_row_everywhere(engine) -> list[str]:
    """One row in every table (foreign keys all pointing at rows with id 1), every required
    column filled by its type; returns the tables."""
    meta = MetaData()
    meta.reflect(engine)
    samples = [(Boolean, False), (DateTime, datetime(2026, 1, 1)), (Date, date(2026, 1, 1)), (Integer, 1),
               (Float, 1.0), (Numeric, 1), (JSON, {}), (String, "x")]
    tables = [t for t in meta.sorted_tables if t.name != "alembic_version"]
    with engine.begin() as conn:
        for table in tables:
            row = {}
            for col in table.columns:
                if col.foreign_keys or col.name == "id":
                    row[col.name] = 1
                elif not col.nullable and col.server_default is None:
                    row[col.name] = next(v for kind, v in samples if isinstance(col.type, kind))
            conn.execute(table.insert().values(**row))
    return [t.name for t in tables]


def _counts(engine, tables) -> dict[str, int]:
    """Rows per table; ``counters`` without the metrics totals that 0009 adds (and drops going down)."""
    where = {"counters": " WHERE name NOT LIKE 'metrics:%'"}
    with engine.connect() as conn:
        return {name: conn.execute(text(f"SELECT count(*) FROM {name}{where.get(name, '')}")).scalar()
                for name in tables}


def test_0009_rolls_up_the_attempts_and_keeps_them_when_their_message_goes(scratch_url):
    cfg = alembic_config(scratch_url)
    command.upgrade(cfg, "0008")
    engine = get_engine(scratch_url)
    with engine.begin() as conn:
        for statement in filter(str.strip, ROWS.split(";")):
            conn.execute(text(statement))
        conn.execute(text("UPDATE messages SET resends = 2 WHERE id = 3"))
    command.upgrade(cfg, "0009")
    with engine.connect() as conn:
        totals = dict(conn.execute(text("SELECT name, value FROM counters WHERE name LIKE 'metrics:%'")).all())
    assert totals["metrics:attempts:failed"] == 2 and totals["metrics:attempts:sent"] == 2
    assert totals["metrics:attempts:retry"] == 1 and totals["metrics:retries"] == 1
    assert totals["metrics:duration_count"] == 5 and totals["metrics:duration_sum_us"] == 4_005_000
    assert totals["metrics:duration_le:5"] == 1 and totals["metrics:duration_le:1000"] == 5
    assert totals["metrics:attempts_upto"] == 5 and totals["metrics:ambiguous_resends"] == 2
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM messages WHERE id = 2"))
        conn.execute(text("DELETE FROM campaigns WHERE id = 1"))
    with engine.connect() as conn:
        kept = conn.execute(text("SELECT count(*) FROM message_attempts WHERE message_id IS NULL"
                                 " AND campaign_id IS NULL")).scalar()
    assert kept == 5  # the deleted message's attempt and the deleted campaign's: all kept

    command.downgrade(cfg, "0008")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM counters WHERE name LIKE 'metrics:%'")).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM message_attempts")).scalar() == 0  # orphans dropped


def test_every_row_survives_each_migration_up_and_down(scratch_url):
    """On SQLite, a migration that rebuilds a table (batch mode: copy, DROP, rename) with foreign
    keys enforced deleted every row referencing it through ON DELETE CASCADE: 0005 rebuilt
    ``workspaces`` and emptied every other table."""
    cfg = alembic_config(scratch_url)
    command.upgrade(cfg, "0001")
    engine = get_engine(scratch_url)
    tables = _one_row_everywhere(engine)
    assert len(tables) >= 15 and set(_counts(engine, tables).values()) == {1}
    command.upgrade(cfg, "head")
    assert _counts(engine, tables) == dict.fromkeys(tables, 1)
    command.downgrade(cfg, "0001")
    assert _counts(engine, tables) == dict.fromkeys(tables, 1)
    command.upgrade(cfg, "head")
    assert _counts(engine, tables) == dict.fromkeys(tables, 1)
    if BACKEND == "sqlite":
        with engine.connect() as conn:  # the pooled connections enforce foreign keys again
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
