"""The contract's error shape: {"error": {"code", "message", "details"}} with a fitting 4xx."""

from __future__ import annotations

from flask import jsonify, request
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from campaigns.errors import HeraldError


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
