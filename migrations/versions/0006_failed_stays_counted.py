"""steps.failed_deleted; messages.failed_at kept through a replay: ``failed`` never decreases

The contract's statistics are cumulative: ``failed`` counts the messages that ever became dead
letters. It used to be read from the current status, so replaying a dead letter took it back
out of the count. From this revision ``failed_at`` is set when a message becomes a dead letter
and never cleared (a replay keeps it), and a deleted dead letter is counted in its step's
``failed_deleted``.

Messages replayed before this revision lost their ``failed_at``; those whose refusal is in
their attempt history (an attempt with the outcome ``failed``: a 400-class answer) get it back
from there. Dead letters made by exhausted retries and replayed before this revision left no
such trace and stay uncounted.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('steps', schema=None) as batch_op:
        batch_op.add_column(sa.Column('failed_deleted', sa.Integer(), nullable=False, server_default='0'))
    op.execute(
        "UPDATE messages SET failed_at = (SELECT max(a.finished_at) FROM message_attempts a"
        " WHERE a.message_id = messages.id AND a.outcome = 'failed')"
        " WHERE failed_at IS NULL AND EXISTS (SELECT 1 FROM message_attempts a"
        " WHERE a.message_id = messages.id AND a.outcome = 'failed')"
    )


def downgrade() -> None:
    op.execute("UPDATE messages SET failed_at = NULL WHERE status <> 'failed'")
    with op.batch_alter_table('steps', schema=None) as batch_op:
        batch_op.drop_column('failed_deleted')
