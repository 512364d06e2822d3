"""imports.run_token and imports.heartbeat_at: a killed import is found and resumed

A consumer killed with SIGKILL (no signal handler runs) left its import ``running`` forever.
The run now writes its token and a heartbeat at the claim and with every batch; the reconciler
queues imports whose heartbeat is older than the lease again, and the new run takes them over.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('imports', schema=None) as batch_op:
        batch_op.add_column(sa.Column('run_token', sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column('heartbeat_at', sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('imports', schema=None) as batch_op:
        batch_op.drop_column('heartbeat_at')
        batch_op.drop_column('run_token')
