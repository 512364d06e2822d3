"""UI pages: a new campaign and the builder (steps, live preview, test send).

The builder is one form. Its step buttons (add email or wait, move up/down, remove) are submit
buttons of that form, so they work without JavaScript: the server applies the action to what
was submitted and saves the draft when it is valid, or shows it again, unsaved, with every
problem beside its field. The live preview posts the unsaved templates to
``POST /api/v1/campaigns/<id>/preview`` as the user types.
"""

from __future__ import annotations

import copy
import re

from flask import current_app, flash, g, redirect, render_template, request, url_for
from sqlalchemy import select

from campaigns import campaign_rules as rules
from campaigns import engine, templating
from campaigns.errors import InvalidInput
from campaigns.ids import is_digits, parse_id
from campaigns.models import Campaign, Contact, ListMember

from ..auth import login_required
from ..db import get_db
from ..params import int_arg
from .blueprint import bp, error_text, form_action, refused, safe_next
from .campaigns import STATUS_ACTIONS, _campaign, _lists
from .summaries import DAY_LABELS, describe_limits, describe_stop_on, describe_window, launch_summary

UNITS = (("seconds", 1), ("minutes", 60), ("hours", 3600), ("days", 86400))
UNIT_SIZE = dict(UNITS)
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
            with refused(InvalidInput) as refusal:
                campaign = rules.create_campaign(db, g.workspace_id, payload)
                db.commit()
            if refusal.exc is None:
                flash("Draft created. Write the emails, then review and launch.", "success")
                return redirect(url_for("ui.campaign_edit", campaign_id=campaign.id)), 303
            errors = dict(refusal.exc.details or {"_schema": [error_text(refusal.exc)]})
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
    chosen_id = int_arg("preview_contact", strict=False) or parse_id(request.form.get("preview_contact"))
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
        with refused() as refusal:
            c = _campaign(campaign_id, for_update=True)
            rules.update_campaign(db, c, payload)
            db.commit()
        exc = refusal.exc
        if exc is not None:
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
@form_action(lambda campaign_id: url_for("ui.campaign_edit", campaign_id=campaign_id), "Test not sent: ",
             form_back=True)
def campaign_test_send(campaign_id: int):
    db = get_db()
    c = _campaign(campaign_id)
    raw_step = request.form.get("step") or ""
    msg = engine.test_send(db, g.workspace_id, c.id, request.form.get("email") or "",
                           int(raw_step) if is_digits(raw_step) else None)
    db.commit()  # queues the send, first in line
    flash(f"Test email queued for {msg.email}, ahead of campaign sends (kept out of the statistics).", "success")
    return redirect(safe_next(request.form.get("back"), url_for("ui.campaign_edit", campaign_id=c.id))), 303


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
