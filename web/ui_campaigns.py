"""UI pages: campaigns (list, new, builder with live preview, test send, launch summary) and the
campaign page (operate, live progress over SSE, per-step funnel, sends-over-time chart).

The builder is one form. Its step buttons (add email or wait, move up/down, remove) are submit
buttons of that form, so they work without JavaScript: the server applies the action to what
was submitted and saves the draft when it is valid, or shows it again, unsaved, with every
problem beside its field (a template error with its line). The live preview is the only part
that needs JavaScript: it posts the unsaved templates to ``POST /api/v1/campaigns/<id>/preview``
as the user types; the page also renders each preview once on the server.
"""

from __future__ import annotations

import copy
import re
from datetime import UTC, datetime, timedelta

from flask import current_app, flash, g, redirect, render_template, request, url_for
from sqlalchemy import and_, case, exists, func, select

from campaigns import campaign_rules as rules
from campaigns import engine, templating
from campaigns.db import is_postgres, utcnow
from campaigns.errors import HeraldError, InvalidInput
from campaigns.models import Campaign, Contact, ContactList, Enrollment, ListMember, Message, Suppression
from campaigns.stats import campaign_stats, empty_step_stats, shared, shared_campaign_stats

from .auth import login_required
from .db import get_db
from .ui import bp, error_text, int_arg, is_digits, keyset_page, safe_next

UNITS = (("seconds", 1), ("minutes", 60), ("hours", 3600), ("days", 86400))
UNIT_SIZE = dict(UNITS)
DAY_LABELS = {"mon": "Mon", "tue": "Tue", "wed": "Wed", "thu": "Thu", "fri": "Fri", "sat": "Sat", "sun": "Sun"}
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
FIRST_STEP = {
    "type": "email",
    "subject": "Hello {{ contact.first_name }}",
    "html": ("<p>Hi {{ contact.first_name }},</p>\n\n<p>Write your message here.</p>\n\n"
             "<p><a href=\"{{ unsubscribe_url }}\">Unsubscribe</a></p>\n"),
    "text": "",
}
NEXT_STEP = {
    "type": "email",
    "subject": "Following up",
    "html": ("<p>Hi {{ contact.first_name }},</p>\n\n<p>Just following up on my last email.</p>\n\n"
             "<p><a href=\"{{ unsubscribe_url }}\">Unsubscribe</a></p>\n"),
    "text": "",
}
LINE_RE = re.compile(r"^line (\d+): ", re.ASCII)


def _campaign(campaign_id: int, for_update: bool = False) -> Campaign:
    return rules.get_campaign(get_db(), g.workspace_id, campaign_id, for_update=for_update)


def _lists(db) -> list[ContactList]:
    return list(db.scalars(select(ContactList).where(ContactList.workspace_id == g.workspace_id)
                           .order_by(func.lower(ContactList.name))))


def _unsubscribe_preview_url() -> str:
    return current_app.config["HERALD_SETTINGS"].public_url.rstrip("/") + "/u/preview"


@bp.app_template_global("line_excerpt")
def line_excerpt(source: str | None, message: str, context: int = 1) -> list[tuple[int, str, bool]]:
    """The lines around the one a template error names (``"line 3: ..."``), for showing it."""
    match = LINE_RE.match(message or "")
    if not match or not source:
        return []
    line = int(match.group(1))
    lines = source.split("\n")
    if not 1 <= line <= len(lines):
        return []
    lo, hi = max(1, line - context), min(len(lines), line + context)
    return [(n, lines[n - 1], n == line) for n in range(lo, hi + 1)]


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
    # shared with the campaigns' live views: a page of big running campaigns is not counted
    # afresh for every visit (each count reads all of a campaign's messages)
    stats = {c.id: shared_campaign_stats(db, c.id, max_age=5.0)[0] for c in rows}
    list_names = dict(db.execute(select(ContactList.id, ContactList.name)
                                 .where(ContactList.workspace_id == g.workspace_id)).all())
    counts = {
        "contacts": db.scalar(select(func.count()).select_from(Contact).where(Contact.workspace_id == g.workspace_id)),
        "lists": len(list_names),
    }
    return render_template("campaigns.html", rows=rows, stats=stats, list_names=list_names, status=status,
                           statuses=rules.STATUSES, next_before=next_before, counts=counts)


# --------------------------------------------------------------------------- new campaign


@bp.route("/campaigns/new", methods=["GET", "POST"])
@login_required
def campaign_new():
    db = get_db()
    lists = _lists(db)
    form = {k: (request.form.get(k) or "").strip() for k in ("name", "list_id", "from_email", "from_name", "reply_to")}
    errors: dict[str, list[str]] = {}
    if request.method == "POST":
        payload = {
            "name": form["name"],
            "list_id": int(form["list_id"]) if is_digits(form["list_id"]) else 0,
            "from_email": form["from_email"],
            "from_name": form["from_name"] or None,
            "reply_to": form["reply_to"] or None,
            "steps": [{k: v for k, v in FIRST_STEP.items() if k != "text"}],
        }
        if not form["list_id"]:
            errors["list_id"] = ["choose the list to send to"]
        else:
            try:
                campaign = rules.create_campaign(db, g.workspace_id, payload)
                db.commit()
            except InvalidInput as exc:
                db.rollback()
                errors = dict(exc.details or {"_schema": [error_text(exc)]})
            else:
                flash("Draft created. Write the emails, then review and launch.", "success")
                return redirect(url_for("ui.campaign_edit", campaign_id=campaign.id)), 303
    else:
        form["list_id"] = request.args.get("list_id", "")
    return render_template("campaign_new.html", lists=lists, form=form, errors=errors), (422 if errors else 200)


# --------------------------------------------------------------------------- builder state


def _amount_unit(seconds: int | None) -> tuple[str, str]:
    seconds = seconds or 0
    for unit, size in reversed(UNITS):
        if seconds and seconds % size == 0:
            return str(seconds // size), unit
    return str(seconds), "seconds"


def state_from_campaign(c: Campaign) -> dict:
    window = c.send_window or {}
    limits = c.limits or {}
    sender = limits.get("sender") or {}
    warmup = sender.get("warmup") or {}
    tracking = c.tracking or {"opens": True, "clicks": True}
    steps = []
    for s in c.steps:
        if s.type == "wait":
            amount, unit = _amount_unit(s.wait_seconds)
            steps.append({"type": "wait", "amount": amount, "unit": unit})
        else:
            steps.append({"type": "email", "subject": s.subject or "", "html": s.html or "", "text": s.text or ""})

    def text(v):
        return "" if v is None else str(v)

    return {
        "name": c.name, "list_id": text(c.list_id), "from_email": c.from_email, "from_name": c.from_name or "",
        "reply_to": c.reply_to or "",
        "window_on": bool(window), "window_start": window.get("start", "09:00"),
        "window_end": window.get("end", "17:00"),
        "window_days": window.get("days", ["mon", "tue", "wed", "thu", "fri"]),
        "window_timezone": window.get("timezone", "contact"), "window_fallback": window.get("fallback_timezone", "UTC"),
        "per_minute": text(limits.get("per_minute")), "per_day": text(limits.get("per_day")),
        "daily_cap": text(sender.get("daily_cap")), "min_gap": text(sender.get("min_gap_seconds")),
        "max_gap": text(sender.get("max_gap_seconds")), "warmup_start": text(warmup.get("start")),
        "warmup_increment": text(warmup.get("increment")),
        "stop_on": list(c.stop_on if c.stop_on is not None else ["reply"]),
        "track_opens": bool(tracking.get("opens", True)), "track_clicks": bool(tracking.get("clicks", True)),
        "max_attempts": text(c.max_attempts),
        "steps": steps,
    }


def _clean_template(value: str | None) -> str:
    return (value or "").replace("\r\n", "\n").replace("\r", "\n")


def state_from_form(form) -> dict:
    def get(name):
        return (form.get(name) or "").strip()

    steps = []
    for i in range(rules.MAX_STEPS + 1):
        kind = form.get(f"steps-{i}-type")
        if kind is None:
            break
        if kind == "wait":
            steps.append({"type": "wait", "amount": get(f"steps-{i}-amount"),
                          "unit": get(f"steps-{i}-unit") or "seconds"})
        else:
            steps.append({"type": "email", "subject": get(f"steps-{i}-subject"),
                          "html": _clean_template(form.get(f"steps-{i}-html")),
                          "text": _clean_template(form.get(f"steps-{i}-text"))})
    return {
        "name": get("name"), "list_id": get("list_id"), "from_email": get("from_email"), "from_name": get("from_name"),
        "reply_to": get("reply_to"),
        "window_on": form.get("window_on") == "1", "window_start": get("window_start"), "window_end": get("window_end"),
        "window_days": [d for d in rules.DAYS if d in form.getlist("window_days")],
        "window_timezone": get("window_timezone") or "contact", "window_fallback": get("window_fallback") or "UTC",
        "per_minute": get("per_minute"), "per_day": get("per_day"), "daily_cap": get("daily_cap"),
        "min_gap": get("min_gap"), "max_gap": get("max_gap"), "warmup_start": get("warmup_start"),
        "warmup_increment": get("warmup_increment"),
        "stop_on": [s for s in rules.STOP_ON if s in form.getlist("stop_on")],
        "track_opens": form.get("track_opens") == "1", "track_clicks": form.get("track_clicks") == "1",
        "max_attempts": get("max_attempts"),
        "steps": steps,
    }


def apply_action(state: dict, action: str) -> int | None:
    """Apply a step button to the state; returns the position to scroll to afterwards."""
    steps = state["steps"]
    if action == "add-email":
        steps.append(dict(NEXT_STEP if any(s["type"] == "email" for s in steps) else FIRST_STEP))
        return len(steps) - 1
    if action == "add-wait":
        steps.append({"type": "wait", "amount": "1", "unit": "days"})
        return len(steps) - 1
    verb, _, index = action.partition("-")
    if not is_digits(index) or int(index) >= len(steps):
        return None
    i = int(index)
    if verb == "up" and i > 0:
        steps[i - 1], steps[i] = steps[i], steps[i - 1]
        return i - 1
    if verb == "down" and i < len(steps) - 1:
        steps[i + 1], steps[i] = steps[i], steps[i + 1]
        return i + 1
    if verb == "remove":
        del steps[i]
        return max(0, i - 1) if steps else None
    return i


def _number(raw: str, key: str, errors: dict) -> int | None:
    if not raw:
        return None
    if not is_digits(raw):
        errors[key] = ["must be a whole number"]
        return None
    return int(raw)


def payload_from_state(state: dict, stored_limits: dict | None) -> tuple[dict, dict]:
    """The state as a ``campaign_rules`` body, and the problems found before it gets there
    (numbers that are not numbers), keyed like the rules' own (``limits.per_minute``)."""
    errors: dict[str, list[str]] = {}
    steps = []
    for i, s in enumerate(state["steps"]):
        if s["type"] == "wait":
            amount = _number(s["amount"], f"steps[{i}].seconds", errors)
            if amount is None and not s["amount"]:
                errors[f"steps[{i}].seconds"] = ["how long to wait?"]
            steps.append({"type": "wait", "seconds": (amount or 0) * UNIT_SIZE.get(s["unit"], 1)})
        else:
            steps.append({"type": "email", "subject": s["subject"], "html": s["html"], "text": s["text"] or None})
    window = None
    if state["window_on"]:
        window = {"start": state["window_start"], "end": state["window_end"], "days": state["window_days"],
                  "timezone": state["window_timezone"], "fallback_timezone": state["window_fallback"]}
    # Keys this form does not show (added by later versions) are kept as they are.
    limits = copy.deepcopy(stored_limits or {})
    sender = limits.pop("sender", None) or {}
    for key, field in (("per_minute", "per_minute"), ("per_day", "per_day")):
        limits.pop(key, None)
        value = _number(state[field], f"limits.{key}", errors)
        if value is not None:
            limits[key] = value
    for key, field in (("daily_cap", "daily_cap"), ("min_gap_seconds", "min_gap"), ("max_gap_seconds", "max_gap")):
        sender.pop(key, None)
        value = _number(state[field], f"limits.sender.{key}", errors)
        if value is not None:
            sender[key] = value
    sender.pop("warmup", None)
    warmup = {}
    for key, field in (("start", "warmup_start"), ("increment", "warmup_increment")):
        value = _number(state[field], f"limits.sender.warmup.{key}", errors)
        if value is not None:
            warmup[key] = value
    if warmup:
        sender["warmup"] = warmup
    if sender:
        limits["sender"] = sender
    payload = {
        "name": state["name"],
        "list_id": int(state["list_id"]) if is_digits(state["list_id"]) else None,
        "from_email": state["from_email"],
        "from_name": state["from_name"] or None,
        "reply_to": state["reply_to"] or None,
        "send_window": window,
        "limits": limits,
        "stop_on": state["stop_on"],
        "tracking": {"opens": state["track_opens"], "clicks": state["track_clicks"]},
        "steps": steps,
    }
    if payload["list_id"] is None:
        errors["list_id"] = ["choose the list to send to"]
    max_attempts = _number(state["max_attempts"], "max_attempts", errors)
    if max_attempts is not None:
        payload["max_attempts"] = max_attempts
    return payload, errors


# --------------------------------------------------------------------------- launch summary


def launch_summary(db, c: Campaign) -> dict:
    """What launching would do: who is enrolled, who is skipped and why, what is sent."""
    email_steps = [s for s in c.steps if s.type == "email"]
    # Waits after the last email delay nothing: the sequence completes when its last email is sent.
    last_email = max((s.position for s in email_steps), default=-1)
    total_wait = sum(s.wait_seconds or 0 for s in c.steps if s.type == "wait" and s.position < last_email)
    trailing_wait = sum(s.wait_seconds or 0 for s in c.steps if s.type == "wait" and s.position > last_email)
    out = {"list": None, "members": 0, "eligible": 0, "suppressed": 0, "inactive": 0, "inactive_by_status": {},
           "email_steps": len(email_steps), "total_wait": total_wait, "trailing_wait": trailing_wait,
           "enrolled": None}
    if c.list_id is None:
        return out
    out["list"] = db.get(ContactList, c.list_id)
    suppressed = exists().where(Suppression.workspace_id == Contact.workspace_id, Suppression.email == Contact.email)
    row = db.execute(
        select(
            func.count(),
            func.coalesce(func.sum(case((suppressed, 1), else_=0)), 0),
            func.coalesce(func.sum(case((and_(~suppressed, Contact.status == "active"), 1), else_=0)), 0),
        )
        .select_from(ListMember)
        .join(Contact, Contact.id == ListMember.contact_id)
        .where(ListMember.list_id == c.list_id, Contact.workspace_id == c.workspace_id)
    ).one()
    out["members"], out["suppressed"], out["eligible"] = (int(v) for v in row)
    out["inactive"] = out["members"] - out["suppressed"] - out["eligible"]
    if out["inactive"]:
        out["inactive_by_status"] = dict(
            db.execute(
                select(Contact.status, func.count())
                .select_from(ListMember)
                .join(Contact, Contact.id == ListMember.contact_id)
                .where(ListMember.list_id == c.list_id, Contact.status != "active", ~suppressed)
                .group_by(Contact.status)
            ).all()
        )
    if c.status != "draft":
        out["enrolled"] = db.scalar(select(func.count()).select_from(Enrollment)
                                    .where(Enrollment.campaign_id == c.id))
    return out


def describe_window(window: dict | None) -> str:
    if not window:
        return "Any day, any time."
    days = window.get("days") or []
    if days == list(rules.DAYS):
        day_text = "every day"
    elif days == ["mon", "tue", "wed", "thu", "fri"]:
        day_text = "Monday to Friday"
    else:
        day_text = ", ".join(DAY_LABELS[d] for d in days)
    tz = window.get("timezone")
    tz_text = (f"in each contact's time zone ({window.get('fallback_timezone') or 'UTC'} when unknown)"
               if tz == "contact" else f"in {tz}")
    return f"{day_text}, {window.get('start')}–{window.get('end')} {tz_text}."


def describe_limits(limits: dict | None) -> str:
    limits = limits or {}
    parts = []
    if limits.get("per_minute"):
        parts.append(f"at most {limits['per_minute']:,} a minute")
    if limits.get("per_day"):
        parts.append(f"at most {limits['per_day']:,} a day")
    sender = limits.get("sender") or {}
    if sender.get("daily_cap"):
        parts.append(f"sender cap {sender['daily_cap']:,} a day")
    if sender.get("warmup"):
        parts.append(f"warm-up from {sender['warmup']['start']:,} a day, +{sender['warmup']['increment']:,} daily")
    if sender.get("min_gap_seconds") or sender.get("max_gap_seconds"):
        parts.append(f"{sender.get('min_gap_seconds', 0)}–{sender.get('max_gap_seconds', 0)} s between sends")
    return ("; ".join(parts) + ".").capitalize() if parts else "Only the account's rate limit."


def describe_stop_on(stop_on: list | None) -> str:
    names = {"reply": "reply", "click": "click a link", "open": "open an email"}
    items = [names[s] for s in (stop_on if stop_on is not None else ["reply"]) if s in names]
    base = "A contact's sequence stops when they unsubscribe, bounce or report spam"
    return base + (f", or when they {' or '.join(items)}." if items else ".")


# --------------------------------------------------------------------------- builder


def _preview_contacts(db, c: Campaign) -> list[Contact]:
    if c.list_id is None:
        return []
    return list(db.scalars(
        select(Contact).join(ListMember, ListMember.contact_id == Contact.id)
        .where(ListMember.list_id == c.list_id, Contact.workspace_id == g.workspace_id)
        .order_by(Contact.id).limit(50)))


def _previews(c: Campaign, state: dict, contact) -> dict[int, dict]:
    out = {}
    for i, s in enumerate(state["steps"]):
        if s["type"] == "email":
            source = {"subject": s["subject"], "html": s["html"], "text": s["text"] or None}
            out[i] = templating.preview(source, contact, c, _unsubscribe_preview_url())
    return out


def _render_builder(c: Campaign, state: dict, errors: dict, status: int = 200, focus: int | None = None):
    db = get_db()
    options = _preview_contacts(db, c)
    chosen_id = int_arg("preview_contact") or (int(request.form["preview_contact"])
                                                if is_digits(request.form.get("preview_contact") or "") else None)
    chosen = next((o for o in options if o.id == chosen_id), None)
    if chosen is None and chosen_id is None and options:
        chosen = options[0]
    unsaved = request.method == "POST"
    return render_template(
        "campaign_edit.html", campaign=c, state=state, errors=errors, lists=_lists(db), units=UNITS,
        days=rules.DAYS, day_labels=DAY_LABELS, stop_choices=rules.STOP_ON, preview_options=options,
        preview_contact=chosen, previews=_previews(c, state, chosen), summary=launch_summary(db, c),
        saved_email_steps=[s for s in c.steps if s.type == "email"], unsaved=unsaved, focus=focus,
        window_text=describe_window(c.send_window), limits_text=describe_limits(c.limits),
        stop_text=describe_stop_on(c.stop_on),
    ), status


@bp.route("/campaigns/<int:campaign_id>/edit", methods=["GET", "POST"])
@login_required
def campaign_edit(campaign_id: int):
    db = get_db()
    c = _campaign(campaign_id)
    if c.status not in STATUS_ACTIONS["edit"]:
        flash(f"This campaign is {c.status}; only a draft can be edited.", "error")
        return redirect(url_for("ui.campaign_page", campaign_id=c.id)), 303
    if request.method == "GET":
        return _render_builder(c, state_from_campaign(c), {})
    state = state_from_form(request.form)
    action = request.form.get("action") or "save"
    focus = apply_action(state, action) if action != "save" else None
    payload, errors = payload_from_state(state, c.limits)
    try:  # every problem at once: the rules' own, and the numbers that were not numbers
        rules.validate_campaign(db, g.workspace_id, payload, partial=True)
    except InvalidInput as exc:
        errors = {**(exc.details or {"_": [error_text(exc)]}), **errors}
    if not errors:
        try:
            c = _campaign(campaign_id, for_update=True)
            rules.update_campaign(db, c, payload)
            db.commit()
        except HeraldError as exc:
            db.rollback()
            errors = dict(exc.details) if isinstance(exc, InvalidInput) and exc.details else {"_": [error_text(exc)]}
    if errors:
        db.rollback()
        c = _campaign(campaign_id)
        return _render_builder(c, state, errors, 422, focus)
    messages = {"add-email": "Email step added.", "add-wait": "Wait step added.", "save": "Draft saved."}
    flash(messages.get(action, "Steps updated."), "success")
    anchor = f"step-{focus}" if focus is not None else None
    preview_contact = request.form.get("preview_contact") or None
    return redirect(url_for("ui.campaign_edit", campaign_id=c.id, preview_contact=preview_contact,
                            _anchor=anchor)), 303


@bp.post("/campaigns/<int:campaign_id>/test-send")
@login_required
def campaign_test_send(campaign_id: int):
    db = get_db()
    c = _campaign(campaign_id)
    back = safe_next(request.form.get("back"), url_for("ui.campaign_edit", campaign_id=c.id))
    raw_step = request.form.get("step") or ""
    try:
        msg = engine.test_send(db, g.workspace_id, c.id, request.form.get("email") or "",
                               int(raw_step) if is_digits(raw_step) else None)
        db.commit()
    except HeraldError as exc:
        db.rollback()
        flash(f"Test not sent: {error_text(exc)}", "error")
        return redirect(back), 303
    flash(f"Test email queued for {msg.email}, ahead of campaign sends (kept out of the statistics).", "success")
    return redirect(back), 303


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


def _operate(campaign_id: int, verb: str):
    db = get_db()
    c = _campaign(campaign_id)
    try:
        if verb == "launch":
            engine.launch(db, g.workspace_id, c.id)
        elif verb == "pause":
            engine.pause(db, g.workspace_id, c.id, reason="paused by a user")
        elif verb == "resume":
            engine.resume(db, g.workspace_id, c.id)
        elif verb == "cancel":
            engine.cancel(db, g.workspace_id, c.id)
        db.commit()  # a launch's fan-out, a resume's wake follow the commit (campaigns.effects)
    except HeraldError as exc:
        db.rollback()
        flash(f"Could not {verb} the campaign: {error_text(exc)}", "error")
        return redirect(url_for("ui.campaign_page", campaign_id=c.id)), 303
    done = {"launch": "Launched: contacts are being enrolled.", "pause": "Paused: no new send starts.",
            "resume": "Resumed.", "cancel": "Cancelled: pending emails will not be sent."}
    flash(done[verb], "success")
    return redirect(url_for("ui.campaign_page", campaign_id=c.id)), 303


@bp.post("/campaigns/<int:campaign_id>/launch")
@login_required
def campaign_launch(campaign_id: int):
    return _operate(campaign_id, "launch")


@bp.post("/campaigns/<int:campaign_id>/pause")
@login_required
def campaign_pause(campaign_id: int):
    return _operate(campaign_id, "pause")


@bp.post("/campaigns/<int:campaign_id>/resume")
@login_required
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
def campaign_delete(campaign_id: int):
    db = get_db()
    c = _campaign(campaign_id, for_update=True)
    name = c.name
    try:
        rules.delete_campaign(db, c)
        db.commit()
    except HeraldError as exc:
        db.rollback()
        flash(error_text(exc), "error")
        return redirect(url_for("ui.campaign_page", campaign_id=campaign_id)), 303
    flash(f"Campaign {name} deleted.", "success")
    return redirect(url_for("ui.home")), 303


@bp.post("/campaigns/<int:campaign_id>/replay-failed")
@login_required
def campaign_replay_failed(campaign_id: int):
    db = get_db()
    c = _campaign(campaign_id)
    back = safe_next(request.form.get("back"), url_for("ui.campaign_page", campaign_id=c.id))
    try:
        n = engine.replay_failed(db, g.workspace_id, c.id)
        db.commit()
    except HeraldError as exc:
        db.rollback()
        flash(f"Not replayed: {error_text(exc)}", "error")
        return redirect(back), 303
    flash(f"{n} dead letter{'s' if n != 1 else ''} of {c.name} queued again (same message keys).", "success")
    return redirect(back), 303


# --------------------------------------------------------------------------- the campaign page


def sends_per_minute(db, campaign_id: int) -> list[tuple[datetime, int]]:
    """(minute, emails first accepted by the provider in it), test sends left out."""
    if is_postgres(db):
        bucket = func.date_trunc("minute", Message.sent_at)
    else:
        bucket = func.strftime("%Y-%m-%d %H:%M:00", Message.sent_at)
    rows = db.execute(
        select(bucket, func.count())
        .where(Message.campaign_id == campaign_id, Message.sent_at.is_not(None), Message.is_test.is_(False))
        .group_by(bucket)
        .order_by(bucket)
    ).all()
    out = []
    for when, n in rows:
        if isinstance(when, str):
            when = datetime.strptime(when, "%Y-%m-%d %H:%M:%S")
        out.append((when.replace(second=0, microsecond=0, tzinfo=None), int(n)))
    return out


BUCKET_MINUTES = (1, 2, 5, 10, 15, 30, 60, 120, 240, 720, 1440)
MAX_BARS = 90


def chart_data(points: list[tuple[datetime, int]], until: datetime | None = None) -> dict | None:
    """Geometry for the sends-over-time bar chart (inline SVG), one bar per minute, or per a
    wider bucket when the campaign spans more than ``MAX_BARS`` minutes."""
    if not points:
        return None
    start = points[0][0]
    end = max(points[-1][0], (until or points[-1][0]).replace(second=0, microsecond=0))
    span = int((end - start).total_seconds() // 60) + 1
    size = next((b for b in BUCKET_MINUTES if span / b <= MAX_BARS), BUCKET_MINUTES[-1])
    if size > 1:  # align the buckets on round times
        offset = (start.hour * 60 + start.minute) % size
        start -= timedelta(minutes=offset)
    n = int((end - start).total_seconds() // 60) // size + 1
    counts = [0] * n
    for when, count in points:
        counts[int((when - start).total_seconds() // 60) // size] += count
    top = max(counts) or 1
    nice = next((m * 10**e for e in range(0, 12) for m in (1, 2, 5) if m * 10**e >= top), top)
    width, height, left, bottom, top_pad = 960, 220, 44, 26, 10
    plot_w, plot_h = width - left - 8, height - bottom - top_pad
    slot = plot_w / n
    bars = []
    for i, count in enumerate(counts):
        h = plot_h * count / nice
        when = start + timedelta(minutes=i * size)
        bars.append({"x": round(left + i * slot + slot * 0.12, 2), "w": round(max(slot * 0.76, 1), 2),
                     "y": round(top_pad + plot_h - h, 2), "h": round(h, 2), "count": count,
                     "label": when.strftime("%H:%M"), "when": when})
    ticks = [{"y": round(top_pad + plot_h - plot_h * v / nice, 2), "value": v} for v in (0, nice // 2, nice)
             if v or v == 0]
    step = max(1, n // 6)
    xlabels = [{"x": round(left + i * slot + slot / 2, 2), "label": bars[i]["label"]} for i in range(0, n, step)]
    return {"width": width, "height": height, "left": left, "plot_w": plot_w, "base": top_pad + plot_h,
            "bars": bars, "ticks": ticks, "xlabels": xlabels, "bucket": size, "total": sum(counts),
            "peak": max(counts), "start": start, "end": start + timedelta(minutes=n * size)}


def _chart(db, c: Campaign, live: bool = False) -> dict | None:
    """``live``: for the page's refreshes while the campaign sends, a count shared by every viewer
    (campaigns.stats.shared: a big campaign is not counted again for each of them)."""
    until = utcnow() if c.status == "running" else None
    if live:
        points = shared(("chart", c.id), lambda: sends_per_minute(db, c.id), max_age=2.0,
                        fresh=c.status not in ("running", "paused"))
    else:
        points = sends_per_minute(db, c.id)
    return chart_data(points, until)


FOLLOW_AFTER_COMPLETION = timedelta(hours=1)


def follow_until(c: Campaign) -> int | None:
    """Until when (ms since the epoch) the campaign page keeps looking at a completed campaign's
    figures: delivery events, opens and clicks go on arriving after its last send."""
    if c.status != "completed" or c.finished_at is None or utcnow() - c.finished_at > FOLLOW_AFTER_COMPLETION:
        return None
    return int((c.finished_at + FOLLOW_AFTER_COMPLETION).replace(tzinfo=UTC).timestamp() * 1000)


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
        follow_until=follow_until(c),
        chart=_chart(db, c), summary=launch_summary(db, c) if c.status == "draft" else None, actions=STATUS_ACTIONS,
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
    return render_template("_chart.html", chart=_chart(db, c, live=True), campaign=c)


# --------------------------------------------------------------------------- builder error labels

_FIELD_IDS = {
    "name": "name", "list_id": "list_id", "from_email": "from_email", "from_name": "from_name",
    "reply_to": "reply_to", "send_window.start": "window_start", "send_window.end": "window_end",
    "send_window.days": "window_days-mon", "send_window.timezone": "window_timezone",
    "send_window.fallback_timezone": "window_fallback", "send_window": "window_on",
    "limits.per_minute": "per_minute", "limits.per_day": "per_day", "limits.sender.daily_cap": "daily_cap",
    "limits.sender.min_gap_seconds": "min_gap", "limits.sender.max_gap_seconds": "max_gap",
    "limits.sender.warmup.start": "warmup_start", "limits.sender.warmup.increment": "warmup_increment",
    "limits.sender.warmup": "warmup_start", "stop_on": "stop_on-reply", "tracking.opens": "track_opens",
    "tracking.clicks": "track_clicks", "max_attempts": "max_attempts", "steps": "add-email",
}
_FIELD_LABELS = {
    "name": "Name", "list_id": "List", "from_email": "From address", "from_name": "From name",
    "reply_to": "Reply-To", "send_window": "Send window", "limits": "Limits", "stop_on": "Stop conditions",
    "tracking": "Tracking", "max_attempts": "Attempts", "steps": "Steps", "_schema": "Campaign", "_": "Campaign",
    "subject": "subject", "html": "HTML", "text": "text", "seconds": "wait",
}
_STEP_KEY = re.compile(r"^steps\[(\d+)\]\.(\w+)$", re.ASCII)


@bp.app_template_global("builder_field_id")
def builder_field_id(key: str) -> str:
    match = _STEP_KEY.match(key)
    if match:
        i, field = match.groups()
        return f"steps-{i}-{'amount' if field == 'seconds' else field}"
    return _FIELD_IDS.get(key, "builder-errors")


@bp.app_template_global("builder_field_label")
def builder_field_label(key: str) -> str:
    match = _STEP_KEY.match(key)
    if match:
        i, field = match.groups()
        return f"Step {int(i) + 1}, {_FIELD_LABELS.get(field, field)}"
    head, _, rest = key.partition(".")
    label = _FIELD_LABELS.get(head, head)
    return f"{label}, {rest.replace('_', ' ').replace('.', ' ')}" if rest else label
