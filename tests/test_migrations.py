"""Migrations that move data, run on a throw-away database of the test backend."""

from __future__ import annotations

import uuid
from datetime import date, datetime

import pytest
from alembic import command
from sqlalchemy import JSON, Boolean, Date, DateTime, Float, Integer, MetaData, Numeric, String, text

from campaigns.db import get_engine
from campaigns.migrate import alembic_config
from tests.conftest import BACKEND, INSTANCE, PG_ADMIN_URL, _admin_execute


@pytest.fixture
def scratch_url():
    if BACKEND == "postgres":
        name = f"herald_migration_{uuid.uuid4().hex[:8]}"
        _admin_execute(f'CREATE DATABASE "{name}"')
        url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
        yield url
        get_engine(url).dispose()
        _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    else:
        url = f"sqlite:///{INSTANCE / f'migration-{uuid.uuid4().hex[:8]}.db'}"
        yield url
        get_engine(url).dispose()


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
    with engine.connect() as conn:
        return {name: conn.execute(text(f"SELECT count(*) FROM {name}")).scalar() for name in tables}


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
