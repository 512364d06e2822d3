"""Replies from SendGrid Inbound Parse: match to the message replied to, tell auto-replies apart.

:func:`ingest` takes the posted form fields (``headers``, ``from``, ``to``, ``cc``, ``subject``,
``text``, ``html``, ``envelope`` JSON; or ``email``, the raw MIME message, when the parse
setting "POST the raw, full MIME message" is on) and, in one transaction:

1. stores a :class:`~campaigns.models.Reply` once: ``dedupe_key`` is sha256 of the reply's own
   Message-ID (else of its content), so Inbound Parse's retries (up to 72 hours on a 5xx)
   store and count it once;
2. matches it: the ``reply+<token>@...`` recipient (``tokens.read_reply_token``; any domain,
   the token is signed, so an INBOUND_DOMAIN changed since the send still matches), else the
   ``<message_key@host>`` ids in In-Reply-To, then References (newest first);
3. tells auto-replies apart (:func:`auto_reply_reason`): stored with ``is_auto``, no effect;
4. a real reply to a known message sets ``messages.replied_at`` once and stops the contact's
   sequence in that campaign when ``stop_on`` has ``reply`` (the default). Test sends are
   never stopped on.

A reply to nothing known is stored too (``message_id`` NULL).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from email import message_from_string
from email.message import Message as MimeMessage
from email.policy import compat32
from email.utils import getaddresses, parseaddr

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .db import dialect_insert, utcnow
from .errors import BadRequest
from .models import Campaign, Message, Reply
from .sequences import stop_contact_in_campaign
from .tokens import read_reply_token

TEXT_MAX = 200_000
HEADERS_MAX = 64_000
_MSGID = re.compile(r"<([^<>\s]+)>")
_KEY = re.compile(r"[0-9a-f]{32}")
_AUTO_SUBJECT = re.compile(
    r"out of (the )?office|automatic reply|auto[- ]?reply|autoreply|auto[- ]?response|autorespond|"
    r"away from (the )?office|on vacation|vacation reply|abwesenheitsnotiz|automatische antwort|"
    r"r[ée]ponse automatique|respuesta autom[áa]tica|risposta automatica|autosvar|"
    r"delivery status notification|undeliverable|undelivered mail|mail delivery (failed|subsystem)|"
    r"returned mail|delivery failure",
    re.IGNORECASE,
)
_AUTO_SENDERS = ("mailer-daemon", "postmaster")
_AUTO_PRECEDENCE = ("auto_reply", "bulk", "junk")


@dataclass
class Ingested:
    reply: Reply
    duplicate: bool
    message: Message | None


def _clean(value, limit: int | None = None) -> str | None:
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", "")
    if not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    return (value[:limit] if limit else value) or None


def _parse_headers(raw: str) -> MimeMessage:
    # compat32 is lenient: a header block with odd lines still parses, values stay plain strings.
    return message_from_string((raw or "").lstrip("\r\n") + "\n\n", policy=compat32)


def _first_text(msg: MimeMessage) -> str | None:
    for part in msg.walk():
        if part.get_content_type() == "text/plain" and not part.is_multipart():
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                return payload.decode(part.get_content_charset() or "utf-8", "replace")
    return None


def _header(headers: MimeMessage, name: str) -> str:
    values = headers.get_all(name) or []
    return " ".join(str(v) for v in values).strip()


def auto_reply_reason(headers: MimeMessage, sender: str, subject: str, envelope_from: str | None) -> str | None:
    """Why this looks like an auto-reply or a bounce sent as mail (None: a person wrote it)."""
    auto_submitted = _header(headers, "Auto-Submitted").lower()
    if auto_submitted and auto_submitted.split(";")[0].strip() != "no":
        return f"Auto-Submitted: {auto_submitted}"
    for name in ("X-Autoreply", "X-Autorespond", "X-Autoresponder", "X-Failed-Recipients"):
        if headers.get(name) is not None:
            return name
    precedence = _header(headers, "Precedence").lower()
    if precedence in _AUTO_PRECEDENCE:
        return f"Precedence: {precedence}"
    if "multipart/report" in _header(headers, "Content-Type").lower():
        return "multipart/report"
    local = sender.rpartition("@")[0].lower()
    if local in _AUTO_SENDERS:
        return f"sender {sender}"
    if _header(headers, "Return-Path") == "<>" or envelope_from in ("", "<>"):
        return "null sender"
    if subject and _AUTO_SUBJECT.search(subject):
        return "subject"
    return None


def _addresses(*values: str | None) -> list[str]:
    return [addr.strip() for _, addr in getaddresses([v for v in values if v]) if addr and "@" in addr]


def _by_token(session: Session, recipients: list[str]) -> Message | None:
    for addr in recipients:
        local = addr.rpartition("@")[0]
        if local.lower().startswith("reply+"):
            key = read_reply_token(local[len("reply+"):])
            if key:
                msg = session.scalar(select(Message).where(Message.message_key == key))
                if msg is not None:
                    return msg
    return None


def _keys_from_ids(raw: str) -> list[str]:
    keys = []
    for mid in _MSGID.findall(raw or ""):
        local = mid.partition("@")[0].lower()
        if _KEY.fullmatch(local):
            keys.append(local)
    return keys


def _by_references(session: Session, in_reply_to: str, references: str) -> tuple[Message | None, str | None]:
    ordered = [("in-reply-to", k) for k in _keys_from_ids(in_reply_to)]
    ordered += [("references", k) for k in reversed(_keys_from_ids(references))]
    if not ordered:
        return None, None
    found = {m.message_key: m for m in session.scalars(
        select(Message).where(Message.message_key.in_(sorted({k for _, k in ordered})))
    )}
    for how, key in ordered:
        if key in found:
            return found[key], how
    return None, None


def ingest(session: Session, fields: dict[str, str]) -> Ingested:
    """Store and apply one Inbound Parse post; BadRequest when it is not one. The caller commits."""
    raw_mime = fields.get("email")
    if not any(fields.get(k) for k in ("headers", "email", "from", "to", "envelope")):
        raise BadRequest("not an Inbound Parse post (no headers, email, from, to or envelope field)")
    envelope: dict = {}
    if fields.get("envelope"):
        try:
            envelope = json.loads(fields["envelope"])
        except (ValueError, RecursionError):  # too deeply nested is bad input too, never a retryable 5xx
            raise BadRequest("envelope is not JSON") from None
        if not isinstance(envelope, dict):
            raise BadRequest("envelope is not a JSON object")

    if raw_mime:
        try:
            headers = message_from_string(raw_mime, policy=compat32)
            text = fields.get("text") or _first_text(headers)
        except RecursionError:  # multiparts nested thousands deep: bad input, never a retryable 5xx
            raise BadRequest("email (the raw MIME message) is nested too deeply to read") from None
        header_text = "".join(f"{k}: {v}\n" for k, v in headers.items())
    else:
        header_text = fields.get("headers") or ""
        headers = _parse_headers(header_text)
        text = fields.get("text")
    subject = fields.get("subject") or _header(headers, "Subject")
    sender = parseaddr(fields.get("from") or _header(headers, "From"))[1].strip().lower()
    env_to = envelope.get("to")
    env_to = [a for a in env_to if isinstance(a, str)] if isinstance(env_to, list) else []
    recipients = env_to + _addresses(fields.get("to"), fields.get("cc"), _header(headers, "To"),
                                     _header(headers, "Cc"), _header(headers, "Delivered-To"))
    env_from = envelope.get("from") if isinstance(envelope.get("from"), str) else None

    own_id = _header(headers, "Message-ID")
    basis = ("mid:" + own_id) if own_id else "content:" + "\x1f".join(
        (header_text, fields.get("from") or "", fields.get("to") or "", subject or "", text or ""))
    dedupe_key = hashlib.sha256(basis.encode("utf-8", "replace")).hexdigest()

    message, matched_by = _by_token(session, recipients), "token"
    if message is None:
        message, matched_by = _by_references(session, _header(headers, "In-Reply-To"), _header(headers, "References"))
    is_auto = auto_reply_reason(headers, sender, subject or "", env_from) is not None

    now = utcnow()
    t = Reply.__table__
    row = {
        "workspace_id": message.workspace_id if message else None,
        "message_id": message.id if message else None,
        "from_email": _clean(sender, 320),
        "subject": _clean(subject, 2000),
        "is_auto": is_auto,
        "matched_by": matched_by if message else None,
        "headers": _clean(header_text, HEADERS_MAX),
        "text": _clean(text, TEXT_MAX),
        "dedupe_key": dedupe_key,
        "received_at": now,
    }
    new_id = session.execute(
        dialect_insert(session)(t).values(**row).on_conflict_do_nothing(index_elements=[t.c.dedupe_key])
        .returning(t.c.id)
    ).scalar()
    if new_id is None:  # Inbound Parse retried a post we already have
        existing = session.scalar(select(Reply).where(Reply.dedupe_key == dedupe_key))
        return Ingested(existing, True, message)
    reply = session.get(Reply, new_id)
    if message is not None and not is_auto:
        session.execute(
            update(Message).where(Message.id == message.id, Message.replied_at.is_(None))
            .values(replied_at=now, updated_at=now).execution_options(synchronize_session=False)
        )
        campaign = session.get(Campaign, message.campaign_id)
        stop_on = campaign.stop_on if campaign is not None and campaign.stop_on is not None else ["reply"]
        if "reply" in stop_on and message.contact_id and not message.is_test:
            stop_contact_in_campaign(session, message.campaign_id, message.contact_id, "reply")
    return Ingested(reply, False, message)
