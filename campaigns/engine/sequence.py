"""Sequences after a send: each sent message's next email (after its waits) or the end of its
sequence; the per-process caches of launched campaigns' steps and sequence plans."""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import lru_cache

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from ..db import is_postgres
from ..models import Campaign, Contact, Enrollment, Message, Step
from .common import _M, BULK_PRIORITY, _id_match, _insert, _not_by_index, new_message_key


def _first_email(campaign: Campaign) -> tuple[Step | None, int]:
    """The first email step and the seconds of waiting before it."""
    wait = 0
    for s in campaign.steps:
        if s.type == "wait":
            wait += s.wait_seconds or 0
        elif s.type == "email":
            return s, wait
    return None, wait


def _next_email(steps: list[Step], after_position: int) -> tuple[Step | None, int]:
    """The next email step after a position, and the seconds of waiting before it."""
    wait = 0
    for s in steps:
        if s.position <= after_position:
            continue
        if s.type == "wait":
            wait += s.wait_seconds or 0
        elif s.type == "email":
            return s, wait
    return None, wait


@lru_cache(maxsize=4)
def _complete_enrollments_stmt(pg: bool):
    e = Enrollment.__table__
    return (update(e).where(_id_match(e.c.id, pg), _not_by_index(e.c.status) == "active")
            .values(status="completed", finished_at=bindparam("now")))


_ADVANCE_COLUMNS = (_M.c.id, _M.c.enrollment_id, _M.c.campaign_id, _M.c.step_id, _M.c.workspace_id,
                    _M.c.contact_id, _M.c.email, _M.c.sent_at)


def _advance(s: Session, message_ids: list[int], now: datetime) -> datetime | None:
    """After sends: schedule each active sequence's next email (after its waits), or complete it."""
    rows = s.execute(
        select(*_ADVANCE_COLUMNS)
        .join(Enrollment, Enrollment.id == _M.c.enrollment_id)
        .where(_M.c.id.in_(message_ids), Enrollment.status == "active")
    ).all()
    return _advance_rows(s, rows, now, active_checked=True)


def _advance_rows(s: Session, rows: list, now: datetime, active_checked: bool) -> datetime | None:
    """Schedule the next email of each of these sent messages' sequences, or complete it.

    ``active_checked``: the rows' enrollments are known to be active; else only active ones
    advance (one query, only when some sequence has a next email).
    """
    if not rows:
        return None
    plans = {cid: _sequence_plan(s, cid) for cid in {r.campaign_id for r in rows}}
    steps = [(r, plans[r.campaign_id].get(r.step_id, (None, 0, 5))) for r in rows]
    active = None
    if not active_checked and any(p[0] is not None for _, p in steps):
        active = set(s.scalars(select(Enrollment.id).where(
            Enrollment.id.in_(sorted({r.enrollment_id for r, p in steps if p[0] is not None})),
            Enrollment.status == "active")))
    # The next email goes to the contact's address now (corrected since the last one was sent?).
    moving = sorted({r.contact_id for r, p in steps if p[0] is not None and r.contact_id is not None})
    emails = dict(s.execute(select(Contact.id, Contact.email).where(Contact.id.in_(moving))).all()) if moving else {}
    new_rows, completed = [], []
    earliest: datetime | None = None
    for r, (nxt_id, wait, max_attempts) in steps:
        if nxt_id is None:
            completed.append(r.enrollment_id)
            continue
        if active is not None and r.enrollment_id not in active:
            continue
        due = (r.sent_at or now) + timedelta(seconds=wait)
        earliest = due if earliest is None else min(earliest, due)
        new_rows.append(dict(
            workspace_id=r.workspace_id, campaign_id=r.campaign_id, enrollment_id=r.enrollment_id, step_id=nxt_id,
            contact_id=r.contact_id, email=emails.get(r.contact_id, r.email), message_key=new_message_key(),
            status="scheduled", due_at=due,
            max_attempts=max_attempts, created_at=now, updated_at=now, attempts=0, resends=0,
            priority=BULK_PRIORITY, is_test=False,
        ))
    if new_rows:
        s.execute(_insert(s, Message.__table__).on_conflict_do_nothing(), new_rows)
    if completed:
        done = s.connection().execute(_complete_enrollments_stmt(is_postgres(s)),
                                      {"ids": completed, "now": now}).rowcount
        if done:
            s.info["herald_completed"] = True
    return earliest


# Per-process caches of what cannot change once a campaign is launched (its steps, its
# sequence plan), bounded, forgotten by clear_caches(); the ledger stays the only truth.
_plans: dict[int, dict[int, tuple[int | None, int, int]]] = {}
_steps: dict[int, Step] = {}


def clear_caches() -> None:
    """Forget cached sequence plans and steps (ids are never reused in production; tests reset them)."""
    _plans.clear()
    _steps.clear()


def _steps_of(s: Session, claimed: list, campaigns: dict[int, Campaign]) -> dict[int, Step]:
    """The claimed messages' steps. A launched campaign's steps never change (only a draft can be
    edited), so they are kept per process, detached; a draft's (test sends) are read each time."""
    wanted = {r.step_id for r in claimed if r.step_id is not None}
    found = {i: _steps[i] for i in wanted if i in _steps}
    missing = sorted(wanted - found.keys())
    if missing:
        for st in s.scalars(select(Step).where(Step.id.in_(missing))):
            found[st.id] = st
            c = campaigns.get(st.campaign_id)
            if c is not None and c.status != "draft":
                if len(_steps) > 5000:
                    _steps.clear()
                _steps[st.id] = st
    return found


def _sequence_plan(s: Session, campaign_id: int) -> dict[int, tuple[int | None, int, int]]:
    """{email step id: (next email step id or None, seconds of waiting before it, max attempts)}.

    Steps cannot change once a campaign has left the draft state, so the plan is cached.
    """
    plan = _plans.get(campaign_id)
    if plan is None:
        steps = s.scalars(select(Step).where(Step.campaign_id == campaign_id).order_by(Step.position)).all()
        max_attempts = s.scalar(select(Campaign.max_attempts).where(Campaign.id == campaign_id)) or 5
        plan = {}
        for st in steps:
            if st.type == "email":
                nxt, wait = _next_email(steps, st.position)
                plan[st.id] = (nxt.id if nxt else None, wait, max_attempts)
        if len(_plans) > 1000:
            _plans.clear()
        _plans[campaign_id] = plan
    return plan
