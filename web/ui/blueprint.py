"""The UI's blueprint ``ui`` and what its pages share: safe redirect targets, the error
handlers, ``form_action`` (flash and redirect) and ``refused`` (show the form again), template
filters and the layout's context.

Route modules (``account``, ``campaigns``, ``contacts``, ``ops``...) import ``bp`` from here;
``web.ui`` imports them, so there is no import circle.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from urllib.parse import urlsplit

from flask import Blueprint, current_app, flash, g, redirect, render_template, request, url_for
from flask_wtf.csrf import CSRFError
from sqlalchemy import select

from campaigns.contacts import email_problem
from campaigns.errors import HeraldError, NotFound
from campaigns.models import User

from ..db import get_db

bp = Blueprint("ui", __name__)


# --------------------------------------------------------------------------- helpers


def settings():
    return current_app.config["HERALD_SETTINGS"]


def _unsafe_char(ch: str) -> bool:
    """A control character (a newline in a Location header is a 500) or a line/paragraph
    separator; a backslash, which browsers read as ``/`` (``/\\evil.example`` is another site)."""
    return ch == "\\" or unicodedata.category(ch) in ("Cc", "Zl", "Zp")


def safe_next(target: str | None, default: str | None = None) -> str:
    """A local path to go back to (never another site, never a control character); anything
    else is ``default`` (the home page when there is none)."""
    fallback = default or url_for("ui.home")
    if not target or any(_unsafe_char(ch) for ch in target):
        return fallback
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return fallback
    return target


def form_action(back: Callable[..., str], failed: str = "", form_back: bool = False):
    """For a POST view that changes something: a domain error it raises (a missing resource
    aside, which is the 404 page) rolls the session back, is flashed as ``failed`` + the reason,
    and redirects (303) to ``back(**view_args)``, or to the form's ``back`` field when
    ``form_back`` is set and that is a safe local path."""

    def decorate(view):
        @functools.wraps(view)
        def wrapped(**kwargs):
            try:
                return view(**kwargs)
            except NotFound:
                raise
            except HeraldError as exc:
                get_db().rollback()
                flash(failed + error_text(exc), "error")
                target = back(**kwargs)
                if form_back:
                    target = safe_next(request.form.get("back"), target)
                return redirect(target), 303

        return wrapped

    return decorate


class Refusal:
    """What :func:`refused` caught: the domain error (None when the action went through)."""

    exc: HeraldError | None = None

    def errors(self, key: str = "_") -> dict[str, list[str]]:
        """The error by field, for a form shown again (``{key: [sentence]}`` when it names none)."""
        return field_errors(self.exc) or {key: [error_text(self.exc)]}


@contextmanager
def refused(*kinds: type[HeraldError]) -> Iterator[Refusal]:
    """For a form shown again with its errors: a domain error (of ``kinds``, all by default)
    raised in the block rolls the session back and is kept in the :class:`Refusal` yielded."""
    refusal = Refusal()
    caught = kinds or (HeraldError,)
    try:
        yield refusal
    except caught as exc:
        get_db().rollback()
        refusal.exc = exc


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


