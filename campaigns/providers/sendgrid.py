"""SendGrid through the official library's payload helpers, over a pooled HTTP client.

The ``sendgrid`` library builds the ``/v3/mail/send`` JSON (``helpers.mail.Mail``); its own HTTP
path (``python_http_client``) opens a new ``urllib`` connection for every call and keeps the
request headers on the client object, shared by every thread that uses it, so a per-call
``Idempotency-Key`` header is not safe to set there. Herald therefore keeps the library's
payload helpers and posts with one ``urllib3`` connection pool per process: thread-safe,
keep-alive connections, explicit connect/read timeouts. ``bench/send_throughput.py`` measures
both paths side by side (the library's own path is ``bench/library_transport.py``).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import urllib3
from sendgrid.helpers.mail import (
    ClickTracking,
    CustomArg,
    From,
    Header,
    Mail,
    OpenTracking,
    ReplyTo,
    To,
    TrackingSettings,
)

from .base import (
    AccountError,
    AmbiguousSendError,
    Mailer,
    OutgoingEmail,
    PermanentSendError,
    RetryableSendError,
    SendResult,
)

SEND_PATH = "/v3/mail/send"


def build_payload(email: OutgoingEmail) -> dict:
    """The mail-send JSON for one email, made by the library's helpers."""
    mail = Mail(
        from_email=From(email.from_email, email.from_name),
        to_emails=To(email.to_email, email.to_name),
        subject=email.subject,
        plain_text_content=email.text or None,
        html_content=email.html or None,
    )
    if email.reply_to:
        mail.reply_to = ReplyTo(email.reply_to)
    args = {"message_key": email.message_key, **email.custom_args}
    mail.custom_arg = [CustomArg(k, str(v)) for k, v in args.items()]
    if email.headers:
        mail.header = [Header(k, v) for k, v in email.headers.items()]
    mail.tracking_settings = TrackingSettings(
        click_tracking=ClickTracking(email.track_clicks, email.track_clicks),
        open_tracking=OpenTracking(email.track_opens),
    )
    return mail.get()


def _retry_at(headers) -> datetime | None:
    reset = headers.get("X-RateLimit-Reset")
    try:
        return datetime.fromtimestamp(float(reset), UTC).replace(tzinfo=None) if reset else None
    except (TypeError, ValueError, OverflowError):
        return None


def classify(status: int, body: str, headers) -> SendResult:
    """Map a provider answer to a result or one of the contract's exceptions."""
    if status in (200, 202):
        return SendResult(provider_message_id=headers.get("X-Message-Id"), status=status)
    summary = f"HTTP {status}: {body[:300]}"
    if status == 429:
        raise RetryableSendError(summary, status, body, retry_at=_retry_at(headers))
    if status >= 500 or status == 408:
        raise RetryableSendError(summary, status, body)
    if status in (401, 403):
        raise AccountError(summary, status, body)
    raise PermanentSendError(summary, status, body)


class SendGridMailer(Mailer):
    def __init__(self, api_key: str, host: str, timeout: float = 10.0, pool_size: int = 32):
        base = host.rstrip("/")
        self.url = base + SEND_PATH
        self.path = urllib3.util.parse_url(self.url).request_uri
        self.auth = f"Bearer {api_key}"
        self.timeout = urllib3.Timeout(connect=min(5.0, timeout), read=timeout)
        # One host: its connection pool directly (a PoolManager would parse the URL and look the
        # pool up again on every call).
        self.http = urllib3.connection_from_url(base, maxsize=pool_size, block=False, retries=False)

    def send(self, email: OutgoingEmail) -> SendResult:
        body = json.dumps(build_payload(email)).encode()
        headers = {
            "Authorization": self.auth,
            "Content-Type": "application/json",
            "Idempotency-Key": email.message_key,
            "User-Agent": "herald",
        }
        try:
            resp = self.http.urlopen("POST", self.path, body=body, headers=headers, timeout=self.timeout,
                                     retries=False, redirect=False)
        except (urllib3.exceptions.ConnectTimeoutError, urllib3.exceptions.NewConnectionError) as exc:
            # The request never left: safe to retry.
            raise RetryableSendError(f"connection failed: {exc}") from None
        except urllib3.exceptions.ReadTimeoutError:
            raise AmbiguousSendError("no answer within the read timeout; the provider may have it") from None
        except (urllib3.exceptions.ProtocolError, urllib3.exceptions.HTTPError) as exc:
            raise AmbiguousSendError(f"connection lost mid-call: {exc}") from None
        return classify(resp.status, resp.data.decode("utf-8", "replace"), resp.headers)

