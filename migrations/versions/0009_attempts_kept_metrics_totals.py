"""message_attempts kept when their message or campaign is deleted; /metrics' attempt totals rolled up

/metrics counted every attempt row at every scrape (a full scan that grows with the history),
and deleting a dead letter or a campaign deleted its attempts (ON DELETE CASCADE), so counters
that Prometheus takes as monotonic went backwards, and the 5-minute failure rate forgot them.
From this revision attempts are never deleted: message_id and campaign_id become NULL when
their row goes. /metrics adds the attempts since a watermark to totals kept in ``counters``
(names ``metrics:…``), rolled forward as scrapes go by (campaigns.queue_health.roll_up).

The upgrade rolls up every attempt already stored (consumers are stopped while migrating),
and counts the ambiguous resends so far (``metrics:ambiguous_resends``; the reconciler adds
each new one), which /metrics read as the sum of ``messages.resends``, a scan of the ledger.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

# The histogram's buckets (ms) when this revision was written: campaigns.queue_health keeps
# the same list; changing it needs a revision that rolls the totals up again.
BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
# SQLite's foreign keys have no names; batch mode names them by this pattern to find them.
SQLITE_NAMES = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}


def _foreign_keys(ondelete: str, nullable: bool) -> None:
    refs = (("campaign_id", "campaigns"), ("message_id", "messages"))
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("message_attempts", recreate="always", naming_convention=SQLITE_NAMES) as b:
            for column, table in refs:
                name = f"fk_message_attempts_{column}_{table}"
                b.drop_constraint(name, type_="foreignkey")
                b.alter_column(column, existing_type=sa.Integer(), nullable=nullable)
                b.create_foreign_key(name, table, [column], ["id"], ondelete=ondelete)
        return
    for column, table in refs:
        name = f"message_attempts_{column}_fkey"
        op.drop_constraint(name, "message_attempts", type_="foreignkey")
        op.alter_column("message_attempts", column, existing_type=sa.BigInteger(), nullable=nullable)
        op.create_foreign_key(name, "message_attempts", table, [column], ["id"], ondelete=ondelete)


def upgrade() -> None:
    _foreign_keys("SET NULL", nullable=True)
    bind = op.get_bind()
    rows = {}
    for outcome, n in bind.execute(sa.text("SELECT outcome, count(*) FROM message_attempts GROUP BY outcome")):
        rows[f"metrics:attempts:{outcome}"] = n
    buckets = ", ".join(f"sum(CASE WHEN duration_ms <= {b} THEN 1 ELSE 0 END)" for b in BUCKETS_MS)
    agg = bind.execute(sa.text(
        "SELECT count(*), coalesce(sum(duration_ms), 0), sum(CASE WHEN number > 1 THEN 1 ELSE 0 END),"
        f" coalesce(max(id), 0), {buckets} FROM message_attempts"
    )).one()
    rows["metrics:duration_count"] = agg[0]
    rows["metrics:duration_sum_us"] = round(float(agg[1]) * 1000)
    rows["metrics:retries"] = agg[2] or 0
    rows["metrics:attempts_upto"] = agg[3]
    for b, n in zip(BUCKETS_MS, agg[4:]):
        rows[f"metrics:duration_le:{b}"] = n or 0
    rows["metrics:ambiguous_resends"] = bind.execute(
        sa.text("SELECT coalesce(sum(resends), 0) FROM messages")).scalar()
    bind.execute(sa.text("DELETE FROM counters WHERE name LIKE 'metrics:%'"))
    bind.execute(sa.text("INSERT INTO counters (name, value) VALUES (:name, :value)"),
                 [{"name": k, "value": int(v)} for k, v in rows.items()])


def downgrade() -> None:
    op.execute("DELETE FROM counters WHERE name LIKE 'metrics:%'")
    op.execute("DELETE FROM message_attempts WHERE message_id IS NULL OR campaign_id IS NULL")
    _foreign_keys("CASCADE", nullable=False)
