"""Alembic environment: the URL comes from Herald's settings (DATABASE_URL or the embedded default)."""

from alembic import context

from campaigns.db import get_engine
from campaigns.models import Base

config = context.config
target_metadata = Base.metadata


def _sqlite_foreign_keys(connection, on: bool) -> None:
    """Outside any transaction (inside one SQLite ignores the pragma), on the driver's connection."""
    connection.connection.driver_connection.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url") or None
    engine = get_engine(url)
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # Batch mode rebuilds a table on SQLite (copy, DROP, rename). With foreign keys on,
            # the DROP deletes every row that references the table, through ON DELETE CASCADE:
            # rebuilding `workspaces` emptied every other table. Off while migrating, checked after.
            _sqlite_foreign_keys(connection, on=False)
        try:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=sqlite,
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
            connection.commit()
            if sqlite:
                broken = connection.connection.driver_connection.execute("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"the migration left rows whose foreign keys point nowhere: {broken[:10]}")
        finally:
            if sqlite:
                connection.invalidate()  # its pragma is off: never hand it back to the pool


run_migrations_online()
