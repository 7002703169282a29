"""Building blocks for end-to-end tests: authors, channels, subscribers."""

from __future__ import annotations

import uuid

from sqlalchemy import insert, select

from channels_core import db
from channels_core.models import AttemptRow, DeliveryRow, PrincipalRow, SubscriptionRow
from channels_core.permissions import SUBMIT
from channels_core.primitives import Channel, Permission, Principal, Role


def tag() -> str:
    return uuid.uuid4().hex[:10]


async def author(*, submit: bool = True) -> Principal:
    principal = Principal("service").set_username(f"author-{tag()}")
    if submit:
        perm = await Permission.get_or_create(SUBMIT)
        role = Role().set_title(f"sender-{tag()}").add_permission(perm.id)  # type: ignore[arg-type]
        await role.save()
        principal.add_role(role.id)  # type: ignore[arg-type]
    return await principal.save()


async def channel(transport: str) -> Channel:
    return (
        await Channel()
        .set_title(f"{transport} {tag()}")
        .set_alias("egress_transport", transport)
        .save()
    )


async def subscribers(ch: Channel, aliases: list[dict[str, str]], kind: str = "bot") -> list[int]:
    """Insert many subscribers at once (the API's save() is one round trip each)."""
    async with db.session() as s, s.begin():
        ids = list(
            await s.scalars(
                insert(PrincipalRow).returning(PrincipalRow.id),
                [{"kind": kind, "aliases": a} for a in aliases],
            )
        )
        await s.execute(
            insert(SubscriptionRow), [{"channel_id": ch.id, "subscriber_id": i} for i in ids]
        )
    return ids


async def deliveries(message_id: int) -> list[DeliveryRow]:
    async with db.session() as s:
        return list(
            await s.scalars(
                select(DeliveryRow)
                .where(DeliveryRow.message_id == message_id)
                .order_by(DeliveryRow.id)
            )
        )


async def attempts(delivery_id: int) -> list[AttemptRow]:
    async with db.session() as s:
        return list(
            await s.scalars(
                select(AttemptRow)
                .where(AttemptRow.delivery_id == delivery_id)
                .order_by(AttemptRow.attempt)
            )
        )
