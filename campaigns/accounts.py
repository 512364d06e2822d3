"""Workspaces, users, memberships and API keys."""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session
from werkzeug.security import check_password_hash, generate_password_hash

from .contacts import text_problem
from .db import utcnow
from .errors import Conflict, InvalidInput, NotFound
from .models import ApiKey, Membership, User, UserSession, Workspace

API_KEY_PREFIX = "hk_"
# Column sizes (models.py): longer values are refused here, not by the database mid-transaction.
WORKSPACE_NAME_MAX = Workspace.__table__.c.name.type.length
EMAIL_MAX = User.__table__.c.email.type.length
API_KEY_NAME_MAX = ApiKey.__table__.c.name.type.length
# A login: one '@', no spaces, a dot in the domain. Looser than a contact's address on purpose:
# a login at a special-use domain (user@team.local) is fine, though no email can be sent there.
_LOGIN = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_workspace(session: Session, name: str) -> Workspace:
    name = (name or "").strip()
    if not name:
        raise InvalidInput("a workspace needs a name")
    if len(name) > WORKSPACE_NAME_MAX:
        raise InvalidInput(f"a workspace name has at most {WORKSPACE_NAME_MAX} characters, not {len(name)}")
    if problem := text_problem(name):
        raise InvalidInput(f"the workspace name {problem}")
    if session.scalar(select(Workspace).where(Workspace.name == name)):
        raise Conflict(f"workspace {name!r} already exists")
    ws = Workspace(name=name)
    session.add(ws)
    session.flush()
    return ws


def get_workspace_by_name(session: Session, name: str) -> Workspace:
    ws = session.scalar(select(Workspace).where(Workspace.name == name))
    if ws is None:
        raise NotFound(f"no workspace named {name!r}")
    return ws


MAX_CONCURRENCY = 1000


def set_concurrency(workspace: Workspace, value: int) -> Workspace:
    """A workspace's concurrency budget: send tasks (up to 80 messages each) queued or sending at
    once. The dispatcher reads it at its next pass; sends already queued are not recalled."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONCURRENCY:
        raise InvalidInput(f"concurrency must be a whole number from 1 to {MAX_CONCURRENCY}, not {value!r}")
    workspace.concurrency = value
    return workspace


def login_email(raw: str) -> str:
    """The normalised (stripped, lower-cased) login address, or InvalidInput saying what is wrong."""
    email = (raw or "").strip().lower()
    if len(email) > EMAIL_MAX:
        raise InvalidInput(f"an email address has at most {EMAIL_MAX} characters, not {len(email)}")
    if not _LOGIN.fullmatch(email) or text_problem(email):
        raise InvalidInput(f"{email!r} is not an email address")
    return email


def find_user(session: Session, email: str) -> User | None:
    return session.scalar(select(User).where(User.email == (email or "").strip().lower()))


def create_user(
    session: Session, email: str, password: str | None, workspace: Workspace, role: str = "owner"
) -> User:
    """Create the user with ``password``, or add an existing user (same email) to ``workspace``:
    an existing user's password is left as it is, whatever ``password`` says."""
    email = login_email(email)
    user = find_user(session, email)
    if user is None:
        if len(password or "") < 8:
            raise InvalidInput("the password must have at least 8 characters")
        user = User(email=email, password_hash=generate_password_hash(password))
        session.add(user)
        session.flush()
    elif session.get(Membership, (user.id, workspace.id)):
        raise Conflict(f"{email} is already a member of {workspace.name!r}")
    session.add(Membership(user_id=user.id, workspace_id=workspace.id, role=role))
    session.flush()
    return user


@functools.lru_cache(maxsize=1)
def _decoy_hash() -> str:
    """A hash to check an unknown address's password against, so that it costs as much as a
    known one's: the time of a failed sign-in must not tell which addresses have accounts."""
    return generate_password_hash(secrets.token_urlsafe(16))


def authenticate(session: Session, email: str, password: str) -> User | None:
    user = find_user(session, email)
    if user is None:
        check_password_hash(_decoy_hash(), password or "")
        return None
    if not check_password_hash(user.password_hash, password or ""):
        return None
    return user


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def start_session(session: Session, user_id: int, lifetime: timedelta) -> str:
    """A new signed-in session for this user; returns its token (the cookie carries it, the
    database only its hash). The user's expired sessions are cleared on the way."""
    now = utcnow()
    session.execute(delete(UserSession).where(UserSession.user_id == user_id, UserSession.expires_at <= now))
    token = secrets.token_urlsafe(32)
    session.add(UserSession(user_id=user_id, token_hash=_token_hash(token), created_at=now, expires_at=now + lifetime))
    return token


def session_alive(session: Session, user_id: int, token: str | None) -> bool:
    """The session this token names exists, is this user's and has not expired."""
    if not token or not isinstance(token, str) or len(token) > 200:
        return False
    found = session.scalar(select(UserSession.expires_at).where(
        UserSession.token_hash == _token_hash(token), UserSession.user_id == user_id))
    return found is not None and found > utcnow()


def end_session(session: Session, token: str | None) -> None:
    if token and isinstance(token, str):
        session.execute(delete(UserSession).where(UserSession.token_hash == _token_hash(token)))


def user_workspaces(session: Session, user_id: int) -> list[Workspace]:
    return list(
        session.scalars(
            select(Workspace)
            .join(Membership, Membership.workspace_id == Workspace.id)
            .where(Membership.user_id == user_id)
            .order_by(Workspace.name)
        )
    )


def create_api_key(session: Session, workspace: Workspace, name: str = "") -> tuple[ApiKey, str]:
    """Make a key; return the row and the key itself, which is never stored (only its hash)."""
    if len(name or "") > API_KEY_NAME_MAX:
        raise InvalidInput(f"an API key name has at most {API_KEY_NAME_MAX} characters, not {len(name)}")
    if problem := text_problem(name or ""):
        raise InvalidInput(f"the API key name {problem}")
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(workspace_id=workspace.id, name=name, prefix=key[:10], key_hash=hash_api_key(key))
    session.add(row)
    session.flush()
    return row, key


def workspace_for_api_key(session: Session, key: str) -> int | None:
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_api_key(key), ApiKey.revoked_at.is_(None)))
    if row is None:
        return None
    return row.workspace_id


def revoke_api_key(session: Session, workspace_id: int, key_id: int) -> None:
    row = session.get(ApiKey, key_id)
    if row is None or row.workspace_id != workspace_id:
        raise NotFound("no such API key")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
