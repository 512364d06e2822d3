"""login_throttle: failed sign-ins counted per account and per client address

POST /login had no throttle (the README sent operators to their proxy's rate limit). Each row
counts the attempts against one account (by the hash of the submitted address, known or not) or
one client address, and the lockout they earned; rows that no longer matter are deleted as new
ones are written. Nothing to carry over: the table starts empty.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'login_throttle',
        sa.Column('key', sa.String(length=100), nullable=False),
        sa.Column('failures', sa.Integer(), nullable=False),
        sa.Column('window_start', sa.DateTime(), nullable=False),
        sa.Column('strikes', sa.Integer(), nullable=False),
        sa.Column('locked_until', sa.DateTime(), nullable=True),
        sa.Column('expires_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('key'),
    )
    op.create_index(op.f('ix_login_throttle_expires_at'), 'login_throttle', ['expires_at'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_login_throttle_expires_at'), table_name='login_throttle')
    op.drop_table('login_throttle')
