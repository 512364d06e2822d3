"""Named running totals in the ``counters`` table (the ``metrics:`` ones /metrics reports),
added to in the caller's transaction, so a count moves with the change it counts."""

from __future__ import annotations

from sqlalchemy.orm import Session

from .db import dialect_insert
from .models import Counter

METRICS = "metrics:"


def add_totals(s: Session, values: dict[str, int]) -> None:
    """Add to the ``metrics:`` totals, in the caller's transaction."""
    rows = [{"name": METRICS + k, "value": int(v)} for k, v in sorted(values.items()) if v]
    if rows:
        stmt = dialect_insert(s)(Counter)
        s.execute(stmt.on_conflict_do_update(index_elements=["name"],
                                             set_={"value": Counter.__table__.c.value + stmt.excluded.value}), rows)
