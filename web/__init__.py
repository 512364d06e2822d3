"""Herald's web app: ``create_app`` builds it; nothing connects until a request needs it, except
the one check of the database that a serving process (``wsgi.py``) asks for."""

from __future__ import annotations

from flask import Flask
from flask_wtf.csrf import CSRFProtect

from campaigns.config import ConfigError, load_settings

csrf = CSRFProtect()


def create_app(test_config: dict | None = None, serving: bool = False) -> Flask:
    """Build the app. ``serving``: the process is about to serve requests, so connect to the
    database once first and stop with one line if it does not answer (instead of booting and
    failing every request)."""
    try:
        settings = load_settings()
        if serving:
            _check_database(settings.database_url)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None

    app = Flask(__name__, template_folder="../templates", instance_path=str(settings.instance_dir))
    app.config.from_mapping(
        SECRET_KEY=settings.secret_key,
        HERALD_SETTINGS=settings,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.public_url.startswith("https://"),
        WTF_CSRF_TIME_LIMIT=None,
        MAX_CONTENT_LENGTH=64 * 1024 * 1024,
        JSON_SORT_KEYS=False,
    )
    if test_config:
        app.config.update(test_config)

    from . import api, db, errors, headers, ops, outbox, ui, unsubscribe, webhooks
    from .cli import register_commands

    db.init_app(app)
    errors.init_app(app)
    headers.init_app(app)
    csrf.init_app(app)
    app.register_blueprint(ui.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(webhooks.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(unsubscribe.bp)
    outbox.init_app(app)  # only when mail goes to the local sink
    # The webhooks and Bearer API calls are exempt; the API checks CSRF itself for session callers.
    csrf.exempt(webhooks.bp)
    csrf.exempt(api.bp)
    csrf.exempt(unsubscribe.bp)  # RFC 8058 one-click: no cookies, no CSRF token
    register_commands(app)
    if settings.trusted_proxies:
        # Behind N reverse proxies: the client address (sign-in throttle, logs) and scheme are
        # taken from the last N entries of X-Forwarded-For / X-Forwarded-Proto, the ones those
        # proxies added; anything a client sent before them is ignored.
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies, x_proto=settings.trusted_proxies,
                                x_host=0, x_port=0, x_prefix=0)
    return app


def _check_database(url: str) -> None:
    from campaigns.db import check_database, dispose_engines

    try:
        check_database(url)
    finally:
        dispose_engines()  # gunicorn --preload forks after this: no pooled connection may outlive it
