"""Who is calling: a signed-in UI session or an API key. Guards for the UI and the API."""

from __future__ import annotations

import functools

from flask import current_app, g, redirect, request, session, url_for

from campaigns.accounts import end_session, session_alive, start_session, user_workspaces, workspace_for_api_key

from .db import get_db


def login_user(user_id: int, workspace_id: int) -> None:
    """Sign in: a new server-side session (its token in the signed cookie), committed at once."""
    db = get_db()
    token = start_session(db, user_id, current_app.permanent_session_lifetime)
    db.commit()
    session.clear()
    session["user_id"] = user_id
    session["workspace_id"] = workspace_id
    session["sid"] = token
    session.permanent = True


def logout_user() -> None:
    """Sign out: the server forgets the session, so a copy of the cookie opens nothing either."""
    db = get_db()
    end_session(db, session.get("sid"))
    db.commit()
    session.clear()


def session_workspace() -> int | None:
    """The signed-in user's current workspace, checked against their memberships (and the
    session against the server's: signed out or expired, it is no session)."""
    user_id, workspace_id = session.get("user_id"), session.get("workspace_id")
    if not user_id or not workspace_id:
        return None
    if "session_ok" not in g:
        g.session_ok = session_alive(get_db(), user_id, session.get("sid"))
    if not g.session_ok:
        return None
    if "session_workspaces" not in g:
        g.session_workspaces = {ws.id: ws for ws in user_workspaces(get_db(), user_id)}
    return workspace_id if workspace_id in g.session_workspaces else None


def bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def api_workspace() -> tuple[int | None, str]:
    """(workspace id, how): by Bearer key first, else by the UI session."""
    token = bearer_token()
    if token is not None:
        return workspace_for_api_key(get_db(), token), "key"
    return session_workspace(), "session"


def login_required(view):
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        workspace_id = session_workspace()
        if workspace_id is None:
            return redirect(url_for("ui.login", next=request.full_path.rstrip("?")))
        g.workspace_id = workspace_id
        g.user_id = session["user_id"]
        return view(*args, **kwargs)

    return wrapped
