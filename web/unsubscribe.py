"""Unsubscribe: ``GET /u/<token>`` (a confirm page) and ``POST /u/<token>`` (RFC 8058 one-click).

The token (``campaigns.tokens.unsubscribe_token``) is signed with SECRET_KEY: not guessable,
not expiring; it names the workspace, the address and the message it came in. The POST needs
no cookie, login or CSRF token (mail clients send ``List-Unsubscribe=One-Click`` from their own
servers; the confirm page's button posts the same body to the same URL). It suppresses the
address in that workspace synchronously (``suppressions.suppress``: suppression row, contact status,
every sequence to the address stopped) and sets the message's ``unsubscribed_at`` once.

From the moment the POST returns, no further email is handed to the provider for that address:
the send path re-checks suppression right before each call (one check per group of calls that
start together), and a call that passed that check
before the suppression committed is waited for (it shows as ``sending``) before answering, up
to the send timeout. The suppression row's ``created_at`` is the recorded time.
"""

from __future__ import annotations

import logging
import time

from flask import Blueprint, current_app, make_response, render_template
from flask import session as cookie_session
from sqlalchemy import exists, select, update

from campaigns import contacts, suppressions
from campaigns.db import utcnow
from campaigns.models import Message, Suppression, Workspace
from campaigns.tokens import read_unsubscribe_token

from .db import get_db

bp = Blueprint("unsubscribe", __name__)
log = logging.getLogger("herald.unsubscribe")


def _page(template: str, status: int = 200, **context):
    resp = make_response(render_template(template, **context), status)
    # These pages set no cookie: the layout's CSRF meta tag puts a token in the session, which
    # nothing here needs (the one-click POST is exempt), so the session is not saved.
    cookie_session.modified = False
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["Referrer-Policy"] = "no-referrer"  # the token is in the URL
    resp.headers["X-Robots-Tag"] = "noindex"
    return resp


def _target(token: str):
    """(workspace_id, email, message_key) for a valid token whose workspace still exists."""
    parsed = read_unsubscribe_token(token)
    if parsed is None:
        return None
    workspace_id, email, key = parsed
    if contacts.text_problem(email) or get_db().get(Workspace, workspace_id) is None:
        return None
    return workspace_id, email.strip().lower(), key


def _not_found():
    return _page("unsubscribe.html", 404, invalid=True)


@bp.get("/u/<token>")
def confirm(token: str):
    target = _target(token)
    if target is None:
        return _not_found()
    workspace_id, email, _ = target
    already = suppressions.is_suppressed(get_db(), workspace_id, email)
    return _page("unsubscribe.html", email=email, token=token, already=already)


def _wait_for_in_flight(workspace_id: int, email: str, timeout: float) -> bool:
    """Wait while a send to this address that began before the suppression is still in its call."""
    session = get_db()
    in_flight = select(
        exists().where(Message.workspace_id == workspace_id, Message.email == email, Message.status == "sending",
                       Message.lease_expires_at > utcnow())
    )
    deadline = time.monotonic() + timeout
    while True:
        busy = session.scalar(in_flight)
        session.rollback()
        if not busy:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


@bp.post("/u/<token>")
def one_click(token: str):
    target = _target(token)
    if target is None:
        return _not_found()
    workspace_id, email, key = target
    session = get_db()
    suppressions.suppress(session, workspace_id, [email], "unsubscribe")
    if key:
        now = utcnow()
        session.execute(
            update(Message)
            .where(Message.message_key == key, Message.workspace_id == workspace_id, Message.unsubscribed_at.is_(None))
            .values(unsubscribed_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
    session.commit()
    suppressed_at = session.scalar(
        select(Suppression.created_at).where(Suppression.workspace_id == workspace_id, Suppression.email == email)
    )
    session.rollback()
    settings = current_app.config["HERALD_SETTINGS"]
    if not _wait_for_in_flight(workspace_id, email, settings.send_timeout + 1.0):
        log.warning("unsubscribe of %s (workspace %s): a send still in flight after %.0f s",
                    email, workspace_id, settings.send_timeout + 1.0)
    log.info("unsubscribed %s in workspace %s (suppressed at %s)", email, workspace_id, suppressed_at)
    return _page("unsubscribed.html", email=email)
