"""Mail providers behind one contract (``Mailer``), and the factory that picks one."""

from __future__ import annotations

from ..config import get_settings
from .base import (
    AccountError,
    AmbiguousSendError,
    Mailer,
    OutgoingEmail,
    PermanentSendError,
    RetryableSendError,
    SendError,
    SendResult,
)

__all__ = [
    "AccountError",
    "AmbiguousSendError",
    "Mailer",
    "OutgoingEmail",
    "PermanentSendError",
    "RetryableSendError",
    "SendError",
    "SendResult",
    "get_mailer",
    "mailer_for",
    "set_mailer",
]

_mailer = None


def get_mailer():
    """The process's mailer (built lazily from the settings; one pooled HTTP client)."""
    global _mailer
    if _mailer is None:
        from .sendgrid import SendGridMailer  # the sendgrid library loads with the first mailer, not on import

        s = get_settings()
        _mailer = SendGridMailer(api_key=s.sendgrid_api_key or "local-sink", host=s.sendgrid_api_host,
                                 timeout=s.send_timeout)
    return _mailer


def set_mailer(mailer) -> None:
    global _mailer
    _mailer = mailer


def mailer_for(sender) -> Mailer:
    """The mailer that sends as ``sender`` (a ``Sender`` row or a detached copy; None: the
    account's SendGrid mailer). SendGrid identities share the process's one SendGrid mailer;
    an SMTP mailbox gets its own (``smtp.smtp_mailer``: pooled connections per consumer thread)."""
    if sender is None or sender.provider != "smtp":
        return get_mailer()
    from .smtp import smtp_mailer  # smtplib and the pools load with the first SMTP sender

    return smtp_mailer(sender)
