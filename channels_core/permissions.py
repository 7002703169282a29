"""Channel permissions, granted through roles.

A principal holds a permission when any of its roles does. Permissions are
global titles (``channel.submit`` lets its holder submit to channels); the
check is one query so every path (Python, CLI, HTTP, WebSocket) can afford it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Exists, select
from sqlalchemy.ext.asyncio import AsyncSession

from channels_core.models import PermissionRow, PrincipalRoleRow, RolePermissionRow

__all__ = ["SUBMIT", "SUBSCRIBE", "MANAGE", "ALL", "has_permission", "holds", "permissions_of"]

SUBMIT = "channel.submit"
SUBSCRIBE = "channel.subscribe"
MANAGE = "channel.manage"
ALL = (SUBMIT, SUBSCRIBE, MANAGE)


def _titles_of(principal_id: Any):  # type: ignore[no-untyped-def]
    return (
        select(PermissionRow.title)
        .join(RolePermissionRow, RolePermissionRow.permission_id == PermissionRow.id)
        .join(PrincipalRoleRow, PrincipalRoleRow.role_id == RolePermissionRow.role_id)
        .where(PrincipalRoleRow.principal_id == principal_id)
    )


async def has_permission(session: AsyncSession, principal_id: int, title: str) -> bool:
    found = await session.scalar(
        _titles_of(principal_id).where(PermissionRow.title == title).limit(1)
    )
    return found is not None


async def permissions_of(session: AsyncSession, principal_id: int) -> set[str]:
    return set(await session.scalars(_titles_of(principal_id).distinct()))


def holds(principal_id: Any, title: str) -> Exists:
    """The check as a clause: whether the principal ``principal_id`` (a column
    or a value) holds ``title``, for a query that checks many at once."""
    clause: Exists = _titles_of(principal_id).where(PermissionRow.title == title).exists()
    return clause
