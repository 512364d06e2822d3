"""The ``import-contacts`` admin command: the same importer as the API, with a progress bar."""

from __future__ import annotations

import os
import sys

import click
from flask import Flask

from campaigns import accounts, contacts, csv_reading, importer
from campaigns.db import new_session
from campaigns.errors import HeraldError
from tasks import jobs

MAX_ERRORS_SHOWN = 1_000


def register(app: Flask) -> None:
    @app.cli.command("import-contacts")
    @click.argument("file", type=click.Path(exists=True, dir_okay=False, readable=True))
    @click.option("--workspace", required=True, help="name of the workspace to import into")
    @click.option(
        "--list", "list_name", default=None,
        help="also add the imported contacts to this list (created if the workspace has no list of that name)",
    )
    def import_contacts(file, workspace, list_name):
        """Import contacts from a CSV FILE (UTF-8; a header row with an email column).

        Columns are separated by commas, semicolons or tabs (told from the header row). Header
        names match ignoring case, spaces, dashes and underscores: email (e-mail, Email Address),
        first_name (First Name, Given Name), last_name (Last Name, Surname, Family Name) and
        timezone (Time Zone, tz) are known columns; every other column becomes a custom field.
        Rows are numbered like a spreadsheet (the header is row 1). Bad rows are reported at the
        end and the good ones stored; an unusable file (empty, binary, no header, no email
        column, two columns for one field, an ambiguous delimiter) stores nothing and exits
        with status 1.
        """
        total = os.path.getsize(file)
        session = new_session()
        try:
            ws = accounts.get_workspace_by_name(session, workspace)
            with open(file, "rb") as fh:
                csv_reading.inspect_csv(fh)  # an unusable file stops here: no list created, no bar
            list_id = None
            if list_name is not None:
                lst, created = contacts.get_or_create_list(session, ws.id, list_name)
                session.commit()
                list_id = lst.id
                if created:
                    click.echo(f"created list {lst.name!r} (id {lst.id})")
            with open(file, "rb") as fh, click.progressbar(
                length=total, label="importing", show_percent=True, file=sys.stderr
            ) as bar:
                done = 0

                def progress(_report, bytes_read: int) -> None:
                    nonlocal done
                    bar.update(max(0, bytes_read - done))
                    done = max(done, bytes_read)

                report = importer.import_csv(session, ws.id, fh, list_id=list_id, progress=progress)
                bar.update(max(0, total - done))
            session.commit()
        except HeraldError as exc:
            session.rollback()
            raise click.ClickException(exc.message) from None
        finally:
            session.close()

        if report.members_added and list_id is not None:
            try:
                jobs.notify_list_changed(list_id)
            except Exception as exc:  # the import itself is done and stored
                click.echo(f"warning: running campaigns of the list were not told about the new members ({exc})",
                           err=True)

        for err in report.errors[:MAX_ERRORS_SHOWN]:
            click.echo(f"row {err['row']}: {err['error']}")
        hidden = report.errors_truncated + max(0, len(report.errors) - MAX_ERRORS_SHOWN)
        if hidden:
            click.echo(f"... and {hidden} more rows with errors")
        failed = len(report.errors) + report.errors_truncated
        click.echo(
            f"{report.rows} rows: {report.created} created, {report.updated} updated, "
            f"{report.skipped} skipped, {failed} with errors"
            + (f"; {report.members_added} added to the list" if list_id is not None else "")
        )
