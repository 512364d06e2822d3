"""UI pages: the message log and each message's details, dead letters (replay, delete), queue health.
The development outbox is in ``web/outbox.py``."""

from __future__ import annotations

import json
import logging

from flask import flash, g, redirect, render_template, request, url_for
from sqlalchemy import func, select

from campaigns import contacts, engine, queue_health
from campaigns.errors import NotFound
from campaigns.models import Campaign, Contact, Event, Message, MessageAttempt, Step
from tasks import huey

from ..auth import login_required
from ..db import get_db
from ..params import int_arg, keyset_page, valid_id
from .blueprint import bp, form_action, safe_next

log = logging.getLogger(__name__)
MESSAGE_STATUSES = ("scheduled", "queued", "sending", "sent", "delivered", "bounced", "dropped", "ambiguous",
                    "failed", "cancelled")


def _campaign_options(db) -> list[tuple[int, str]]:
    return db.execute(select(Campaign.id, Campaign.name).where(Campaign.workspace_id == g.workspace_id)
                      .order_by(Campaign.id.desc())).all()


def _labels(db, rows: list[Message]) -> tuple[dict, dict]:
    """Campaign names and step labels for the messages shown."""
    campaign_ids = {m.campaign_id for m in rows}
    step_ids = {m.step_id for m in rows}
    names = dict(db.execute(select(Campaign.id, Campaign.name).where(Campaign.id.in_(campaign_ids))).all()) \
        if campaign_ids else {}
    steps = {s.id: s for s in db.scalars(select(Step).where(Step.id.in_(step_ids)))} if step_ids else {}
    return names, steps


# --------------------------------------------------------------------------- message log


@bp.get("/messages")
@login_required
def messages_page():
    db = get_db()
    campaign_id = int_arg("campaign_id", strict=False)
    step_id = int_arg("step_id", strict=False)
    status = request.args.get("status") or ""
    email = (request.args.get("email") or "").strip().lower()
    stmt = select(Message).where(Message.workspace_id == g.workspace_id)
    if campaign_id is not None:
        stmt = stmt.where(Message.campaign_id == campaign_id)
    if step_id is not None:
        stmt = stmt.where(Message.step_id == step_id)
    if status in MESSAGE_STATUSES:
        stmt = stmt.where(Message.status == status)
    bad_email = bool(email and contacts.text_problem(email))
    if email and not bad_email:
        stmt = stmt.where(Message.email.contains(email, autoescape=True))
    rows, next_before = ([], None) if bad_email else keyset_page(db, stmt, Message)
    names, steps = _labels(db, rows)
    step_options = []
    if campaign_id is not None:
        step_options = list(db.scalars(select(Step).where(Step.campaign_id == campaign_id,
                                                          Step.workspace_id == g.workspace_id,
                                                          Step.type == "email").order_by(Step.position)))
    return render_template("messages.html", rows=rows, next_before=next_before, names=names, steps=steps,
                           campaign_options=_campaign_options(db), step_options=step_options,
                           statuses=MESSAGE_STATUSES, campaign_id=campaign_id, step_id=step_id, status=status,
                           email=email)


def _message(message_id: int) -> Message:
    m = get_db().get(Message, message_id) if valid_id(message_id) else None
    if m is None or m.workspace_id != g.workspace_id:
        raise NotFound(f"There is no message {message_id} in this workspace.")
    return m


def _pretty(raw: str | None) -> str | None:
    if not raw:
        return raw
    try:
        return json.dumps(json.loads(raw), indent=2, sort_keys=True)
    except (ValueError, TypeError):
        return raw


@bp.get("/messages/<int:message_id>")
@login_required
def message_page(message_id: int):
    db = get_db()
    m = _message(message_id)
    attempts = list(db.scalars(select(MessageAttempt).where(MessageAttempt.message_id == m.id)
                               .order_by(MessageAttempt.id)))
    events = list(db.scalars(select(Event).where(Event.message_id == m.id).order_by(Event.id)))
    campaign = db.get(Campaign, m.campaign_id)
    step = db.get(Step, m.step_id) if m.step_id is not None else None
    contact = db.get(Contact, m.contact_id) if m.contact_id else None
    return render_template("message.html", m=m, attempts=attempts, events=events, campaign=campaign, step=step,
                           contact=contact, last_response=_pretty(m.last_response))


@bp.post("/messages/<int:message_id>/replay")
@login_required
@form_action(lambda message_id: url_for("ui.message_page", message_id=message_id), "Not replayed: ", form_back=True)
def message_replay(message_id: int):
    db = get_db()
    m = engine.replay_message(db, g.workspace_id, _message(message_id).id)
    db.commit()  # queues the test send again, or wakes the dispatcher
    flash(f"Message to {m.email} queued again (same message key).", "success")
    return redirect(safe_next(request.form.get("back"), url_for("ui.message_page", message_id=m.id))), 303


# --------------------------------------------------------------------------- dead letters


@bp.get("/dead-letters")
@login_required
def dead_letters_page():
    db = get_db()
    campaign_id = int_arg("campaign_id", strict=False)
    stmt = select(Message).where(Message.workspace_id == g.workspace_id, Message.status == "failed")
    if campaign_id is not None:
        stmt = stmt.where(Message.campaign_id == campaign_id)
    rows, next_before = keyset_page(db, stmt, Message)
    names, steps = _labels(db, rows)
    by_campaign = db.execute(
        select(Campaign.id, Campaign.name, func.count(Message.id))
        .join(Message, Message.campaign_id == Campaign.id)
        .where(Message.workspace_id == g.workspace_id, Message.status == "failed")
        .group_by(Campaign.id, Campaign.name)
        .order_by(Campaign.id.desc())
    ).all()
    return render_template("dead_letters.html", rows=rows, next_before=next_before, names=names, steps=steps,
                           by_campaign=by_campaign, campaign_id=campaign_id)


def _dead_letters_url(campaign_id: int | None = None) -> str:
    return url_for("ui.dead_letters_page", campaign_id=campaign_id) if campaign_id else url_for("ui.dead_letters_page")


@bp.get("/messages/<int:message_id>/delete")
@login_required
def message_delete_confirm(message_id: int):
    m = _message(message_id)
    if m.status != "failed":
        flash(f"Only dead letters can be deleted; this message is {m.status}.", "error")
        return redirect(url_for("ui.message_page", message_id=m.id)), 303
    back = safe_next(request.args.get("back"), _dead_letters_url())
    return render_template(
        "confirm.html", title=f"Delete the dead letter to {m.email}?",
        message=("The message and its attempts are deleted for good: it can no longer be inspected or replayed. "
                 "The contact's sequence in this campaign stays stopped."),
        action=url_for("ui.message_delete", message_id=m.id), fields={"back": back}, button="Delete dead letter",
        danger=True, back=url_for("ui.message_page", message_id=m.id), back_label="Keep it")


@bp.post("/messages/<int:message_id>/delete")
@login_required
@form_action(lambda message_id: url_for("ui.message_page", message_id=message_id), "Not deleted: ")
def message_delete(message_id: int):
    db = get_db()
    gone = engine.delete_dead_letter(db, g.workspace_id, _message(message_id).id)
    db.commit()
    flash(f"Dead letter to {gone['email']} deleted.", "success")
    return redirect(safe_next(request.form.get("back"), _dead_letters_url())), 303


@bp.get("/campaigns/<int:campaign_id>/delete-failed")
@login_required
def campaign_delete_failed_confirm(campaign_id: int):
    db = get_db()
    c = engine.get_campaign(db, g.workspace_id, campaign_id)
    n = db.scalar(select(func.count()).select_from(Message)
                  .where(Message.campaign_id == c.id, Message.status == "failed"))
    if not n:
        flash(f"{c.name} has no dead letters.", "success")
        return redirect(_dead_letters_url()), 303
    return render_template(
        "confirm.html", title=f"Delete {n:,} dead letter{'s' if n != 1 else ''} of {c.name}?",
        message=("They are deleted for good with their attempts: they can no longer be inspected or replayed. "
                 "The contacts' sequences in this campaign stay stopped."),
        action=url_for("ui.campaign_delete_failed", campaign_id=c.id), button=f"Delete {n:,}", danger=True,
        back=_dead_letters_url(c.id), back_label="Keep them")


@bp.post("/campaigns/<int:campaign_id>/delete-failed")
@login_required
def campaign_delete_failed(campaign_id: int):
    db = get_db()
    c = engine.get_campaign(db, g.workspace_id, campaign_id)
    name = c.name
    n = engine.delete_failed(db, g.workspace_id, c.id)
    db.commit()
    flash(f"{n:,} dead letter{'s' if n != 1 else ''} of {name} deleted.", "success")
    return redirect(_dead_letters_url()), 303


# --------------------------------------------------------------------------- queue health


@bp.get("/queue")
@login_required
def queue_page():
    db = get_db()
    snap = queue_health.snapshot(db, huey, workspace_id=g.workspace_id)
    running = db.execute(select(Campaign.id, Campaign.name, Campaign.status)
                         .where(Campaign.workspace_id == g.workspace_id,
                                Campaign.status.in_(("running", "paused")))
                         .order_by(Campaign.id.desc()).limit(20)).all()
    return render_template("queue.html", snap=snap, running=running)
