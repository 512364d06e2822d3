"""The web UI: server-rendered Jinja pages on one blueprint, ``ui``.

This module holds the blueprint, the shared helpers (errors, pagination, formatting) and the
account pages (sign in/out, workspace switcher, settings and API keys). The other pages live
beside it and add their routes to the same blueprint:

- ``ui_contacts``: contacts, CSV import with progress, lists, the suppression list;
- ``ui_campaigns``: campaigns, the builder with live preview, launch, the live campaign page;
- ``ui_ops``: the message log and details, dead letters and replay, queue health.

Views call the domain layer (``campaigns.*``) directly and queue work through ``tasks``, like
the JSON API does. Every form carries the CSRF token (``CSRFProtect`` refuses a form without
it); the few fetches the pages make to ``/api/v1`` send it as ``X-CSRFToken``. Destructive
actions go through a confirmation page (GET shows what will happen, POST does it), so they
work the same with or without JavaScript. Live parts (progress over SSE, import progress,
queue health, template preview) are small progressive enhancements in ``static/herald.js``.
"""

from __future__ import annotations

from datetime import datetime
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_wtf.csrf import CSRFError
from sqlalchemy import select

from campaigns import accounts
from campaigns.accounts import authenticate, user_workspaces
from campaigns.contacts import email_problem
from campaigns.errors import HeraldError, NotFound
from campaigns.models import ApiKey, User, Workspace

from .auth import login_required, login_user, logout_user, remember_device, sign_in_succeeded, throttle_sign_in
from .db import get_db

bp = Blueprint("ui", __name__)

PAGE_SIZE = 50
MAX_ID = 2**63 - 1


# --------------------------------------------------------------------------- helpers


def settings():
    return current_app.config["HERALD_SETTINGS"]


def safe_next(target: str | None, default: str | None = None) -> str:
    """A local path to go back to (never another site)."""
    fallback = default or url_for("ui.home")
    if not target:
        return fallback
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return fallback
    return target


def is_digits(raw: str) -> bool:
    """ASCII digits only: ``str.isdigit()`` also says yes to '²', which ``int()`` refuses (a 500)."""
    return raw.isascii() and raw.isdigit()


def parse_id(raw: str | None) -> int | None:
    """A positive id typed in a form or a query string; anything else (junk, too large) is None."""
    raw = (raw or "").strip()
    if not is_digits(raw):
        return None
    value = int(raw)
    return value if 0 < value <= MAX_ID else None


def int_arg(name: str) -> int | None:
    """A positive id from the query string; anything else (junk, too large) is None."""
    return parse_id(request.args.get(name))


def keyset_page(session, stmt, model, limit: int = PAGE_SIZE):
    """Newest first, ``?before=<id>`` for the next (older) page: ``(rows, next_before | None)``."""
    before = int_arg("before")
    if before is not None:
        stmt = stmt.where(model.id < before)
    rows = list(session.scalars(stmt.order_by(model.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].id if more and rows else None)


@bp.app_template_global("page_url")
def page_url(**changes) -> str:
    """The current page's URL with some query arguments changed (None drops one). Only plain
    query arguments are carried over: a key that is also url_for's own (``endpoint``,
    ``_external``, ``_method``...) or the view's (``list_id``) was a 500 or a foreign link."""
    view_args = request.view_args or {}
    args = {k: v for k, v in request.args.to_dict().items()
            if not k.startswith("_") and k != "endpoint" and k not in view_args}
    for key, value in changes.items():
        if value is None or value == "":
            args.pop(key, None)
        else:
            args[key] = value
    return url_for(request.endpoint, **view_args, **args)


def error_text(exc: HeraldError) -> str:
    """A domain error as one sentence for a person."""
    message = exc.message or "Something went wrong."
    return message[:1].upper() + message[1:]


def field_errors(exc: HeraldError) -> dict[str, list[str]]:
    """The per-field messages of a domain error (``{"email": [...]}``), if it has them."""
    out: dict[str, list[str]] = {}
    for key, value in (exc.details or {}).items():
        if isinstance(value, list):
            out[key] = [str(v) for v in value]
        elif isinstance(value, str):
            out[key] = [value]
    return out


# --------------------------------------------------------------------------- template helpers


@bp.app_template_filter("dt")
def format_datetime(value: datetime | None, seconds: bool = True) -> str:
    """Naive UTC as ``2025-01-31 14:05:09 UTC``."""
    if value is None:
        return "—"
    return value.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M") + " UTC"


@bp.app_template_filter("num")
def format_number(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


@bp.app_template_filter("pct")
def format_percent(value) -> str:
    if value is None:
        return "—"
    return f"{value * 100:.1f}%"


@bp.app_template_filter("duration")
def format_duration(seconds) -> str:
    """``90`` -> ``1 min 30 s``; ``86400`` -> ``1 day``."""
    if seconds is None:
        return "—"
    seconds = int(seconds)
    parts = []
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        n, seconds = divmod(seconds, size)
        if n:
            parts.append(f"{n} {unit}{'s' if unit == 'day' and n > 1 else ''}")
    return " ".join(parts[:2]) or "0 s"


@bp.context_processor
def _layout_context():
    workspaces = g.get("session_workspaces") or {}
    current = workspaces.get(g.get("workspace_id"))
    user_email = None
    if g.get("user_id"):
        user_email = get_db().scalar(select(User.email).where(User.id == g.user_id))
    return {
        "nav_workspaces": sorted(workspaces.values(), key=lambda w: w.name.lower()),
        "current_workspace": current,
        "user_email": user_email,
        # the test-send forms' default "To": the user's own address, when a test could go there
        "test_email_default": user_email if user_email and not email_problem(user_email) else "",
    }


# --------------------------------------------------------------------------- errors


@bp.errorhandler(HeraldError)
def _domain_error(exc: HeraldError):
    return render_template("error.html", status=exc.status, message=error_text(exc)), exc.status


@bp.errorhandler(CSRFError)
def _csrf_error(exc: CSRFError):
    message = (
        "This form was refused because its security token is missing or out of date "
        f"({exc.description.rstrip('.')}). Go back, reload the page and try again."
    )
    return render_template("error.html", status=400, message=message), 400


# --------------------------------------------------------------------------- sign in / out


@bp.route("/login", methods=["GET", "POST"])
def login():
    error = None
    if request.method == "POST":
        email = request.form.get("email", "")
        refused = throttle_sign_in(email)  # counts the attempt, or refuses it unchecked (429)
        if refused is not None:
            return refused
        db = get_db()
        user = authenticate(db, email, request.form.get("password", ""))
        if user is not None:
            sign_in_succeeded(email)
        workspaces = user_workspaces(db, user.id) if user else []
        if user is None:
            error = "Wrong email or password."
        elif not workspaces:
            error = "Your account belongs to no workspace yet."
        else:
            login_user(user.id, workspaces[0].id)
            resp = redirect(safe_next(request.args.get("next")))
            remember_device(resp, email)  # this browser is not locked out by others' guesses
            return resp
    return render_template("login.html", error=error), (401 if error else 200)


@bp.post("/logout")
def logout():
    logout_user()
    flash("You are signed out.", "success")
    return redirect(url_for("ui.login"))


@bp.post("/workspace")
@login_required
def switch_workspace():
    raw = request.form.get("workspace_id", "")
    workspace_id = int(raw) if is_digits(raw) else None
    if workspace_id not in g.session_workspaces:
        flash("You are not a member of that workspace.", "error")
        return redirect(url_for("ui.home")), 303
    session["workspace_id"] = workspace_id
    flash(f"Switched to {g.session_workspaces[workspace_id].name}.", "success")
    # Ids in the current URL belong to the old workspace: go to the new one's home page.
    return redirect(url_for("ui.home")), 303


# --------------------------------------------------------------------------- settings: API keys


def _workspace() -> Workspace:
    ws = get_db().get(Workspace, g.workspace_id)
    if ws is None:
        raise NotFound("no such workspace")
    return ws


def _api_keys():
    return list(
        get_db().scalars(
            select(ApiKey).where(ApiKey.workspace_id == g.workspace_id).order_by(ApiKey.revoked_at.is_not(None),
                                                                                 ApiKey.id.desc())
        )
    )


@bp.get("/settings")
@login_required
def settings_page():
    return render_template("settings.html", workspace=_workspace(), keys=_api_keys(), new_key=None,
                           settings=settings())


@bp.post("/settings/api-keys")
@login_required
def create_api_key():
    db = get_db()
    name = (request.form.get("name") or "").strip()
    if len(name) > 200:
        flash("A key's name has at most 200 characters.", "error")
        return redirect(url_for("ui.settings_page")), 303
    row, key = accounts.create_api_key(db, _workspace(), name)
    db.commit()
    # Shown once, in this response only (never stored, never put in the session cookie).
    resp = current_app.make_response(
        render_template("settings.html", workspace=_workspace(), keys=_api_keys(), new_key=key, new_key_row=row,
                        settings=settings())
    )
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _own_key(key_id: int) -> ApiKey:
    row = get_db().get(ApiKey, key_id) if 0 < key_id <= MAX_ID else None
    if row is None or row.workspace_id != g.workspace_id:
        raise NotFound("There is no such API key in this workspace.")
    return row


@bp.get("/settings/api-keys/<int:key_id>/revoke")
@login_required
def revoke_api_key_confirm(key_id: int):
    row = _own_key(key_id)
    return render_template(
        "confirm.html",
        title=f"Revoke API key {row.prefix}…?",
        message=(f"Scripts using the key {row.prefix}… ({row.name or 'no name'}) will get 401 Unauthorized "
                 "from their next call. This cannot be undone."),
        action=url_for("ui.revoke_api_key", key_id=row.id),
        button="Revoke key",
        danger=True,
        back=url_for("ui.settings_page"),
    )


@bp.post("/settings/api-keys/<int:key_id>/revoke")
@login_required
def revoke_api_key(key_id: int):
    db = get_db()
    row = _own_key(key_id)
    accounts.revoke_api_key(db, g.workspace_id, row.id)
    db.commit()
    flash(f"API key {row.prefix}… is revoked.", "success")
    return redirect(url_for("ui.settings_page")), 303


# The other pages add their routes to ``bp``.
from . import ui_campaigns, ui_contacts, ui_ops  # noqa: E402,F401
