"""the dispatcher's order in its index: (campaign_id, status, due_at, id)

The dispatcher takes each campaign's due messages oldest first (due_at, then id) a few hundred
at a time. With id missing from the index, every pass read and sorted all of a campaign's due
rows (all of them share one due_at after a fan-out); with it, a pass reads only what it takes.

Revision ID: 0003
Revises: 0002
"""

from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index('ix_messages_campaign_status')
        batch_op.create_index('ix_messages_campaign_status', ['campaign_id', 'status', 'due_at', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index('ix_messages_campaign_status')
        batch_op.create_index('ix_messages_campaign_status', ['campaign_id', 'status', 'due_at'], unique=False)
