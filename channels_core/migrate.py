"""Schema migrations: ``channels db upgrade`` and what tests call.

The migrations ship inside the package (``channels_core/migrations``), so an
installed wheel can migrate without a checkout.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from channels_core.db import get_sync_engine

__all__ = ["alembic_config", "upgrade", "current_revision", "head_revision"]

_HERE = Path(__file__).parent / "migrations"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(_HERE))
    return config


def upgrade(revision: str = "head") -> str | None:
    """Bring the schema to ``revision``; a no-op when it is already there."""
    command.upgrade(alembic_config(), revision)
    return current_revision()


def current_revision() -> str | None:
    with get_sync_engine().connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()
