"""UI pages: the campaigns list, operating a campaign (launch, pause, resume, cancel, delete,
replay dead letters) and the campaign page (live progress over SSE, per-step funnel, chart)."""

from __future__ import annotations

from flask import flash, g, redirect, render_template, request, url_for
from sqlalchemy import func, select

from campaigns import campaign_rules as rules
from campaigns import engine
from campaigns.models import Campaign, Contact, ContactList, Message
from campaigns.stats import LIST_MAX_AGE, campaign_stats, empty_step_stats, shared_campaign_stats

from ..auth import login_required
from ..db import get_db
from ..params import keyset_page
from .blueprint import bp, form_action, safe_next
from .summaries import describe_limits, describe_stop_on, describe_window, follow_until, launch_summary, sends_chart

FUNNEL_KEYS = ("sent", "delivered", "opened", "clicked", "replied", "bounced", "unsubscribed", "failed")
TOTAL_KEYS = ("enrolled", "sent", "delivered", "opened", "clicked", "replied", "bounced", "unsubscribed",
              "failed", "scheduled")
STATUS_ACTIONS = {
    "launch": ("draft",),
    "edit": ("draft",),
    "pause": ("running",),
    "resume": ("paused",),
    "cancel": ("running", "paused"),
    "delete": rules.DELETABLE,
}


def _campaign(campaign_id: int, for_update: bool = False) -> Campaign:
    return rules.get_campaign(get_db(), g.workspace_id, campaign_id, for_update=for_update)


def _lists(db) -> list[ContactList]:
    return list(db.scalars(select(ContactList).where(ContactList.workspace_id == g.workspace_id)
                           .order_by(func.lower(ContactList.name))))


# --------------------------------------------------------------------------- campaigns list


@bp.get("/", endpoint="home")
@bp.get("/campaigns")
@login_required
def campaigns_page():
    db = get_db()
    status = request.args.get("status") or ""
    stmt = select(Campaign).where(Campaign.workspace_id == g.workspace_id)
    if status in rules.STATUSES:
        stmt = stmt.where(Campaign.status == status)
    rows, next_before = keyset_page(db, stmt, Campaign)
    # shared with the campaigns' live views (see campaigns.stats.LIST_MAX_AGE)
    stats = {c.id: shared_campaign_stats(db, c.id, max_age=LIST_MAX_AGE)[0] for c in rows}
    list_names = dict(db.execute(select(ContactList.id, ContactList.name)
                                 .where(ContactList.workspace_id == g.workspace_id)).all())
    counts = {
        "contacts": db.scalar(select(func.count()).select_from(Contact).where(Contact.workspace_id == g.workspace_id)),
        "lists": len(list_names),
    }
    return render_template("campaigns.html", rows=rows, stats=stats, list_names=list_names, status=status,
                           statuses=rules.STATUSES, next_before=next_before, counts=counts)


# --------------------------------------------------------------------------- operate


@bp.get("/campaigns/<int:campaign_id>/launch")
@login_required
def campaign_launch_confirm(campaign_id: int):
    db = get_db()
    c = _campaign(campaign_id)
    if c.status != "draft":
        flash(f"This campaign is already {c.status}.", "error")
        return redirect(url_for("ui.campaign_page", campaign_id=c.id)), 303
    return render_template("campaign_launch.html", campaign=c, summary=launch_summary(db, c),
                           window_text=describe_window(c.send_window), limits_text=describe_limits(c.limits),
                           stop_text=describe_stop_on(c.stop_on))


def _campaign_url(campaign_id: int) -> str:
    return url_for("ui.campaign_page", campaign_id=campaign_id)


def _operate(campaign_id: int, verb: str):
    db = get_db()
    c = _campaign(campaign_id)
    if verb == "launch":
        engine.launch(db, g.workspace_id, c.id)
    elif verb == "pause":
        engine.pause(db, g.workspace_id, c.id, reason="paused by a user")
    elif verb == "resume":
        engine.resume(db, g.workspace_id, c.id)
    elif verb == "cancel":
        engine.cancel(db, g.workspace_id, c.id)
    db.commit()  # a launch's fan-out, a resume's wake follow the commit (campaigns.effects)
    done = {"launch": "Launched: contacts are being enrolled.", "pause": "Paused: no new send starts.",
            "resume": "Resumed.", "cancel": "Cancelled: pending emails will not be sent."}
    flash(done[verb], "success")
    return redirect(_campaign_url(c.id)), 303


@bp.post("/campaigns/<int:campaign_id>/launch")
@login_required
@form_action(_campaign_url, "Could not launch the campaign: ")
def campaign_launch(campaign_id: int):
    return _operate(campaign_id, "launch")


@bp.post("/campaigns/<int:campaign_id>/pause")
@login_required
@form_action(_campaign_url, "Could not pause the campaign: ")
def campaign_pause(campaign_id: int):
    return _operate(campaign_id, "pause")


@bp.post("/campaigns/<int:campaign_id>/resume")
@login_required
@form_action(_campaign_url, "Could not resume the campaign: ")
def campaign_resume(campaign_id: int):
    return _operate(campaign_id, "resume")


@bp.get("/campaigns/<int:campaign_id>/cancel")
@login_required
def campaign_cancel_confirm(campaign_id: int):
    db = get_db()
    c = _campaign(campaign_id)
    if c.status not in STATUS_ACTIONS["cancel"]:
        flash("A draft has not been launched, so there is nothing to cancel: delete it instead."
              if c.status == "draft" else f"This campaign is already {c.status}.", "error")
        return redirect(url_for("ui.campaign_page", campaign_id=c.id)), 303
    pending = db.scalar(select(func.count()).select_from(Message).where(
        Message.campaign_id == c.id, Message.status.in_(engine.PENDING), Message.is_test.is_(False)))
    return render_template(
        "confirm.html", title=f"Cancel {c.name}?",
        message=(f"{pending:,} scheduled email{'s' if pending != 1 else ''} will not be sent and every sequence "
                 "stops. Emails already sent stay in the statistics. A cancelled campaign cannot be resumed."),
        action=url_for("ui.campaign_cancel", campaign_id=c.id), button="Cancel campaign", danger=True,
        back=url_for("ui.campaign_page", campaign_id=c.id), back_label="Keep it")


@bp.post("/campaigns/<int:campaign_id>/cancel")
@login_required
@form_action(_campaign_url, "Could not cancel the campaign: ")
def campaign_cancel(campaign_id: int):
    return _operate(campaign_id, "cancel")


@bp.get("/campaigns/<int:campaign_id>/delete")
@login_required
def campaign_delete_confirm(campaign_id: int):
    c = _campaign(campaign_id)
    return render_template(
        "confirm.html", title=f"Delete {c.name}?",
        message="The campaign, its steps, enrollments and message log are deleted. This cannot be undone.",
        action=url_for("ui.campaign_delete", campaign_id=c.id), button="Delete campaign", danger=True,
        back=url_for("ui.campaign_page", campaign_id=c.id))


@bp.post("/campaigns/<int:campaign_id>/delete")
@login_required
@form_action(_campaign_url)
def campaign_delete(campaign_id: int):
    db = get_db()
    c = _campaign(campaign_id, for_update=True)
    name = c.name
    rules.delete_campaign(db, c)
    db.commit()
    flash(f"Campaign {name} deleted.", "success")
    return redirect(url_for("ui.home")), 303


@bp.post("/campaigns/<int:campaign_id>/replay-failed")
@login_required
@form_action(_campaign_url, "Not replayed: ", form_back=True)
def campaign_replay_failed(campaign_id: int):
    db = get_db()
    c = _campaign(campaign_id)
    n = engine.replay_failed(db, g.workspace_id, c.id)
    db.commit()  # wakes the dispatcher
    flash(f"{n} dead letter{'s' if n != 1 else ''} of {c.name} queued again (same message keys).", "success")
    return redirect(safe_next(request.form.get("back"), _campaign_url(c.id))), 303


@bp.get("/campaigns/<int:campaign_id>")
@login_required
def campaign_page(campaign_id: int):
    db = get_db()
    c = _campaign(campaign_id)
    totals, per_step = campaign_stats(db, c.id)
    empty = empty_step_stats()
    steps = [(s, per_step.get(s.id) or empty) for s in c.steps]
    email_steps = sum(1 for s in c.steps if s.type == "email")
    return render_template(
        "campaign.html", campaign=c, totals=totals, steps=steps, email_steps=email_steps,
        follow_until=follow_until(c), chart=sends_chart(db, c),
        summary=launch_summary(db, c) if c.status == "draft" else None, actions=STATUS_ACTIONS,
        funnel_keys=FUNNEL_KEYS, total_keys=TOTAL_KEYS, list_row=db.get(ContactList, c.list_id) if c.list_id else None,
        window_text=describe_window(c.send_window), limits_text=describe_limits(c.limits),
        stop_text=describe_stop_on(c.stop_on),
    )


@bp.get("/campaigns/<int:campaign_id>/chart")
@login_required
def campaign_chart(campaign_id: int):
    """The chart alone (an HTML fragment), for the campaign page to refresh in place."""
    db = get_db()
    c = _campaign(campaign_id)
    return render_template("_chart.html", chart=sends_chart(db, c, live=True), campaign=c)
