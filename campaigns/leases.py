"""Leases held in the database: a recurring job never overlaps itself, across consumers.

Redis 7.0 (as Debian ships it) has no per-field lock TTLs and Huey's task locks never expire,
so a consumer killed while holding one would block the job forever. A lease here expires on
its own (``expires_at``); the holder renews it while it works.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import or_, update
from sqlalchemy.exc import IntegrityError

from .db import utcnow
from .models import JobLock


def acquire(session_factory, name: str, owner: str, ttl: float) -> bool:
    """Take (or renew) the lease ``name`` for ``ttl`` seconds; False when someone else holds it."""
    now = utcnow()
    with session_factory() as s, s.begin():
        got = s.execute(
            update(JobLock)
            .where(JobLock.name == name, or_(JobLock.owner.is_(None), JobLock.expires_at < now, JobLock.owner == owner))
            .values(owner=owner, expires_at=now + timedelta(seconds=ttl), last_run_at=now, rerun=False)
        ).rowcount
        if got:
            return True
    try:
        with session_factory() as s, s.begin():
            if s.get(JobLock, name) is None:
                s.add(JobLock(name=name, owner=owner, expires_at=now + timedelta(seconds=ttl), last_run_at=now))
                return True
    except IntegrityError:
        pass
    return False


def request_rerun(session_factory, name: str) -> bool:
    """Ask the current holder to run once more; False when nobody holds the lease."""
    with session_factory() as s, s.begin():
        return bool(
            s.execute(
                update(JobLock)
                .where(JobLock.name == name, JobLock.owner.is_not(None), JobLock.expires_at >= utcnow())
                .values(rerun=True)
            ).rowcount
        )


def release(session_factory, name: str, owner: str) -> bool:
    """Let go unless a rerun was requested meanwhile; True when released (False: run again)."""
    with session_factory() as s, s.begin():
        done = s.execute(
            update(JobLock)
            .where(JobLock.name == name, JobLock.owner == owner, JobLock.rerun.is_(False))
            .values(owner=None, expires_at=None)
        ).rowcount
        if done:
            return True
        still_mine = s.execute(
            update(JobLock).where(JobLock.name == name, JobLock.owner == owner).values(rerun=False)
        ).rowcount
        return not still_mine
