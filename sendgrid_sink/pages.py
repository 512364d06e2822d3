"""The sink's own HTML outbox: every call it received, newest first, and each one's details.

Self-contained pages (inline CSS, no script) under a strict Content-Security-Policy; an email's
HTML is shown in a sandboxed frame whose links open in a new tab. Also the request helpers the
JSON endpoints share (``sink_state``, ``int_arg``, ``BadInput``).
"""

from __future__ import annotations

import html
import json
import time
from typing import Any

from flask import Blueprint, Response, current_app, request

from .state import SinkState

EXTENSION_KEY = "sendgrid_sink"
NEW_TAB = '<base target="_blank">'  # a framed email's links open in a new tab

bp = Blueprint("sink_pages", __name__)

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:10px 20px;display:flex;gap:20px;align-items:baseline}
header a{color:#cfd8ff}main{padding:16px 20px}table{border-collapse:collapse;width:100%;background:#fff}
th,td{padding:6px 10px;border-bottom:1px solid #e3e6eb;text-align:left;vertical-align:top}
th{font-weight:600;background:#eef0f4}.muted{color:#6b7385}.s202{color:#137333}.err{color:#b3261e}
iframe{width:100%;height:70vh;border:1px solid #d0d4dc;background:#fff}pre{white-space:pre-wrap;
background:#fff;border:1px solid #d0d4dc;padding:10px}dl{display:grid;grid-template-columns:max-content 1fr;
gap:4px 16px}dt{font-weight:600}code{font-size:12px}
"""


class BadInput(Exception):
    """A query or body the sink cannot use; answered 400 {"error": message}."""


def sink_state() -> SinkState:
    return current_app.extensions[EXTENSION_KEY]


def int_arg(name: str, default: int | None = None) -> int | None:
    raw = request.args.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise BadInput(f"{name} must be an integer") from None


@bp.get("/")
@bp.get("/_sink/outbox")
def outbox():
    state = sink_state()
    limit = max(1, min(int_arg("limit", 200) or 200, 1000))
    recs = state.latest(limit, int_arg("before"))
    return _page("Outbox", _render_outbox(state, recs, limit))


@bp.get("/_sink/messages/<int:seq>/html")
def message_html(seq: int):
    rec = sink_state().get(seq)
    if rec is None:
        return _page("Not found", f"<p>No message {seq}.</p>"), 404
    return _page(f"#{seq} {rec.get('subject') or ''}", _render_message(rec))


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _page(title: str, body: str) -> Response:
    doc = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(title)} · SendGrid sink</title><style>{_CSS}</style></head><body>"
        "<header><strong>Herald · SendGrid sink</strong><a href=\"/\">Outbox</a>"
        "<a href=\"/_sink/stats\">Stats</a><a href=\"/_sink/messages?fields=summary\">JSON</a></header>"
        f"<main>{body}</main></body></html>"
    )
    resp = Response(doc, mimetype="text/html")
    resp.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data: http: https:; frame-src 'self'"
    )
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def _render_outbox(state: SinkState, recs: list[dict], limit: int) -> str:
    stats = state.stats()
    rows = []
    for r in recs:
        status = "dropped" if r["status"] is None else r["status"]
        cls = "s202" if status == 202 else "err"
        sender = (r.get("from") or {}).get("email")
        rows.append(
            f"<tr><td><a href=\"/_sink/messages/{r['seq']}/html\">#{r['seq']}</a></td>"
            f"<td class=muted>{_e(_when(r['time']))}</td><td class={cls}>{_e(status)}</td>"
            f"<td>{_e(sender)}</td><td>{_e(', '.join(r['to']))}</td>"
            f"<td><a href=\"/_sink/messages/{r['seq']}/html\">{_e(r.get('subject') or '(no subject)')}</a></td>"
            f"<td><code>{_e(r.get('key'))}</code></td></tr>"
        )
    older = ""
    if recs and recs[-1]["seq"] > 1:
        older = f"<p><a href=\"/?before={recs[-1]['seq']}&amp;limit={limit}\">Older →</a></p>"
    summary = (
        f"<p class=muted>{stats['calls']} calls, {stats['accepted']} accepted, "
        f"{stats['keys']['repeated']} message keys sent more than once. Newest first.</p>"
    )
    if not rows:
        return summary + "<p>No email received yet. POST /v3/mail/send to this host.</p>"
    return (
        summary + "<table><thead><tr><th>#</th><th>Received</th><th>Status</th><th>From</th>"
        "<th>To</th><th>Subject</th><th>message_key</th></tr></thead><tbody>"
        + "".join(rows) + "</tbody></table>" + older
    )


def _render_message(rec: dict) -> str:
    status = "dropped" if rec["status"] is None else rec["status"]
    sender = rec.get("from") or {}
    facts = [
        ("Status", status), ("Received", _when(rec["time"])), ("X-Message-Id", rec.get("message_id")),
        ("From", f"{sender.get('name') or ''} <{sender.get('email') or ''}>".strip()),
        ("To", ", ".join(rec["to"])), ("Subject", rec.get("subject")),
        ("Reply-To", (rec.get("reply_to") or {}).get("email")), ("message_key", rec.get("key")),
        ("Idempotency-Key", rec.get("idempotency_key")),
        ("custom_args", json.dumps(rec.get("custom_args") or {})),
        ("headers", json.dumps(rec.get("headers") or {})),
    ]
    parts = ["<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts) + "</dl>"]
    if rec.get("errors"):
        parts.append(f"<pre class=err>{_e(json.dumps(rec['errors'], indent=2))}</pre>")
    if rec.get("html"):
        parts.append(
            # links open in a new tab, as in a mail client (the unsubscribe link, say): no script
            # runs in the frame, and a page of another origin could not be framed here anyway
            "<h3>HTML</h3><iframe sandbox=\"allow-popups allow-popups-to-escape-sandbox\" "
            f"referrerpolicy=\"no-referrer\" srcdoc=\"{_e(NEW_TAB + rec['html'])}\" "
            "title=\"email HTML\"></iframe>"
        )
    if rec.get("text"):
        parts.append(f"<h3>Text</h3><pre>{_e(rec['text'])}</pre>")
    if rec.get("truncated"):
        parts.append("<p class=muted>Details no longer kept (SINK_MAX_STORED_BODIES).</p>")
    parts.append(f"<p><a href=\"/_sink/messages/{rec['seq']}\">JSON</a></p>")
    return "".join(parts)
