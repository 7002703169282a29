"""Role and permission reads the Python API does not offer yet.

``channels_core.registries`` has no role registry: nothing lists roles or
finds one by title. These few read-only queries fill the gap for the CLI and
belong in ``channels_core.registries`` (a ``RoleRegistry`` with ``all``,
``get_by_title`` and ``require``); move them there and delete this module
when it exists. Nothing here writes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select

from channels_core import db
from channels_core.errors import NotFoundError
from channels_core.models import PermissionRow, RolePermissionRow, RoleRow
from channels_core.permissions import permissions_of

__all__ = [
    "RoleInfo",
    "all_roles",
    "roles_by_id",
    "role_by_title",
    "resolve_role",
    "permission_titles_of",
]


@dataclass(frozen=True)
class RoleInfo:
    id: int
    title: str
    permissions: tuple[str, ...]

    def as_dict(self) -> dict[str, object]:
        return {"id": self.id, "title": self.title, "permissions": list(self.permissions)}


async def _infos(role_ids: Iterable[int] | None = None) -> list[RoleInfo]:
    query = select(RoleRow).order_by(RoleRow.id)
    perms = (
        select(RolePermissionRow.role_id, PermissionRow.title)
        .join(PermissionRow, PermissionRow.id == RolePermissionRow.permission_id)
        .order_by(PermissionRow.title)
    )
    if role_ids is not None:
        ids = list(role_ids)
        if not ids:
            return []
        query = query.where(RoleRow.id.in_(ids))
        perms = perms.where(RolePermissionRow.role_id.in_(ids))
    async with db.session() as s:
        rows = list(await s.scalars(query))
        titles: dict[int, list[str]] = {}
        for role_id, title in await s.execute(perms):
            titles.setdefault(role_id, []).append(title)
    return [RoleInfo(r.id, r.title, tuple(titles.get(r.id, []))) for r in rows]


async def all_roles() -> list[RoleInfo]:
    return await _infos()


async def roles_by_id(role_ids: Iterable[int]) -> dict[int, RoleInfo]:
    return {info.id: info for info in await _infos(role_ids)}


async def role_by_title(title: str) -> RoleInfo | None:
    async with db.session() as s:
        ident = await s.scalar(select(RoleRow.id).where(RoleRow.title == title))
    return None if ident is None else (await _infos([ident]))[0]


async def resolve_role(ref: str) -> RoleInfo:
    """A role by id (all digits) or by title; ``NotFoundError`` if neither names one."""
    async with db.session() as s:
        row = None
        if ref.isdigit() and int(ref) < 2**63:
            row = await s.get(RoleRow, int(ref))
        if row is None:
            row = await s.scalar(select(RoleRow).where(RoleRow.title == ref))
    if row is None:
        raise NotFoundError("role", ref if ref.isdigit() else repr(ref))
    return (await _infos([row.id]))[0]


async def permission_titles_of(principal_id: int) -> list[str]:
    async with db.session() as s:
        return sorted(await permissions_of(s, principal_id))
