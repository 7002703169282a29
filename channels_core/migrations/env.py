"""Alembic environment: runs against the configured (or embedded) database."""

from __future__ import annotations

from typing import Any, Literal

from alembic import context

from channels_core.db import get_sync_engine
from channels_core.models import Base, UTCDateTime

target_metadata = Base.metadata


def _render_item(type_: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    # Migrations stand alone: our UTC wrapper is a plain timestamptz column.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def run_migrations_online() -> None:
    connectable = context.config.attributes.get("connection")
    if connectable is not None:
        _run(connectable)
        return
    with get_sync_engine().connect() as connection:
        _run(connection)


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_item=_render_item,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():  # pragma: no cover - we always migrate online
    raise SystemExit("offline migrations are not supported; run `channels db upgrade`")
run_migrations_online()
