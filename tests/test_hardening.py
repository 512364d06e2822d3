"""Issue 18's hardening: files under instance/ readable by their owner only, security headers."""

from __future__ import annotations

import os
import stat

import pytest
from sqlalchemy import text

from campaigns import config
from campaigns.db import make_engine, private_file

# --------------------------------------------------------------------------- instance/ files are 0600


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)  # the usual umask, which made herald.db 0644
    yield
    os.umask(old)


def test_the_sqlite_database_and_its_wal_and_shm_are_created_0600(tmp_path, umask_022):
    engine = make_engine(f"sqlite:///{tmp_path / 'herald.db'}")
    try:
        with engine.begin() as conn:
            conn.execute(text("create table t (x integer)"))
            conn.execute(text("insert into t values (1)"))
        with engine.connect() as conn:  # the WAL and its index exist while a connection is open
            assert conn.execute(text("select x from t")).scalar() == 1
            names = sorted(p.name for p in tmp_path.iterdir())
            assert names == ["herald.db", "herald.db-shm", "herald.db-wal"]
            assert {name: mode(tmp_path / name) for name in names} == dict.fromkeys(names, 0o600)
    finally:
        engine.dispose()


def test_an_older_install_s_0644_files_are_made_0600(tmp_path, umask_022):
    for name in ("herald.db", "herald.db-wal", "herald.db-shm"):
        (tmp_path / name).touch()
        os.chmod(tmp_path / name, 0o644)
    private_file(tmp_path / "herald.db")
    assert [mode(tmp_path / n) for n in ("herald.db", "herald.db-wal", "herald.db-shm")] == [0o600] * 3


def test_the_sqlite_queue_and_the_secret_key_are_0600(tmp_path, umask_022):
    from tasks import LazySqliteStorage

    storage = LazySqliteStorage("q", filename=str(tmp_path / "huey.db"))
    storage.enqueue(b"task")
    assert storage.queue_size() == 1
    assert mode(tmp_path / "huey.db") == 0o600
    assert all(mode(p) == 0o600 for p in tmp_path.glob("huey.db-*"))
    config.load_settings({"HERALD_INSTANCE_DIR": str(tmp_path)})
    assert mode(tmp_path / "secret_key") == 0o600
