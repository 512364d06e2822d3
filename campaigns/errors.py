"""Domain errors. The web layer maps each to the contract's error shape and a 4xx status."""

from __future__ import annotations


class HeraldError(Exception):
    """Base class: ``code`` is machine-readable, the message is for people."""

    code = "error"
    status = 400

    def __init__(self, message: str, details: dict | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        if code:
            self.code = code


class NotFound(HeraldError):
    code = "not_found"
    status = 404


class Conflict(HeraldError):
    code = "conflict"
    status = 409


class InvalidInput(HeraldError):
    """Input that is well-formed but not acceptable (HTTP 422)."""

    code = "invalid"
    status = 422


class BadRequest(HeraldError):
    code = "bad_request"
    status = 400
