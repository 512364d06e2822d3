"""The SQL rate-limit store: the same arithmetic in one short write transaction per take."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from sqlalchemy import and_, delete, or_, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from ..models import Counter, RateLimitState
from .base import Limiter
from .rules import BUCKET_SECONDS, Capacity, Grant, Rule, _capacities, _plan

_SEP = "#"  # window buckets are rows "<key>#<bucket index>"


class SqlLimiter(Limiter):
    """The same arithmetic in the database (the embedded default: SQLite, BEGIN IMMEDIATE).

    A take is one short write transaction of three statements (lock, read, upsert): on SQLite
    the write lock (BEGIN IMMEDIATE) serialises takes across processes; on PostgreSQL each rule
    is locked with an advisory transaction lock (taken in one statement, in a fixed order), which
    also covers a rule's rows before the first exists, so two first takes cannot both pass.
    """

    def __init__(self, session_factory, clock: Callable[[], float] | None = None):
        self.session_factory = session_factory
        self.clock = clock
        self.local = {}

    def _now(self) -> float:
        return self.clock() if self.clock else time.time()

    @staticmethod
    def _pg(s: Session) -> bool:
        return s.get_bind().dialect.name == "postgresql"

    def _lock(self, s: Session, rules: list[Rule]) -> None:
        if self._pg(s):
            s.execute(text(
                "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtext('herald:rl:' || k) AS h "
                "FROM unnest(CAST(:keys AS text[])) AS k ORDER BY 1) AS locks"
            ), {"keys": sorted({r.key for r in rules})})

    def _load(self, s: Session, rules: list[Rule]) -> tuple[dict, dict]:
        """Every rule's state and hold, in one query (window buckets by key range)."""
        key = RateLimitState.key
        plain = [r.key for r in rules if r.kind not in ("window", "gate")] + [r.key + ":hold" for r in rules]
        ranges = [(r.key + _SEP, r.key + chr(ord(_SEP) + 1)) for r in rules if r.kind == "window"]
        where = or_(key.in_(plain), *(and_(key >= lo, key < hi) for lo, hi in ranges))
        values = dict(s.execute(select(RateLimitState.key, RateLimitState.value).where(where)).all())
        states: dict = {}
        for r in rules:
            if r.kind == "window":
                lo = r.key + _SEP
                states[r.key] = {int(k[len(lo):]): v for k, v in values.items() if k.startswith(lo)}
            else:
                states[r.key] = values.get(r.key, 0.0)
        holds = {r.key: values.get(r.key + ":hold", 0.0) for r in rules}
        return states, holds

    def _store(self, s: Session, values: dict[str, float]) -> None:
        """One upsert for every changed row."""
        if not values:
            return
        insert = pg_insert if self._pg(s) else sqlite_insert
        stmt = insert(RateLimitState)
        s.execute(stmt.on_conflict_do_update(index_elements=["key"], set_={"value": stmt.excluded.value}),
                  [{"key": k, "value": v} for k, v in values.items()])

    def _store_states(self, s: Session, rules: list[Rule], old: dict, new: dict) -> None:
        flat: dict[str, float] = {}
        for r in rules:
            if r.key not in new:
                continue
            if r.kind == "window":
                gone = [b for b in old.get(r.key, {}) if b not in new[r.key]]
                if gone:
                    s.execute(delete(RateLimitState).where(
                        RateLimitState.key.in_([f"{r.key}{_SEP}{b:012d}" for b in gone])))
                for b, v in new[r.key].items():
                    if old.get(r.key, {}).get(b) != v:
                        flat[f"{r.key}{_SEP}{b:012d}"] = v
            else:
                flat[r.key] = new[r.key]
        self._store(s, flat)

    def take(self, rules: list[Rule], n: int = 1, watch: str | None = None) -> Grant:
        if n <= 0 or not rules:
            return Grant(max(n, 0), 0.0)
        with self.session_factory() as s, s.begin():
            self._lock(s, rules)
            states, holds = self._load(s, rules)
            k, wait, blocker, new = _plan(rules, states, holds, n, self._now())
            if k:
                self._store_states(s, rules, states, new)
        return Grant(k, wait, blocker)

    def _reader(self) -> Session:
        """A session that takes no lock (SQLite: no BEGIN IMMEDIATE for a read)."""
        engine = self.session_factory.kw["bind"]
        return Session(engine.execution_options(isolation_level="AUTOCOMMIT"))

    def peek(self, rules: list[Rule], horizon: float = 0.0) -> list[Capacity]:
        if not rules:
            return []
        with self._reader() as s:
            states, holds = self._load(s, rules)
        return _capacities(rules, states, holds, self._now(), horizon)

    def give_back(self, rules: list[Rule], n: int) -> None:
        if n <= 0 or not rules:
            return
        now = self._now()
        with self.session_factory() as s, s.begin():
            self._lock(s, rules)
            states, _ = self._load(s, rules)
            new = {}
            for r in rules:
                if r.kind == "gcra" and states[r.key]:
                    new[r.key] = max(now, states[r.key] - n * r.interval)
                elif r.kind == "window":
                    buckets = dict(states[r.key])
                    cur = math.floor(now / BUCKET_SECONDS)
                    if buckets.get(cur):
                        buckets[cur] = max(0.0, buckets[cur] - n)
                        new[r.key] = buckets
            self._store_states(s, rules, states, new)

    def hold(self, key: str, until: float) -> None:
        with self.session_factory() as s, s.begin():
            self._lock(s, [Rule(key=key + ":hold", kind="gap")])
            row = s.get(RateLimitState, key + ":hold")
            self._store(s, {key + ":hold": max(row.value if row else 0.0, until)})

    def release(self, key: str) -> None:
        with self.session_factory() as s, s.begin():
            s.execute(delete(RateLimitState).where(RateLimitState.key == key + ":hold"))

    def mark(self, key: str, value: float) -> float:
        k = "mark:" + key
        with self.session_factory() as s, s.begin():
            self._lock(s, [Rule(key=k, kind="gap")])
            row = s.get(RateLimitState, k)
            if row is not None:
                return row.value
            s.add(RateLimitState(key=k, value=value))
            return value

    def read_mark(self, key: str) -> float | None:
        with self._reader() as s:
            row = s.get(RateLimitState, "mark:" + key)
            return None if row is None else row.value

    def incr(self, name: str, by: int = 1) -> None:
        with self.session_factory() as s, s.begin():
            self._lock(s, [Rule(key="counter:" + name, kind="gap")])
            row = s.get(Counter, name, with_for_update=self._pg(s))
            if row is None:
                s.add(Counter(name=name, value=by))
            else:
                row.value += by

    def counters(self, prefix: str = "") -> dict[str, int]:
        with self._reader() as s:
            return {c.name: c.value for c in s.scalars(select(Counter).where(Counter.name.startswith(prefix)))}
