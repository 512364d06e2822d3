"""Herald's configuration, read from the environment.

Every public variable is in ../shared/CONTRACT.md. ``load_settings`` validates them all and
raises :class:`ConfigError` whose message is one line that names the bad variable; the entry
points (app factory, ``tasks``) turn it into ``SystemExit`` so the process stops with that line.
Reading the environment connects to nothing.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SINK_PORT = 3030
REAL_SENDGRID_HOST = "https://api.sendgrid.com"

_RATE_UNITS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}


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


def _positive(env, name: str, default, whole: bool):
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a {'whole ' if whole else ''}number") from None
    if value <= 0:
        raise ConfigError(f"{name}: must be {'at least 1' if whole else 'greater than 0'}, got {raw!r}")
    return value


def _positive_number(env, name: str, default: float) -> float:
    return _positive(env, name, default, whole=False)


def _positive_int(env, name: str, default: int) -> int:
    return _positive(env, name, default, whole=True)


def _http_url(env, name: str, default: str) -> str:
    raw = env.get(name) or default
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name}: {raw!r} is not an http(s) URL")
    return raw.rstrip("/")


def normalize_database_url(raw: str) -> str:
    """Validate ``DATABASE_URL`` and pin PostgreSQL URLs to the psycopg 3 driver."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(raw)
    except ArgumentError:
        raise ConfigError(
            f"DATABASE_URL: {raw!r} is not a database URL "
            "(expected postgresql+psycopg://user@host/dbname or sqlite:///path)"
        ) from None
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
    extra: dict = field(default_factory=dict)

    @property
    def uses_sink(self) -> bool:
        return not self.sendgrid_api_key

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def _secret_key(env, instance_dir: Path, database_set: bool) -> str:
    key = env.get("SECRET_KEY")
    if key:
        if len(key) < 16:
            raise ConfigError("SECRET_KEY: too short; use at least 16 random characters")
        return key
    if database_set:
        raise ConfigError("SECRET_KEY: required whenever DATABASE_URL is set")
    path = instance_dir / "secret_key"
    if path.exists():
        return path.read_text().strip()
    instance_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    # Exclusive create, so two processes starting together agree on one key.
    try:
        with open(path, "x") as fh:
            fh.write(key)
        os.chmod(path, 0o600)
    except FileExistsError:
        key = path.read_text().strip()
    return key


def load_settings(env=None) -> Settings:
    env = os.environ if env is None else env
    instance_dir = Path(env.get("HERALD_INSTANCE_DIR") or PROJECT_ROOT / "instance")

    raw_db = env.get("DATABASE_URL")
    if raw_db:
        database_url = normalize_database_url(raw_db)
    else:
        instance_dir.mkdir(parents=True, exist_ok=True)
        database_url = f"sqlite:///{instance_dir / 'herald.db'}"

    redis_url = env.get("REDIS_URL") or None
    if redis_url:
        parts = urlsplit(redis_url)
        if parts.scheme not in ("redis", "rediss", "unix") or not (parts.netloc or parts.path):
            raise ConfigError(f"REDIS_URL: {redis_url!r} is not a redis:// URL")
        try:
            _ = parts.port
        except ValueError:
            raise ConfigError(f"REDIS_URL: {redis_url!r} has a bad port") from None

    sink_port = int(_positive_number(env, "HERALD_SINK_PORT", DEFAULT_SINK_PORT))
    sink_url = f"http://127.0.0.1:{sink_port}"
    api_key = env.get("SENDGRID_API_KEY") or None
    api_host = _http_url(env, "SENDGRID_API_HOST", REAL_SENDGRID_HOST if api_key else sink_url)

    public_key = env.get("SENDGRID_WEBHOOK_PUBLIC_KEY") or None
    if public_key:
        import base64

        try:
            base64.b64decode(public_key, validate=True)
        except ValueError:
            raise ConfigError("SENDGRID_WEBHOOK_PUBLIC_KEY: not base64 (paste the key as SendGrid shows it)") from None

    inbound_domain = env.get("INBOUND_DOMAIN") or None
    if inbound_domain and not re.fullmatch(r"[A-Za-z0-9.-]+\.[A-Za-z]{2,}", inbound_domain):
        raise ConfigError(f"INBOUND_DOMAIN: {inbound_domain!r} is not a domain name")

    return Settings(
        instance_dir=instance_dir,
        database_url=database_url,
        redis_url=redis_url,
        sendgrid_api_key=api_key,
        sendgrid_api_host=api_host,
        sink_url=sink_url,
        webhook_public_key=public_key,
        rate_limit=parse_rate(env.get("SENDGRID_RATE_LIMIT") or "100/second"),
        inbound_parse_secret=env.get("INBOUND_PARSE_SECRET") or None,
        inbound_domain=inbound_domain,
        public_url=_http_url(env, "PUBLIC_URL", "http://127.0.0.1:5000"),
        secret_key=_secret_key(env, instance_dir, bool(raw_db)),
        ambiguous_window=_positive_number(env, "HERALD_AMBIGUOUS_WINDOW", 900.0),
        lease_seconds=_positive_number(env, "HERALD_LEASE_SECONDS", 120.0),
        send_timeout=_positive_number(env, "HERALD_SEND_TIMEOUT", 10.0),
        queue_name=env.get("HERALD_QUEUE_NAME") or "herald",
        send_concurrency=_positive_int(env, "HERALD_SEND_CONCURRENCY", 16),
        send_batches=_positive_int(env, "HERALD_SEND_BATCHES", 2),
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
