"""Herald's configuration, read from the environment.

Every public variable is in ../shared/CONTRACT.md. ``load_settings`` validates them all and
raises :class:`ConfigError` whose message is one line that names the bad variable; the entry
points (app factory, ``tasks``) turn it into ``SystemExit`` so the process stops with that line.
Reading the environment connects to nothing.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SINK_PORT = 3030
REAL_SENDGRID_HOST = "https://api.sendgrid.com"

_RATE_UNITS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
# Upper bounds for the tunables: anything larger is a typo, and timedelta/sleep overflow on huge values.
MAX_SECONDS = 86400.0  # a day
MAX_COUNT = 1000
# Characters that stay one path segment in a URL unescaped (RFC 3986 "unreserved").
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._~-]+")


class ConfigError(Exception):
    """A setting is malformed; the message is one line naming the variable."""


@dataclass(frozen=True)
class Rate:
    """``N/unit`` with a burst: a smooth rate of ``count`` per ``period`` seconds."""

    count: int
    period: float
    burst: int

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def __str__(self) -> str:
        unit = {v: k for k, v in _RATE_UNITS.items()}.get(self.period, f"{self.period}s")
        return f"{self.count}/{unit};burst={self.burst}"


def parse_rate(value: str, name: str = "SENDGRID_RATE_LIMIT") -> Rate:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*([a-z]+)\s*(?:;\s*burst\s*=\s*(\d+)\s*)?", value or "")
    if not m:
        raise ConfigError(
            f"{name}: {value!r} is not a rate; expected N/second, N/minute, N/hour or N/day, "
            "optionally followed by ;burst=B"
        )
    count, unit, burst = int(m.group(1)), m.group(2), m.group(3)
    if unit not in _RATE_UNITS:
        raise ConfigError(f"{name}: unknown rate unit {unit!r} (use second, minute, hour or day)")
    if count <= 0:
        raise ConfigError(f"{name}: the rate must be at least 1 per {unit}")
    b = int(burst) if burst is not None else max(1, count // 10)
    if b <= 0:
        raise ConfigError(f"{name}: burst must be at least 1")
    return Rate(count=count, period=_RATE_UNITS[unit], burst=b)


def _positive(env, name: str, default, whole: bool, maximum: float, unit: str = ""):
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a {'whole ' if whole else ''}number") from None
    if not math.isfinite(value):  # nan and inf parse as floats but make no duration
        raise ConfigError(f"{name}: must be a finite number, got {raw!r}")
    if value <= 0:
        raise ConfigError(f"{name}: must be {'at least 1' if whole else 'greater than 0'}, got {raw!r}")
    if value > maximum:
        raise ConfigError(f"{name}: must be at most {maximum:g}{unit}, got {raw!r}")
    return value


def _seconds(env, name: str, default: float) -> float:
    return _positive(env, name, default, whole=False, maximum=MAX_SECONDS, unit=" seconds (a day)")


def _count(env, name: str, default: int) -> int:
    return _positive(env, name, default, whole=True, maximum=MAX_COUNT)


def _proxies(env, name: str) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return 0
    if not re.fullmatch(r"\s*[0-9]{1,2}\s*", raw) or int(raw) > 10:
        raise ConfigError(f"{name}: {raw!r} is not a number of proxies (a whole number from 0 to 10)")
    return int(raw)


def _max_age(env, name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    if not re.fullmatch(r"\s*[0-9]{1,6}\s*", raw) or int(raw) > MAX_SECONDS:
        raise ConfigError(f"{name}: {raw!r} is not a number of seconds (a whole number from 1 to "
                          f"{MAX_SECONDS:g}, or 0 to turn the check off)")
    return int(raw)


def _port(env, name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    if not re.fullmatch(r"\s*[0-9]{1,5}\s*", raw) or not 1 <= int(raw) <= 65535:
        raise ConfigError(f"{name}: {raw!r} is not a port (a whole number from 1 to 65535)")
    return int(raw)


def _http_url(env, name: str, default: str) -> str:
    raw = env.get(name) or default
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}: {raw!r} is not an http(s) URL")
    if any(c.isspace() or not c.isprintable() for c in raw):
        raise ConfigError(f"{name}: {raw!r} contains whitespace or control characters")
    try:
        port = parts.port  # urlsplit checks the port only when asked
    except ValueError:
        port = 0
    if port == 0:
        raise ConfigError(f"{name}: {raw!r} has a bad port (use a number from 1 to 65535)")
    return raw.rstrip("/")


def _redis_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.netloc or parts.path):
        raise ConfigError(f"REDIS_URL: {raw!r} is not a redis:// URL")
    # redis-py reads the database number from the path but silently uses 0 when it is not a number.
    if parts.scheme != "unix" and not re.fullmatch(r"/?([0-9]+)?", parts.path):
        raise ConfigError(f"REDIS_URL: {parts.path!r} is not a database number (redis://host:port/N)")
    from redis.connection import parse_url

    try:
        port = parts.port
        parse_url(raw)  # the query arguments (?db=, timeouts); connects to nothing
    except ValueError as exc:
        raise ConfigError(f"REDIS_URL: {raw!r} is not usable ({exc})") from None
    if port == 0:
        raise ConfigError(f"REDIS_URL: {raw!r} has a bad port")
    return raw


def _webhook_public_key(raw: str) -> str:
    """SendGrid's Signed Event Webhook key: base64 of a DER SubjectPublicKeyInfo, ECDSA on P-256.

    Checked here because a key that does not load makes every signed event a silent 403."""
    import base64

    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    try:
        key = load_der_public_key(base64.b64decode(raw, validate=True))
    except (ValueError, UnsupportedAlgorithm):  # binascii.Error is a ValueError
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(
            "SENDGRID_WEBHOOK_PUBLIC_KEY: not an ECDSA P-256 public key in base64 (paste the key as SendGrid shows it)"
        )
    return raw


def normalize_database_url(raw: str) -> str:
    """Validate ``DATABASE_URL`` and pin PostgreSQL URLs to the psycopg 3 driver."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(raw)
        port = url.port  # a non-numeric port is a ValueError from make_url itself
    except (ArgumentError, ValueError):
        raise ConfigError(
            f"DATABASE_URL: {raw!r} is not a database URL "
            "(expected postgresql+psycopg://user@host/dbname or sqlite:///path)"
        ) from None
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"DATABASE_URL: port {port} is out of range (1 to 65535)")
    backend = url.get_backend_name()
    if backend == "postgres":
        url = url.set(drivername="postgresql+psycopg")
    elif backend == "postgresql":
        if url.drivername in ("postgresql", "postgresql+psycopg2"):
            url = url.set(drivername="postgresql+psycopg")
        if not url.database:
            raise ConfigError("DATABASE_URL: no database name in the URL")
    elif backend != "sqlite":
        raise ConfigError(
            f"DATABASE_URL: unsupported database {backend!r} (use PostgreSQL 15+ or SQLite)"
        )
    return url.render_as_string(hide_password=False)


@dataclass(frozen=True)
class Settings:
    instance_dir: Path
    database_url: str
    redis_url: str | None
    sendgrid_api_key: str | None
    sendgrid_api_host: str
    sink_url: str
    webhook_public_key: str | None
    rate_limit: Rate
    inbound_parse_secret: str | None
    inbound_domain: str | None
    public_url: str
    secret_key: str
    # Engine tunables (not in the contract; documented in README).
    ambiguous_window: float = 900.0
    lease_seconds: float = 120.0
    send_timeout: float = 10.0
    queue_name: str = "herald"
    send_concurrency: int = 16  # provider calls in flight per consumer process
    send_batches: int = 2  # bulk send batches running at once per consumer process
    retry_base: float = 10.0  # backoff: uniform(0, min(cap, base * 2**(attempt-1))) seconds
    retry_cap: float = 900.0
    stale_queued_seconds: float = 90.0  # a queued message no task claimed for this long is scheduled again
    dispatch_horizon: float = 1.0  # seconds of work the dispatcher queues at a time
    sink_port: int = DEFAULT_SINK_PORT
    # Sign-in throttle (web.auth): failed sign-ins allowed per account and per client address
    # within the window; then a lockout of login_lockout seconds, doubling up to login_lockout_max.
    login_failures: int = 5
    login_ip_failures: int = 20
    login_window: float = 900.0
    login_lockout: float = 300.0
    login_lockout_max: float = 3600.0
    # Reverse proxies in front of the web app that append to X-Forwarded-For (0: none; the
    # client address is the connection's).
    trusted_proxies: int = 0
    # A signed Event Webhook batch whose timestamp is further than this from now is refused
    # (seconds; 0: no check).
    webhook_max_age: int = 600
    # Live-progress streams open at once per web process, in total and per workspace (None:
    # derived from the process's thread count, see web.streams).
    max_streams: int | None = None
    max_streams_per_workspace: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def uses_sink(self) -> bool:
        return not self.sendgrid_api_key


def _instance_dir(path: Path) -> Path:
    """Create the instance folder (the embedded defaults keep their files there), or say why not."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"HERALD_INSTANCE_DIR: {str(path)!r} is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"HERALD_INSTANCE_DIR: cannot create {str(path)!r} ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"HERALD_INSTANCE_DIR: {str(path)!r} is not writable")
    return path


def _secret_key(env, instance_dir: Path, database_set: bool) -> str:
    key = env.get("SECRET_KEY")
    if key:
        if len(key) < 16:
            raise ConfigError("SECRET_KEY: too short; use at least 16 random characters")
        return key
    if database_set:
        raise ConfigError("SECRET_KEY: required whenever DATABASE_URL is set")
    path = instance_dir / "secret_key"
    try:
        if not path.exists():
            # Write the whole key to a temporary file, then link it into place: the link either
            # lands complete or fails because another process's key won, so no one reads a partial file.
            fd, tmp = tempfile.mkstemp(dir=instance_dir, prefix=".secret_key.")  # mode 0600
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(secrets.token_urlsafe(48))
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process linked its key first: use that one
            finally:
                os.unlink(tmp)
        key = path.read_text().strip()
    except OSError as exc:
        reason = f"cannot keep the secret key in {str(path)!r} ({exc.strerror or exc})"
        raise ConfigError(f"HERALD_INSTANCE_DIR: {reason}") from None
    if len(key) < 16:
        raise ConfigError(
            f"SECRET_KEY: {str(path)!r} is empty or shorter than 16 characters; delete it to generate a new key"
        )
    return key


def _inbound(env) -> tuple[str | None, str | None]:
    """INBOUND_PARSE_SECRET and INBOUND_DOMAIN, checked."""
    inbound_secret = env.get("INBOUND_PARSE_SECRET") or None
    if inbound_secret and (not _PATH_SEGMENT.fullmatch(inbound_secret) or not inbound_secret.strip(".")):
        raise ConfigError(
            "INBOUND_PARSE_SECRET: must be one URL path segment: letters, digits, '-', '_', '.' and '~' only"
        )
    inbound_domain = env.get("INBOUND_DOMAIN") or None
    if inbound_domain and not re.fullmatch(r"[A-Za-z0-9.-]+\.[A-Za-z]{2,}", inbound_domain):
        raise ConfigError(f"INBOUND_DOMAIN: {inbound_domain!r} is not a domain name")
    return inbound_secret, inbound_domain


def _lockouts(env) -> tuple[float, float]:
    """The first sign-in lockout and its cap (which cannot be below it)."""
    login_lockout = _seconds(env, "HERALD_LOGIN_LOCKOUT", 300.0)
    login_lockout_max = _seconds(env, "HERALD_LOGIN_LOCKOUT_MAX", max(3600.0, login_lockout))
    if login_lockout_max < login_lockout:
        raise ConfigError(
            f"HERALD_LOGIN_LOCKOUT_MAX: must be at least HERALD_LOGIN_LOCKOUT ({login_lockout:g} seconds), "
            f"got {env.get('HERALD_LOGIN_LOCKOUT_MAX')!r}"
        )
    return login_lockout, login_lockout_max


def _stream_bounds(env) -> tuple[int | None, int | None]:
    """HERALD_MAX_STREAMS and its per-workspace share (None: derived from the thread count)."""
    max_streams = _count(env, "HERALD_MAX_STREAMS", None)
    max_streams_ws = _count(env, "HERALD_MAX_STREAMS_PER_WORKSPACE", None)
    if max_streams and max_streams_ws and max_streams_ws > max_streams:
        raise ConfigError(f"HERALD_MAX_STREAMS_PER_WORKSPACE: must be at most HERALD_MAX_STREAMS ({max_streams}), "
                          f"got {max_streams_ws}")
    return max_streams, max_streams_ws


def load_settings(env=None) -> Settings:
    env = os.environ if env is None else env
    instance_dir = Path(env.get("HERALD_INSTANCE_DIR") or PROJECT_ROOT / "instance")

    raw_db = env.get("DATABASE_URL")
    database_url = normalize_database_url(raw_db) if raw_db else f"sqlite:///{instance_dir / 'herald.db'}"
    redis_url = _redis_url(env["REDIS_URL"]) if env.get("REDIS_URL") else None
    # The instance folder holds the SQLite database, the SQLite queue and the generated secret key.
    if not (raw_db and redis_url and env.get("SECRET_KEY")):
        _instance_dir(instance_dir)

    sink_port = _port(env, "HERALD_SINK_PORT", DEFAULT_SINK_PORT)
    sink_url = f"http://127.0.0.1:{sink_port}"
    api_key = env.get("SENDGRID_API_KEY") or None
    api_host = _http_url(env, "SENDGRID_API_HOST", REAL_SENDGRID_HOST if api_key else sink_url)

    public_key = env.get("SENDGRID_WEBHOOK_PUBLIC_KEY") or None
    if public_key:
        _webhook_public_key(public_key)

    inbound_secret, inbound_domain = _inbound(env)
    queue_name = env.get("HERALD_QUEUE_NAME") or "herald"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", queue_name):
        raise ConfigError(f"HERALD_QUEUE_NAME: {queue_name[:80]!r} is not a queue name (1-64 letters, digits, "
                          "'.', '_', ':' or '-', starting with a letter or digit)")
    login_lockout, login_lockout_max = _lockouts(env)
    max_streams, max_streams_ws = _stream_bounds(env)

    return Settings(
        instance_dir=instance_dir,
        database_url=database_url,
        redis_url=redis_url,
        sendgrid_api_key=api_key,
        sendgrid_api_host=api_host,
        sink_url=sink_url,
        webhook_public_key=public_key,
        rate_limit=parse_rate(env.get("SENDGRID_RATE_LIMIT") or "100/second"),
        inbound_parse_secret=inbound_secret,
        inbound_domain=inbound_domain,
        public_url=_http_url(env, "PUBLIC_URL", "http://127.0.0.1:5000"),
        secret_key=_secret_key(env, instance_dir, bool(raw_db)),
        ambiguous_window=_seconds(env, "HERALD_AMBIGUOUS_WINDOW", 900.0),
        lease_seconds=_seconds(env, "HERALD_LEASE_SECONDS", 120.0),
        send_timeout=_seconds(env, "HERALD_SEND_TIMEOUT", 10.0),
        queue_name=queue_name,
        send_concurrency=_count(env, "HERALD_SEND_CONCURRENCY", 16),
        send_batches=_count(env, "HERALD_SEND_BATCHES", 2),
        retry_base=_seconds(env, "HERALD_RETRY_BASE", 10.0),
        retry_cap=_seconds(env, "HERALD_RETRY_CAP", 900.0),
        stale_queued_seconds=_seconds(env, "HERALD_STALE_QUEUED_SECONDS", 90.0),
        dispatch_horizon=_seconds(env, "HERALD_DISPATCH_HORIZON", 1.0),
        sink_port=sink_port,
        login_failures=_count(env, "HERALD_LOGIN_FAILURES", 5),
        login_ip_failures=_count(env, "HERALD_LOGIN_IP_FAILURES", 20),
        login_window=_seconds(env, "HERALD_LOGIN_WINDOW", 900.0),
        login_lockout=login_lockout,
        login_lockout_max=login_lockout_max,
        trusted_proxies=_proxies(env, "HERALD_TRUSTED_PROXIES"),
        webhook_max_age=_max_age(env, "SENDGRID_WEBHOOK_MAX_AGE", 600),
        max_streams=max_streams,
        max_streams_per_workspace=max_streams_ws,
    )


_cached: Settings | None = None


def get_settings() -> Settings:
    """The process's settings, read once (lazily, on first use)."""
    global _cached
    if _cached is None:
        _cached = load_settings()
    return _cached


def reset_settings() -> None:
    """Forget the cached settings (tests change the environment between apps)."""
    global _cached
    _cached = None
