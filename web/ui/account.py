"""UI pages of the account: sign in and out, the workspace switcher, settings and API keys."""

from __future__ import annotations

from flask import current_app, flash, g, redirect, render_template, request, session, url_for
from sqlalchemy import select

from campaigns import accounts
from campaigns.accounts import authenticate, user_workspaces
from campaigns.errors import NotFound
from campaigns.ids import parse_id, valid_id
from campaigns.models import ApiKey, Workspace

from ..auth import login_required, login_user, logout_user, remember_device, sign_in_succeeded, throttle_sign_in
from ..db import get_db
from .blueprint import bp, safe_next, settings

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
            target = safe_next(request.args.get("next"))  # before the session row: nothing can fail after it
            login_user(user.id, workspaces[0].id)
            resp = redirect(target)
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
    workspace_id = parse_id(request.form.get("workspace_id"))
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
    row = get_db().get(ApiKey, key_id) if valid_id(key_id) else None
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
