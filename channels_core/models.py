"""The tables, as typed SQLAlchemy 2.0 models.

These are storage rows, not the public API: ``channels_core.primitives``
wraps them in the seed's fluent objects. The Alembic migrations in
``channels_core/migrations`` must describe exactly these tables; a test runs
autogenerate against a migrated database and expects an empty diff.

Delivery state lives in two tables: ``deliveries`` holds one row per
(message, channel, subscriber) with its current state, and
``delivery_attempts`` one row per try (the TransportResult rows).

Ids are never reused, SQLite included (``sqlite_autoincrement``): a delivery
id is the ``webhook-id`` receivers deduplicate on, so a reused one would
make them drop a real delivery.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "Base",
    "PrincipalRow",
    "RoleRow",
    "PermissionRow",
    "RolePermissionRow",
    "PrincipalRoleRow",
    "ConversationRow",
    "ChannelRow",
    "SubscriptionRow",
    "MessageRow",
    "MessageReferenceRow",
    "OutboxRow",
    "DeliveryRow",
    "AttemptRow",
    "TokenRow",
    "IdempotencyRow",
    "EndpointRow",
    "EndpointEventRow",
    "HostLimitRow",
    "DeliveryStatus",
    "AttemptStatus",
    "utcnow",
]

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets BIGINT.
Id = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps are UTC and timezone-aware on every backend.

    PostgreSQL keeps the zone; SQLite has none and would hand back naive
    values that cannot be compared with aware ones. Values are stored in
    UTC and come back marked as UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }


class DeliveryStatus:
    """States of a delivery. ``delivered`` and ``dead`` are final."""

    PENDING = "pending"
    RETRYING = "retrying"
    DELIVERED = "delivered"
    DEAD = "dead"
    FINAL = frozenset({DELIVERED, DEAD})


class AttemptStatus:
    """Outcome of one attempt."""

    DELIVERED = "delivered"
    TRANSIENT = "transient"  # failed; another attempt is scheduled if any remain
    PERMANENT = "permanent"  # failed; retrying cannot help


class PrincipalRow(Base):
    __tablename__ = "principals"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(64), default="user")
    username: Mapped[str | None] = mapped_column(String(255), unique=True)
    email: Mapped[str | None] = mapped_column(String(320))
    aliases: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # An inactive principal keeps its subscriptions but receives nothing.
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RoleRow(Base):
    __tablename__ = "roles"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    title: Mapped[str] = mapped_column(String(255), unique=True)


class PermissionRow(Base):
    __tablename__ = "permissions"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    title: Mapped[str] = mapped_column(String(255), unique=True)


class RolePermissionRow(Base):
    __tablename__ = "role_permissions"

    role_id: Mapped[int] = mapped_column(
        Id, ForeignKey("roles.id", ondelete="CASCADE"), primary_key=True
    )
    permission_id: Mapped[int] = mapped_column(
        Id, ForeignKey("permissions.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class PrincipalRoleRow(Base):
    __tablename__ = "principal_roles"

    principal_id: Mapped[int] = mapped_column(
        Id, ForeignKey("principals.id", ondelete="CASCADE"), primary_key=True
    )
    role_id: Mapped[int] = mapped_column(
        Id, ForeignKey("roles.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class ConversationRow(Base):
    __tablename__ = "conversations"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    title: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ChannelRow(Base):
    __tablename__ = "channels"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    title: Mapped[str] = mapped_column(String(255))
    aliases: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SubscriptionRow(Base):
    __tablename__ = "subscriptions"
    __table_args__ = (
        UniqueConstraint("channel_id", "subscriber_id"),
        {"sqlite_autoincrement": True},
    )

    # Routing pages through a channel's subscribers by this key.
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    channel_id: Mapped[int] = mapped_column(Id, ForeignKey("channels.id", ondelete="CASCADE"))
    subscriber_id: Mapped[int] = mapped_column(
        Id, ForeignKey("principals.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class MessageRow(Base):
    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_conversation_created", "conversation_id", "created_at"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    content: Mapped[str] = mapped_column(Text)
    content_type: Mapped[str] = mapped_column(String(255), default="text/plain")
    author_id: Mapped[int | None] = mapped_column(Id, ForeignKey("principals.id"), index=True)
    reply_to_id: Mapped[int | None] = mapped_column(Id, ForeignKey("messages.id"), index=True)
    conversation_id: Mapped[int | None] = mapped_column(Id, ForeignKey("conversations.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class MessageReferenceRow(Base):
    __tablename__ = "message_references"

    message_id: Mapped[int] = mapped_column(
        Id, ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True
    )
    referenced_id: Mapped[int] = mapped_column(
        Id, ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    position: Mapped[int] = mapped_column(Integer, default=0)


class OutboxRow(Base):
    """A routing job owed: written in the message's transaction.

    ``routed_at`` is set when routing has created every delivery row; until
    then the sweeper re-enqueues the entry once ``relay_at`` passes, so a
    broker outage at send time loses nothing.
    """

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("message_id", "channel_id"),
        Index(
            "ix_outbox_unrouted",
            "relay_at",
            postgresql_where=text("routed_at IS NULL"),
            sqlite_where=text("routed_at IS NULL"),
        ),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    message_id: Mapped[int] = mapped_column(Id, ForeignKey("messages.id", ondelete="CASCADE"))
    channel_id: Mapped[int] = mapped_column(Id, ForeignKey("channels.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    relay_at: Mapped[datetime] = mapped_column(default=utcnow)
    relays: Mapped[int] = mapped_column(Integer, default=0)
    routed_at: Mapped[datetime | None] = mapped_column()
    transport: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)


class DeliveryRow(Base):
    """The current state of one message to one subscriber over one channel."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("message_id", "channel_id", "subscriber_id"),
        Index("ix_deliveries_status_next", "status", "next_attempt_at"),
        Index("ix_deliveries_channel_created", "channel_id", "created_at"),
        Index("ix_deliveries_subscriber_id", "subscriber_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    message_id: Mapped[int] = mapped_column(Id, ForeignKey("messages.id", ondelete="CASCADE"))
    channel_id: Mapped[int] = mapped_column(Id, ForeignKey("channels.id", ondelete="CASCADE"))
    subscriber_id: Mapped[int] = mapped_column(Id, ForeignKey("principals.id", ondelete="CASCADE"))
    transport: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Attempts made before the last manual retry or replay: the retry
    # schedule counts from here, so a replayed dead letter gets a full one.
    retry_base: Mapped[int] = mapped_column(Integer, default=0)
    # When the next attempt is due. Long delays live here, not in a Celery
    # countdown: the sweeper enqueues what is due.
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    # Set when a task for this delivery is enqueued: past it, the task is
    # presumed lost (a broker restart) and the sweeper enqueues another.
    queued_until: Mapped[datetime | None] = mapped_column()
    # The lease of the task delivering it now. A redelivered copy of the same
    # task (same id) may take it over; any other task leaves it alone, so no
    # delivery runs twice in parallel.
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claimed_until: Mapped[datetime | None] = mapped_column()
    # Claims since the last recorded outcome. Above one, a worker died (or
    # lost its broker) while holding it: the engine isolates and, past
    # ``poison_claims``, dead-letters it instead of letting it kill workers
    # forever.
    claims: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column()


class AttemptRow(Base):
    """One try of one delivery: the TransportResult row."""

    __tablename__ = "delivery_attempts"
    __table_args__ = (UniqueConstraint("delivery_id", "attempt"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(Id, ForeignKey("deliveries.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    transport: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[float | None] = mapped_column()
    started_at: Mapped[datetime] = mapped_column()
    finished_at: Mapped[datetime] = mapped_column()


class TokenRow(Base):
    """An API token: only its SHA-256 is stored; the token is shown once."""

    __tablename__ = "api_tokens"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    principal_id: Mapped[int] = mapped_column(
        Id, ForeignKey("principals.id", ondelete="CASCADE"), index=True
    )
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters, so an operator can tell tokens apart.
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()
    last_used_at: Mapped[datetime | None] = mapped_column()


class IdempotencyRow(Base):
    """An ingress idempotency key: the same key and body give the same message."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("principal_id", "key"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    principal_id: Mapped[int] = mapped_column(Id, ForeignKey("principals.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[int] = mapped_column(Id, ForeignKey("messages.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EndpointRow(Base):
    """A webhook endpoint known to the engine: its switch and its limits.

    Rows appear on the first event worth remembering (a breaker transition,
    a limit, a disable), not for every URL ever dialled. The live breaker
    state is shared through Redis (``channels_core.endpoints``); this row is
    what must survive a Redis restart: disabled or not, and why.
    """

    __tablename__ = "endpoints"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    url: Mapped[str] = mapped_column(Text, unique=True)
    host: Mapped[str] = mapped_column(String(255), index=True)
    disabled_at: Mapped[datetime | None] = mapped_column()
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    # Deliveries per second; None falls back to CHANNELS_ENDPOINT_RATE_LIMIT.
    rate_limit: Mapped[float | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class EndpointEventRow(Base):
    """One recorded transition of an endpoint: opened, half_open, closed, disabled, enabled."""

    __tablename__ = "endpoint_events"
    __table_args__ = (
        Index("ix_endpoint_events_endpoint_at", "endpoint_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    endpoint_id: Mapped[int] = mapped_column(Id, ForeignKey("endpoints.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class HostLimitRow(Base):
    """A rate limit shared by every endpoint on one host."""

    __tablename__ = "host_limits"

    host: Mapped[str] = mapped_column(String(255), primary_key=True)
    rate_limit: Mapped[float] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
