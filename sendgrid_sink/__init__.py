"""The local SendGrid sink: a development tool that speaks SendGrid's real v3 wire format.

It records every ``POST /v3/mail/send`` in memory, answers as SendGrid does, injects failures on
request and posts signed Event Webhook batches back to Herald. Standalone on purpose: it imports
nothing from ``campaigns``, ``web`` or ``tasks``, and nothing starts at import time. Run it with
``flask --app wsgi sendgrid-sink``; routes, fault controls and settings are in docs/sink.md.

Modules: ``wire`` (the body checks), ``state`` (what was recorded), ``faults`` (failure
injection), ``events`` (signing and posting events), ``mail_send`` and ``app`` (the endpoints),
``pages`` (the HTML outbox), ``server`` (the HTTP server, ``run_sink``).
"""

from __future__ import annotations

from .app import create_sink_app
from .events import SIGNATURE_HEADER, TIMESTAMP_HEADER, generate_key_pair, public_key_b64, sign_events
from .pages import EXTENSION_KEY
from .server import SinkServer, make_sink_server, run_sink
from .state import SinkConfigError, SinkState
from .wire import MAX_BODY_BYTES, validate_mail_send

__all__ = [
    "EXTENSION_KEY",
    "MAX_BODY_BYTES",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "SinkConfigError",
    "SinkServer",
    "SinkState",
    "create_sink_app",
    "generate_key_pair",
    "make_sink_server",
    "public_key_b64",
    "run_sink",
    "sign_events",
    "validate_mail_send",
]
