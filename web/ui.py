"""The web UI (server-rendered Jinja pages)."""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Blueprint, flash, redirect, render_template, request, url_for

from campaigns.accounts import authenticate, user_workspaces

from .auth import login_required, login_user, logout_user
from .db import get_db

bp = Blueprint("ui", __name__)


def _safe_next(target: str | None) -> str:
    if not target:
        return url_for("ui.home")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/"):
        return url_for("ui.home")
    return target


@bp.route("/login", methods=["GET", "POST"])
def login():
    error = None
    if request.method == "POST":
        db = get_db()
        user = authenticate(db, request.form.get("email", ""), request.form.get("password", ""))
        workspaces = user_workspaces(db, user.id) if user else []
        if user is None:
            error = "Wrong email or password."
        elif not workspaces:
            error = "Your account belongs to no workspace yet."
        else:
            login_user(user.id, workspaces[0].id)
            return redirect(_safe_next(request.args.get("next")))
    return render_template("login.html", error=error), (401 if error else 200)


@bp.post("/logout")
def logout():
    logout_user()
    flash("You are signed out.")
    return redirect(url_for("ui.login"))


@bp.get("/")
@login_required
def home():
    return render_template("home.html")
