"""Migrations: idempotent upgrades, and models and migrations that agree.

The ``database_url`` databases were upgraded to head when the session began;
these tests upgrade again and compare the reflected schema, and ask Alembic's
autogenerate for the difference between the migrated database and
``channels_core.models`` (it must be empty on SQLite and on PostgreSQL).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from _support import override_settings
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from channels_core import db, migrate
from channels_core.models import Base
from channels_core.primitives import Channel, Message, Principal
from channels_core.registries import MessageRegistry


def reflected_schema() -> dict[str, Any]:
    """Tables, columns, keys, indexes and constraints as the database reports them."""
    with db.get_sync_engine().connect() as conn:
        inspector = sa.inspect(conn)
        schema: dict[str, Any] = {}
        for table in sorted(inspector.get_table_names()):
            schema[table] = {
                "columns": [
                    (c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
                    for c in inspector.get_columns(table)
                ],
                "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
                "foreign_keys": sorted(
                    (
                        tuple(fk["constrained_columns"]),
                        fk["referred_table"],
                        tuple(fk["referred_columns"]),
                        str(fk.get("options", {}).get("ondelete")),
                    )
                    for fk in inspector.get_foreign_keys(table)
                ),
                "indexes": sorted(
                    (i["name"], tuple(i["column_names"]), bool(i["unique"]))  # type: ignore[arg-type]
                    for i in inspector.get_indexes(table)
                ),
                "unique": sorted(
                    (u["name"], tuple(u["column_names"]))  # type: ignore[arg-type]
                    for u in inspector.get_unique_constraints(table)
                ),
            }
        return schema


def autogenerate_diff() -> list[Any]:
    with db.get_sync_engine().connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


async def test_upgrade_twice_leaves_the_schema_unchanged(database: str) -> None:
    before = reflected_schema()
    assert set(Base.metadata.tables) | {"alembic_version"} == set(before)

    assert migrate.upgrade() == migrate.head_revision()
    assert migrate.upgrade() == migrate.head_revision()

    assert reflected_schema() == before
    assert migrate.current_revision() == migrate.head_revision()
    assert migrate.head_revision() is not None


async def test_models_and_migrations_agree(database: str) -> None:
    assert autogenerate_diff() == []


async def test_the_schema_comparison_can_fail(database: str) -> None:
    """A column the models lack shows up in both comparisons."""
    before = reflected_schema()
    with db.get_sync_engine().begin() as conn:
        conn.execute(sa.text("ALTER TABLE conversations ADD COLUMN stray INTEGER"))
    try:
        assert reflected_schema() != before
        diff = autogenerate_diff()
        assert [(d[0], d[2], d[3].name) for d in diff] == [
            ("remove_column", "conversations", "stray")
        ]
    finally:
        with db.get_sync_engine().begin() as conn:
            conn.execute(sa.text("ALTER TABLE conversations DROP COLUMN stray"))
    assert reflected_schema() == before


async def test_db_upgrade_on_a_brand_new_sqlite_file(tmp_path: Path) -> None:
    """What ``channels db upgrade`` runs, on a database that does not exist yet."""
    path = tmp_path / "fresh" / "channels.db"
    path.parent.mkdir()
    await db.dispose()  # this loop's engine belongs to the previous URL
    with override_settings(database_url=f"sqlite:///{path}"):
        try:
            assert migrate.current_revision() is None
            assert migrate.upgrade() == migrate.head_revision()
            assert path.exists()
            schema = reflected_schema()
            assert set(schema) == set(Base.metadata.tables) | {"alembic_version"}
            assert autogenerate_diff() == []

            assert migrate.upgrade() == migrate.head_revision()  # a no-op the second time
            assert reflected_schema() == schema

            # The fresh database serves the Python API.
            author = await Principal("user", username="first").save()
            channel = await Channel("General").save()
            message = await Message("hello", author_id=author.id).save()
            assert (await MessageRegistry().get_thread(message.id)).ids() == [message.id]  # type: ignore[arg-type]
            assert channel.id == 1
        finally:
            await db.dispose()
