"""``POST /v3/mail/send``: a plain WSGI handler in front of the sink's Flask app (the hot path).

Reads the body (up to SendGrid's 20 MB, gzip allowed), checks the Bearer key and the body,
records the call through the fault controls and answers as SendGrid does.
"""

from __future__ import annotations

import json
import socket
import sys
import time
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from .faults import Behaviour
from .state import SinkState, extract
from .wire import (
    ERR_AUTH_BAD,
    ERR_AUTH_MISSING,
    MAX_BODY_BYTES,
    REASONS,
    err,
    error_body,
    status_message,
    validate_mail_send,
)

_JSON_HEADERS = [("Content-Type", "application/json")]


def _read_body(environ: dict) -> tuple[bytes | None, int]:
    """(body, declared length); body None when it exceeds the limit (the rest is drained)."""
    stream = environ.get("wsgi.input")
    length_header = environ.get("CONTENT_LENGTH") or ""
    try:
        length = int(length_header) if length_header else -1
    except ValueError:
        length = -1
    if stream is None:
        return b"", length
    if length > MAX_BODY_BYTES:
        remaining = min(length, 4 * MAX_BODY_BYTES)  # let the client finish sending, then answer 413
        while remaining > 0:
            chunk = stream.read(min(remaining, 1 << 20))
            if not chunk:
                break
            remaining -= len(chunk)
        return None, length
    if length >= 0:
        parts = []
        remaining = length
        while remaining > 0:
            chunk = stream.read(remaining)
            if not chunk:
                break
            parts.append(chunk)
            remaining -= len(chunk)
        return b"".join(parts), length
    if environ.get("wsgi.input_terminated") or environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked":
        data = stream.read(MAX_BODY_BYTES + 1)
        if len(data) > MAX_BODY_BYTES:
            return None, len(data)
        return data, len(data)
    return b"", length


def _drop_connection(environ: dict) -> bool:
    sock = environ.get("herald_sink.socket") or environ.get("werkzeug.socket") or environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    return True


def _authorize(rec: dict, auth: str | None, api_key: str | None) -> bool:
    """True when the Bearer key is acceptable; else records the 401."""
    if not auth:
        rec["status"], rec["errors"] = 401, [err(ERR_AUTH_MISSING)]
        return False
    scheme, _, token = auth.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or (api_key and token != api_key):
        rec["status"], rec["errors"] = 401, [err(ERR_AUTH_BAD)]
        return False
    return True


def _parse(rec: dict, body_bytes: bytes, encoding: str) -> Any:
    """The JSON body (None when unreadable); a 400/413/415 verdict unless one is already set."""
    try:
        if encoding.lower() == "gzip":
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            body_bytes = inflater.decompress(body_bytes, MAX_BODY_BYTES + 1)
            if len(body_bytes) > MAX_BODY_BYTES:
                raise OverflowError
        text = body_bytes.decode("utf-8")
        try:
            return json.loads(text)
        except ValueError:
            if rec["status"] == 202:
                rec["status"], rec["errors"] = 400, [err("Bad Request")]
    except OverflowError:
        if rec["status"] == 202:
            rec["status"], rec["errors"] = 413, [err(status_message(413))]
    except (UnicodeDecodeError, zlib.error):
        if rec["status"] == 202:
            rec["status"], rec["errors"] = 415, [err("Invalid UTF8 in request")]
    return None


class MailSend:
    """WSGI handler for POST /v3/mail/send; every other path goes to the Flask app."""

    def __init__(self, flask_wsgi: Callable, state: SinkState) -> None:
        self.flask_wsgi = flask_wsgi
        self.state = state

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path != "/v3/mail/send" and path != "/v3/mail/send/":
            return self.flask_wsgi(environ, start_response)
        if environ.get("REQUEST_METHOD") != "POST":
            start_response("405 METHOD NOT ALLOWED", [*_JSON_HEADERS, ("Allow", "POST")])
            return [error_body([err("method not allowed")])]
        return self.mail_send(environ, start_response)

    def mail_send(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        state = self.state
        now = time.time()
        body_bytes, size = _read_body(environ)
        rec: dict = {
            "seq": None, "time": now, "status": 202, "message_id": None,
            "idempotency_key": environ.get("HTTP_IDEMPOTENCY_KEY"),
            "errors": None, "behaviour": None, "truncated": False, "size": size,
            "user_agent": sys.intern(environ.get("HTTP_USER_AGENT") or "") or None,
        }
        parsed: Any = None
        authed = False
        if body_bytes is None:
            rec["status"], rec["errors"] = 413, [err(status_message(413))]
        else:
            authed = _authorize(rec, environ.get("HTTP_AUTHORIZATION"), state.api_key)
        if body_bytes:
            parsed = _parse(rec, body_bytes, environ.get("HTTP_CONTENT_ENCODING", ""))
        elif rec["status"] == 202:
            rec["status"], rec["errors"] = 400, [err("Bad Request")]
        if rec["status"] == 202:
            errors = validate_mail_send(parsed)
            if errors:
                rec["status"], rec["errors"] = 400, errors
        rec.update(extract(parsed))
        rec, behaviour = state.record_call(rec, authed)
        return self._answer(environ, start_response, rec, behaviour)

    def _answer(self, environ: dict, start_response: Callable, rec: dict,
                behaviour: Behaviour | None) -> Iterable[bytes]:
        if behaviour is not None and behaviour.mode == "hang":
            self.state.wait(behaviour.delay)
            start_response("504 GATEWAY TIMEOUT", [*_JSON_HEADERS])
            if _drop_connection(environ):
                return [b""]
            return [error_body([err("the sink held this request and dropped it (hang)")])]
        if behaviour is not None and behaviour.mode == "slow":
            self.state.wait(behaviour.delay)
        status = rec["status"]
        if status == 202:
            start_response("202 ACCEPTED", [("Content-Length", "0"), ("X-Message-Id", rec["message_id"])])
            return [b""]
        headers = list(_JSON_HEADERS)
        if status == 429:
            limit = behaviour.limit if behaviour is not None else 600
            reset_in = behaviour.reset_in if behaviour is not None else 1.0
            headers += [
                ("X-RateLimit-Limit", str(limit)),
                ("X-RateLimit-Remaining", "0"),
                ("X-RateLimit-Reset", str(int(time.time() + reset_in))),
            ]
        payload = error_body(rec["errors"] or [err(status_message(status))])
        headers.append(("Content-Length", str(len(payload))))
        start_response(f"{status} {REASONS.get(status, 'ERROR')}", headers)
        return [payload]
