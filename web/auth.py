"""Who is calling: a signed-in UI session or an API key. Guards for the UI and the API, and the
sign-in throttle of ``POST /login``."""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import secrets
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from flask import current_app, g, make_response, redirect, render_template, request, session, url_for
from itsdangerous import BadData, URLSafeTimedSerializer
from sqlalchemy import delete, or_, select, update

from campaigns.accounts import end_session, session_alive, start_session, user_workspaces, workspace_for_api_key
from campaigns.db import dialect_insert, utcnow
from campaigns.models import LoginThrottle

from .db import get_db

log = logging.getLogger("herald.auth")


def login_user(user_id: int, workspace_id: int) -> None:
    """Sign in: a new server-side session (its token in the signed cookie), committed at once."""
    db = get_db()
    token = start_session(db, user_id, current_app.permanent_session_lifetime)
    db.commit()
    session.clear()
    session["user_id"] = user_id
    session["workspace_id"] = workspace_id
    session["sid"] = token
    session.permanent = True


def logout_user() -> None:
    """Sign out: the server forgets the session, so a copy of the cookie opens nothing either."""
    db = get_db()
    end_session(db, session.get("sid"))
    db.commit()
    session.clear()


def session_workspace() -> int | None:
    """The signed-in user's current workspace, checked against their memberships (and the
    session against the server's: signed out or expired, it is no session)."""
    user_id, workspace_id = session.get("user_id"), session.get("workspace_id")
    if not user_id or not workspace_id:
        return None
    if "session_ok" not in g:
        g.session_ok = session_alive(get_db(), user_id, session.get("sid"))
    if not g.session_ok:
        return None
    if "session_workspaces" not in g:
        g.session_workspaces = {ws.id: ws for ws in user_workspaces(get_db(), user_id)}
    return workspace_id if workspace_id in g.session_workspaces else None


def bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def api_workspace() -> tuple[int | None, str]:
    """(workspace id, how): by Bearer key first, else by the UI session."""
    token = bearer_token()
    if token is not None:
        return workspace_for_api_key(get_db(), token), "key"
    return session_workspace(), "session"


def login_required(view):
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        workspace_id = session_workspace()
        if workspace_id is None:
            return redirect(url_for("ui.login", next=request.full_path.rstrip("?")))
        g.workspace_id = workspace_id
        g.user_id = session["user_id"]
        return view(*args, **kwargs)

    return wrapped


# --------------------------------------------------------------------------- sign-in throttle
#
# Every sign-in attempt is counted against the submitted address (whether an account has it or
# not, so the answers cannot tell) and against the client address, in the database: it is shared
# by every web process, on SQLite and PostgreSQL alike, and needs no Redis. An attempt is counted
# before its password is checked, in one transaction that holds the rows (PostgreSQL: row locks;
# SQLite: the write lock), so concurrent attempts neither under-count nor all slip through before
# the first failure is written; a success takes its own attempt back (and clears the account).
# Past the limit, the next attempt starts a lockout, refused like every attempt during it: 429,
# Retry-After, the password not even checked. Each lockout in a row lasts twice as long as the
# one before (up to the cap); one quiet window after a lockout ends the streak. The client
# address is ``request.remote_addr``: the connection's, or with HERALD_TRUSTED_PROXIES set, the
# one the trusted proxies put in X-Forwarded-For (ProxyFix, in the app factory).

clock = utcnow  # the throttle's time (naive UTC); tests replace it


@dataclass(frozen=True)
class _Policy:
    what: str  # for the log: "account" or "client address"
    limit: int
    window: timedelta
    lockout: float  # seconds
    lockout_max: float

    def lockout_for(self, strikes: int) -> timedelta:
        return timedelta(seconds=min(self.lockout_max, self.lockout * 2.0 ** min(strikes - 1, 64)))


@dataclass
class _State:
    failures: int = 0
    window_start: datetime | None = None
    strikes: int = 0
    locked_until: datetime | None = None


def _policies(keys: tuple[str, str]) -> dict[str, _Policy]:
    """Each of ``_keys``' two keys with its limits: the account's (or this browser's for it), the
    client address's."""
    s = current_app.config["HERALD_SETTINGS"]
    window = timedelta(seconds=s.login_window)
    account, client = keys
    what = "account, on a browser that signed in to it before" if account.startswith("device:") else "account"
    return {account: _Policy(what, s.login_failures, window, s.login_lockout, s.login_lockout_max),
            client: _Policy("client address", s.login_ip_failures, window, s.login_lockout, s.login_lockout_max)}


def _account_hash(email: str) -> str:
    return hashlib.sha256((email or "").strip().lower().encode("utf-8", "replace")).hexdigest()


def account_key(email: str) -> str:
    """An address's throttle key: a hash, so no submitted text is stored."""
    return "account:" + _account_hash(email)


def client_key(address: str) -> str:
    return "ip:" + (address or "unknown")[:64]


# A browser that has signed in to an account gets a signed cookie naming that account (the
# "device cookie" of OWASP's guidance on lockouts): its later sign-ins to that account are
# counted against the cookie rather than the account, so someone who locks the account by
# guessing from elsewhere does not lock out its owner's browser. Its own failures are counted
# (the account's limits), so the cookie gives no more guesses than a lockout allows; the client
# address's limit still applies.
DEVICE_COOKIE = "herald_device"
DEVICE_MAX_AGE = 180 * 86400  # seconds


def _device_serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.secret_key, salt="herald.sign-in-device")


def device_key(email: str) -> str | None:
    """This browser's throttle key for the account, when its device cookie names that account."""
    raw = request.cookies.get(DEVICE_COOKIE)
    if not raw or len(raw) > 512:
        return None
    try:
        data = _device_serializer().loads(raw, max_age=DEVICE_MAX_AGE)
    except BadData:
        return None
    if not isinstance(data, dict) or data.get("account") != account_key(email) or not data.get("device"):
        return None
    # the account's hash in the key, so unlock-sign-in EMAIL lifts its browsers' lockouts too
    return f"device:{_account_hash(email)}:{hashlib.sha256(str(data['device']).encode()).hexdigest()[:24]}"


def remember_device(resp, email: str) -> None:
    """After a successful sign-in: the cookie that lets this browser past the account's lockouts."""
    value = _device_serializer().dumps({"account": account_key(email), "device": secrets.token_urlsafe(16)})
    resp.set_cookie(DEVICE_COOKIE, value, max_age=DEVICE_MAX_AGE, path=url_for("ui.login"), httponly=True,
                    samesite="Lax", secure=current_app.config.get("SESSION_COOKIE_SECURE", False))


def _keys(email: str) -> tuple[str, str]:
    """The account's key (this browser's, when it has signed in to the account before) and the
    client address's."""
    return device_key(email) or account_key(email), client_key(request.remote_addr)


def lift_lockouts(db, emails: list[str] = (), clients: list[str] = (), everything: bool = False) -> int:
    """Forget the failed sign-ins (and lockouts) of these addresses typed and client addresses,
    or of everyone; in the caller's transaction. Returns how many counts were removed."""
    stmt = delete(LoginThrottle)
    if not everything:
        keys = [account_key(e) for e in emails] + [client_key(c.strip()) for c in clients]
        browsers = [LoginThrottle.key.startswith(f"device:{_account_hash(e)}:", autoescape=True) for e in emails]
        stmt = stmt.where(or_(LoginThrottle.key.in_(keys), *browsers))
    return db.execute(stmt).rowcount


def _attempt(state: _State, policy: _Policy, now: datetime) -> tuple[datetime | None, _State | None]:
    """One more attempt against one key: (locked until, or None when allowed; the state to write)."""
    if state.locked_until is not None and now < state.locked_until:
        return state.locked_until, None  # refused; a refused attempt changes nothing
    if state.locked_until is not None and now >= state.locked_until + policy.window:
        state = _State()  # a quiet window since the last lockout ended: the streak is over
    if state.strikes == 0 and (not state.failures or now >= state.window_start + policy.window):
        state = _State(window_start=now)  # a new window
    if state.failures >= policy.limit:
        # One attempt past the limit: a lockout, longer for each one in a row. Once it ends, one
        # attempt is let through; when that one fails too, the next lockout begins.
        strikes = state.strikes + 1
        until = now + policy.lockout_for(strikes)
        return until, _State(failures=policy.limit - 1, window_start=now, strikes=strikes, locked_until=until)
    return None, _State(state.failures + 1, state.window_start, state.strikes, state.locked_until)


def _expires_at(state: _State, policy: _Policy) -> datetime:
    """When the row stops mattering (its window, and a window after its lockout, are over)."""
    ends = [state.window_start + policy.window]
    if state.locked_until is not None:
        ends.append(state.locked_until + policy.window)
    return max(ends)


def _upsert(db, rows: list[dict]) -> None:
    stmt = dialect_insert(db)(LoginThrottle)
    columns = ("failures", "window_start", "strikes", "locked_until", "expires_at")
    db.execute(stmt.on_conflict_do_update(index_elements=["key"], set_={c: stmt.excluded[c] for c in columns}), rows)


def throttle_sign_in(email: str):
    """Count this sign-in attempt before its password is checked: None lets it go on; else the
    answer refusing it (429, the login page saying when to try again, ``Retry-After``)."""
    db = get_db()
    now = clock()
    policies = _policies(_keys(email))
    keys = sorted(policies)  # one order for every process: no deadlock between two attempts
    try:
        # A row for each key first, so that the lock below covers a first attempt too.
        fresh = [{"key": k, "failures": 0, "window_start": now, "strikes": 0, "locked_until": None,
                  "expires_at": now} for k in keys]
        db.execute(dialect_insert(db)(LoginThrottle).on_conflict_do_nothing(index_elements=["key"]), fresh)
        found = {row.key: row for row in db.scalars(
            select(LoginThrottle).where(LoginThrottle.key.in_(keys)).order_by(LoginThrottle.key)
            .with_for_update().execution_options(populate_existing=True))}
        outcomes = {}
        for key in keys:
            row = found.get(key)  # gone only if another attempt pruned it as stale: a fresh start
            state = _State(row.failures, row.window_start, row.strikes, row.locked_until) if row else _State()
            outcomes[key] = _attempt(state, policies[key], now)
        refused = {key: until for key, (until, _) in outcomes.items() if until is not None}
        # Refused: only the lockouts this attempt starts are written; allowed: every key's count.
        writes = [{"key": key, **asdict(state), "expires_at": _expires_at(state, policies[key])}
                  for key, (until, state) in outcomes.items() if state is not None and (until or not refused)]
        if writes:
            _upsert(db, writes)
        db.execute(delete(LoginThrottle).where(LoginThrottle.expires_at < now, LoginThrottle.key.not_in(keys)))
        db.commit()
    except BaseException:
        db.rollback()
        raise
    if not refused:
        return None
    seconds = max(1, math.ceil((max(refused.values()) - now).total_seconds()))
    minutes = math.ceil(seconds / 60)
    for key, until in refused.items():
        started = outcomes[key][1] is not None
        log.warning("sign-in refused for %r from %s: too many failed sign-ins for this %s; %s until %s",
                    (email or "").strip().lower()[:320], request.remote_addr or "unknown", policies[key].what,
                    "locked" if started else "still locked", until.isoformat(timespec="seconds"))
    message = f"Too many failed sign-ins; try again in {minutes} minute{'' if minutes == 1 else 's'}."
    resp = make_response(render_template("login.html", error=message), 429)
    resp.headers["Retry-After"] = str(seconds)
    return resp


def sign_in_succeeded(email: str) -> None:
    """The password was right: the account (or this browser's count for it) starts afresh, and
    the client address gets this attempt back (its other failures still count)."""
    db = get_db()
    account, client = _keys(email)
    # (a browser let in by its device cookie clears its own count only: others' failed guesses at
    # the account still count, so its owner signing in does not hand a guesser a new window)
    db.execute(delete(LoginThrottle).where(LoginThrottle.key == account))
    db.execute(update(LoginThrottle).where(LoginThrottle.key == client, LoginThrottle.failures > 0)
               .values(failures=LoginThrottle.failures - 1))
    db.commit()
