"""The sink as a Flask app: ``/v3/mail/send`` (see ``mail_send``), the JSON control endpoints
under ``/_sink/`` (records, stats, fault controls, events) and the HTML outbox (``pages``)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request

from . import pages
from .mail_send import MailSend
from .pages import EXTENSION_KEY, BadInput, int_arg, sink_state
from .state import SinkState
from .wire import err

bp = Blueprint("sink_control", __name__, url_prefix="/_sink")

_SUMMARY_FIELDS = ("seq", "time", "key", "to", "subject", "status", "message_id", "idempotency_key")


def create_sink_app(config: dict | None = None) -> Flask:
    """The sink as a Flask app; ``app.extensions["sendgrid_sink"]`` is its SinkState."""
    app = Flask("herald_sendgrid_sink")
    app.config.update(config or {})
    state = SinkState(config)
    app.extensions[EXTENSION_KEY] = state
    app.wsgi_app = MailSend(app.wsgi_app, state)  # type: ignore[method-assign]
    app.register_blueprint(bp)
    app.register_blueprint(pages.bp)
    app.register_error_handler(BadInput, lambda exc: (jsonify({"error": str(exc)}), 400))
    app.register_error_handler(404, lambda _exc: (jsonify({"errors": [err("not found")]}), 404))
    app.register_error_handler(405, lambda _exc: (jsonify({"errors": [err("method not allowed")]}), 405))
    return app


def _json_body() -> Any:
    data = request.get_json(silent=True)
    if data is None and request.get_data():
        raise BadInput("the body must be JSON")
    return data


# --------------------------------------------------------------------------- records


@bp.get("/messages")
def messages():
    recs = sink_state().select(since=int_arg("since", 0) or 0, key=request.args.get("key"),
                               status=request.args.get("status"), limit=int_arg("limit"))
    if request.args.get("fields") == "summary":
        recs = [{f: r[f] for f in _SUMMARY_FIELDS} for r in recs]
    return jsonify({"count": len(recs), "messages": recs})


@bp.get("/messages/<int:seq>")
def message(seq: int):
    rec = sink_state().get(seq)
    if rec is None:
        return jsonify({"error": f"no message {seq}"}), 404
    return jsonify(rec)


@bp.get("/stats")
def stats():
    return jsonify(sink_state().stats())


@bp.get("/keys")
def keys():
    accepted = request.args.get("accepted") in ("1", "true", "yes")
    idem = request.args.get("by") == "idempotency"
    return jsonify(sink_state().key_counts(accepted=accepted, idempotency=idem))


@bp.post("/reset")
def reset():
    sink_state().reset()
    return jsonify({"ok": True})


# --------------------------------------------------------------------------- fault controls


@bp.get("/behaviour")
def get_behaviour():
    return jsonify({"behaviours": sink_state().describe_behaviours()})


@bp.post("/behaviour")
def set_behaviour():
    data = _json_body()
    specs = data if isinstance(data, list) else [data] if isinstance(data, dict) else None
    if specs is None or not all(isinstance(s, dict) for s in specs):
        raise BadInput('send {"mode": "429"|"5xx"|"slow"|"hang"|"ok", ...} or a list of them')
    try:
        current = sink_state().set_behaviours(specs, append=request.args.get("append") in ("1", "true"))
    except (TypeError, ValueError) as exc:
        raise BadInput(str(exc)) from None
    return jsonify({"ok": True, "behaviours": current})


@bp.route("/fail-addresses", methods=["GET", "POST", "DELETE"])
def fail_addresses():
    state = sink_state()
    if request.method == "DELETE":
        state.clear_fail_addresses()
        return jsonify({"ok": True, "emails": []})
    if request.method == "POST":
        data = _json_body()
        emails = data.get("emails") if isinstance(data, dict) else None
        if isinstance(emails, str):
            emails = [emails]
        if not isinstance(emails, list) or not all(isinstance(e, str) for e in emails):
            raise BadInput('send {"emails": [...], "status"?: 400}')
        status = data.get("status", 400)
        if not isinstance(status, int) or not 400 <= status <= 599:
            raise BadInput("status must be a 4xx or 5xx code")
        state.refuse_addresses(emails, status)
    current = state.fail_addresses()
    return jsonify({"ok": True, "emails": sorted(current), "statuses": current})


# --------------------------------------------------------------------------- events


@bp.get("/event-public-key")
def event_public_key():
    state = sink_state()
    if request.args.get("format") == "json" or request.accept_mimetypes.best == "application/json":
        return jsonify({"public_key": state.public_key})
    return Response(state.public_key, mimetype="text/plain")


@bp.route("/events-url", methods=["GET", "POST"])
def events_url():
    state = sink_state()
    if request.method == "POST":
        data = _json_body()
        url = data.get("url") if isinstance(data, dict) else None
        if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
            raise BadInput('send {"url": "http://..."} or {"url": null}')
        state.events_url = url or None
    return jsonify({"url": state.events_url})


@bp.post("/events")
def post_event():
    state = sink_state()
    data = _json_body()
    if not isinstance(data, dict):
        raise BadInput('send {"seq": n | "key": k, "event": "bounce", ...} or {"events": [...]}')
    url = data.get("webhook_url") or state.events_url
    if not url:
        return jsonify({"error": "no events URL: set SINK_EVENTS_URL or POST /_sink/events-url"}), 409
    if isinstance(data.get("events"), list):
        events = data["events"]
    else:
        events = _events_for_message(state, data)
        if isinstance(events, tuple):  # an error answer
            return events
    try:
        status, body = state.post_events(events, url=url, signed=data.get("signed", True) is not False,
                                         bad_signature=bool(data.get("bad_signature")))
    except Exception as exc:
        return jsonify({"error": f"{type(exc).__name__}: {exc}", "events": events}), 502
    return jsonify({"status": status, "events": events, "response": body[:2000].decode("utf-8", "replace")})


def _events_for_message(state: SinkState, data: dict) -> list[dict] | tuple[Response, int]:
    """The events {"seq" | "key", "event", ...} asks for, or a 404 answer."""
    kind = data.get("event")
    if not isinstance(kind, str) or not kind:
        raise BadInput("event is required")
    if data.get("seq") is not None:
        try:
            rec = state.get(int(data["seq"]))
        except (TypeError, ValueError):
            raise BadInput("seq must be an integer") from None
    elif isinstance(data.get("key"), str):
        rec = state.find_for_key(data["key"])
    else:
        raise BadInput("seq or key is required")
    if rec is None:
        return jsonify({"error": "no such message"}), 404
    events = state.build_events(rec, [kind], email=data.get("email"), options=data, timestamp=data.get("timestamp"))
    if not events:
        return jsonify({"error": "that message has no such recipient"}), 404
    return events
