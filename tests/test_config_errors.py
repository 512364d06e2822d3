"""Bad configuration stops every entry point with one line naming the variable (CONTRACT.md,
"Configuration"): values load_settings refuses, and services that do not answer at start."""

import multiprocessing
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from campaigns import config
from campaigns.config import ConfigError, load_settings
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
UNREACHABLE_DB = "postgresql+psycopg://postgres@127.0.0.1:1/nodb"


def _settings_env(tmp_path, **values):
    return {"HERALD_INSTANCE_DIR": str(tmp_path), "SECRET_KEY": "x" * 20, **values}


def _p384_key() -> str:
    import base64

    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    der = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        s.Encoding.DER, s.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


def _p256_key() -> str:
    from sendgrid_sink import generate_key_pair

    return generate_key_pair()[1]


@pytest.mark.parametrize(
    "name,value",
    [
        ("DATABASE_URL", "postgresql://127.0.0.1:notaport/db"),
        ("DATABASE_URL", "postgresql://127.0.0.1:99999/db"),
        ("HERALD_SINK_PORT", "nan"),
        ("HERALD_SINK_PORT", "inf"),
        ("HERALD_SINK_PORT", "70000"),
        ("HERALD_SINK_PORT", "0"),
        ("HERALD_SINK_PORT", "3030.5"),
        ("HERALD_LEASE_SECONDS", "inf"),
        ("HERALD_LEASE_SECONDS", "1e300"),
        ("HERALD_AMBIGUOUS_WINDOW", "nan"),
        ("HERALD_SEND_TIMEOUT", "1e400"),
        ("HERALD_SEND_CONCURRENCY", "1000000"),
        ("HERALD_STALE_QUEUED_SECONDS", "abc"),
        ("HERALD_DISPATCH_HORIZON", "abc"),
        ("HERALD_RETRY_BASE", "abc"),
        ("HERALD_RETRY_CAP", "abc"),
        ("HERALD_RETRY_BASE", "-1"),
        ("HERALD_RETRY_CAP", "0"),
        ("HERALD_INSTANCE_DIR", "/etc/passwd"),
        ("HERALD_INSTANCE_DIR", "/proc/x"),
        ("SENDGRID_WEBHOOK_PUBLIC_KEY", "AAAA"),
        ("SENDGRID_WEBHOOK_PUBLIC_KEY", "truncated"),  # replaced by a truncated real key below
        ("SENDGRID_WEBHOOK_PUBLIC_KEY", "p384"),  # replaced by a P-384 key below
        ("PUBLIC_URL", "http://example.com:99999"),
        ("PUBLIC_URL", "http://exa mple.com"),
        ("SENDGRID_API_HOST", "https://api.x.com:abc"),
        ("REDIS_URL", "redis://127.0.0.1:6379/abc"),
        ("REDIS_URL", "redis://127.0.0.1:6379/0?db=x"),
        ("INBOUND_PARSE_SECRET", "ab/cd+ef=="),
        ("INBOUND_PARSE_SECRET", ".."),
        ("HERALD_QUEUE_NAME", "my queue"),
        ("HERALD_QUEUE_NAME", "q" * 65),
    ],
)
def test_bad_value_is_one_line_naming_the_variable(name, value, tmp_path):
    if value == "truncated":
        value = _p256_key()[:-8]
    elif value == "p384":
        value = _p384_key()
    env = _settings_env(tmp_path, **{name: value})
    with pytest.raises(ConfigError) as err:
        load_settings(env)
    assert str(err.value).startswith(name + ":"), str(err.value)
    assert "\n" not in str(err.value)


def test_good_values_are_kept(tmp_path):
    key = _p256_key()
    s = load_settings(_settings_env(
        tmp_path, SENDGRID_WEBHOOK_PUBLIC_KEY=key, HERALD_SINK_PORT="4040", REDIS_URL="redis://127.0.0.1:6379/15",
        INBOUND_PARSE_SECRET="Ab-0_9.~z", PUBLIC_URL="https://herald.example.com:8443/",
        HERALD_RETRY_BASE="0.5", HERALD_RETRY_CAP="60", HERALD_STALE_QUEUED_SECONDS="30",
        HERALD_DISPATCH_HORIZON="2", HERALD_LEASE_SECONDS="86400",
    ))
    assert s.webhook_public_key == key and s.inbound_parse_secret == "Ab-0_9.~z"
    assert (s.sink_port, s.sink_url) == (4040, "http://127.0.0.1:4040")
    assert s.public_url == "https://herald.example.com:8443"
    assert (s.retry_base, s.retry_cap, s.stale_queued_seconds, s.dispatch_horizon) == (0.5, 60, 30, 2)
    d = load_settings(_settings_env(tmp_path))
    assert (d.retry_base, d.retry_cap, d.stale_queued_seconds, d.dispatch_horizon) == (10, 900, 90, 1)
    assert d.sink_port == 3030


def test_engine_reads_its_tunables_from_the_settings(monkeypatch):
    from campaigns import engine

    # conftest sets these in the environment before the engine is imported
    assert engine.stale_queued() == timedelta(seconds=float(os.environ["HERALD_STALE_QUEUED_SECONDS"]))
    assert engine.retry_base() == float(os.environ["HERALD_RETRY_BASE"])
    monkeypatch.setenv("HERALD_RETRY_CAP", "7")
    config.reset_settings()
    try:
        assert engine.retry_cap() == 7.0
    finally:
        monkeypatch.undo()
        config.reset_settings()


# --------------------------------------------------------------------------- SECRET_KEY file


def test_empty_secret_key_file_is_an_error(tmp_path):
    (tmp_path / "secret_key").write_text("\n")
    with pytest.raises(ConfigError, match=r"^SECRET_KEY: .*secret_key.* is empty") as err:
        load_settings({"HERALD_INSTANCE_DIR": str(tmp_path)})
    assert "\n" not in str(err.value)


def _make_key(directory, barrier, results):
    barrier.wait()
    try:
        results.put(config._secret_key({}, Path(directory), False))
    except Exception as exc:  # reported to the parent
        results.put(repr(exc))


def test_processes_starting_together_agree_on_one_secret_key(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for round_ in range(6):
        directory = tmp_path / str(round_)
        directory.mkdir()
        barrier, results = ctx.Barrier(16), ctx.Queue()
        procs = [ctx.Process(target=_make_key, args=(str(directory), barrier, results)) for _ in range(16)]
        for p in procs:
            p.start()
        keys = [results.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(10)
        assert len(set(keys)) == 1 and len(keys[0]) >= 16, set(keys)
        assert [f.name for f in directory.iterdir()] == ["secret_key"]  # no temporary file left


# --------------------------------------------------------------------------- entry points


def _run(cmd, tmp_path, timeout=30, **env):
    full = dict(os.environ, HERALD_INSTANCE_DIR=str(tmp_path), PYTHONPATH=str(ROOT), **env)
    out = subprocess.run(cmd, cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout)
    return out.returncode, [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]


FLASK = [str(BIN / "flask"), "--app", "wsgi"]
CONSUMER = [str(BIN / "huey_consumer"), "tasks.huey", "-k", "thread", "-w", "2"]


@pytest.mark.parametrize("args", [["routes"], ["create-workspace", "foo"], ["create-api-key", "--workspace", "x"],
                                  ["demo"], ["replay-failed", "--campaign", "1"]])
def test_flask_commands_stop_on_unreachable_database(args, tmp_path):
    rc, lines = _run(FLASK + args, tmp_path, DATABASE_URL=UNREACHABLE_DB)
    assert rc != 0
    assert len(lines) == 1 and lines[0].startswith("error: DATABASE_URL: cannot connect"), lines


def test_flask_run_stops_on_missing_sqlite_folder(tmp_path):
    rc, lines = _run(FLASK + ["run", "--port", str(free_port())], tmp_path,
                     DATABASE_URL="sqlite:////nonexistent/dir/x.db")
    assert rc != 0
    assert len(lines) == 1 and lines[0].startswith("error: DATABASE_URL: cannot connect"), lines


@pytest.mark.parametrize("url,error", [(UNREACHABLE_DB, "error: DATABASE_URL: cannot connect"),
                                       ("nonsense", "error: DATABASE_URL: 'nonsense' is not a database URL")])
def test_gunicorn_stops_on_a_bad_database_in_one_line(tmp_path, url, error):
    # gunicorn.conf.py checks in the master before any worker starts. Two workers each failing
    # to load the app raced gunicorn's shutdown: 3 runs in 8 printed two tracebacks.
    cmd = [str(BIN / "gunicorn"), "--no-control-socket", "-w", "2", "-b", f"127.0.0.1:{free_port()}", "wsgi:app"]
    for _ in range(3):
        rc, lines = _run(cmd, tmp_path, DATABASE_URL=url)
        assert rc == 4  # gunicorn's "App failed to load"
        assert [ln for ln in lines if "[INFO]" not in ln] == [lines[-1]] and lines[-1].startswith(error), lines


def test_consumer_stops_on_unreachable_database(tmp_path):
    rc, lines = _run(CONSUMER, tmp_path, DATABASE_URL=UNREACHABLE_DB)
    assert rc != 0
    assert len(lines) == 1 and lines[0].startswith("error: DATABASE_URL: cannot connect"), lines


def test_consumer_stops_on_unreachable_redis(tmp_path):
    rc, lines = _run(CONSUMER, tmp_path, REDIS_URL="redis://127.0.0.1:1/0")
    assert rc != 0
    assert len(lines) == 1 and lines[0].startswith("error: REDIS_URL: cannot connect"), lines


def test_bad_tunable_stops_the_consumer_with_one_line(tmp_path):
    rc, lines = _run(CONSUMER, tmp_path, HERALD_DISPATCH_HORIZON="abc")
    assert rc != 0
    assert lines == ["error: HERALD_DISPATCH_HORIZON: 'abc' is not a number"]


def test_sink_listens_on_the_configured_port_and_needs_no_database(tmp_path):
    port = free_port()
    env = dict(os.environ, HERALD_INSTANCE_DIR=str(tmp_path), HERALD_SINK_PORT=str(port), DATABASE_URL=UNREACHABLE_DB)
    proc = subprocess.Popen(FLASK + ["sendgrid-sink"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, "the sink exited"
                assert time.monotonic() < deadline, f"nothing listening on HERALD_SINK_PORT {port}"
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(10)


# --------------------------------------------------------------------------- admin command input


def _cli(app, *args, input=None):
    result = app.test_cli_runner().invoke(args=list(args), input=input)
    return result.exit_code, result.output


@pytest.mark.parametrize("args,expected", [
    (["create-workspace", "w" * 300], "a workspace name has at most 200 characters"),
    (["create-api-key", "--workspace", "Alpha", "--name", "n" * 300], "an API key name has at most 200 characters"),
    (["create-user", "u" * 400 + "@example.com", "--workspace", "Alpha", "--password", "long enough"],
     "an email address has at most 320 characters"),
    (["create-user", "not an email@", "--workspace", "Alpha", "--password", "long enough"], "is not an email address"),
    (["demo", "--email", "nobody", "--workspace", "Demo"], "is not an email address"),
    (["workspace-concurrency", "Alpha", "0"], "concurrency must be a whole number from 1 to 1000"),
])
def test_admin_commands_refuse_bad_input_in_one_line(app, args, expected):
    assert _cli(app, "create-workspace", "Alpha")[0] == 0
    code, output = _cli(app, *args)
    assert code == 1
    lines = output.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], output


def test_create_user_for_an_existing_user_keeps_the_password(app):
    from campaigns import accounts
    from campaigns.db import session_scope

    for name in ("Alpha", "Beta"):
        assert _cli(app, "create-workspace", name)[0] == 0
    code, output = _cli(app, "create-user", "bob@example.com", "--workspace", "Alpha", input="first pass\n" * 2)
    assert code == 0 and "created user bob@example.com in 'Alpha'" in output, output

    code, output = _cli(app, "create-user", "bob@example.com", "--workspace", "Beta", "--password", "NEW password")
    assert code == 1 and "already exists" in output and "without --password" in output, output

    code, output = _cli(app, "create-user", "Bob@Example.com", "--workspace", "Beta")
    assert code == 0 and output.strip() == "added existing user bob@example.com to 'Beta' (password unchanged)"
    with session_scope() as s:
        user = accounts.authenticate(s, "bob@example.com", "first pass")
        assert user is not None
        assert [w.name for w in accounts.user_workspaces(s, user.id)] == ["Alpha", "Beta"]
