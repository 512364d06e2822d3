"""Senders: SendGrid identities and SMTP mailboxes as a resource; campaigns send from several

Adds ``senders`` (connection settings, encrypted credentials, caps, warm-up, gaps, standing,
the IMAP poll's position), ``sender_audit`` (pauses and resumes, who and when),
``campaign_senders`` (a campaign's senders in order), ``provider_guards`` (the per recipient
provider spam guardrail), and the columns that tie the ledger to them: ``enrollments.sender_id``
and ``messages.sender_id`` (NULL until the dispatcher picks the contact's sender),
``messages.subject`` (as sent, for "Re:" threads), ``messages.mailbox_provider``,
``steps.thread``, ``replies.source`` and ``replies.sender_id``.

Existing campaigns keep working: every distinct (workspace, from address) of a campaign becomes
a ``sendgrid`` sender, with the ``limits.sender`` rules (daily cap, warm-up, gaps) of the newest
campaign that set them, and each campaign sends from its address's sender.

Revision ID: 0011
Revises: 0010
"""

import json

import sqlalchemy as sa
from alembic import op


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
SQLITE_NAMES = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}


def _id():
    return sa.Column("id", BigId, primary_key=True, autoincrement=True)


def _ws():
    return sa.Column("workspace_id", BigId, sa.ForeignKey("workspaces.id", ondelete="CASCADE"), nullable=False)


def _tables() -> None:
    op.create_table(
        "senders", _id(), _ws(),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("name", sa.String(200)),
        sa.Column("reply_to", sa.String(320)),
        sa.Column("signature_html", sa.Text()),
        sa.Column("provider", sa.String(20), nullable=False),
        sa.Column("smtp", sa.JSON()),
        sa.Column("imap", sa.JSON()),
        sa.Column("credentials", sa.Text()),
        sa.Column("daily_cap", sa.Integer()),
        sa.Column("warmup", sa.JSON()),
        sa.Column("min_gap_seconds", sa.Integer()),
        sa.Column("max_gap_seconds", sa.Integer()),
        sa.Column("forward_replies_to", sa.String(320)),
        sa.Column("status", sa.String(20), nullable=False, server_default="ok"),
        sa.Column("status_reason", sa.Text()),
        sa.Column("paused_at", sa.DateTime()),
        sa.Column("imap_uidvalidity", sa.BigInteger()),
        sa.Column("imap_last_uid", sa.BigInteger()),
        sa.Column("imap_checked_at", sa.DateTime()),
        sa.Column("imap_error", sa.Text()),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("workspace_id", "email", name="uq_senders_workspace_email"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_senders_workspace_id", "senders", ["workspace_id"])
    op.create_table(
        "sender_audit", _id(), _ws(),
        sa.Column("sender_id", BigId, sa.ForeignKey("senders.id", ondelete="CASCADE"), nullable=False),
        sa.Column("action", sa.String(20), nullable=False),
        sa.Column("reason", sa.Text()),
        sa.Column("actor", sa.String(320)),
        sa.Column("at", sa.DateTime(), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_sender_audit_workspace_id", "sender_audit", ["workspace_id"])
    op.create_index("ix_sender_audit_sender", "sender_audit", ["sender_id", "id"])
    op.create_table(
        "campaign_senders",
        sa.Column("campaign_id", BigId, sa.ForeignKey("campaigns.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("sender_id", BigId, sa.ForeignKey("senders.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("position", sa.Integer(), nullable=False),
    )
    op.create_index("ix_campaign_senders_sender", "campaign_senders", ["sender_id"])
    op.create_table(
        "provider_guards",
        sa.Column("workspace_id", BigId, sa.ForeignKey("workspaces.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("provider", sa.String(16), primary_key=True),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("reason", sa.Text()),
        sa.Column("changed_at", sa.DateTime()),
        sa.Column("resumed_by", sa.String(320)),
        sa.Column("resumed_at", sa.DateTime()),
    )


def _columns() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"

    def sender_fk(table: str):
        # SQLite adds a column with a foreign key in place only through batch mode.
        if sqlite:
            with op.batch_alter_table(table, naming_convention=SQLITE_NAMES) as b:
                b.add_column(sa.Column("sender_id", BigId))
                b.create_foreign_key(f"fk_{table}_sender_id_senders", "senders", ["sender_id"], ["id"],
                                     ondelete="SET NULL")
        else:
            op.add_column(table, sa.Column("sender_id", BigId, sa.ForeignKey("senders.id", ondelete="SET NULL")))

    for table in ("enrollments", "messages", "replies"):
        sender_fk(table)
    op.add_column("messages", sa.Column("subject", sa.Text()))
    op.add_column("messages", sa.Column("mailbox_provider", sa.String(16)))
    op.create_index("ix_messages_sender_sent", "messages", ["sender_id", "sent_at"])
    op.add_column("steps", sa.Column("thread", sa.Boolean()))
    op.add_column("replies", sa.Column("source", sa.String(20), nullable=False, server_default="inbound_parse"))


def _senders_of_existing_campaigns() -> None:
    """Each (workspace, from address) of a campaign becomes a sendgrid sender; campaigns send from it."""
    bind = op.get_bind()
    rows = bind.execute(sa.text(
        "SELECT id, workspace_id, from_email, from_name, reply_to, limits FROM campaigns ORDER BY id")).all()
    senders: dict[tuple[int, str], dict] = {}
    for cid, ws, email, name, reply_to, limits in rows:
        key = (ws, (email or "").strip().lower())
        if not key[1]:
            continue
        limits = json.loads(limits) if isinstance(limits, str) else (limits or {})
        rules = (limits or {}).get("sender") or {}
        s = senders.setdefault(key, {"name": None, "reply_to": None, "rules": {}, "campaigns": []})
        s["name"] = name or s["name"]  # the newest campaign's, as ids grow
        s["reply_to"] = reply_to or s["reply_to"]
        if rules:
            s["rules"] = rules
        s["campaigns"].append(cid)
    now = sa.func.now() if bind.dialect.name == "postgresql" else sa.text("CURRENT_TIMESTAMP")
    table = sa.table(
        "senders", sa.column("id"), sa.column("workspace_id"), sa.column("email"), sa.column("name"),
        sa.column("reply_to"), sa.column("provider"), sa.column("daily_cap"), sa.column("warmup", sa.JSON()),
        sa.column("min_gap_seconds"), sa.column("max_gap_seconds"), sa.column("status"),
        sa.column("created_at"), sa.column("updated_at"))
    links = sa.table("campaign_senders", sa.column("campaign_id"), sa.column("sender_id"), sa.column("position"))
    for (ws, email), s in senders.items():
        rules = s["rules"]
        new_id = bind.execute(table.insert().values(
            workspace_id=ws, email=email, name=s["name"], reply_to=s["reply_to"], provider="sendgrid",
            daily_cap=rules.get("daily_cap"), warmup=rules.get("warmup"),
            min_gap_seconds=rules.get("min_gap_seconds"), max_gap_seconds=rules.get("max_gap_seconds"),
            status="ok", created_at=now, updated_at=now,
        ).returning(table.c.id)).scalar()
        bind.execute(links.insert(), [{"campaign_id": cid, "sender_id": new_id, "position": 0}
                                      for cid in s["campaigns"]])


def upgrade() -> None:
    _tables()
    _columns()
    _senders_of_existing_campaigns()


def downgrade() -> None:
    op.drop_column("replies", "source")
    op.drop_column("steps", "thread")
    op.drop_index("ix_messages_sender_sent", "messages")
    op.drop_column("messages", "mailbox_provider")
    op.drop_column("messages", "subject")
    for table in ("replies", "messages", "enrollments"):
        if op.get_bind().dialect.name == "sqlite":
            with op.batch_alter_table(table, naming_convention=SQLITE_NAMES) as b:
                b.drop_constraint(f"fk_{table}_sender_id_senders", type_="foreignkey")
                b.drop_column("sender_id")
        else:
            op.drop_column(table, "sender_id")
    op.drop_table("provider_guards")
    op.drop_table("campaign_senders")
    op.drop_table("sender_audit")
    op.drop_table("senders")
