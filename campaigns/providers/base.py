"""The mail provider contract.

Exceptions (callers catch ``SendError``)::

    SendError                      the send did not succeed
    ├── RetryableSendError         timeouts before the request left, connection errors, 429, 5xx:
    │                              try again later (``retry_at`` when the provider said when)
    ├── PermanentSendError         400, 404, 413 ...: this message will never go; fail it now
    │   └── AccountError           401, 403: the account itself is refused; pause the campaign
    └── AmbiguousSendError         the request left but no answer came (read timeout, reset):
                                   the provider may have accepted it; never resend blindly
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


class SendError(Exception):
    def __init__(self, message: str, status: int | None = None, body: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = body


class RetryableSendError(SendError):
    def __init__(self, message: str, status: int | None = None, body: str | None = None,
                 retry_at: datetime | None = None):
        super().__init__(message, status, body)
        self.retry_at = retry_at


class PermanentSendError(SendError):
    pass


class AccountError(PermanentSendError):
    pass


class AmbiguousSendError(SendError):
    pass


@dataclass
class OutgoingEmail:
    """Everything a provider needs for one email; built by the engine, rendered already."""

    message_key: str
    to_email: str
    to_name: str | None
    from_email: str
    from_name: str | None
    subject: str
    html: str
    text: str
    reply_to: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    custom_args: dict[str, str] = field(default_factory=dict)
    track_opens: bool = True
    track_clicks: bool = True
    categories: list[str] = field(default_factory=list)


@dataclass
class SendResult:
    provider_message_id: str | None
    status: int


class Mailer:
    """Hands one email to a provider. Implementations must be thread-safe.

    ``send`` returns a ``SendResult`` once the provider accepted the email, and otherwise
    raises one of the ``SendError`` classes above. It passes ``email.message_key`` as the
    ``Idempotency-Key`` header, though no caller may rely on the provider honouring it.
    """

    def send(self, email: OutgoingEmail) -> SendResult:
        raise NotImplementedError
