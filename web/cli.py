"""Admin commands: ``flask --app wsgi --help`` lists them."""

from __future__ import annotations

import functools

import click
from flask import Flask
from flask.cli import AppGroup
from sqlalchemy import func, select

from campaigns import accounts, campaign_rules, engine
from campaigns.config import ConfigError, get_settings
from campaigns.contacts import valid_id
from campaigns.db import check_database, session_scope
from campaigns.errors import HeraldError
from campaigns.models import Campaign, Message, User, Workspace

from .auth import lift_lockouts
from .cli_import import register as register_import

# Commands that never touch the database; every other one checks it first (see _admin_command).
NO_DATABASE = {"sendgrid-sink"}


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(getattr(exc, "message", exc)))


def _admin_command(callback):
    """Wrap a command so its failures are one line, not a traceback: the database is checked
    before it runs (an unreachable one fails like ``migrate``), and a refusal (HeraldError)
    becomes ``Error: <message>``."""

    @functools.wraps(callback)
    def run(*args, **kwargs):
        try:
            check_database()
        except ConfigError as exc:
            raise SystemExit(f"error: {exc}") from None
        try:
            return callback(*args, **kwargs)
        except HeraldError as exc:
            _fail(exc)

    run.herald_admin = True
    return run


# The commands, added to each app by register_commands. AppGroup.command runs each one inside
# the app context, as app.cli.command does.
commands = AppGroup("herald")


@commands.command("migrate")
def migrate():
    """Create or upgrade the schema to the latest migration (safe to run again)."""
    from campaigns.migrate import upgrade  # Alembic is loaded only by the command that needs it

    upgrade()
    click.echo("database is at the latest migration")


@commands.command("create-workspace")
@click.argument("name")
def create_workspace(name):
    """Create a workspace (an error if it exists)."""
    with session_scope() as s:
        ws = accounts.create_workspace(s, name)
        click.echo(f"created workspace {ws.name!r} (id {ws.id})")


@commands.command("workspace-concurrency")
@click.argument("name")
@click.argument("value", type=int, required=False)
def workspace_concurrency(name, value):
    """Show or set a workspace's concurrency budget: send tasks (up to 80 messages each) it may
    have queued or sending at once (default 16)."""
    with session_scope() as s:
        ws = accounts.get_workspace_by_name(s, name)
        if value is not None:
            accounts.set_concurrency(ws, value)
        click.echo(f"workspace {ws.name!r}: concurrency {ws.concurrency} send tasks "
                   f"({engine.workspace_slots(ws.concurrency)} messages queued or sending)")


@commands.command("create-user")
@click.argument("email")
@click.option("--workspace", required=True, help="name of the workspace to join")
@click.option("--password", default=None,
              help="the new user's password (prompted for when not given); refused for an existing user")
def create_user(email, workspace, password):
    """Create a user in a workspace, or add an existing user (of another workspace) to it.

    An existing user keeps their password: --password is then an error, so a password is
    never silently ignored (this command does not change passwords)."""
    email = accounts.login_email(email)
    with session_scope() as s:
        accounts.get_workspace_by_name(s, workspace)
        exists = accounts.find_user(s, email) is not None
    if exists and password is not None:
        raise click.ClickException(f"user {email} already exists and keeps their password; "
                                   f"run again without --password to add them to {workspace!r}")
    if not exists and password is None:
        # Prompted outside any transaction: SQLite would hold its write lock while we wait.
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    with session_scope() as s:
        ws = accounts.get_workspace_by_name(s, workspace)
        user = accounts.create_user(s, email, password, ws)
        if exists:
            click.echo(f"added existing user {user.email} to {ws.name!r} (password unchanged)")
        else:
            click.echo(f"created user {user.email} in {ws.name!r}")


@commands.command("create-api-key")
@click.option("--workspace", required=True, help="name of the workspace the key acts for")
@click.option("--name", default="", help="a label for the key")
def create_api_key(workspace, name):
    """Create an API key; it is printed once, alone on the last line (only its hash is kept)."""
    with session_scope() as s:
        ws = accounts.get_workspace_by_name(s, workspace)
        _, key = accounts.create_api_key(s, ws, name)
    click.echo(f"API key for {workspace!r} (shown once; store it now):")
    click.echo(key)


@commands.command("sendgrid-sink")
@click.option("--port", default=lambda: get_settings().sink_port, show_default="HERALD_SINK_PORT, else 3030",
              type=click.IntRange(1, 65535), help="the port the app sends to (HERALD_SINK_PORT)")
@click.option("--host", default="127.0.0.1", show_default=True)
def sendgrid_sink(port, host):
    """Run the local SendGrid sink (the /v3/mail/send wire format, a local outbox)."""
    from sendgrid_sink import SinkConfigError, run_sink  # the dev sink, loaded only when asked for

    try:
        run_sink(host=host, port=port)
    except SinkConfigError as exc:
        raise SystemExit(f"error: {exc}") from None


@commands.command("replay-failed")
@click.option("--campaign", "campaign_id", required=True, type=int, help="the campaign's id")
def replay_failed(campaign_id):
    """Queue every dead letter of a campaign again, with the same message keys."""
    with session_scope() as s:  # the commit wakes the dispatcher (campaigns.effects)
        c = s.get(Campaign, campaign_id) if valid_id(campaign_id) else None
        if c is None:
            raise click.ClickException(f"no campaign with id {campaign_id}")
        n = engine.replay_failed(s, c.workspace_id, campaign_id)
    click.echo(f"queued {n} failed message(s) of campaign {campaign_id} again")


@commands.command("delete-failed")
@click.option("--campaign", "campaign_id", required=True, type=int, help="the campaign's id")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
def delete_failed(campaign_id, yes):
    """Delete every dead letter of a campaign for good (they can no longer be replayed)."""
    with session_scope() as s:
        c = s.get(Campaign, campaign_id) if valid_id(campaign_id) else None
        if c is None:
            raise click.ClickException(f"no campaign with id {campaign_id}")
        name, workspace_id = c.name, c.workspace_id
        n = s.scalar(select(func.count()).select_from(Message)
                     .where(Message.campaign_id == campaign_id, Message.status == "failed"))
    if not n:
        click.echo(f"campaign {campaign_id} has no dead letters")
        return
    if not yes:
        click.confirm(f"Delete {n} dead letter(s) of campaign {campaign_id} ({name}) and their attempts? "
                      "They cannot be replayed afterwards", abort=True)
    with session_scope() as s:
        n = engine.delete_failed(s, workspace_id, campaign_id)
    click.echo(f"deleted {n} dead letter(s) of campaign {campaign_id}")


@commands.command("unlock-sign-in")
@click.argument("emails", nargs=-1)
@click.option("--client", "clients", multiple=True, metavar="ADDRESS",
              help="a client (IP) address whose failed sign-ins to forget; may be repeated")
@click.option("--all", "everything", is_flag=True, help="forget every failed sign-in and lockout")
def unlock_sign_in(emails, clients, everything):
    """Lift sign-in lockouts: forget the failed sign-ins of EMAILS (as typed at sign-in, any
    case), of --client addresses, or --all."""
    if not (emails or clients or everything):
        raise click.UsageError("name at least one address, a --client address, or --all")
    if everything and (emails or clients):
        raise click.UsageError("--all forgets everything: name no address with it")
    with session_scope() as s:
        n = lift_lockouts(s, list(emails), list(clients), everything)
    what = "every address" if everything else ", ".join([*emails, *(f"client {c}" for c in clients)])
    click.echo(f"forgot the failed sign-ins of {what} ({n} count{'' if n == 1 else 's'} removed)")


@commands.command("check-templates")
def check_templates():
    """List the email steps of open campaigns (draft, scheduled, running, paused) whose templates
    the template language refuses (saved by an older version); exit status 1 when there are any.
    Run it after an upgrade: such a step's emails fail at send until it is edited."""
    with session_scope() as s:
        found = campaign_rules.refused_templates(s)
        for campaign, _step, errors in found:
            for field, problems in errors.items():
                for problem in problems:
                    click.echo(f"workspace {campaign.workspace_id}, campaign {campaign.id} ({campaign.name!r}, "
                               f"{campaign.status}), {field}: {problem}")
    if found:
        raise click.ClickException(f"{len(found)} step{'s' if len(found) != 1 else ''} to edit "
                                   "(docs/templates.md lists what templates may use)")
    click.echo("every open campaign's templates are accepted")


@commands.command("demo")
@click.option("--email", default="demo@example.com", show_default=True)
@click.option("--password", default="herald-demo", show_default=True)
@click.option("--workspace", default="Demo", show_default=True)
def demo(email, password, workspace):
    """Create the demo workspace and user if missing (used by `make run`), and print the login."""
    with session_scope() as s:
        ws = s.scalar(select(Workspace).where(Workspace.name == workspace))
        if ws is None:
            ws = accounts.create_workspace(s, workspace)
        if s.scalar(select(User).where(User.email == email)) is None:
            accounts.create_user(s, email, password, ws)
            click.echo(f"demo login: {email} / {password}")
        else:
            click.echo(f"demo login: {email} (password unchanged; default {password})")


def register_commands(app: Flask) -> None:
    for command in commands.commands.values():
        app.cli.add_command(command)
    register_import(app)
    # Every command, including those registered from other modules; the module-level ones are
    # shared by every app, so each is wrapped once.
    for name, command in app.cli.commands.items():
        if name not in NO_DATABASE and not getattr(command.callback, "herald_admin", False):
            command.callback = _admin_command(command.callback)
