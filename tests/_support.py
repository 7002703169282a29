"""Helpers shared by the issue-2 suites: database snapshots, settings
overrides, principals with permissions, and the egress registry's state."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Iterator
from typing import Any

from sqlalchemy import func, select, text

from channels_core import db
from channels_core.models import Base
from channels_core.primitives import Permission, Principal, Role
from channels_core.settings import Settings, configure, get_settings
from channels_core.transports.registry import TransportRegistry

__all__ = [
    "new_principals",
    "table_counts",
    "snapshot",
    "unchanged",
    "override_settings",
    "principal_with",
    "registry_state",
]


def new_principals(n: int) -> str:
    """SQL opening ``WITH p AS (...)``: ``n`` new bot principals, their ids in
    ``p``, for a statement that fills a large table in one go."""
    return (
        "WITH p AS (INSERT INTO principals (kind, aliases, active, created_at)"
        f" SELECT 'bot', '{{}}', true, now() FROM generate_series(1, {int(n)}) RETURNING id)"
    )


async def table_counts() -> dict[str, int]:
    """Rows per table, for every table the models declare."""
    async with db.session() as s:
        return {
            table.name: int(await s.scalar(select(func.count()).select_from(table)) or 0)
            for table in Base.metadata.sorted_tables
        }


async def snapshot() -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, order-independent: catches updates as well as inserts.

    ``SELECT *`` rather than the mapped columns, so a column the models have
    and the database lacks (or the other way round) cannot break the helper.
    """
    rows: dict[str, list[tuple[Any, ...]]] = {}
    async with db.session() as s:
        for table in Base.metadata.sorted_tables:
            result = await s.execute(text(f"SELECT * FROM {table.name}"))
            rows[table.name] = sorted((tuple(r) for r in result), key=repr)
    return rows


@contextlib.asynccontextmanager
async def unchanged() -> AsyncIterator[None]:
    """Assert the block leaves every table's row count and content as it was."""
    counts, before = await table_counts(), await snapshot()
    yield
    assert await table_counts() == counts
    assert await snapshot() == before


@contextlib.contextmanager
def override_settings(**values: object) -> Iterator[Settings]:
    """Layer ``values`` over the settings in force (keeping the test's
    database URL) and restore them afterwards.

    ``configure(**values)`` alone layers over the *environment*, which would
    drop the database URL the ``database`` fixture configured.
    """
    previous = get_settings()
    try:
        yield configure(previous, **values)
    finally:
        configure(previous)


_serial = itertools.count(1)


async def principal_with(
    *permissions: str, username: str | None = None, kind: str = "user"
) -> Principal:
    """A saved principal holding ``permissions`` through a role of its own."""
    principal = Principal(kind, username=username)
    if permissions:
        role = Role(f"role-{next(_serial)}")
        for title in permissions:
            role.add_permission((await Permission.get_or_create(title)).id)  # type: ignore[arg-type]
        await role.save()
        principal.add_role(role.id)  # type: ignore[arg-type]
    return await principal.save()


@contextlib.contextmanager
def registry_state(registry: TransportRegistry) -> Iterator[TransportRegistry]:
    """Restore a transport registry's names and instances after the block."""
    targets = dict(registry._targets)
    instances = dict(registry._instances)
    loaded = registry._entry_points_loaded
    try:
        yield registry
    finally:
        registry._targets.clear()
        registry._targets.update(targets)
        registry._instances.clear()
        registry._instances.update(instances)
        registry._entry_points_loaded = loaded
