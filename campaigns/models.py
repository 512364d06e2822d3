"""Herald's data model (SQLAlchemy 2). The database is the source of truth; Redis carries ids.

Every row belongs to a workspace (``workspace_id``), and every query the web layer makes is
scoped by it. Timestamps are naive UTC (``campaigns.db.utcnow``) on both backends.

The message ledger (``messages``) has one row per (enrollment, step) with a stable
``message_key`` fixed when the row is created; the engine moves a row through
``scheduled -> queued -> sending -> sent -> delivered | bounced | dropped`` (or ``ambiguous``,
``failed``, ``cancelled``) and never backwards on a late event.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from .db import utcnow

# BIGINT on PostgreSQL, INTEGER (the rowid alias) on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


def _pk():
    return mapped_column(BigId, primary_key=True, autoincrement=True)


def _ws():
    return mapped_column(BigId, ForeignKey("workspaces.id", ondelete="CASCADE"), nullable=False, index=True)


DEFAULT_CONCURRENCY = 16


class Workspace(Base):
    __tablename__ = "workspaces"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = _pk()
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # Send tasks of this workspace queued or sending at once (fairness, issue 4); each carries up
    # to engine.SEND_BATCH (80) messages. Migration 0005 raised the default from 8.
    concurrency: Mapped[int] = mapped_column(Integer, default=DEFAULT_CONCURRENCY,
                                             server_default=str(DEFAULT_CONCURRENCY))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class User(Base):
    __tablename__ = "users"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = _pk()
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    memberships: Mapped[list[Membership]] = relationship(back_populates="user", cascade="all, delete-orphan")


class UserSession(Base):
    """A signed-in browser: the UI's cookie carries its token, this row says it is still valid.
    Signing out deletes it, so a cookie copied before then opens nothing afterwards."""

    __tablename__ = "user_sessions"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = _pk()
    user_id: Mapped[int] = mapped_column(BigId, ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime)


class LoginThrottle(Base):
    """Sign-in attempts counted against one account or one client address (``web.auth``).

    ``key`` is ``account:<sha256 of the normalised address>`` (known or not: no submitted text is
    kept), ``device:<that hash>:<browser>`` (a browser that signed in to the account before: its
    own count, see ``web.auth.device_key``) or ``ip:<address>``. ``failures`` counts the
    attempts in the window that began at ``window_start`` (an attempt counts from before its
    password is checked; a success takes its own back); ``strikes`` the lockouts in a row, each
    twice as long as the one before.
    ``expires_at`` is when the row stops mattering: rows past it are deleted on the next write.
    """

    __tablename__ = "login_throttle"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    window_start: Mapped[datetime] = mapped_column(DateTime)
    strikes: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(DateTime)
    expires_at: Mapped[datetime] = mapped_column(DateTime, index=True)


class Membership(Base):
    __tablename__ = "memberships"

    user_id: Mapped[int] = mapped_column(BigId, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    workspace_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("workspaces.id", ondelete="CASCADE"), primary_key=True
    )
    role: Mapped[str] = mapped_column(String(20), default="owner")

    user: Mapped[User] = relationship(back_populates="memberships")
    workspace: Mapped[Workspace] = relationship()


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = _pk()
    workspace_id: Mapped[int] = _ws()
    name: Mapped[str] = mapped_column(String(200), default="")
    prefix: Mapped[str] = mapped_column(String(16))  # shown in the UI to tell keys apart
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the key
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime)


class Contact(Base):
    __tablename__ = "contacts"
    __table_args__ = (
        UniqueConstraint("workspace_id", "email", name="uq_contacts_workspace_email"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = _pk()
    workspace_id: Mapped[int] = _ws()
    email: Mapped[str] = mapped_column(String(320))  # normalised (lower-cased) address
    first_name: Mapped[str | None] = mapped_column(String(200))
    last_name: Mapped[str | None] = mapped_column(String(200))
    timezone: Mapped[str | None] = mapped_column(String(64))
    fields: Mapped[dict] = mapped_column(JSON, default=dict)
    # active | unsubscribed | bounced | complained
    status: Mapped[str] = mapped_column(String(20), default="active", server_default="active")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class ContactList(Base):
    __tablename__ = "lists"
    __table_args__ = (
        UniqueConstraint("workspace_id", "name", name="uq_lists_workspace_name"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = _pk()
    workspace_id: Mapped[int] = _ws()
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ListMember(Base):
    __tablename__ = "list_members"
    __table_args__ = (
        Index("ix_list_members_contact", "contact_id"),
        Index("ix_list_members_list_added", "list_id", "added_at"),
    )

    list_id: Mapped[int] = mapped_column(BigId, ForeignKey("lists.id", ondelete="CASCADE"), primary_key=True)
    contact_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True
    )
    workspace_id: Mapped[int] = _ws()
    added_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Suppression(Base):
    __tablename__ = "suppressions"
    __table_args__ = (
        UniqueConstraint("workspace_id", "email", name="uq_suppressions_workspace_email"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = _pk()
    workspace_id: Mapped[int] = _ws()
    email: Mapped[str] = mapped_column(String(320))
    # manual | unsubscribe | bounce | dropped | spamreport | import
    reason: Mapped[str] = mapped_column(String(40), default="manual")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Campaign(Base):
    __tablename__ = "campaigns"
    __table_args__ = (Index("ix_campaigns_status", "status"), {"sqlite_autoincrement": True})

    id: Mapped[int] = _pk()
    workspace_id: Mapped[int] = _ws()
    name: Mapped[str] = mapped_column(String(200))
    list_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("lists.id", ondelete="SET NULL"))
    from_email: Mapped[str] = mapped_column(String(320))
    from_name: Mapped[str | None] = mapped_column(String(200))
    reply_to: Mapped[str | None] = mapped_column(String(320))
    send_window: Mapped[dict | None] = mapped_column(JSON)
    limits: Mapped[dict] = mapped_column(JSON, default=dict)
    stop_on: Mapped[list] = mapped_column(JSON, default=lambda: ["reply"])
    tracking: Mapped[dict] = mapped_column(JSON, default=lambda: {"opens": True, "clicks": True})
    max_attempts: Mapped[int] = mapped_column(Integer, default=5, server_default="5")
    # draft | running | paused | completed | cancelled
    status: Mapped[str] = mapped_column(String(20), default="draft", server_default="draft")
    status_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    launched_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    # Set once the launch fan-out has enrolled the list; later members are enrolled as they come.
    fanout_done_at: Mapped[datetime | None] = mapped_column(DateTime)

    steps: Mapped[list[Step]] = relationship(
        back_populates="campaign", order_by="Step.position", cascade="all, delete-orphan"
    )


class Step(Base):
    __tablename__ = "steps"
    __table_args__ = (
        UniqueConstraint("campaign_id", "position", name="uq_steps_campaign_position"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = _pk()
    workspace_id: Mapped[int] = _ws()
    campaign_id: Mapped[int] = mapped_column(BigId, ForeignKey("campaigns.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(10))  # email | wait
    subject: Mapped[str | None] = mapped_column(Text)
    html: Mapped[str | None] = mapped_column(Text)
    text: Mapped[str | None] = mapped_column(Text)
    wait_seconds: Mapped[int | None] = mapped_column(Integer)
    # Email steps: follow the previous email's thread (In-Reply-To/References, "Re:" when the
    # subject is empty). NULL: the default (true for every email after the first).
    thread: Mapped[bool | None] = mapped_column(Boolean)
    # Dead letters of this step deleted for good: still counted in its (cumulative) ``failed``.
    failed_deleted: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    campaign: Mapped[Campaign] = relationship(back_populates="steps")


class Enrollment(Base):
    """One contact in one campaign. ``next_position`` is the step the sequence is at."""

    __tablename__ = "enrollments"
    __table_args__ = (
        UniqueConstraint("campaign_id", "contact_id", name="uq_enrollments_campaign_contact"),
        Index("ix_enrollments_contact", "contact_id", "status"),
        Index("ix_enrollments_campaign_status", "campaign_id", "status"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = _pk()
    workspace_id: Mapped[int] = _ws()
    campaign_id: Mapped[int] = mapped_column(BigId, ForeignKey("campaigns.id", ondelete="CASCADE"))
    contact_id: Mapped[int] = mapped_column(BigId, ForeignKey("contacts.id", ondelete="CASCADE"))
    # active | completed | stopped
    status: Mapped[str] = mapped_column(String(20), default="active", server_default="active")
    stopped_reason: Mapped[str | None] = mapped_column(String(40))
    # The sender this contact's whole sequence comes from: chosen when its first email is
    # dispatched (by each sender's room), then kept (NULL: not chosen yet).
    sender_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("senders.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class Message(Base):
    """The ledger: one email of one step to one contact (or a test send)."""

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("enrollment_id", "step_id", name="uq_messages_enrollment_step"),
        # The dispatcher's query: work due now, oldest first.
        Index("ix_messages_status_due", "status", "due_at"),
        # A campaign's messages by status (stats, dead letters, the message log), and the
        # dispatcher's pass: a campaign's due work in its order (due_at, id), read no further.
        Index("ix_messages_campaign_status", "campaign_id", "status", "due_at", "id"),
        # The reconciler's query: leases that ran out.
        Index("ix_messages_lease", "status", "lease_expires_at"),
        Index("ix_messages_provider_id", "provider_message_id"),
        Index("ix_messages_contact", "contact_id"),
        # A sender's recent sends (sent today, bounce rate over its last sends).
        Index("ix_messages_sender_sent", "sender_id", "sent_at"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = _pk()
    workspace_id: Mapped[int] = _ws()
    campaign_id: Mapped[int] = mapped_column(BigId, ForeignKey("campaigns.id", ondelete="CASCADE"))
    enrollment_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("enrollments.id", ondelete="CASCADE"))
    # NULL: a draft's test send whose step has since been edited away (saving a draft's steps
    # replaces their rows; the test stays in the log and the outbox, and cannot be replayed).
    step_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("steps.id", ondelete="SET NULL"))
    contact_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("contacts.id", ondelete="SET NULL"))
    email: Mapped[str] = mapped_column(String(320))
    message_key: Mapped[str] = mapped_column(String(64), unique=True)
    # The sender it goes from (NULL until the dispatcher assigns the enrollment's sender), the
    # subject as sent (threads: "Re: <previous subject>"), and the recipient's mailbox provider
    # (google | microsoft | yahoo | other: the per-provider spam guardrail), set at send time.
    sender_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("senders.id", ondelete="SET NULL"))
    subject: Mapped[str | None] = mapped_column(Text)
    mailbox_provider: Mapped[str | None] = mapped_column(String(16))
    # scheduled | queued | sending | sent | delivered | bounced | dropped | ambiguous | failed | cancelled
    status: Mapped[str] = mapped_column(String(20), default="scheduled", server_default="scheduled")
    is_test: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    due_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(DateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer, default=5, server_default="5")
    lease_owner: Mapped[str | None] = mapped_column(String(80))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_response: Mapped[str | None] = mapped_column(Text)
    provider_message_id: Mapped[str | None] = mapped_column(String(100))
    ambiguous_at: Mapped[datetime | None] = mapped_column(DateTime)
    resends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    sent_at: Mapped[datetime | None] = mapped_column(DateTime)
    # When it last became a dead letter; never cleared (a replay keeps it): the ``failed`` statistic.
    failed_at: Mapped[datetime | None] = mapped_column(DateTime)
    # First-seen times of engagement (unique opens/clicks per message; replies).
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime)
    opened_at: Mapped[datetime | None] = mapped_column(DateTime)
    clicked_at: Mapped[datetime | None] = mapped_column(DateTime)
    replied_at: Mapped[datetime | None] = mapped_column(DateTime)
    unsubscribed_at: Mapped[datetime | None] = mapped_column(DateTime)
    spam_reported_at: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class MessageAttempt(Base):
    """One try at handing a message to the provider: the retry history and the duration figures.

    Rows are written once and never changed or deleted: deleting a dead letter or a campaign
    leaves its attempts (message and campaign set to NULL), so the 5-minute failure rate and
    /metrics' counters never go backwards (``queue_health``)."""

    __tablename__ = "message_attempts"
    __table_args__ = (
        Index("ix_attempts_message", "message_id"),
        Index("ix_attempts_finished", "finished_at"),
        Index("ix_attempts_campaign", "campaign_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = _pk()
    workspace_id: Mapped[int] = _ws()
    campaign_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("campaigns.id", ondelete="SET NULL"))
    message_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("messages.id", ondelete="SET NULL"))
    number: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime] = mapped_column(DateTime)
    duration_ms: Mapped[float] = mapped_column(Float)
    # sent | retry | failed | ambiguous | rate_limited
    outcome: Mapped[str] = mapped_column(String(20))
    http_status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    retry_at: Mapped[datetime | None] = mapped_column(DateTime)


class Event(Base):
    """A delivery event from the SendGrid Event Webhook (kept even when unmatched)."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_message", "message_id"),
        Index("ix_events_message_key", "message_key"),
        # The processor's queue: unprocessed events in id order (a partial index stays small).
        Index("ix_events_unprocessed", "id", postgresql_where=text("processed_at IS NULL"),
              sqlite_where=text("processed_at IS NULL")),
        # A repeat is stored once: by its sg_event_id here, by dedupe_key (a hash of the
        # fallback tuple, see campaigns.events) when SendGrid resends it with a new id.
        Index("uq_events_sg_event_id", "sg_event_id", unique=True),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = _pk()
    workspace_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("workspaces.id", ondelete="CASCADE"))
    message_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("messages.id", ondelete="SET NULL"))
    message_key: Mapped[str | None] = mapped_column(String(64))
    dedupe_key: Mapped[str] = mapped_column(String(128), unique=True)
    sg_event_id: Mapped[str | None] = mapped_column(String(100))
    sg_message_id: Mapped[str | None] = mapped_column(String(200))
    event: Mapped[str] = mapped_column(String(40))
    email: Mapped[str | None] = mapped_column(String(320))
    timestamp: Mapped[datetime | None] = mapped_column(DateTime)
    url: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[dict] = mapped_column(JSON)
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    processed_at: Mapped[datetime | None] = mapped_column(DateTime)


class Reply(Base):
    """An inbound email (Inbound Parse), matched to a message when possible."""

    __tablename__ = "replies"
    __table_args__ = (
        Index("ix_replies_message", "message_id"),
        Index("uq_replies_dedupe_key", "dedupe_key", unique=True),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = _pk()
    workspace_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("workspaces.id", ondelete="CASCADE"))
    message_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("messages.id", ondelete="SET NULL"))
    from_email: Mapped[str | None] = mapped_column(String(320))
    subject: Mapped[str | None] = mapped_column(Text)
    is_auto: Mapped[bool] = mapped_column(Boolean, default=False)
    matched_by: Mapped[str | None] = mapped_column(String(20))
    headers: Mapped[str | None] = mapped_column(Text)
    text: Mapped[str | None] = mapped_column(Text)
    # sha256 of the reply's own Message-ID (else of its content): Inbound Parse retries store once.
    dedupe_key: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # Where it came from: inbound_parse | imap; for IMAP, the mailbox (sender) it was read from.
    source: Mapped[str] = mapped_column(String(20), default="inbound_parse", server_default="inbound_parse")
    sender_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("senders.id", ondelete="SET NULL"))


class Sender(Base):
    """A From identity: a SendGrid sender identity or an SMTP mailbox (optionally read over IMAP).

    ``smtp``/``imap`` hold the connection settings without secrets; ``credentials`` is one Fernet
    token (``campaigns.secret_box``, key derived from SECRET_KEY) of a JSON object
    ``{"smtp": {"kind": "password", "password": ...}, "imap": {...}}``: a later credential kind
    (``{"kind": "xoauth2", ...}``) is a new ``kind`` in the same blob, not a migration.
    ``status`` is ``ok`` or ``paused`` (a guardrail or a person; ``status_reason`` says why);
    ``throttled`` is computed, never stored. ``imap_uidvalidity``/``imap_last_uid``: where the
    mailbox poll got to.
    """

    __tablename__ = "senders"
    __table_args__ = (
        UniqueConstraint("workspace_id", "email", name="uq_senders_workspace_email"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = _pk()
    workspace_id: Mapped[int] = _ws()
    email: Mapped[str] = mapped_column(String(320))  # normalised (lower-cased) address
    name: Mapped[str | None] = mapped_column(String(200))
    reply_to: Mapped[str | None] = mapped_column(String(320))
    signature_html: Mapped[str | None] = mapped_column(Text)
    provider: Mapped[str] = mapped_column(String(20), default="sendgrid")  # sendgrid | smtp
    smtp: Mapped[dict | None] = mapped_column(JSON)
    imap: Mapped[dict | None] = mapped_column(JSON)
    credentials: Mapped[str | None] = mapped_column(Text)
    daily_cap: Mapped[int | None] = mapped_column(Integer)
    warmup: Mapped[dict | None] = mapped_column(JSON)
    min_gap_seconds: Mapped[int | None] = mapped_column(Integer)
    max_gap_seconds: Mapped[int | None] = mapped_column(Integer)
    forward_replies_to: Mapped[str | None] = mapped_column(String(320))
    status: Mapped[str] = mapped_column(String(20), default="ok", server_default="ok")
    status_reason: Mapped[str | None] = mapped_column(Text)
    paused_at: Mapped[datetime | None] = mapped_column(DateTime)
    imap_uidvalidity: Mapped[int | None] = mapped_column(BigInteger)
    imap_last_uid: Mapped[int | None] = mapped_column(BigInteger)
    imap_checked_at: Mapped[datetime | None] = mapped_column(DateTime)
    imap_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class SenderAudit(Base):
    """What happened to a sender's standing, kept for the record: ``paused`` (by a guardrail,
    with the reason) and ``resumed`` (by whom: a user's address or an API key's prefix)."""

    __tablename__ = "sender_audit"
    __table_args__ = (Index("ix_sender_audit_sender", "sender_id", "id"), {"sqlite_autoincrement": True})

    id: Mapped[int] = _pk()
    workspace_id: Mapped[int] = _ws()
    sender_id: Mapped[int] = mapped_column(BigId, ForeignKey("senders.id", ondelete="CASCADE"))
    action: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str | None] = mapped_column(String(320))
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class CampaignSender(Base):
    """The senders a campaign sends from, in the order given (``sender_ids``)."""

    __tablename__ = "campaign_senders"
    __table_args__ = (Index("ix_campaign_senders_sender", "sender_id"),)

    campaign_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("campaigns.id", ondelete="CASCADE"), primary_key=True)
    sender_id: Mapped[int] = mapped_column(BigId, ForeignKey("senders.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, default=0)


class ProviderGuard(Base):
    """The spam guardrail's standing for one recipient mailbox provider in one workspace:
    ``ok``, ``halved`` (spam reports above 0.1% of the last 7 days' deliveries: half the rate)
    or ``stopped`` (above 0.3%: nothing goes to that provider until a person resumes)."""

    __tablename__ = "provider_guards"

    workspace_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("workspaces.id", ondelete="CASCADE"), primary_key=True)
    provider: Mapped[str] = mapped_column(String(16), primary_key=True)  # google | microsoft | yahoo | other
    state: Mapped[str] = mapped_column(String(20), default="ok")
    reason: Mapped[str | None] = mapped_column(Text)
    changed_at: Mapped[datetime | None] = mapped_column(DateTime)
    resumed_by: Mapped[str | None] = mapped_column(String(320))
    resumed_at: Mapped[datetime | None] = mapped_column(DateTime)


class Import(Base):
    """A CSV import run in the background, with its progress and per-row report."""

    __tablename__ = "imports"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = _pk()
    workspace_id: Mapped[int] = _ws()
    list_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("lists.id", ondelete="SET NULL"))
    # pending | running | done | failed
    status: Mapped[str] = mapped_column(String(20), default="pending")
    path: Mapped[str | None] = mapped_column(Text)
    total_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_done: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[int] = mapped_column(Integer, default=0)
    updated: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[list] = mapped_column(JSON, default=list)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    # The running worker's claim: written at the claim and with every batch. A run whose
    # heartbeat is older than the lease (its consumer was killed) is taken over and resumed.
    run_token: Mapped[str | None] = mapped_column(String(40))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime)


class JobLock(Base):
    """A lease held in the database, so a recurring job never overlaps itself across consumers."""

    __tablename__ = "job_locks"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(100))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_run_at: Mapped[datetime | None] = mapped_column(DateTime)
    # Where the last run got to (e.g. the reconciler's enrollment checkpoint).
    checkpoint: Mapped[datetime | None] = mapped_column(DateTime)
    # Set by a caller that found the lease held: the holder runs once more before letting go.
    rerun: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))


class Counter(Base):
    """Shared counters the consumers bump and /metrics reads (e.g. rate-limit waits), and the
    send attempts' rolled-up totals (names ``metrics:…``, ``queue_health.roll_up``)."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class RateLimitState(Base):
    """Rate-limit state for the embedded store (GCRA arrival times, window counts, holds)."""

    __tablename__ = "rate_limit_state"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[float] = mapped_column(Float, default=0.0)
