"""workspaces.concurrency: default 16 send tasks (was 8)

A workspace's concurrency budget counts send tasks queued or sending (40 messages each). At 8
(320 messages) the budget, not the consumers or the provider, capped a workspace sending alone:
a batch's 40 messages count from the moment they are queued until their outcomes are recorded,
and 320 of them cover only ~0.25 s of a 2-consumer installation's pace (bench/RESULTS.md:
1,100 -> 1,550 sends/s end to end on the same machine and run).

No release let anyone set the column (no API, UI or command did), so rows still at 8 hold the
old default and move to the new one.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('workspaces', schema=None) as batch_op:
        batch_op.alter_column('concurrency', existing_type=sa.Integer(), existing_nullable=False, server_default='16')
    op.execute("UPDATE workspaces SET concurrency = 16 WHERE concurrency = 8")


def downgrade() -> None:
    op.execute("UPDATE workspaces SET concurrency = 8 WHERE concurrency = 16")
    with op.batch_alter_table('workspaces', schema=None) as batch_op:
        batch_op.alter_column('concurrency', existing_type=sa.Integer(), existing_nullable=False, server_default='8')
