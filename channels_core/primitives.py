"""The seed's primitives: fluent objects that save themselves.

``Channel().set_title("General").set_alias("egress_transport", "http")``
then ``await channel.save()``: setters return ``self``, ``save`` validates
everything first and writes in one transaction, so a refused value changes
nothing. The objects are plain Python; the rows behind them are in
``channels_core.models``.

``Message.send`` is queue-backed: it commits the message and one outbox
entry per permitted channel together, then asks the configured dispatcher
to enqueue routing (see ``channels_core.sending``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from channels_core import db
from channels_core.errors import ConflictError, NotFoundError, ValidationError
from channels_core.models import (
    ChannelRow,
    ConversationRow,
    MessageReferenceRow,
    MessageRow,
    PermissionRow,
    PrincipalRoleRow,
    PrincipalRow,
    RolePermissionRow,
    RoleRow,
    SubscriptionRow,
    utcnow,
)
from channels_core.permissions import MANAGE, SUBMIT, SUBSCRIBE, has_permission
from channels_core.transports.registry import (
    TransportRepository,
    egress_registry,
    ingress_registry,
)
from channels_core.validation import (
    check_alias,
    check_content,
    check_content_type,
    check_email,
    check_title,
)

if TYPE_CHECKING:
    from channels_core.sending import Dispatch

__all__ = [
    "Principal",
    "Role",
    "Permission",
    "Conversation",
    "Channel",
    "Message",
    "Subscription",
    "Manifest",
]

T = TypeVar("T")


def _need_id(obj: object, what: str) -> int:
    ident = getattr(obj, "id", None)
    if ident is None:
        raise ValidationError(f"{what} must be saved before this call")
    return int(ident)


def _check_id(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValidationError(f"{field} must be a positive integer id, not {value!r}")
    return value


def _one_subscriber(subscriber_id: int | None, user_id: int | None) -> int:
    """``subscribe(42)`` or, as the seed's README writes it, ``subscribe(user_id=42)``."""
    if subscriber_id is not None and user_id is not None:
        raise ValidationError("give subscriber_id or user_id, not both")
    chosen = subscriber_id if subscriber_id is not None else user_id
    return _check_id(chosen, "subscriber_id")


async def _require(session: AsyncSession, row_type: type[Any], ident: int, kind: str) -> Any:
    row = await session.get(row_type, ident)
    if row is None:
        raise NotFoundError(kind, ident)
    return row


class Manifest(list[T]):
    """An ordered collection of primitives, as the seed's ``Manifest``.

    Any iterable of channels works where a Manifest is asked for; this class
    only adds a readable repr and ``ids()``.
    """

    def ids(self) -> list[int | None]:
        return [getattr(item, "id", None) for item in self]

    def __repr__(self) -> str:
        return f"Manifest({list.__repr__(self)})"


class _Aliased:
    aliases: dict[str, str]

    def set_alias(self, key: str, value: str) -> Any:
        check_alias(key, value)
        # Reassign rather than mutate so a shared dict is never changed behind a caller.
        self.aliases = {**self.aliases, key: value}
        return self

    def get_alias(self, key: str, default: str | None = None) -> str | None:
        return self.aliases.get(key, default)

    def remove_alias(self, key: str) -> Any:
        self.aliases = {k: v for k, v in self.aliases.items() if k != key}
        return self


class Principal(_Aliased):
    """Anyone who sends or receives: user, bot, service, system, integration.

    ``kind`` is any short string. Aliases hold what transports read:
    ``endpoint`` (http), ``email`` (email), ``queue`` (queue),
    ``webhook_secret`` (http signing).
    """

    def __init__(
        self,
        kind: str = "user",
        *,
        username: str | None = None,
        email: str | None = None,
        aliases: dict[str, str] | None = None,
    ) -> None:
        self.id: int | None = None
        self.kind = kind
        self.username = username
        self.email = email
        self.aliases: dict[str, str] = {}
        for key, value in (aliases or {}).items():
            self.set_alias(key, value)
        self.active = True
        self.created_at: datetime | None = None
        self._roles: list[int] = []
        # Set by a worker on the copies it hands to a transport.
        self.delivery_id: int | None = None
        self.attempt: int = 1

    def __repr__(self) -> str:
        return f"Principal(id={self.id}, kind={self.kind!r}, username={self.username!r})"

    def set_kind(self, kind: str) -> Principal:
        self.kind = kind
        return self

    def set_username(self, username: str) -> Principal:
        self.username = username
        return self

    def set_active(self, active: bool) -> Principal:
        """An inactive principal keeps its subscriptions but receives nothing."""
        if not isinstance(active, bool):
            raise ValidationError(f"active must be True or False, not {active!r}")
        self.active = active
        return self

    def set_email(self, email: str) -> Principal:
        self.email = check_email(email)
        return self

    def add_role(self, role_id: int) -> Principal:
        _check_id(role_id, "role_id")
        if role_id not in self._roles:
            self._roles.append(role_id)
        return self

    def remove_role(self, role_id: int) -> Principal:
        self._roles = [r for r in self._roles if r != role_id]
        return self

    @property
    def roles(self) -> list[int]:
        return list(self._roles)

    def _validate(self) -> None:
        check_title("kind", self.kind, max_length=64)
        if self.username is not None:
            check_title("username", self.username)
        if self.email is not None:
            check_email(self.email)
        for key, value in self.aliases.items():
            check_alias(key, value)

    async def save(self) -> Principal:
        self._validate()
        async with db.session() as s, s.begin():
            for role_id in self._roles:
                await _require(s, RoleRow, role_id, "role")
            values = {
                "kind": self.kind,
                "username": self.username,
                "email": self.email,
                "aliases": dict(self.aliases),
                "active": self.active,
            }
            if self.username is not None:
                clash = await s.scalar(
                    select(PrincipalRow.id).where(
                        PrincipalRow.username == self.username,
                        PrincipalRow.id != (self.id or 0),
                    )
                )
                if clash is not None:
                    raise ConflictError(f"username {self.username!r} is taken by principal {clash}")
            if self.id is None:
                row = PrincipalRow(**values)
                s.add(row)
                try:
                    await s.flush()
                except IntegrityError as exc:  # a concurrent save took the username
                    raise ConflictError(f"username {self.username!r} is taken") from exc
                self.id, self.created_at = row.id, row.created_at
            else:
                await _require(s, PrincipalRow, self.id, "principal")
                await s.execute(
                    update(PrincipalRow).where(PrincipalRow.id == self.id).values(values)
                )
            current = set(
                await s.scalars(
                    select(PrincipalRoleRow.role_id).where(PrincipalRoleRow.principal_id == self.id)
                )
            )
            wanted = set(self._roles)
            if wanted - current:
                await s.execute(
                    insert(PrincipalRoleRow),
                    [{"principal_id": self.id, "role_id": r} for r in sorted(wanted - current)],
                )
            if current - wanted:
                await s.execute(
                    delete(PrincipalRoleRow).where(
                        PrincipalRoleRow.principal_id == self.id,
                        PrincipalRoleRow.role_id.in_(current - wanted),
                    )
                )
        return self

    async def has_permission(self, title: str) -> bool:
        if self.id is None:
            return False
        async with db.session() as s:
            return await has_permission(s, self.id, title)

    async def has_role(self, role: int | str) -> bool:
        """By id or by title."""
        if self.id is None:
            return False
        async with db.session() as s:
            query = select(PrincipalRoleRow.role_id).where(PrincipalRoleRow.principal_id == self.id)
            if isinstance(role, str):
                query = query.join(RoleRow, RoleRow.id == PrincipalRoleRow.role_id).where(
                    RoleRow.title == role
                )
            else:
                query = query.where(PrincipalRoleRow.role_id == role)
            return (await s.scalar(query)) is not None

    @classmethod
    def _from_row(cls, row: PrincipalRow, roles: Iterable[int] = ()) -> Principal:
        p = cls._from_values(
            row.id, row.kind, row.username, row.email, row.aliases, row.active, row.created_at
        )
        p._roles = list(roles)
        return p

    @classmethod
    def _from_values(
        cls,
        id: int,
        kind: str,
        username: str | None,
        email: str | None,
        aliases: dict[str, Any] | None,
        active: bool,
        created_at: datetime | None,
    ) -> Principal:
        """From its columns as plain values: a claim builds hundreds at a
        time from tuples, where reading each column of a result row by name
        cost ten times the rest."""
        p = cls(kind, username=username, email=email)
        p.aliases = dict(aliases or {})
        p.active = active
        p.id, p.created_at = id, created_at
        return p

    @classmethod
    async def get(cls, principal_id: int) -> Principal | None:
        _check_id(principal_id, "principal_id")
        async with db.session() as s:
            row = await s.get(PrincipalRow, principal_id)
            if row is None:
                return None
            roles = await s.scalars(
                select(PrincipalRoleRow.role_id)
                .where(PrincipalRoleRow.principal_id == principal_id)
                .order_by(PrincipalRoleRow.role_id)
            )
            return cls._from_row(row, roles)


class _Titled:
    id: int | None
    title: str

    def set_title(self, title: str) -> Any:
        self.title = check_title("title", title)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id}, title={self.title!r})"


class Permission(_Titled):
    """A permission by title: ``channel.submit``, ``channel.subscribe``, ``channel.manage``."""

    def __init__(self, title: str = "") -> None:
        self.id: int | None = None
        self.title = title

    async def save(self) -> Permission:
        check_title("title", self.title)
        async with db.session() as s, s.begin():
            clash = await s.scalar(
                select(PermissionRow.id).where(
                    PermissionRow.title == self.title, PermissionRow.id != (self.id or 0)
                )
            )
            if clash is not None:
                raise ConflictError(f"permission {self.title!r} already exists (id {clash})")
            if self.id is None:
                row = PermissionRow(title=self.title)
                s.add(row)
                await s.flush()
                self.id = row.id
            else:
                await _require(s, PermissionRow, self.id, "permission")
                await s.execute(
                    update(PermissionRow)
                    .where(PermissionRow.id == self.id)
                    .values(title=self.title)
                )
        return self

    @classmethod
    async def get_or_create(cls, title: str) -> Permission:
        async with db.session() as s:
            ident = await s.scalar(select(PermissionRow.id).where(PermissionRow.title == title))
        if ident is not None:
            p = cls(title)
            p.id = ident
            return p
        return await cls(title).save()


class Role(_Titled):
    """A named set of permissions, granted to principals with ``add_role``."""

    def __init__(self, title: str = "") -> None:
        self.id: int | None = None
        self.title = title
        self._permissions: list[int] = []

    def add_permission(self, permission_id: int) -> Role:
        _check_id(permission_id, "permission_id")
        if permission_id not in self._permissions:
            self._permissions.append(permission_id)
        return self

    def remove_permission(self, permission_id: int) -> Role:
        self._permissions = [p for p in self._permissions if p != permission_id]
        return self

    @property
    def permissions(self) -> list[int]:
        return list(self._permissions)

    async def save(self) -> Role:
        check_title("title", self.title)
        async with db.session() as s, s.begin():
            for permission_id in self._permissions:
                await _require(s, PermissionRow, permission_id, "permission")
            clash = await s.scalar(
                select(RoleRow.id).where(RoleRow.title == self.title, RoleRow.id != (self.id or 0))
            )
            if clash is not None:
                raise ConflictError(f"role {self.title!r} already exists (id {clash})")
            if self.id is None:
                row = RoleRow(title=self.title)
                s.add(row)
                await s.flush()
                self.id = row.id
            else:
                await _require(s, RoleRow, self.id, "role")
                await s.execute(
                    update(RoleRow).where(RoleRow.id == self.id).values(title=self.title)
                )
            current = set(
                await s.scalars(
                    select(RolePermissionRow.permission_id).where(
                        RolePermissionRow.role_id == self.id
                    )
                )
            )
            wanted = set(self._permissions)
            if wanted - current:
                await s.execute(
                    insert(RolePermissionRow),
                    [{"role_id": self.id, "permission_id": p} for p in sorted(wanted - current)],
                )
            if current - wanted:
                await s.execute(
                    delete(RolePermissionRow).where(
                        RolePermissionRow.role_id == self.id,
                        RolePermissionRow.permission_id.in_(current - wanted),
                    )
                )
        return self

    @classmethod
    async def get(cls, role_id: int) -> Role | None:
        _check_id(role_id, "role_id")
        async with db.session() as s:
            row = await s.get(RoleRow, role_id)
            if row is None:
                return None
            role = cls(row.title)
            role.id = row.id
            role._permissions = list(
                await s.scalars(
                    select(RolePermissionRow.permission_id)
                    .where(RolePermissionRow.role_id == role_id)
                    .order_by(RolePermissionRow.permission_id)
                )
            )
            return role


class Conversation(_Titled):
    """A canonical conversation that messages belong to."""

    def __init__(self, title: str = "") -> None:
        self.id: int | None = None
        self.title = title
        self.created_at: datetime | None = None

    async def save(self) -> Conversation:
        check_title("title", self.title)
        async with db.session() as s, s.begin():
            if self.id is None:
                row = ConversationRow(title=self.title)
                s.add(row)
                await s.flush()
                self.id, self.created_at = row.id, row.created_at
            else:
                await _require(s, ConversationRow, self.id, "conversation")
                await s.execute(
                    update(ConversationRow)
                    .where(ConversationRow.id == self.id)
                    .values(title=self.title)
                )
        return self

    async def get_messages(self) -> Manifest[Message]:
        from channels_core.registries import MessageRegistry

        return await MessageRegistry().get_for_conversation(_need_id(self, "conversation"))

    @classmethod
    async def get(cls, conversation_id: int) -> Conversation | None:
        _check_id(conversation_id, "conversation_id")
        async with db.session() as s:
            row = await s.get(ConversationRow, conversation_id)
        if row is None:
            return None
        c = cls(row.title)
        c.id, c.created_at = row.id, row.created_at
        return c


class Subscription:
    """The link between a channel and a subscriber; unique per pair."""

    def __init__(self, channel_id: int | None = None, subscriber_id: int | None = None) -> None:
        self.id: int | None = None
        self.channel_id = channel_id
        self.subscriber_id = subscriber_id
        self.created_at: datetime | None = None

    def __repr__(self) -> str:
        return (
            f"Subscription(id={self.id}, channel_id={self.channel_id}, "
            f"subscriber_id={self.subscriber_id})"
        )

    async def save(self) -> Subscription:
        if self.id is not None:
            return self  # a subscription has nothing to update
        channel_id = _check_id(self.channel_id, "channel_id")
        subscriber_id = _check_id(self.subscriber_id, "subscriber_id")
        async with db.session() as s, s.begin():
            await _require(s, ChannelRow, channel_id, "channel")
            await _require(s, PrincipalRow, subscriber_id, "principal")
            exists = await s.scalar(
                select(SubscriptionRow.id).where(
                    SubscriptionRow.channel_id == channel_id,
                    SubscriptionRow.subscriber_id == subscriber_id,
                )
            )
            if exists is not None:
                raise ConflictError(
                    f"principal {subscriber_id} is already subscribed to channel {channel_id}"
                )
            row = SubscriptionRow(channel_id=channel_id, subscriber_id=subscriber_id)
            s.add(row)
            try:
                await s.flush()
            except IntegrityError as exc:  # a concurrent subscribe won the race
                raise ConflictError(
                    f"principal {subscriber_id} is already subscribed to channel {channel_id}"
                ) from exc
            self.id, self.created_at = row.id, row.created_at
        return self

    async def delete(self) -> None:
        ident = _need_id(self, "subscription")
        async with db.session() as s, s.begin():
            result = await s.execute(delete(SubscriptionRow).where(SubscriptionRow.id == ident))
            if result.rowcount == 0:  # type: ignore[attr-defined]
                raise NotFoundError("subscription", ident)
        self.id = None

    @classmethod
    def _from_row(cls, row: SubscriptionRow) -> Subscription:
        sub = cls(row.channel_id, row.subscriber_id)
        sub.id, sub.created_at = row.id, row.created_at
        return sub


class Channel(_Titled, _Aliased):
    """A permission-controlled route from authors to subscribers.

    ``egress_transport`` / ``ingress_transport`` aliases name the preferred
    transports; resolution falls back to the first available one.
    """

    def __init__(self, title: str = "") -> None:
        self.id: int | None = None
        self.title = title
        self.aliases: dict[str, str] = {}
        self.created_at: datetime | None = None

    def set_alias(self, key: str, value: str) -> Channel:
        if key == "egress_transport":
            egress_registry.check_name(value)
        elif key == "ingress_transport":
            ingress_registry.check_name(value)
        return super().set_alias(key, value)  # type: ignore[no-any-return]

    def _validate(self) -> None:
        check_title("title", self.title)
        for key, value in self.aliases.items():
            check_alias(key, value)
        if "egress_transport" in self.aliases:
            egress_registry.check_name(self.aliases["egress_transport"])
        if "ingress_transport" in self.aliases:
            ingress_registry.check_name(self.aliases["ingress_transport"])

    async def save(self) -> Channel:
        self._validate()
        values = {"title": self.title, "aliases": dict(self.aliases)}
        async with db.session() as s, s.begin():
            if self.id is None:
                row = ChannelRow(**values)
                s.add(row)
                await s.flush()
                self.id, self.created_at = row.id, row.created_at
            else:
                await _require(s, ChannelRow, self.id, "channel")
                await s.execute(update(ChannelRow).where(ChannelRow.id == self.id).values(values))
        return self

    @classmethod
    def _from_row(cls, row: ChannelRow) -> Channel:
        c = cls(row.title)
        c.aliases = dict(row.aliases or {})
        c.id, c.created_at = row.id, row.created_at
        return c

    @classmethod
    async def get(cls, channel_id: int) -> Channel | None:
        _check_id(channel_id, "channel_id")
        async with db.session() as s:
            row = await s.get(ChannelRow, channel_id)
        return None if row is None else cls._from_row(row)

    # -- subscribers ------------------------------------------------------

    async def subscribe(
        self, subscriber_id: int | None = None, *, by: int | None = None, user_id: int | None = None
    ) -> Subscription:
        """Subscribe a principal.

        With ``by``, the call acts for that principal and is checked: it
        needs ``channel.subscribe`` to subscribe itself, ``channel.manage``
        to subscribe anyone else. Without it, the caller is the application
        itself (as in the seed), which does its own checks.
        """
        channel_id = _need_id(self, "channel")
        subscriber_id = _one_subscriber(subscriber_id, user_id)
        if by is not None:
            needed = SUBSCRIBE if by == subscriber_id else MANAGE
            await self._require_permission(by, needed)
        return await Subscription(channel_id, subscriber_id).save()

    async def unsubscribe(
        self, subscriber_id: int | None = None, *, by: int | None = None, user_id: int | None = None
    ) -> None:
        channel_id = _need_id(self, "channel")
        subscriber_id = _one_subscriber(subscriber_id, user_id)
        if by is not None and by != subscriber_id:
            await self._require_permission(by, MANAGE)
        async with db.session() as s, s.begin():
            result = await s.execute(
                delete(SubscriptionRow).where(
                    SubscriptionRow.channel_id == channel_id,
                    SubscriptionRow.subscriber_id == subscriber_id,
                )
            )
            if result.rowcount == 0:  # type: ignore[attr-defined]
                raise NotFoundError(
                    "subscription", f"of principal {subscriber_id} to channel {channel_id}"
                )

    async def get_subscribers(self) -> Manifest[Principal]:
        channel_id = _need_id(self, "channel")
        async with db.session() as s:
            rows = await s.scalars(
                select(PrincipalRow)
                .join(SubscriptionRow, SubscriptionRow.subscriber_id == PrincipalRow.id)
                .where(SubscriptionRow.channel_id == channel_id)
                .order_by(SubscriptionRow.id)
            )
            return Manifest(Principal._from_row(r) for r in rows)

    async def count_subscribers(self) -> int:
        channel_id = _need_id(self, "channel")
        async with db.session() as s:
            return int(
                await s.scalar(select(func.count()).where(SubscriptionRow.channel_id == channel_id))
                or 0
            )

    # -- permissions ------------------------------------------------------

    async def _can(self, principal_id: int | None, title: str) -> bool:
        if principal_id is None:
            return False
        async with db.session() as s:
            return await has_permission(s, principal_id, title)

    async def can_submit(self, principal_id: int | None) -> bool:
        return await self._can(principal_id, SUBMIT)

    async def can_subscribe(self, principal_id: int | None) -> bool:
        return await self._can(principal_id, SUBSCRIBE)

    async def can_manage(self, principal_id: int | None) -> bool:
        return await self._can(principal_id, MANAGE)

    async def _require_permission(self, principal_id: int, title: str) -> None:
        from channels_core.errors import PermissionDeniedError

        async with db.session() as s:
            await _require(s, PrincipalRow, principal_id, "principal")
            if not await has_permission(s, principal_id, title):
                raise PermissionDeniedError(principal_id, title, self.id)

    # -- transports -------------------------------------------------------

    def get_egress_repository(self) -> TransportRepository:
        return TransportRepository(egress_registry, self.aliases.get("egress_transport"))

    def get_ingress_repository(self) -> TransportRepository:
        return TransportRepository(ingress_registry, self.aliases.get("ingress_transport"))


class Message:
    """The transport-agnostic unit: content, author, thread and conversation."""

    def __init__(
        self,
        content: str | None = None,
        *,
        author_id: int | None = None,
        content_type: str = "text/plain",
    ) -> None:
        self.id: int | None = None
        self.content: str | None = content
        self.content_type = content_type
        self.author_id = author_id
        self.reply_to_id: int | None = None
        self.conversation_id: int | None = None
        self.created_at: datetime | None = None
        self._references: list[int] = []

    def __repr__(self) -> str:
        return f"Message(id={self.id}, author_id={self.author_id}, content={self.content!r:.40})"

    def set_content(self, content: str) -> Message:
        self.content = check_content(content)
        return self

    def set_content_type(self, content_type: str) -> Message:
        self.content_type = check_content_type(content_type)
        return self

    def set_author_id(self, author_id: int) -> Message:
        self.author_id = _check_id(author_id, "author_id")
        return self

    def set_reply_to_id(self, message_id: int | None) -> Message:
        self.reply_to_id = None if message_id is None else _check_id(message_id, "reply_to_id")
        return self

    def set_conversation_id(self, conversation_id: int | None) -> Message:
        self.conversation_id = (
            None if conversation_id is None else _check_id(conversation_id, "conversation_id")
        )
        return self

    def add_reference(self, message_id: int) -> Message:
        _check_id(message_id, "reference")
        if message_id not in self._references:
            self._references.append(message_id)
        return self

    @property
    def references(self) -> list[int]:
        return list(self._references)

    def _validate(self) -> None:
        check_content(self.content)
        check_content_type(self.content_type)
        # Attributes can be assigned around the setters; check them again.
        for field, value in (
            ("author_id", self.author_id),
            ("reply_to_id", self.reply_to_id),
            ("conversation_id", self.conversation_id),
        ):
            if value is not None:
                _check_id(value, field)
        for ref in self._references:
            _check_id(ref, "reference")
        if self.id is not None and (self.reply_to_id == self.id or self.id in self._references):
            raise ValidationError(f"message {self.id} cannot reply to or reference itself")

    async def _check_links(self, s: AsyncSession) -> None:
        if self.author_id is not None:
            await _require(s, PrincipalRow, self.author_id, "principal")
        if self.conversation_id is not None:
            await _require(s, ConversationRow, self.conversation_id, "conversation")
        if self.reply_to_id is not None:
            await _require(s, MessageRow, self.reply_to_id, "message")
            if self.id is not None:
                await self._refuse_cycle(s)
        for ref in self._references:
            await _require(s, MessageRow, ref, "message")

    async def _refuse_cycle(self, s: AsyncSession) -> None:
        """Walk up from the new parent; reaching this message would close a loop."""
        # No depth limit here: a limit would let a deep thread be closed into
        # a loop. ``seen`` ends the walk on any cycle already in the table.
        seen: set[int] = set()
        current = self.reply_to_id
        while current is not None:
            if current == self.id or current in seen:
                raise ValidationError(
                    f"replying to message {self.reply_to_id} would make a thread cycle"
                )
            seen.add(current)
            current = await s.scalar(select(MessageRow.reply_to_id).where(MessageRow.id == current))

    def _values(self) -> dict[str, Any]:
        return {
            "content": self.content,
            "content_type": self.content_type,
            "author_id": self.author_id,
            "reply_to_id": self.reply_to_id,
            "conversation_id": self.conversation_id,
        }

    async def _write(self, s: AsyncSession) -> None:
        """Validate links and write, inside the caller's transaction."""
        self._validate()
        await self._check_links(s)
        current: list[int] = []  # a new message has no references yet: nothing to read
        if self.id is None:
            row = MessageRow(**self._values())
            s.add(row)
            await s.flush()
            self.id, self.created_at = row.id, row.created_at
        else:
            await _require(s, MessageRow, self.id, "message")
            await s.execute(
                update(MessageRow).where(MessageRow.id == self.id).values(self._values())
            )
            current = list(
                await s.scalars(
                    select(MessageReferenceRow.referenced_id).where(
                        MessageReferenceRow.message_id == self.id
                    )
                )
            )
        missing = [r for r in self._references if r not in current]
        if missing:
            await s.execute(
                insert(MessageReferenceRow),
                [
                    {
                        "message_id": self.id,
                        "referenced_id": r,
                        "position": self._references.index(r),
                    }
                    for r in missing
                ],
            )
        stale = [r for r in current if r not in self._references]
        if stale:
            await s.execute(
                delete(MessageReferenceRow).where(
                    MessageReferenceRow.message_id == self.id,
                    MessageReferenceRow.referenced_id.in_(stale),
                )
            )

    @classmethod
    async def _insert_many(
        cls, s: AsyncSession, messages: Sequence[Message], *, authors_exist: bool = False
    ) -> None:
        """Write new messages in bulk (``send_many``'s path).

        Each is validated and its links checked as ``_write`` would, naming the
        same first missing link, but the links are looked up a few queries per
        batch instead of one per message, and the rows go in one statement.
        ``authors_exist`` when the caller has just looked the authors up.
        """
        for m in messages:
            assert m.id is None
            m._validate()
        authors = [m.author_id for m in messages if m.author_id is not None]
        principals = (
            set(authors) if authors_exist else await db.existing_ids(s, PrincipalRow.id, authors)
        )
        conversations = await db.existing_ids(
            s,
            ConversationRow.id,
            [m.conversation_id for m in messages if m.conversation_id is not None],
        )
        linked = await db.existing_ids(
            s,
            MessageRow.id,
            [r for m in messages for r in (m.reply_to_id, *m._references) if r is not None],
        )
        for m in messages:  # _check_links' order, so the same link is named
            if m.author_id is not None and m.author_id not in principals:
                raise NotFoundError("principal", m.author_id)
            if m.conversation_id is not None and m.conversation_id not in conversations:
                raise NotFoundError("conversation", m.conversation_id)
            for r in (m.reply_to_id, *m._references):
                if r is not None and r not in linked:
                    raise NotFoundError("message", r)
        rows = [{**m._values(), "created_at": utcnow()} for m in messages]
        # Core on the session's connection: the ORM's bulk-insert path costs
        # more than the statement for a handful of rows.
        conn = await s.connection()
        postgres = conn.dialect.name == "postgresql"
        if postgres:
            # The sequence numbers rows in the ORDER BY's order, so the ids
            # sorted are the messages' ids in order: what SQLAlchemy's own
            # sort_by_parameter_order relies on for PostgreSQL.
            created = await conn.scalars(*db.insert_rows(MessageRow, rows, returning=("id",)))
            ids = sorted(created)
        else:
            created = await conn.scalars(
                insert(MessageRow).returning(MessageRow.id, sort_by_parameter_order=True), rows
            )
            ids = list(created)
        for m, message_id, row in zip(messages, ids, rows, strict=True):
            m.id, m.created_at = message_id, row["created_at"]
        references = [
            {"message_id": m.id, "referenced_id": r, "position": i}
            for m in messages
            for i, r in enumerate(m._references)
        ]
        if references and postgres:
            await conn.execute(*db.insert_rows(MessageReferenceRow, references))
        elif references:
            await conn.execute(insert(MessageReferenceRow), references)

    async def save(self) -> Message:
        async with db.session() as s, s.begin():
            await self._write(s)
        return self

    @classmethod
    def _from_row(cls, row: MessageRow, references: Iterable[int] = ()) -> Message:
        m = cls(row.content, author_id=row.author_id, content_type=row.content_type)
        m.id, m.created_at = row.id, row.created_at
        m.reply_to_id, m.conversation_id = row.reply_to_id, row.conversation_id
        m._references = list(references)
        return m

    @classmethod
    async def get(cls, message_id: int) -> Message | None:
        _check_id(message_id, "message_id")
        async with db.session() as s:
            row = await s.get(MessageRow, message_id)
            if row is None:
                return None
            refs = await s.scalars(
                select(MessageReferenceRow.referenced_id)
                .where(MessageReferenceRow.message_id == message_id)
                .order_by(MessageReferenceRow.position)
            )
            return cls._from_row(row, refs)

    async def get_reply_to(self) -> Message | None:
        return None if self.reply_to_id is None else await Message.get(self.reply_to_id)

    async def get_references(self) -> Manifest[Message]:
        if self.id is None:
            return Manifest([m for r in self._references if (m := await Message.get(r))])
        async with db.session() as s:
            rows = await s.execute(
                select(MessageRow)
                .join(MessageReferenceRow, MessageReferenceRow.referenced_id == MessageRow.id)
                .where(MessageReferenceRow.message_id == self.id)
                .order_by(MessageReferenceRow.position)
            )
            return Manifest(Message._from_row(r) for (r,) in rows)

    async def get_conversation(self) -> Conversation | None:
        return (
            None if self.conversation_id is None else await Conversation.get(self.conversation_id)
        )

    async def send(
        self, channels: Iterable[Channel] | Channel, *, wait: bool = False, timeout: float = 30.0
    ) -> Dispatch:
        """Queue the message for delivery on each channel the author may submit to.

        Returns at once with one ``TransportResult`` per channel (pending
        counts); ``await dispatch.wait()`` gives the final ones. With
        ``wait=True`` this waits before returning.
        """
        from channels_core.sending import send_messages

        dispatches = await send_messages([self], _as_list(channels))
        dispatch = dispatches[0]
        if wait:
            await dispatch.wait(timeout=timeout)
        return dispatch


def _as_list(channels: Iterable[Channel] | Channel) -> list[Channel]:
    if isinstance(channels, Channel):
        return [channels]
    listed = list(channels)
    for c in listed:
        if not isinstance(c, Channel):
            raise ValidationError(f"send() takes channels, not {type(c).__name__}")
    return listed
