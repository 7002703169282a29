"""endpoint health and limits; claims per delivery

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("claims", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )

    op.create_table(
        "endpoints",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.Column("rate_limit", sa.Double(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_endpoints")),
        sa.UniqueConstraint("url", name=op.f("uq_endpoints_url")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("endpoints", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_endpoints_host"), ["host"], unique=False)

    op.create_table(
        "endpoint_events",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("endpoint_id", _ID, nullable=False),
        sa.Column("event", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["endpoints.id"],
            name=op.f("fk_endpoint_events_endpoint_id_endpoints"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_endpoint_events")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("endpoint_events", schema=None) as batch_op:
        batch_op.create_index("ix_endpoint_events_endpoint_at", ["endpoint_id", "id"], unique=False)

    op.create_table(
        "host_limits",
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("rate_limit", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("host", name=op.f("pk_host_limits")),
    )


def downgrade() -> None:
    op.drop_table("host_limits")
    with op.batch_alter_table("endpoint_events", schema=None) as batch_op:
        batch_op.drop_index("ix_endpoint_events_endpoint_at")
    op.drop_table("endpoint_events")
    with op.batch_alter_table("endpoints", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_endpoints_host"))
    op.drop_table("endpoints")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("claims")
