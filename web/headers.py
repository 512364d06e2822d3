"""Security headers on every response: the Content-Security-Policy, framing, sniffing, referrer
and (behind an https ``PUBLIC_URL``) HSTS. docs/security.md explains each choice."""

from __future__ import annotations

# Scripts come from Herald's own files only: no inline script, no event-handler attribute, no
# eval. Styles allow 'unsafe-inline' because the email previews (the builder's and the outbox's
# sandboxed srcdoc frames) inherit this policy, and emails are styled inline; the frames run no
# script (sandbox without allow-scripts). Images and fonts in an email come from anywhere.
CSP = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self' 'unsafe-inline'",
    "img-src 'self' data: https: http:",
    "font-src 'self' data: https:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'self'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])

HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: Flask-WTF refuses a form posted over https without a
    # same-origin Referer. No other site learns a Herald URL (unsubscribe tokens, campaign ids).
    "Referrer-Policy": "same-origin",
}
HSTS = "max-age=31536000"  # a year; no includeSubDomains: Herald does not own its siblings


def init_app(app) -> None:
    headers = dict(HEADERS)
    if app.config["HERALD_SETTINGS"].public_url.startswith("https://"):
        headers["Strict-Transport-Security"] = HSTS

    @app.after_request
    def _security_headers(response):
        for name, value in headers.items():
            response.headers.setdefault(name, value)
        return response
