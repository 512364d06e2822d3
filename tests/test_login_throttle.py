"""Sign-in throttling of ``POST /login``: per account (the submitted address, known or not) and
per client address, in the database (shared by every web process, no Redis needed). Time is the
throttle's clock (``web.auth.clock``), moved by hand: nothing here sleeps."""

from __future__ import annotations

import logging
import re
import threading
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from campaigns import accounts
from campaigns.config import ConfigError, load_settings
from campaigns.db import session_scope, utcnow
from campaigns.models import LoginThrottle
from tests.helpers import make_workspace
from web import auth, create_app

CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')
TOKENS = re.compile(r'(?<=name="csrf-token" content=")[^"]+|(?<=name="csrf_token" value=")[^"]+')
PASSWORD = "correct horse"
MESSAGE = re.compile(r"Too many failed sign-ins; try again in (\d+) minutes?\.")


class Clock:
    def __init__(self):
        self.now = utcnow()

    def __call__(self):
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(auth, "clock", c)
    return c


@pytest.fixture
def checked(monkeypatch):
    """Every password hash checked (known address or decoy)."""
    calls = []
    real = accounts.check_password_hash
    monkeypatch.setattr(accounts, "check_password_hash", lambda h, p: calls.append(h) or real(h, p))
    return calls


@pytest.fixture
def user():
    return make_workspace(password=PASSWORD)[3]


class Browser:
    """One test client from one client address."""

    def __init__(self, app, ip: str = "10.0.0.1"):
        self.client = app.test_client()
        self.ip = ip

    def sign_in(self, email: str, password: str):
        token = CSRF_META.search(self.client.get("/login").get_data(as_text=True)).group(1)  # new after a sign-in
        return self.client.post("/login", data={"email": email, "password": password, "csrf_token": token},
                                environ_base={"REMOTE_ADDR": self.ip})


def refused_for(resp) -> int:
    """The seconds a refused sign-in says to wait (and the page says the same in minutes)."""
    assert resp.status_code == 429, resp.status_code
    seconds = int(resp.headers["Retry-After"])
    html = resp.get_data(as_text=True)
    match = MESSAGE.search(html)
    assert match and int(match.group(1)) == -(-seconds // 60), html
    assert '<form method="post"' in html  # the normal login page, to try again later
    return seconds


def fail(browser, email, times: int) -> None:
    for _ in range(times):
        resp = browser.sign_in(email, "wrong password")
        assert resp.status_code == 401 and "Wrong email or password." in resp.get_data(as_text=True)


def test_five_failures_lock_the_account_even_against_the_right_password(app, clock, checked, user, caplog):
    browser = Browser(app)
    fail(browser, user, 5)
    assert len(checked) == 5
    with caplog.at_level(logging.WARNING, logger="herald.auth"):
        resp = browser.sign_in(user, PASSWORD)
        assert refused_for(resp) == 300  # 5 minutes
        resp = browser.sign_in(user.upper(), "wrong password")  # the same account, however it is typed
        assert refused_for(resp) == 300
    assert len(checked) == 5  # a refused attempt's password is never checked
    assert browser.client.get("/settings").status_code == 302  # not signed in
    refusals = [r for r in caplog.records if r.name == "herald.auth" and "sign-in refused" in r.getMessage()]
    assert len(refusals) == 2 and user in refusals[0].getMessage() and "10.0.0.1" in refusals[0].getMessage()
    # another account from the same address is not locked
    _, _, _, other = make_workspace(password=PASSWORD)
    assert browser.sign_in(other, PASSWORD).status_code == 302


def test_an_unknown_address_is_throttled_exactly_like_a_known_one(app, clock, checked, user):
    def run(email, ip):
        browser = Browser(app, ip=ip)
        answers = []
        for password in ["wrong"] * 5 + [PASSWORD, "wrong"]:
            resp = browser.sign_in(email, password)
            body = TOKENS.sub("TOKEN", resp.get_data(as_text=True)).replace(email, "EMAIL")
            answers.append((resp.status_code, resp.headers.get("Retry-After"), body))
        return answers

    known = run(user, "10.0.1.1")
    hashes = len(checked)
    unknown = run("nobody-" + user, "10.0.2.2")
    assert [a[:2] for a in known] == [a[:2] for a in unknown]
    assert [a[0] for a in known] == [401] * 5 + [429, 429]
    assert known == unknown  # the same pages, word for word
    assert hashes == 5 and len(checked) == 10  # a hash checked for each allowed attempt, known or not


def test_a_browser_that_signed_in_before_is_not_locked_out_by_others_guesses(app, clock, checked, user):
    owner = Browser(app, ip="198.51.100.1")
    resp = owner.sign_in(user, PASSWORD)
    assert resp.status_code == 302
    cookie = next(c for c in resp.headers.getlist("Set-Cookie") if c.startswith("herald_device="))
    assert "HttpOnly" in cookie and "Path=/login" in cookie and "SameSite=Lax" in cookie
    attacker = Browser(app, ip="192.0.2.7")
    fail(attacker, user, 5)
    assert refused_for(attacker.sign_in(user, PASSWORD)) == 300  # the account is locked for everyone else
    assert refused_for(Browser(app, ip="198.51.100.1").sign_in(user, PASSWORD)) == 300  # a new browser too
    assert owner.sign_in(user, PASSWORD).status_code == 302  # its owner's browser is let in
    assert refused_for(attacker.sign_in(user, PASSWORD)) == 300  # and that unlocked nothing for others
    # the browser's own failures are counted, with the account's limits: no extra guesses
    fail(owner, user, 5)
    assert refused_for(owner.sign_in(user, PASSWORD)) == 300
    # the cookie names one account: another locked account is locked for this browser as well
    _, _, _, other = make_workspace(password=PASSWORD)
    fail(attacker, other, 5)
    assert refused_for(Browser(app, ip="198.51.100.2").sign_in(other, "x")) == 300
    helper = Browser(app, ip="198.51.100.3")
    helper.client.set_cookie("herald_device", cookie.split(";")[0].split("=", 1)[1], path="/login")
    assert refused_for(helper.sign_in(other, PASSWORD)) == 300
    # a cookie not signed by this server counts for nothing
    forger = Browser(app, ip="198.51.100.4")
    forger.client.set_cookie("herald_device", "eyJhY2NvdW50Ijoi.forged.sig", path="/login")
    assert refused_for(forger.sign_in(user, PASSWORD)) == 300


def test_a_successful_sign_in_clears_the_account(app, clock, user):
    browser = Browser(app)
    fail(browser, user, 4)
    assert browser.sign_in(user, PASSWORD).status_code == 302
    fail(Browser(app), user, 5)  # five more allowed: the count started again
    assert refused_for(Browser(app).sign_in(user, PASSWORD)) == 300


def test_the_client_address_has_its_own_looser_limit_across_accounts(app, clock, user):
    attacker = Browser(app, ip="192.0.2.7")
    for i in range(20):  # one guess per address: no account reaches its own limit
        fail(attacker, f"guess-{i}@example.com", 1)
    resp = attacker.sign_in(user, PASSWORD)
    assert refused_for(resp) == 300
    assert refused_for(attacker.sign_in(f"guess-new-{uuid.uuid4().hex}@example.com", "x")) == 300
    # the account itself is not locked: its owner, elsewhere, signs in
    assert Browser(app, ip="198.51.100.1").sign_in(user, PASSWORD).status_code == 302


def test_a_successful_sign_in_gives_the_client_address_only_its_own_attempt_back(app, clock, user):
    office = Browser(app, ip="192.0.2.8")
    for i in range(19):
        fail(office, f"typo-{i}@example.com", 1)
    for _ in range(3):  # successes in between do not wipe the address's failures, nor add to them
        assert office.sign_in(user, PASSWORD).status_code == 302
    fail(office, "typo-last@example.com", 1)  # the 20th failure
    assert refused_for(office.sign_in(user, PASSWORD)) == 300


def test_lockouts_expire_and_grow_while_the_failures_go_on(app, clock, user):
    browser = Browser(app)
    fail(browser, user, 5)
    assert refused_for(browser.sign_in(user, PASSWORD)) == 300
    clock.advance(299)
    resp = browser.sign_in(user, PASSWORD)
    assert refused_for(resp) == 1 and "try again in 1 minute." in resp.get_data(as_text=True)
    clock.advance(1)
    # each lockout in a row lets one attempt through once it ends, then doubles (up to an hour)
    for expected in (600, 1200, 2400, 3600, 3600):
        fail(browser, user, 1)
        assert refused_for(browser.sign_in(user, PASSWORD)) == expected
        clock.advance(expected)
    # a quiet window (15 minutes) after the last lockout ends the streak: five attempts again
    clock.advance(900)
    fail(browser, user, 5)
    assert refused_for(browser.sign_in(user, PASSWORD)) == 300
    clock.advance(300)
    assert browser.sign_in(user, PASSWORD).status_code == 302  # the right password, once let through


def test_failures_count_within_the_window_only(app, clock, user):
    browser = Browser(app)
    fail(browser, user, 4)
    clock.advance(15 * 60)
    fail(browser, user, 5)  # a new window: the four before no longer count
    assert refused_for(browser.sign_in(user, PASSWORD)) == 300


def test_old_rows_are_deleted_as_new_ones_are_written(app, clock, db):
    browser = Browser(app)
    for i in range(5):
        fail(browser, f"old-{i}@example.com", 1)
    fail(browser, "locked@example.com", 5)
    refused_for(browser.sign_in("locked@example.com", "x"))
    assert db.scalar(select(func.count()).select_from(LoginThrottle)) == 7  # six accounts and the address
    clock.advance(15 * 60 + 1)  # the windows are over, the lockout is not (and a window after it)
    fail(Browser(app, ip="10.9.9.9"), "new@example.com", 1)
    assert db.scalar(select(func.count()).select_from(LoginThrottle)) == 3  # the locked account, and the new two
    clock.advance(300 + 15 * 60)
    fail(Browser(app, ip="10.9.9.10"), "newer@example.com", 1)
    assert db.scalar(select(func.count()).select_from(LoginThrottle)) == 2
    # no submitted address is stored, only its hash
    keys = db.scalars(select(LoginThrottle.key)).all()
    assert all("@" not in k for k in keys) and any(k.startswith("ip:10.9.9.10") for k in keys)


def test_concurrent_attempts_are_all_counted(app, clock, checked, user):
    """Ten wrong guesses at once: five are checked and fail, five are refused unchecked. Counted
    after the check (or read, then written), several would pass and some failures would be lost."""
    browsers = [Browser(app, ip=f"10.1.0.{i}") for i in range(10)]
    start = threading.Barrier(len(browsers))
    statuses = []

    def guess(b):
        start.wait()
        statuses.append(b.sign_in(user, "wrong password").status_code)

    threads = [threading.Thread(target=guess, args=(b,)) for b in browsers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [401] * 5 + [429] * 5
    assert len(checked) == 5
    with session_scope() as s:
        row = s.scalars(select(LoginThrottle).where(LoginThrottle.key.startswith("account:"))).one()
        assert row.strikes == 1 and row.locked_until is not None


@pytest.mark.parametrize("name,value", [
    ("HERALD_LOGIN_FAILURES", "0"),
    ("HERALD_LOGIN_IP_FAILURES", "many"),
    ("HERALD_LOGIN_WINDOW", "-5"),
    ("HERALD_LOGIN_LOCKOUT", "inf"),
    ("HERALD_LOGIN_LOCKOUT_MAX", "1e9"),
])
def test_a_bad_throttle_setting_is_one_line_naming_it(tmp_path, name, value):
    with pytest.raises(ConfigError) as err:
        load_settings({"HERALD_INSTANCE_DIR": str(tmp_path), "SECRET_KEY": "x" * 20, name: value})
    assert str(err.value).startswith(f"{name}: ") and "\n" not in str(err.value)


def test_the_lockout_cap_cannot_be_below_the_first_lockout(tmp_path):
    env = {"HERALD_INSTANCE_DIR": str(tmp_path), "SECRET_KEY": "x" * 20}
    with pytest.raises(ConfigError, match=r"^HERALD_LOGIN_LOCKOUT_MAX: must be at least HERALD_LOGIN_LOCKOUT"):
        load_settings({**env, "HERALD_LOGIN_LOCKOUT": "600", "HERALD_LOGIN_LOCKOUT_MAX": "60"})
    s = load_settings({**env, "HERALD_LOGIN_FAILURES": "3", "HERALD_LOGIN_LOCKOUT": "7200"})
    assert (s.login_failures, s.login_ip_failures, s.login_lockout, s.login_lockout_max) == (3, 20, 7200, 7200)


def test_bad_trusted_proxies_setting_is_one_line(tmp_path):
    env = {"HERALD_INSTANCE_DIR": str(tmp_path), "SECRET_KEY": "x" * 20}
    for value in ("-1", "two", "11"):
        with pytest.raises(ConfigError, match=r"^HERALD_TRUSTED_PROXIES: .* from 0 to 10\)$"):
            load_settings({**env, "HERALD_TRUSTED_PROXIES": value})
    assert load_settings(env).trusted_proxies == 0
    assert load_settings({**env, "HERALD_TRUSTED_PROXIES": "2"}).trusted_proxies == 2


class ProxiedBrowser(Browser):
    """A client behind a reverse proxy at 10.9.9.9 that appends the client's address to
    X-Forwarded-For; ``sent`` is what the client itself put there (forged or not)."""

    def __init__(self, app, ip: str, sent: str = ""):
        super().__init__(app, ip="10.9.9.9")
        self.forwarded = f"{sent}, {ip}" if sent else ip

    def sign_in(self, email: str, password: str):
        token = CSRF_META.search(self.client.get("/login").get_data(as_text=True)).group(1)
        return self.client.post("/login", data={"email": email, "password": password, "csrf_token": token},
                                environ_base={"REMOTE_ADDR": self.ip},
                                headers={"X-Forwarded-For": self.forwarded})


def _guess_twenty(browser):
    for i in range(20):
        fail(browser, f"guess-{uuid.uuid4().hex[:8]}-{i}@example.com", 1)


def test_behind_a_trusted_proxy_each_client_has_its_own_limit(monkeypatch, database, clock, user):
    monkeypatch.setenv("HERALD_TRUSTED_PROXIES", "1")
    app = create_app({"TESTING": True})
    attacker = ProxiedBrowser(app, "198.51.100.1")
    _guess_twenty(attacker)
    assert refused_for(attacker.sign_in("guess-more@example.com", "x")) == 300
    # Another client behind the same proxy is not refused: the proxy's address is not the key.
    assert ProxiedBrowser(app, "198.51.100.2").sign_in(user, PASSWORD).status_code == 302
    # Forging X-Forwarded-For does not help: only the entry the trusted proxy added counts.
    assert refused_for(ProxiedBrowser(app, "198.51.100.1", sent="203.0.113.5").sign_in("g@example.com", "x")) == 300


def test_without_trusted_proxies_the_forwarded_header_is_ignored(app, clock, user):
    _guess_twenty(ProxiedBrowser(app, "198.51.100.1"))
    # Every client behind the proxy shares its address (and its count) when no proxy is trusted.
    assert refused_for(ProxiedBrowser(app, "198.51.100.2").sign_in(user, PASSWORD)) == 300


def test_unlock_sign_in_lifts_an_account_a_client_or_everything(app, clock, user, db):
    runner = app.test_cli_runner()
    browser = Browser(app, ip="10.3.3.3")
    fail(browser, user, 5)
    assert refused_for(browser.sign_in(user, PASSWORD)) == 300
    result = runner.invoke(args=["unlock-sign-in", user.upper()])  # as typed, any case
    assert result.exit_code == 0, result.output
    assert f"forgot the failed sign-ins of {user.upper()} (1 count removed)" in result.output
    assert browser.sign_in(user, PASSWORD).status_code == 302
    fail(browser, user, 5)  # it has signed in: now on its own count (its device cookie)
    assert refused_for(browser.sign_in(user, PASSWORD)) == 300
    result = runner.invoke(args=["unlock-sign-in", user])  # the address's browsers are lifted too
    assert result.exit_code == 0 and "(1 count removed)" in result.output, result.output
    assert browser.sign_in(user, PASSWORD).status_code == 302

    attacker = Browser(app, ip="192.0.2.99")
    _guess_twenty(attacker)
    assert refused_for(attacker.sign_in(user, PASSWORD)) == 300
    result = runner.invoke(args=["unlock-sign-in", "--client", "192.0.2.99"])
    assert result.exit_code == 0 and "client 192.0.2.99 (1 count removed)" in result.output
    assert attacker.sign_in(user, PASSWORD).status_code == 302

    fail(Browser(app, ip="10.4.4.4"), "someone@example.com", 2)
    result = runner.invoke(args=["unlock-sign-in", "--all"])
    assert result.exit_code == 0 and "every address" in result.output
    assert db.scalar(select(func.count()).select_from(LoginThrottle)) == 0

    for args, message in ((["unlock-sign-in"], "name at least one address"),
                          (["unlock-sign-in", "--all", user], "--all forgets everything")):
        result = runner.invoke(args=args)
        assert result.exit_code == 2 and message in result.output
