"""One database session per request, opened lazily and closed at teardown."""

from __future__ import annotations

from flask import g
from sqlalchemy.orm import Session

from campaigns.db import new_session


def get_db() -> Session:
    if "db" not in g:
        g.db = new_session()
    return g.db


def close_db(_exc=None) -> None:
    session = g.pop("db", None)
    if session is not None:
        session.close()


def init_app(app) -> None:
    app.teardown_appcontext(close_db)
