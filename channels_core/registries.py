"""Read-side queries over the primitives, as the seed's registries.

``get`` returns ``None`` for an unknown id (the seed's ``if not channel``);
``require`` raises ``NotFoundError``. Listings page through the table by key
so they stay flat in memory however large it grows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from channels_core import db
from channels_core.errors import NotFoundError, ValidationError
from channels_core.models import (
    ChannelRow,
    MessageReferenceRow,
    MessageRow,
    PermissionRow,
    PrincipalRoleRow,
    PrincipalRow,
    RolePermissionRow,
    RoleRow,
    SubscriptionRow,
)
from channels_core.primitives import Channel, Manifest, Message, Principal, Subscription
from channels_core.settings import get_settings

__all__ = [
    "MessageRegistry",
    "ChannelRegistry",
    "SubscriptionRegistry",
    "PrincipalRegistry",
    "RoleRegistry",
    "RoleInfo",
]

_PAGE = 500


class MessageRegistry:
    async def get(self, message_id: int) -> Message | None:
        return await Message.get(message_id)

    async def require(self, message_id: int) -> Message:
        found = await self.get(message_id)
        if found is None:
            raise NotFoundError("message", message_id)
        return found

    async def get_thread(self, message_id: int) -> Manifest[Message]:
        """The reply chain ending at ``message_id``, root first.

        Follows ``reply_to`` upward; a cycle (only possible in rows written
        around the API) ends the walk, and so does the depth limit.
        """
        limit = get_settings().thread_depth_limit
        chain: list[Message] = []
        seen: set[int] = set()
        current: int | None = message_id
        async with db.session() as s:
            while current is not None and current not in seen and len(chain) < limit:
                row = await s.get(MessageRow, current)
                if row is None:
                    if not chain:
                        raise NotFoundError("message", message_id)
                    break
                seen.add(current)
                chain.append(Message._from_row(row))
                current = row.reply_to_id
            await _attach_references(s, chain)
        chain.reverse()
        return Manifest(chain)

    async def get_for_conversation(self, conversation_id: int) -> Manifest[Message]:
        """Every message of a conversation, oldest first."""
        async with db.session() as s:
            rows = list(
                await s.scalars(
                    select(MessageRow)
                    .where(MessageRow.conversation_id == conversation_id)
                    .order_by(MessageRow.created_at, MessageRow.id)
                )
            )
            messages = [Message._from_row(r) for r in rows]
            await _attach_references(s, messages)
        return Manifest(messages)

    async def iterate(self, *, since: datetime | None = None) -> AsyncIterator[Message]:
        last = 0
        while True:
            query = (
                select(MessageRow).where(MessageRow.id > last).order_by(MessageRow.id).limit(_PAGE)
            )
            if since is not None:
                query = query.where(MessageRow.created_at >= since)
            async with db.session() as s:
                rows = list(await s.scalars(query))
            if not rows:
                return
            for row in rows:
                yield Message._from_row(row)
            last = rows[-1].id

    async def filter(
        self, predicate: Callable[[Message], bool], *, since: datetime | None = None
    ) -> Manifest[Message]:
        return Manifest([m async for m in self.iterate(since=since) if predicate(m)])


async def _attach_references(s, messages: list[Message]) -> None:  # type: ignore[no-untyped-def]
    ids = [m.id for m in messages if m.id is not None]
    if not ids:
        return
    rows = await s.execute(
        select(MessageReferenceRow.message_id, MessageReferenceRow.referenced_id)
        .where(MessageReferenceRow.message_id.in_(ids))
        .order_by(MessageReferenceRow.position)
    )
    by_message: dict[int, list[int]] = {}
    for message_id, ref in rows:
        by_message.setdefault(message_id, []).append(ref)
    for m in messages:
        m._references = by_message.get(m.id or 0, [])


class ChannelRegistry:
    async def get(self, channel_id: int) -> Channel | None:
        return await Channel.get(channel_id)

    async def require(self, channel_id: int) -> Channel:
        found = await self.get(channel_id)
        if found is None:
            raise NotFoundError("channel", channel_id)
        return found

    async def all(self) -> Manifest[Channel]:
        async with db.session() as s:
            rows = await s.scalars(select(ChannelRow).order_by(ChannelRow.id))
            return Manifest(Channel._from_row(r) for r in rows)

    async def get_by_title(self, title: str) -> Channel | None:
        async with db.session() as s:
            row = await s.scalar(
                select(ChannelRow).where(ChannelRow.title == title).order_by(ChannelRow.id).limit(1)
            )
        return None if row is None else Channel._from_row(row)

    async def filter(self, predicate: Callable[[Channel], bool]) -> Manifest[Channel]:
        return Manifest(c for c in await self.all() if predicate(c))


class SubscriptionRegistry:
    async def filter(
        self, *, subscriber_id: int | None = None, channel_id: int | None = None
    ) -> Manifest[Subscription]:
        if subscriber_id is None and channel_id is None:
            raise ValidationError("filter subscriptions by subscriber_id, channel_id or both")
        query = select(SubscriptionRow).order_by(SubscriptionRow.id)
        if subscriber_id is not None:
            query = query.where(SubscriptionRow.subscriber_id == subscriber_id)
        if channel_id is not None:
            query = query.where(SubscriptionRow.channel_id == channel_id)
        async with db.session() as s:
            return Manifest(Subscription._from_row(r) for r in await s.scalars(query))

    async def for_subscriber(self, subscriber_id: int) -> Manifest[Subscription]:
        return await self.filter(subscriber_id=subscriber_id)

    async def for_channel(self, channel_id: int) -> Manifest[Subscription]:
        return await self.filter(channel_id=channel_id)

    async def get_channels(self, subscriber_id: int) -> Manifest[Channel]:
        async with db.session() as s:
            rows = await s.scalars(
                select(ChannelRow)
                .join(SubscriptionRow, SubscriptionRow.channel_id == ChannelRow.id)
                .where(SubscriptionRow.subscriber_id == subscriber_id)
                .order_by(ChannelRow.id)
            )
            return Manifest(Channel._from_row(r) for r in rows)


class PrincipalRegistry:
    async def get(self, principal_id: int) -> Principal | None:
        return await Principal.get(principal_id)

    async def require(self, principal_id: int) -> Principal:
        found = await self.get(principal_id)
        if found is None:
            raise NotFoundError("principal", principal_id)
        return found

    async def get_by_username(self, username: str) -> Principal | None:
        async with db.session() as s:
            row = await s.scalar(select(PrincipalRow).where(PrincipalRow.username == username))
            if row is None:
                return None
            roles = await s.scalars(
                select(PrincipalRoleRow.role_id).where(PrincipalRoleRow.principal_id == row.id)
            )
            return Principal._from_row(row, roles)

    async def all(self, *, kind: str | None = None) -> Manifest[Principal]:
        query = select(PrincipalRow).order_by(PrincipalRow.id)
        if kind is not None:
            query = query.where(PrincipalRow.kind == kind)
        async with db.session() as s:
            rows = list(await s.scalars(query))
            role_rows = await s.execute(
                select(PrincipalRoleRow.principal_id, PrincipalRoleRow.role_id)
            )
            roles: dict[int, list[int]] = {}
            for pid, rid in role_rows:
                roles.setdefault(pid, []).append(rid)
            return Manifest(Principal._from_row(r, roles.get(r.id, [])) for r in rows)


@dataclass(frozen=True)
class RoleInfo:
    """A role with the titles of its permissions."""

    id: int
    title: str
    permissions: tuple[str, ...]

    def as_dict(self) -> dict[str, object]:
        return {"id": self.id, "title": self.title, "permissions": list(self.permissions)}


class RoleRegistry:
    async def _infos(self, role_ids: Iterable[int] | None = None) -> list[RoleInfo]:
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

    async def all(self) -> list[RoleInfo]:
        return await self._infos()

    async def by_ids(self, role_ids: Iterable[int]) -> dict[int, RoleInfo]:
        return {info.id: info for info in await self._infos(role_ids)}

    async def get_by_title(self, title: str) -> RoleInfo | None:
        async with db.session() as s:
            ident = await s.scalar(select(RoleRow.id).where(RoleRow.title == title))
        return None if ident is None else (await self._infos([ident]))[0]

    async def require(self, ref: str | int) -> RoleInfo:
        """A role by id (an int or all digits) or by title; ``NotFoundError`` otherwise."""
        text_ref = str(ref)
        async with db.session() as s:
            row = None
            if text_ref.isdigit() and int(text_ref) < 2**63:
                row = await s.get(RoleRow, int(text_ref))
            if row is None and not isinstance(ref, int):
                row = await s.scalar(select(RoleRow).where(RoleRow.title == text_ref))
        if row is None:
            raise NotFoundError("role", text_ref if text_ref.isdigit() else repr(text_ref))
        return (await self._infos([row.id]))[0]
