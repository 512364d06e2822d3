"""The development outbox: what the local SendGrid sink received for this workspace.

Registered by the app factory only when mail goes to the sink (no ``SENDGRID_API_KEY``); the sink
is asked over HTTP, server-side, so the browser needs no access to it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime

from flask import Blueprint, Flask, g, render_template
from sqlalchemy import select

from campaigns.db import one_of
from campaigns.errors import HeraldError, NotFound
from campaigns.models import Campaign, Message

from .auth import login_required
from .db import get_db
from .params import int_arg
from .ui import blueprint as ui
from .ui.blueprint import settings
from .ui.ops import _labels

SINK_TIMEOUT = 3.0
OUTBOX_PAGE = 50

bp = Blueprint("outbox", __name__)
# The UI's page context (menus, workspaces) and its error page, as on every other UI page.
bp.context_processor(ui._layout_context)
bp.register_error_handler(HeraldError, ui._domain_error)


def init_app(app: Flask) -> None:
    """Register the outbox when mail goes to the local sink; templates show its link then."""
    enabled = app.config["HERALD_SETTINGS"].uses_sink
    if enabled:
        app.register_blueprint(bp)
    app.add_template_global(enabled, "outbox_enabled")


class SinkUnavailable(Exception):
    pass


def _sink_get(path: str, **params):
    """GET a JSON document from the local sink."""
    host = settings().sendgrid_api_host.rstrip("/")
    query = ("?" + urllib.parse.urlencode(params)) if params else ""
    try:
        with urllib.request.urlopen(host + path + query, timeout=SINK_TIMEOUT) as resp:  # our own URL
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            exc.close()
            return None
        exc.close()
        raise SinkUnavailable(f"the sink answered {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SinkUnavailable(str(getattr(exc, "reason", exc))) from None


def _ledger_for_keys(db, keys: set[str]) -> dict[str, Message]:
    if not keys:
        return {}
    rows = db.scalars(select(Message).where(Message.workspace_id == g.workspace_id,
                                            one_of(db, Message.message_key, sorted(keys))))
    return {m.message_key: m for m in rows}


def _unavailable(host: str, exc: SinkUnavailable):
    return render_template("outbox.html", sink_url=host, rows=[], error=str(exc), hidden=0, older=None,
                           calls=0), 503


@bp.get("/outbox")
@login_required
def index():
    db = get_db()
    host = settings().sendgrid_api_host.rstrip("/")
    before = int_arg("before", strict=False)
    try:
        calls = int((_sink_get("/_sink/stats") or {}).get("calls", 0))
        end = calls if before is None else min(calls, before - 1)
        since = max(0, end - OUTBOX_PAGE)
        data = _sink_get("/_sink/messages", fields="summary", since=since, limit=end - since) if end > 0 else None
    except SinkUnavailable as exc:
        return _unavailable(host, exc)
    recs = list(reversed((data or {}).get("messages") or []))
    for r in recs:
        r["time_text"] = datetime.fromtimestamp(r.get("time") or 0, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    ledger = _ledger_for_keys(db, {r["key"] for r in recs if r.get("key")})
    names, steps = _labels(db, list(ledger.values()))
    rows = [(r, ledger[r["key"]]) for r in recs if r.get("key") in ledger]
    return render_template("outbox.html", sink_url=host, error=None, rows=rows, hidden=len(recs) - len(rows),
                           calls=calls, names=names, steps=steps, older=since if since > 0 else None)


@bp.get("/outbox/<int:seq>")
@login_required
def message(seq: int):
    db = get_db()
    host = settings().sendgrid_api_host.rstrip("/")
    try:
        rec = _sink_get(f"/_sink/messages/{seq}") if seq < 2**31 else None
    except SinkUnavailable as exc:
        return _unavailable(host, exc)
    message = _ledger_for_keys(db, {rec["key"]}).get(rec["key"]) if rec and rec.get("key") else None
    if message is None:  # not this workspace's (or not Herald's) email
        raise NotFound(f"The outbox has no message #{seq} of this workspace.")
    campaign = db.get(Campaign, message.campaign_id)
    return render_template("outbox_message.html", rec=rec, m=message, campaign=campaign, sink_url=host)
