"""messages.step_id: SET NULL when the step goes, so a draft's test sends outlive its edits

Saving a draft's steps replaces its step rows, and ``messages.step_id`` was ON DELETE CASCADE:
every test send made from the draft vanished from the message log and the outbox at the next
save. A message's step may now be NULL: a test of a step that has since been edited away (only
a draft's steps change, and a draft has only test sends).

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

SQLITE_NAMES = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}


def _step_key(ondelete: str, nullable: bool) -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("messages", recreate="always", naming_convention=SQLITE_NAMES) as b:
            b.drop_constraint("fk_messages_step_id_steps", type_="foreignkey")
            b.alter_column("step_id", existing_type=sa.Integer(), nullable=nullable)
            b.create_foreign_key("fk_messages_step_id_steps", "steps", ["step_id"], ["id"], ondelete=ondelete)
        return
    op.drop_constraint("messages_step_id_fkey", "messages", type_="foreignkey")
    op.alter_column("messages", "step_id", existing_type=sa.BigInteger(), nullable=nullable)
    op.create_foreign_key("messages_step_id_fkey", "messages", "steps", ["step_id"], ["id"], ondelete=ondelete)


def upgrade() -> None:
    _step_key("SET NULL", nullable=True)


def downgrade() -> None:
    # Test sends of steps edited away have nothing to point at: they go, as they did before.
    op.execute("DELETE FROM messages WHERE step_id IS NULL")
    _step_key("CASCADE", nullable=False)
