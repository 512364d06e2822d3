"""The ``sendgrid`` library's own HTTP path, for ``send_throughput.py``'s comparison only.

Herald posts the library's payloads over a pooled urllib3 client (``SendGridMailer``); this
mailer goes through ``python_http_client`` instead: a new connection per call, and a header dict
shared by every thread, so a per-call ``Idempotency-Key`` is unsafe. Not for production use.
"""

from __future__ import annotations

from campaigns.providers import Mailer, OutgoingEmail, SendResult
from campaigns.providers.sendgrid import build_payload, classify


class LibraryTransportMailer(Mailer):
    """Sends through ``sendgrid.SendGridAPIClient`` (the library's transport)."""

    def __init__(self, api_key: str, host: str, timeout: float = 10.0):
        import sendgrid

        self.client = sendgrid.SendGridAPIClient(api_key=api_key, host=host)
        self.client.client.timeout = timeout

    def send(self, email: OutgoingEmail) -> SendResult:
        from python_http_client import exceptions as http_exc

        try:
            resp = self.client.client.mail.send.post(request_body=build_payload(email))
        except http_exc.HTTPError as exc:
            return classify(exc.status_code, (exc.body or b"").decode("utf-8", "replace"), exc.headers or {})
        return classify(resp.status_code, resp.body.decode() if resp.body else "", resp.headers)
