"""Reading and steering deliveries: what the CLI and the HTTP API show.

One ``DeliveryView`` per (message, channel, subscriber) with its attempts;
dead letters listed newest first; ``retry`` and ``replay`` put dead (or
waiting) deliveries back in line with a fresh retry schedule.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update

from channels_core import db
from channels_core.dispatch import Batch, get_dispatcher
from channels_core.errors import NotFoundError, ValidationError
from channels_core.models import AttemptRow, DeliveryRow, DeliveryStatus, MessageRow, utcnow
from channels_core.settings import get_settings

__all__ = [
    "AttemptView",
    "DeliveryView",
    "deliveries_for_message",
    "deliveries_for_channel",
    "dead_letters",
    "retry",
    "replay",
]


@dataclass
class AttemptView:
    attempt: int
    status: str
    status_code: int | None
    error: str | None
    latency_ms: float | None
    started_at: datetime
    finished_at: datetime
    transport: str


@dataclass
class DeliveryView:
    id: int
    message_id: int
    channel_id: int
    subscriber_id: int
    transport: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None
    attempt_log: list[AttemptView] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in list(data.items()):
            if isinstance(value, datetime):
                data[key] = value.isoformat()
        for attempt in data["attempt_log"]:
            for key in ("started_at", "finished_at"):
                attempt[key] = attempt[key].isoformat()
        return data


def _view(row: DeliveryRow) -> DeliveryView:
    return DeliveryView(
        id=row.id,
        message_id=row.message_id,
        channel_id=row.channel_id,
        subscriber_id=row.subscriber_id,
        transport=row.transport,
        status=row.status,
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        last_status_code=row.last_status_code,
        last_error=row.last_error,
        created_at=row.created_at,
        updated_at=row.updated_at,
        delivered_at=row.delivered_at,
    )


async def _with_attempts(rows: list[DeliveryRow]) -> list[DeliveryView]:
    views = {row.id: _view(row) for row in rows}
    if views:
        async with db.session() as s:
            attempts = await s.scalars(
                select(AttemptRow)
                .where(AttemptRow.delivery_id.in_(list(views)))
                .order_by(AttemptRow.delivery_id, AttemptRow.attempt)
            )
            for a in attempts:
                views[a.delivery_id].attempt_log.append(
                    AttemptView(
                        a.attempt,
                        a.status,
                        a.status_code,
                        a.error,
                        a.latency_ms,
                        a.started_at,
                        a.finished_at,
                        a.transport,
                    )
                )
    return list(views.values())


async def deliveries_for_message(message_id: int, *, limit: int = 10000) -> list[DeliveryView]:
    async with db.session() as s:
        if await s.get(MessageRow, message_id) is None:
            raise NotFoundError("message", message_id)
        rows = list(
            await s.scalars(
                select(DeliveryRow)
                .where(DeliveryRow.message_id == message_id)
                .order_by(DeliveryRow.id)
                .limit(limit)
            )
        )
    return await _with_attempts(rows)


async def deliveries_for_channel(
    channel_id: int,
    *,
    status: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[DeliveryView]:
    query = select(DeliveryRow).where(DeliveryRow.channel_id == channel_id)
    if status is not None:
        if status not in (*DeliveryStatus.FINAL, DeliveryStatus.PENDING, DeliveryStatus.RETRYING):
            raise ValidationError(
                f"status {status!r} is not one of pending, retrying, delivered, dead"
            )
        query = query.where(DeliveryRow.status == status)
    if since is not None:
        query = query.where(DeliveryRow.created_at >= since)
    async with db.session() as s:
        rows = list(await s.scalars(query.order_by(DeliveryRow.id.desc()).limit(limit)))
    return await _with_attempts(rows)


async def dead_letters(*, channel_id: int | None = None, limit: int = 100) -> list[DeliveryView]:
    query = select(DeliveryRow).where(DeliveryRow.status == DeliveryStatus.DEAD)
    if channel_id is not None:
        query = query.where(DeliveryRow.channel_id == channel_id)
    async with db.session() as s:
        rows = list(await s.scalars(query.order_by(DeliveryRow.updated_at.desc()).limit(limit)))
    return await _with_attempts(rows)


async def _requeue(where: list[Any]) -> list[DeliveryView]:
    """Put matching non-delivered deliveries back in line now, with a fresh schedule."""
    settings = get_settings()
    now = utcnow()
    async with db.session() as s, s.begin():
        rows = list(
            await s.scalars(
                select(DeliveryRow)
                .where(
                    *where,
                    DeliveryRow.status != DeliveryStatus.DELIVERED,
                    # A batch delivering it now keeps its claim: breaking it
                    # would let a second worker send it in parallel.
                    or_(DeliveryRow.claimed_until.is_(None), DeliveryRow.claimed_until < now),
                )
                .with_for_update()
            )
        )
        if not rows:
            return []
        await s.execute(
            update(DeliveryRow)
            .where(DeliveryRow.id.in_([r.id for r in rows]))
            .values(
                status=DeliveryStatus.RETRYING,
                retry_base=DeliveryRow.attempts,
                next_attempt_at=now,
                queued_until=now + timedelta(seconds=settings.queue_lease),
                claimed_by=None,
                claimed_until=None,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
    groups: dict[tuple[int, int], list[int]] = {}
    for r in rows:
        groups.setdefault((r.message_id, r.channel_id), []).append(r.id)
    batches = [
        Batch(m, c, tuple(ids[i : i + settings.batch_size]))
        for (m, c), ids in groups.items()
        for i in range(0, len(ids), settings.batch_size)
    ]
    # Requeued in the database either way: if the broker is down, the
    # sweeper delivers them once the lease passes.
    with contextlib.suppress(Exception):
        await get_dispatcher().enqueue_batches(batches)
    views = [_view(r) for r in rows]
    for v in views:
        v.status = DeliveryStatus.RETRYING
    return views


async def retry(delivery_id: int) -> DeliveryView:
    """Attempt one delivery again now (a dead letter or one waiting to retry)."""
    async with db.session() as s:
        row = await s.get(DeliveryRow, delivery_id)
    if row is None:
        raise NotFoundError("delivery", delivery_id)
    if row.status == DeliveryStatus.DELIVERED:
        raise ValidationError(f"delivery {delivery_id} is already delivered")
    views = await _requeue([DeliveryRow.id == delivery_id])
    if not views:
        async with db.session() as s:
            row = await s.get(DeliveryRow, delivery_id)
        if row is not None and row.status == DeliveryStatus.DELIVERED:
            raise ValidationError(f"delivery {delivery_id} is already delivered")
        raise ValidationError(f"delivery {delivery_id} is being attempted now; try again later")
    return views[0]


async def replay(message_id: int, *, subscriber_id: int | None = None) -> list[DeliveryView]:
    """Replay a message's dead letters (optionally one subscriber's)."""
    async with db.session() as s:
        if await s.get(MessageRow, message_id) is None:
            raise NotFoundError("message", message_id)
    where = [DeliveryRow.message_id == message_id, DeliveryRow.status == DeliveryStatus.DEAD]
    if subscriber_id is not None:
        where.append(DeliveryRow.subscriber_id == subscriber_id)
    return await _requeue(where)
