"""WSGI entry point: ``gunicorn wsgi:app`` and ``flask --app wsgi ...``.

A process that serves requests (gunicorn, ``flask run``, and Flask's other built-in commands such
as ``routes`` and ``shell``) checks the database first and stops with one line if it does not
answer. The admin commands check it themselves when they need it (``sendgrid-sink`` and ``--help``
do not), so loading the app to find one of them connects to nothing.
"""

import sys

import click

from web import create_app


def _serving() -> bool:
    # The flask CLI loads the app in its command group's context to look up an app command (or to
    # list them for --help); its built-in commands (run, routes, shell) load it in their own context.
    ctx = click.get_current_context(silent=True)
    return ctx is None or not isinstance(ctx.command, click.Group)


try:
    app = create_app(serving=_serving())
except SystemExit as exc:
    if not isinstance(exc.code, str):
        raise
    # Status 4 is gunicorn's "app failed to load": it stops the server, where any other status
    # makes it boot a new worker forever. Elsewhere it is just a failure.
    print(exc.code, file=sys.stderr)
    raise SystemExit(4) from None
