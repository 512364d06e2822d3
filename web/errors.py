"""The contract's error shape: {"error": {"code", "message", "details"}} with a fitting 4xx."""

from __future__ import annotations

import logging

from flask import jsonify, make_response, render_template, request
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from campaigns.db import TRANSIENT_ERRORS, error_reason
from campaigns.errors import HeraldError
from tasks import STORE_ERRORS

log = logging.getLogger("herald.web")
RETRY_AFTER = 5  # seconds a 503 asks the client to wait


def error_response(status: int, code: str, message: str, details: dict | None = None):
    resp = jsonify({"error": {"code": code, "message": message, "details": details or {}}})
    resp.status_code = status
    return resp


def _wants_json() -> bool:
    return (
        request.path.startswith("/api/")
        or request.path.startswith("/webhooks/")
        or request.accept_mimetypes.best == "application/json"
    )


def init_app(app) -> None:
    @app.errorhandler(HeraldError)
    def _herald_error(exc: HeraldError):
        return error_response(exc.status, exc.code, exc.message, exc.details)

    @app.errorhandler(ValidationError)
    def _validation_error(exc: ValidationError):
        messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        return error_response(422, "validation_failed", "the request body is not valid", messages)

    def _unavailable(exc: Exception):
        # The database or the queue store did not answer (a restart, a failover): a 503 to retry,
        # not a 500. What the driver said (host names, ports) goes to the log, not to the client.
        what = "queue store (Redis)" if isinstance(exc, STORE_ERRORS) else "database"
        log.warning("%s %s: the %s did not answer (%s)", request.method, request.path, what, error_reason(exc))
        message = f"Herald's {what} is not answering; try again in a moment"
        if _wants_json():
            resp = error_response(503, "unavailable", message)
        else:  # the plain page: the usual layout would ask the database for its menus
            resp = make_response(render_template("error.html", status=503, message=message + ".", plain=True), 503)
        resp.headers["Retry-After"] = str(RETRY_AFTER)
        return resp

    for exc_type in (*TRANSIENT_ERRORS, *STORE_ERRORS):
        app.register_error_handler(exc_type, _unavailable)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if not _wants_json():
            return exc
        code = (exc.name or "error").lower().replace(" ", "_")
        resp = error_response(exc.code or 500, code, exc.description or exc.name)
        # the exception's own headers go along: a 405's Allow (RFC 9110 requires it), a 429's Retry-After
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                resp.headers[name] = value
        return resp
