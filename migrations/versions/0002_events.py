"""delivery events and replies: a unique sg_event_id, reply dedupe key

Revision ID: 0002
Revises: 0001
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # An event is stored once by its sg_event_id (several NULLs are allowed on both backends);
    # repeats with a new id are caught by the existing unique dedupe_key.
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index('uq_events_sg_event_id', ['sg_event_id'], unique=True)
        # The processor's queue: unprocessed events in id order, in a partial index that stays small.
        batch_op.drop_index('ix_events_unprocessed')
        batch_op.create_index('ix_events_unprocessed', ['id'], unique=False,
                              postgresql_where=sa.text('processed_at IS NULL'),
                              sqlite_where=sa.text('processed_at IS NULL'))
    # A reply is stored once under Inbound Parse's retries (sha256 of its Message-ID).
    with op.batch_alter_table('replies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dedupe_key', sa.String(length=64), nullable=True))
        batch_op.create_index('uq_replies_dedupe_key', ['dedupe_key'], unique=True)
        batch_op.create_index('ix_replies_message', ['message_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('replies', schema=None) as batch_op:
        batch_op.drop_index('ix_replies_message')
        batch_op.drop_index('uq_replies_dedupe_key')
        batch_op.drop_column('dedupe_key')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index('ix_events_unprocessed')
        batch_op.create_index('ix_events_unprocessed', ['processed_at'], unique=False)
        batch_op.drop_index('uq_events_sg_event_id')
