"""The delivery engine: routing, batch delivery and the sweeper.

These are the bodies of the worker's tasks, kept here so they know nothing
of Celery: they read and write the database, call transports, and hand
follow-up work to the dispatcher in force. Every step is safe to run twice:

- ``route`` does nothing for an outbox entry already routed, and creates
  delivery rows with ON CONFLICT DO NOTHING;
- ``deliver`` claims its deliveries first (only non-final, due ones whose
  claim is free or already its own), so a redelivered task skips what is
  final and never runs beside another copy of itself;
- ``sweep`` enqueues only what is due and not already queued or claimed.

A task lost with the broker costs a delay (``queue_lease``), never a delivery.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from typing import Any, cast

from sqlalchemy import Select, Update, bindparam, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from channels_core import db, delivery_pg, endpoints, metrics
from channels_core.dispatch import Batch, RouteJob, get_dispatcher
from channels_core.errors import ConfigurationError, NotFoundError, ValidationError
from channels_core.models import (
    AttemptRow,
    AttemptStatus,
    ChannelRow,
    DeliveryRow,
    DeliveryStatus,
    OutboxRow,
    PrincipalRow,
    SubscriptionRow,
    utcnow,
)
from channels_core.primitives import Channel, Message, Principal
from channels_core.registries import MessageRegistry
from channels_core.retry import next_delay
from channels_core.settings import get_settings
from channels_core.transports.base import TransportResult
from channels_core.transports.registry import egress_registry

__all__ = ["route", "deliver", "sweep", "warm_up", "RouteStats", "BatchStats", "SweepStats"]

log = logging.getLogger("channels.delivery")

_NOT_FINAL = (DeliveryStatus.PENDING, DeliveryStatus.RETRYING)
# A batch crowded out of a host's in-flight cap asks again after 10 ms,
# doubling up to 100 ms: room comes back when another batch settles, which
# is a request's time away, and each ask is one Redis script.
_ROOM_POLL = 0.01
_ROOM_POLL_MAX = 0.1
# The transport recorded for deliveries routed when none was available.
NO_TRANSPORT = "none"


@dataclass
class RouteStats:
    outbox_id: int
    transport: str | None = None
    deliveries: int = 0
    batches: int = 0
    skipped: bool = False


@dataclass
class BatchStats:
    claimed: int = 0
    delivered: int = 0
    retrying: int = 0
    dead: int = 0
    skipped: int = 0
    # Not attempted now: their endpoint's breaker, rate limit or in-flight cap said wait.
    deferred: int = 0
    # Handed back as single deliveries after killing their worker (see _split).
    split: int = 0
    outcomes: list[TransportResult] = field(default_factory=list)


@dataclass(frozen=True)
class _Claimed:
    id: int
    subscriber_id: int
    attempts: int
    retry_base: int
    claims: int
    transport: str


@dataclass
class SweepStats:
    relayed: int = 0
    enqueued: int = 0


def _chunks(items: Sequence[int], size: int) -> list[tuple[int, ...]]:
    return [tuple(items[i : i + size]) for i in range(0, len(items), max(1, size))]


# -- routing -----------------------------------------------------------------


@cache
def _entry_statement() -> Select[Any]:
    """An outbox entry with its channel's columns (None where the channel is gone)."""
    return (
        select(OutboxRow.message_id, OutboxRow.channel_id, OutboxRow.routed_at, *_CHANNEL)
        .outerjoin(ChannelRow, ChannelRow.id == OutboxRow.channel_id)
        .where(OutboxRow.id == bindparam("outbox_id", type_=OutboxRow.id.type))
    )


_CHANNEL = tuple(ChannelRow.__table__.c)


async def route(job: RouteJob) -> RouteStats:
    """Create the deliveries of one outbox entry and enqueue them in batches."""
    settings = get_settings()
    stats = RouteStats(job.outbox_id)
    dispatcher = get_dispatcher()
    async with db.autocommit() as conn:
        entry = (await conn.execute(_entry_statement(), {"outbox_id": job.outbox_id})).first()
    if entry is None or entry.routed_at is not None:
        stats.skipped = True
        return stats
    if entry.id is None:  # the channel was deleted since the send: nothing to route to
        await _mark_routed(job.outbox_id, None, "channel no longer exists")
        stats.skipped = True
        return stats
    # The row carries the channel's columns under their own names.
    channel = Channel._from_row(cast(ChannelRow, entry))
    try:
        transport = channel.get_egress_repository().resolve_name()
        error = None
    except ConfigurationError as exc:
        transport, error = NO_TRANSPORT, str(exc)
    stats.transport = transport

    page = _page_postgres if db.is_postgres() else _page_portable
    last = 0
    size = _first_page_size()
    while True:
        values = _delivery_values(entry.message_id, entry.channel_id, transport, error)
        found = await page(values, last, size)
        if not found.seen:
            break
        last = found.last
        stats.deliveries += found.active
        batches = [
            Batch(entry.message_id, entry.channel_id, chunk)
            for chunk in _chunks(found.ids, settings.batch_size)
        ]
        if batches:
            # Committed above: if this enqueue fails the sweeper finds the
            # rows once queue_lease passes.
            await dispatcher.enqueue_batches(batches)
            stats.batches += len(batches)
        # A short page is the last one: asking again would only cost one
        # more round trip to find an empty page.
        if found.seen < size:
            break
        size = settings.route_page_size
    await _mark_routed(job.outbox_id, transport, error)
    return stats


def _first_page_size() -> int:
    """A routing's first page is one batch, the rest ``route_page_size``.

    A page of 5,000 takes a couple of hundred milliseconds to insert, and
    until it is in no delivery of a large channel could start; a first page
    of one batch is enqueued (and picked up by another pool process) within
    tens of milliseconds while the routing pages on.
    """
    settings = get_settings()
    return min(settings.batch_size, settings.route_page_size)


def _delivery_values(
    message_id: int, channel_id: int, transport: str, error: str | None
) -> dict[str, Any]:
    """A new delivery row's values but its subscriber."""
    now = utcnow()
    return {
        "message_id": message_id,
        "channel_id": channel_id,
        "transport": transport,
        "status": DeliveryStatus.DEAD if error else DeliveryStatus.PENDING,
        "attempts": 0,
        "retry_base": 0,
        "next_attempt_at": None if error else now,
        "queued_until": None if error else now + timedelta(seconds=get_settings().queue_lease),
        "last_error": error,
        "created_at": now,
        "updated_at": now,
    }


async def warm_up() -> None:
    """Run the hot path's statements once each, matching no row, so that a
    worker process's first message does not wait while SQLAlchemy builds
    and compiles them (tens of milliseconds on its first routing)."""
    if not db.is_postgres():
        return
    settings = get_settings()
    now = utcnow()
    async with db.autocommit() as conn:
        await conn.execute(_entry_statement(), {"outbox_id": 0})
    for size in {_first_page_size(), settings.route_page_size}:
        await _page_postgres(_delivery_values(0, 0, NO_TRANSPORT, None), 0, size)
    await delivery_pg.claim([], "warm-up", now, settings.claim_lease)
    await delivery_pg.load(0, 0)
    await delivery_pg.record(
        delivery_pg.record_params([], [], NO_TRANSPORT, None, now, now, "warm-up")
    )
    await _mark_routed(0, None, None)


@dataclass(frozen=True)
class _Page:
    last: int  # the page's last subscription id: the next page starts after it
    seen: int  # subscriptions on the page
    active: int  # ...of active subscribers: those that get a delivery
    ids: list[int]  # their deliveries that are not final, new or not, in id order


async def _page_postgres(values: dict[str, Any], after: int, size: int) -> _Page:
    """One page in one statement (``delivery_pg.route_page``)."""
    last, seen, active, ids = await delivery_pg.route_page(values, after, size)
    return _Page(last or 0, seen, active, ids)


async def _page_portable(values: dict[str, Any], after: int, size: int) -> _Page:
    """One page in one transaction: read it, insert its rows, read their ids."""
    async with db.session() as s, s.begin():
        page = list(
            (
                await s.execute(
                    select(SubscriptionRow.id, SubscriptionRow.subscriber_id, PrincipalRow.active)
                    .join(PrincipalRow, PrincipalRow.id == SubscriptionRow.subscriber_id)
                    .where(
                        SubscriptionRow.channel_id == values["channel_id"],
                        SubscriptionRow.id > after,
                    )
                    .order_by(SubscriptionRow.id)
                    .limit(size)
                )
            ).all()
        )
        if not page:
            return _Page(after, 0, 0, [])
        # Inactive subscribers are skipped: no delivery row, nothing owed.
        subscriber_ids = [sid for _, sid, active in page if active]
        ids: list[int] = []
        if subscriber_ids:
            # RETURNING turns on SQLAlchemy's batched multi-row VALUES
            # ("insertmanyvalues"), which ON CONFLICT alone does not: one
            # statement per page instead of one per row.
            await s.execute(
                db.insert(s, DeliveryRow).on_conflict_do_nothing().returning(DeliveryRow.id),
                [{**values, "subscriber_id": sid} for sid in subscriber_ids],
            )
            ids = list(
                await s.scalars(
                    select(DeliveryRow.id)
                    .where(
                        DeliveryRow.message_id == values["message_id"],
                        DeliveryRow.channel_id == values["channel_id"],
                        DeliveryRow.subscriber_id.in_(subscriber_ids),
                        DeliveryRow.status.in_(_NOT_FINAL),
                    )
                    .order_by(DeliveryRow.id)
                )
            )
    return _Page(page[-1][0], len(page), len(subscriber_ids), ids)


@cache
def _mark_routed_statement() -> Update:
    return (
        update(OutboxRow)
        .where(
            OutboxRow.id == bindparam("outbox_id", type_=OutboxRow.id.type),
            OutboxRow.routed_at.is_(None),
        )
        .values(
            routed_at=bindparam("routed_at", type_=OutboxRow.routed_at.type),
            transport=bindparam("transport", type_=OutboxRow.transport.type),
            error=bindparam("error", type_=OutboxRow.error.type),
        )
    )


async def _mark_routed(outbox_id: int, transport: str | None, error: str | None) -> None:
    params = {"outbox_id": outbox_id, "routed_at": utcnow(), "transport": transport, "error": error}
    async with db.autocommit() as conn:
        await conn.execute(_mark_routed_statement(), params)


# -- delivering a batch --------------------------------------------------------


async def _claim(batch: Batch, claimant: str) -> tuple[list[_Claimed], dict[int, Principal] | None]:
    """Claim what of ``batch`` is claimable; on PostgreSQL, with its subscribers
    (one statement: ``channels_core.delivery_pg``)."""
    settings = get_settings()
    now = utcnow()
    if db.is_postgres():
        rows, principals = await delivery_pg.claim(
            batch.delivery_ids, claimant, now, settings.claim_lease
        )
        return [_Claimed(*row) for row in rows], principals
    claim = delivery_pg.claim_update(
        db.one_of(DeliveryRow.id, batch.delivery_ids),
        claimant,
        now,
        now + timedelta(seconds=1),
        now + timedelta(seconds=settings.claim_lease),
    )
    async with db.session() as s, s.begin():
        result = await s.execute(claim.execution_options(synchronize_session=False))
        return [_Claimed(*row) for row in result.all()], None


async def _split(batch: Batch, claimed: list[_Claimed], claimant: str) -> None:
    """Hand a batch that killed its worker back as single deliveries.

    One poisonous delivery (one that crashes the process every time) then
    takes only itself down; the rest go through. Each keeps one claim on
    its record, so a single that dies again reaches ``poison_claims`` soon.
    """
    settings = get_settings()
    ids = [c.id for c in claimed]
    async with db.session() as s, s.begin():
        await s.execute(
            update(DeliveryRow)
            .where(DeliveryRow.id.in_(ids), DeliveryRow.claimed_by == claimant)
            .values(
                claimed_by=None,
                claimed_until=None,
                claims=1,
                queued_until=utcnow() + timedelta(seconds=settings.queue_lease),
            )
            .execution_options(synchronize_session=False)
        )
    log.warning(
        "batch of message %s was claimed %d times without finishing: split into %d singles",
        batch.message_id,
        max(c.claims for c in claimed),
        len(ids),
        extra=_batch_context(batch, ids),
    )
    # Committed above: if this enqueue fails the sweeper finds them once queue_lease passes.
    await get_dispatcher().enqueue_batches(
        [Batch(batch.message_id, batch.channel_id, (i,)) for i in ids]
    )


async def _load(
    batch: Batch,
    subscriber_ids: list[int],
    principals: dict[int, Principal] | None,
    loading: Awaitable[tuple[Message, Channel] | None] | None = None,
) -> tuple[Message, Channel, dict[int, Principal]]:
    """The batch's message (with its references), channel and subscribers.

    On PostgreSQL the message, its references and the channel are one
    statement (``loading``, when it was started beside the claim), and the
    subscribers came with the claim.
    """
    message: Message | None = None
    channel: Channel | None = None
    if db.is_postgres():
        if loading is None:
            loading = delivery_pg.load(batch.message_id, batch.channel_id)
        found = await loading
        if found is not None:
            message, channel = found
    else:
        message = await Message.get(batch.message_id)
        channel = await Channel.get(batch.channel_id)
    if message is None or channel is None:
        # Name what is gone (on PostgreSQL one missing row hides both).
        if await Message.get(batch.message_id) is None:
            raise NotFoundError("message", batch.message_id)
        raise NotFoundError("channel", batch.channel_id)
    if principals is None:
        async with db.session() as s:
            principals = {
                row.id: Principal._from_row(row)
                for row in await s.scalars(
                    select(PrincipalRow).where(db.one_of(PrincipalRow.id, subscriber_ids))
                )
            }
    return message, channel, principals


async def _ensure_generated_aliases(transport: Any, principals: dict[int, Principal]) -> None:
    """Fill aliases a transport generates on first use (the webhook secret).

    Under a row lock, so two batches racing for one new subscriber agree on
    one secret instead of each signing with its own.
    """
    generated: dict[str, Any] = getattr(transport, "generated_aliases", {})
    if not generated:
        return
    missing = [
        p.id for p in principals.values() if p.id and any(k not in p.aliases for k in generated)
    ]
    if not missing:
        return
    async with db.session() as s, s.begin():
        rows = await s.scalars(
            select(PrincipalRow).where(PrincipalRow.id.in_(missing)).with_for_update()
        )
        for row in rows:
            aliases = dict(row.aliases or {})
            for key, make in generated.items():
                aliases.setdefault(key, make())
            row.aliases = aliases
            principals[row.id].aliases = dict(aliases)


async def _attach_thread(message: Message, batch: Batch, principals: dict[int, Principal]) -> None:
    """Give each subscriber the ids of its deliveries of the thread's earlier messages."""
    if message.reply_to_id is None:
        return
    thread = await MessageRegistry().get_thread(message.reply_to_id)
    order = {m.id: i for i, m in enumerate(thread)}
    async with db.session() as s:
        rows = await s.execute(
            select(DeliveryRow.subscriber_id, DeliveryRow.message_id, DeliveryRow.id).where(
                DeliveryRow.message_id.in_(list(order)),
                DeliveryRow.subscriber_id.in_(list(principals)),
                DeliveryRow.channel_id == batch.channel_id,
            )
        )
        found: dict[int, list[tuple[int, int]]] = {}
        for subscriber_id, message_id, delivery_id in rows:
            found.setdefault(subscriber_id, []).append((order[message_id], delivery_id))
    for subscriber_id, principal in principals.items():
        principal.thread_delivery_ids = [d for _, d in sorted(found.get(subscriber_id, []))]  # type: ignore[attr-defined]


class _Beside:
    """Work a batch runs beside its critical path, on connections of its own.

    The message and channel depend on the batch, not on what its claim
    finds, so on PostgreSQL they are read while the claim runs; the
    endpoints' breakers are settled while the outcomes are written. Each
    costs a round trip a batch no longer waits for in turn (at 100 ms
    endpoints a batch spends most of its time outside its requests).
    """

    def __init__(self, batch: Batch) -> None:
        self.loading: asyncio.Future[tuple[Message, Channel] | None] | None = None
        if db.is_postgres():
            self.loading = asyncio.ensure_future(
                delivery_pg.load(batch.message_id, batch.channel_id)
            )
        self.settling: list[asyncio.Future[None]] = []

    def settle(self, gate: endpoints.Gate, admission: endpoints.Admission, sent: Any) -> None:
        self.settling.append(asyncio.ensure_future(gate.settle(admission, sent)))

    async def beside(self, work: Awaitable[None]) -> None:
        """``work``, with the settling under way; a failed settle is logged, not raised:
        the outcomes are written by then, and the breakers are a courtesy."""
        done = await asyncio.gather(work, *self.settling, return_exceptions=True)
        self.settling = []
        if isinstance(done[0], BaseException):
            raise done[0]
        for failure in done[1:]:
            if isinstance(failure, BaseException):
                log.error("endpoint health not updated after a batch", exc_info=failure)

    async def close(self) -> None:
        """Leave nothing running on the loop when the batch ends, however it ends."""
        if self.loading is not None:
            if not self.loading.done():
                self.loading.cancel()
            await asyncio.gather(self.loading, return_exceptions=True)
        if self.settling:
            await asyncio.gather(*self.settling, return_exceptions=True)


async def deliver(batch: Batch, claimant: str) -> BatchStats:
    """Attempt every claimable delivery of ``batch`` once; record and schedule."""
    beside = _Beside(batch)
    try:
        return await _deliver(batch, claimant, beside)
    finally:
        await beside.close()


async def _deliver(batch: Batch, claimant: str, beside: _Beside) -> BatchStats:
    settings = get_settings()
    stats = BatchStats()
    claimed, principals = await _claim(batch, claimant)
    stats.claimed = len(claimed)
    stats.skipped = len(batch.delivery_ids) - len(claimed)
    if not claimed:
        return stats
    if len(claimed) > 1 and max(c.claims for c in claimed) > 1:
        await _split(batch, claimed, claimant)
        stats.split = len(claimed)
        return stats
    transport_name: str | None = claimed[0].transport
    started_at = utcnow()
    started = time.perf_counter()
    results: dict[int, TransportResult] = {}
    deferred: dict[int, tuple[float, str]] = {}
    resolved: str | None = None
    poisoned = claimed[0].claims >= settings.poison_claims
    if poisoned:
        # A single delivery whose every try killed the worker: no more tries.
        c = claimed[0]
        results[c.id] = TransportResult.failed(
            c.subscriber_id,
            f"its worker died {c.claims - 1} times while delivering it; not tried again",
            permanent=True,
        )
    else:
        resolved = await _attempt(
            batch, claimed, principals, transport_name, results, deferred, beside
        )
        if resolved:
            transport_name = resolved
    elapsed_ms = (time.perf_counter() - started) * 1000
    finished_at = utcnow()
    soon: dict[float, list[int]] = {}
    attempt_rows: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    waits: list[dict[str, Any]] = []
    for c in claimed:
        if c.id in deferred:
            # No attempt was made: the attempt count stays, only the due time moves.
            wait, reason = deferred[c.id]
            due = finished_at + timedelta(seconds=wait)
            queued = wait <= settings.countdown_max
            waits.append(
                {
                    "id": c.id,
                    "claimed_by": None,
                    "claimed_until": None,
                    "claims": 0,
                    "next_attempt_at": due,
                    "queued_until": due + timedelta(seconds=settings.queue_lease)
                    if queued
                    else None,
                    "updated_at": finished_at,
                }
            )
            if queued:
                soon.setdefault(round(wait, 1), []).append(c.id)
            stats.deferred += 1
            continue
        result = results[c.id]
        result.delivery_id = c.id
        result.transport = transport_name
        number = c.attempts + 1
        error = "; ".join(result.errors) or None
        change: dict[str, Any] = {
            "id": c.id,
            "attempts": number,
            "last_status_code": result.status_code,
            "last_error": error,
            "claimed_by": None,
            "claimed_until": None,
            "claims": 0,
            "updated_at": finished_at,
        }
        if resolved:
            change["transport"] = resolved
        if result.success:
            status = AttemptStatus.DELIVERED
            change.update(
                status=DeliveryStatus.DELIVERED,
                delivered_at=finished_at,
                next_attempt_at=None,
                queued_until=None,
            )
            stats.delivered += 1
        else:
            delay = (
                None if result.permanent else next_delay(number - c.retry_base, result.retry_after)
            )
            status = AttemptStatus.PERMANENT if result.permanent else AttemptStatus.TRANSIENT
            if delay is None:
                if not result.permanent:
                    change["last_error"] = f"gave up after {number} attempts: {error}"
                change.update(status=DeliveryStatus.DEAD, next_attempt_at=None, queued_until=None)
                stats.dead += 1
            else:
                due = finished_at + timedelta(seconds=delay)
                queued = delay <= settings.countdown_max
                change.update(
                    status=DeliveryStatus.RETRYING,
                    next_attempt_at=due,
                    queued_until=due + timedelta(seconds=settings.queue_lease) if queued else None,
                )
                if queued:
                    soon.setdefault(round(delay, 1), []).append(c.id)
                stats.retrying += 1
        updates.append(change)
        attempt_rows.append(
            {
                "delivery_id": c.id,
                "attempt": number,
                "transport": transport_name or NO_TRANSPORT,
                "status": status,
                "status_code": result.status_code,
                "error": error,
                "latency_ms": result.latency_ms if result.latency_ms is not None else elapsed_ms,
                "started_at": started_at,
                "finished_at": finished_at,
            }
        )
        stats.outcomes.append(result)
    await beside.beside(
        _record(
            _Outcome(
                transport_name or NO_TRANSPORT,
                resolved,
                started_at,
                finished_at,
                attempt_rows,
                updates,
                waits,
                claimant,
            )
        )
    )
    _observe(batch, transport_name or NO_TRANSPORT, attempt_rows, updates, stats, elapsed_ms)
    dispatcher = get_dispatcher()
    for delay, ids in soon.items():
        for chunk in _chunks(ids, settings.batch_size):
            await dispatcher.enqueue_batches(
                [Batch(batch.message_id, batch.channel_id, chunk)], delay
            )
    return stats


async def _attempt(
    batch: Batch,
    claimed: list[_Claimed],
    loaded: dict[int, Principal] | None,
    transport_name: str | None,
    results: dict[int, TransportResult],
    deferred: dict[int, tuple[float, str]],
    beside: _Beside,
) -> str | None:
    """Send what the endpoints admit; fill ``results`` and ``deferred`` by delivery id.

    Returns the transport resolved now for deliveries routed without one.
    """
    resolved: str | None = None
    recipients: list[Principal] = []
    try:
        message, channel, principals = await _load(
            batch, [c.subscriber_id for c in claimed], loaded, beside.loading
        )
        if transport_name == NO_TRANSPORT:
            # Routed while no transport was available; a replay resolves afresh.
            transport_name = resolved = channel.get_egress_repository().resolve_name()
        transport: Any = egress_registry.get(transport_name or "")
        await _ensure_generated_aliases(transport, principals)
        await _attach_thread(message, batch, principals)
        for c in claimed:
            principal = principals.get(c.subscriber_id)
            if principal is None:
                results[c.id] = TransportResult.failed(
                    c.subscriber_id, f"principal {c.subscriber_id} no longer exists", permanent=True
                )
                continue
            principal.delivery_id = c.id
            principal.attempt = c.attempts + 1
            recipients.append(principal)
        gate = endpoints.gate()
        # Duck-typed transports without ``endpoint`` dial nothing we guard.
        endpoint_of = getattr(transport, "endpoint", None) or (lambda _principal: None)
        at_once: int = getattr(transport, "at_once", lambda: 0)()
        rounds: list[asyncio.Future[tuple[endpoints.Admission, list[TransportResult]]]] = []
        failure: BaseException | None = None
        try:
            waiting = recipients
            give_up = time.monotonic() + get_settings().in_flight_hold
            pause = _ROOM_POLL
            # A cold endpoint's canary goes out in one round; the rest of its
            # share is asked for again only once that round is over, or each
            # ask would send another canary.
            testing: dict[str, asyncio.Future[Any]] = {}
            last: dict[int, tuple[float, str]] = {}  # delivery id -> why it waits

            def under_test(principal: Principal) -> bool:
                url = endpoint_of(principal)
                return url in testing and not testing[url].done()

            while waiting:
                ask, waiting = _split_by(waiting, under_test)
                if ask:
                    admission = await gate.admit(endpoint_of, ask, at_once)
                    if admission.allowed or admission.held:
                        # Sent while the crowded rest waits for room: each
                        # round settles (frees its room) as soon as it is done.
                        sending = asyncio.ensure_future(
                            _send_admitted(
                                transport, message, channel, admission, deferred, gate, beside
                            )
                        )
                        rounds.append(sending)
                        for principal in admission.held:
                            testing[admission.by_subscriber[principal.id or 0]] = sending
                    elif admission.charged:  # all of it booked for later: free the room now
                        beside.settle(gate, admission, [])
                    for principal in ask:
                        assert principal.delivery_id is not None and principal.id is not None
                        if principal.id in admission.disabled:
                            results[principal.delivery_id] = TransportResult.failed(
                                principal.id, admission.disabled[principal.id], permanent=True
                            )
                        elif principal.id in admission.crowded:
                            last[principal.delivery_id] = admission.deferred[principal.id]
                            waiting.append(principal)
                        elif principal.id in admission.deferred:
                            deferred[principal.delivery_id] = admission.deferred[principal.id]
                if waiting and time.monotonic() + pause >= give_up:
                    for principal in waiting:  # every one was asked at least once
                        assert principal.delivery_id is not None
                        deferred[principal.delivery_id] = last[principal.delivery_id]
                    break
                if waiting:
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, _ROOM_POLL_MAX)
        finally:
            # What went out is recorded as sent even if a later ask for room failed.
            for outcome in await asyncio.gather(*rounds, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    failure = failure or outcome
                    continue
                admission, sent = outcome
                by_subscriber = {r.subscriber_id: r for r in sent}
                for principal in admission.allowed:
                    assert principal.delivery_id is not None
                    results[principal.delivery_id] = by_subscriber.get(
                        principal.id
                    ) or TransportResult.failed(
                        principal.id,
                        f"transport {transport_name!r} returned no result for this subscriber",
                    )
        if failure is not None:  # what other rounds sent stays recorded as sent
            raise failure
    except (NotFoundError, ValidationError, ConfigurationError, ValueError, ImportError) as exc:
        for c in claimed:
            if c.id not in deferred:
                results.setdefault(
                    c.id, TransportResult.failed(c.subscriber_id, str(exc), permanent=True)
                )
    except Exception as exc:  # a transport bug must not lose the batch: retry it
        log.exception(
            "transport %s failed on batch of message %s",
            transport_name,
            batch.message_id,
            extra=_batch_context(batch, [c.id for c in claimed]),
        )
        for c in claimed:
            if c.id not in deferred:
                results.setdefault(
                    c.id, TransportResult.failed(c.subscriber_id, f"{type(exc).__name__}: {exc}")
                )
    return resolved


def _split_by(
    principals: list[Principal], later: Callable[[Principal], bool]
) -> tuple[list[Principal], list[Principal]]:
    """(those to ask now, those ``later`` keeps back), in one pass."""
    now: list[Principal] = []
    kept: list[Principal] = []
    for principal in principals:
        (kept if later(principal) else now).append(principal)
    return now, kept


async def _send_admitted(
    transport: Any,
    message: Message,
    channel: Channel,
    admission: endpoints.Admission,
    deferred: dict[int, tuple[float, str]],
    gate: endpoints.Gate,
    beside: _Beside,
) -> tuple[endpoints.Admission, list[TransportResult]]:
    """Send one admission's share; ``admission.allowed`` ends as what was sent."""
    sent: list[TransportResult] = []
    try:
        if admission.allowed:
            sent = await _send_paced(transport, message, channel, admission.allowed, admission)
        if admission.held:
            # The rest of a cold endpoint's share follows its canary only
            # if the canary reached it; otherwise they wait, untried.
            reachable = {
                admission.by_subscriber.get(r.subscriber_id or 0)
                for r in sent
                if endpoints.reached(r)
            }
            follow: list[Principal] = []
            for principal in admission.held:
                assert principal.id is not None and principal.delivery_id is not None
                url = admission.by_subscriber[principal.id]
                if url in reachable:
                    follow.append(principal)
                else:
                    deferred[principal.delivery_id] = (1.0, f"waiting while {url} is tested")
            if follow:
                sent += await _send_paced(transport, message, channel, follow, admission)
                admission.allowed += follow
    finally:
        # Settled while the outcomes are written (``_Beside``).
        beside.settle(gate, admission, sent)
    return admission, sent


async def _send_paced(
    transport: Any,
    message: Message,
    channel: Channel,
    recipients: list[Principal],
    admission: endpoints.Admission,
) -> list[TransportResult]:
    """Send now what may go now, and each rate-limited one at its booked slot."""
    slots: dict[float, list[Principal]] = {}
    for principal in recipients:
        offset = admission.send_at.get(principal.id or 0, 0.0)
        slots.setdefault(round(offset, 3), []).append(principal)
    if list(slots) == [0.0]:
        return list(await transport.send(message, channel, recipients))

    async def at(offset: float, group: list[Principal]) -> list[TransportResult]:
        delay = admission.admitted_at + offset - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        return list(await transport.send(message, channel, group))

    sent = await asyncio.gather(*(at(offset, group) for offset, group in sorted(slots.items())))
    return [result for group in sent for result in group]


# -- observability: metrics and log lines of a batch (channels_core.metrics, .logs) ----------


def _batch_context(batch: Batch, delivery_ids: list[int]) -> dict[str, Any]:
    """The ids every log line about a batch carries (CHANNELS_LOG_FORMAT=json keys)."""
    return {
        "message_id": batch.message_id,
        "channel_id": batch.channel_id,
        "delivery_ids": delivery_ids,
    }


def _observe(
    batch: Batch,
    transport: str,
    attempt_rows: list[dict[str, Any]],
    updates: list[dict[str, Any]],
    stats: BatchStats,
    elapsed_ms: float,
) -> None:
    """Record a written batch: in-memory metrics, one line for the batch, one per failure."""
    metrics.record_batch(
        transport,
        [(row["status"], row["latency_ms"]) for row in attempt_rows],
        seconds=elapsed_ms / 1000,
        dead=stats.dead,
        retrying=stats.retrying,
    )
    log.info(
        "batch of message %s on channel %s via %s: %d delivered, %d retrying, %d dead",
        batch.message_id,
        batch.channel_id,
        transport,
        stats.delivered,
        stats.retrying,
        stats.dead,
        extra={
            **_batch_context(batch, [row["delivery_id"] for row in attempt_rows]),
            "transport": transport,
            "delivered": stats.delivered,
            "retrying": stats.retrying,
            "dead": stats.dead,
            "skipped": stats.skipped,
            "elapsed_ms": round(elapsed_ms, 3),
        },
    )
    for change in updates:
        if change.get("status") not in (DeliveryStatus.DEAD, DeliveryStatus.RETRYING):
            continue
        dead = change["status"] == DeliveryStatus.DEAD
        log.log(
            logging.WARNING if dead else logging.INFO,
            "delivery %s of message %s %s: %s",
            change["id"],
            batch.message_id,
            "is a dead letter" if dead else f"failed attempt {change['attempts']}, will retry",
            change["last_error"],
            extra={
                "message_id": batch.message_id,
                "channel_id": batch.channel_id,
                "delivery_id": change["id"],
                "transport": transport,
                "attempt": change["attempts"],
                "outcome": change["status"],
                "reason": change["last_error"],
                "status_code": change["last_status_code"],
            },
        )


@dataclass
class _Outcome:
    """What a batch writes when it ends: attempt rows, new delivery states
    and the due times of deliveries deferred without an attempt."""

    transport: str
    resolved: str | None
    started_at: datetime
    finished_at: datetime
    attempts: list[dict[str, Any]]
    states: list[dict[str, Any]]
    waits: list[dict[str, Any]]
    # States are written only where this claimant still holds the claim: a
    # batch that outlived its lease must not overwrite what the worker that
    # took its deliveries over wrote. Its tries are still counted on the
    # rows and recorded: an attempt's number is the row's count after it,
    # taken where the attempt is written, so the two workers' attempts of
    # one delivery get numbers of their own.
    claimant: str


async def _record(outcome: _Outcome) -> None:
    """Write a batch's attempt rows and its deliveries' new states together."""
    if not db.is_postgres():
        async with db.session() as s, s.begin():
            tried = [row["delivery_id"] for row in outcome.attempts]
            if tried:
                # Those this batch no longer holds are counted first, while
                # the ones it holds are still marked as its own.
                await s.execute(
                    update(DeliveryRow)
                    .where(
                        DeliveryRow.id.in_(tried),
                        or_(
                            DeliveryRow.claimed_by.is_(None),
                            DeliveryRow.claimed_by != outcome.claimant,
                        ),
                    )
                    .values(attempts=DeliveryRow.attempts + 1)
                    .execution_options(synchronize_session=False)
                )
            await _write_states(s, outcome.states, outcome.claimant)
            if tried:
                found = await s.execute(
                    select(DeliveryRow.id, DeliveryRow.attempts).where(DeliveryRow.id.in_(tried))
                )
                numbers = {delivery_id: count for delivery_id, count in found}
                rows = [
                    {**row, "attempt": numbers[row["delivery_id"]]}
                    for row in outcome.attempts
                    if row["delivery_id"] in numbers  # not deleted meanwhile
                ]
                if rows:
                    await s.execute(
                        db.insert(s, AttemptRow).on_conflict_do_nothing().returning(AttemptRow.id),
                        rows,
                    )
            if outcome.waits:
                await s.execute(_held_by(outcome.claimant), outcome.waits)
        return
    if outcome.states:
        await delivery_pg.record(
            delivery_pg.record_params(
                outcome.attempts,
                outcome.states,
                outcome.transport,
                outcome.resolved,
                outcome.started_at,
                outcome.finished_at,
                outcome.claimant,
            )
        )
    if outcome.waits:
        async with db.session() as s, s.begin():
            await s.execute(_held_by(outcome.claimant), outcome.waits)


def _held_by(claimant: str) -> Update:
    """An UPDATE by primary key (one parameter set per row) of rows ``claimant`` holds."""
    return (
        update(DeliveryRow)
        .where(DeliveryRow.claimed_by == claimant)
        .execution_options(synchronize_session=None)  # no ORM objects to keep in step
    )


async def _write_states(s: AsyncSession, updates: list[dict[str, Any]], claimant: str) -> None:
    """Write new delivery states in as few statements as the data allows,
    each row's try counted on it (``attempts + 1``).

    Rows whose new values are equal but for the id (the common case: a batch
    all delivered with 200) share one ``UPDATE ... WHERE id IN (...)``;
    the rest (retries carry their own jittered due time) go as one
    executemany by primary key.
    """
    counted = {"attempts": DeliveryRow.attempts + 1}
    groups: dict[tuple[Any, ...], list[int]] = {}
    singles: list[dict[str, Any]] = []
    for change in updates:
        if change.get("status") == DeliveryStatus.RETRYING:
            singles.append(change)
            continue
        values = tuple(sorted((k, v) for k, v in change.items() if k not in ("id", "attempts")))
        groups.setdefault(values, []).append(change["id"])
    for values, ids in groups.items():
        await s.execute(
            update(DeliveryRow)
            .where(DeliveryRow.id.in_(ids), DeliveryRow.claimed_by == claimant)
            .values({**dict(values), **counted})
            .execution_options(synchronize_session=False)
        )
    if singles:
        keys = sorted(singles[0].keys() - {"id", "attempts"})  # a batch's retries share keys
        by_id = (
            update(DeliveryRow)
            .where(
                DeliveryRow.id == bindparam("row_id"),
                DeliveryRow.claimed_by == claimant,
            )
            .values({**{key: bindparam(f"row_{key}") for key in keys}, **counted})
        )
        # On the session's connection: a list of rows given to the session
        # itself would make this an ORM bulk update, which takes no expressions.
        conn = await s.connection()
        await conn.execute(
            by_id, [{f"row_{key}": change[key] for key in ("id", *keys)} for change in singles]
        )


# -- the sweeper ---------------------------------------------------------------


async def sweep() -> SweepStats:
    """Relay outbox entries not routed in time; enqueue deliveries that are due."""
    settings = get_settings()
    stats = SweepStats()
    dispatcher = get_dispatcher()
    now = utcnow()
    async with db.session() as s, s.begin():
        stale = list(
            (
                await s.execute(
                    select(OutboxRow.id, OutboxRow.message_id, OutboxRow.channel_id)
                    .where(OutboxRow.routed_at.is_(None), OutboxRow.relay_at <= now)
                    .order_by(OutboxRow.relay_at)
                    .limit(settings.sweep_limit)
                    .with_for_update(skip_locked=True)
                )
            ).all()
        )
        if stale:
            await s.execute(
                update(OutboxRow)
                .where(OutboxRow.id.in_([r[0] for r in stale]))
                .values(
                    relay_at=now + timedelta(seconds=settings.outbox_relay_after),
                    relays=OutboxRow.relays + 1,
                )
            )
    if stale:
        await dispatcher.enqueue_routes([RouteJob(*row) for row in stale])
        stats.relayed = len(stale)

    async with db.session() as s, s.begin():
        due = list(
            (
                await s.execute(
                    select(DeliveryRow.id, DeliveryRow.message_id, DeliveryRow.channel_id)
                    .where(
                        DeliveryRow.status.in_(_NOT_FINAL),
                        DeliveryRow.next_attempt_at <= now,
                        or_(DeliveryRow.queued_until.is_(None), DeliveryRow.queued_until < now),
                        or_(DeliveryRow.claimed_until.is_(None), DeliveryRow.claimed_until < now),
                    )
                    .order_by(DeliveryRow.next_attempt_at)
                    .limit(settings.sweep_limit)
                    .with_for_update(skip_locked=True)
                )
            ).all()
        )
        if due:
            await s.execute(
                update(DeliveryRow)
                .where(DeliveryRow.id.in_([r[0] for r in due]))
                .values(queued_until=now + timedelta(seconds=settings.queue_lease))
                .execution_options(synchronize_session=False)
            )
    if due:
        groups: dict[tuple[int, int], list[int]] = {}
        for delivery_id, message_id, channel_id in due:
            groups.setdefault((message_id, channel_id), []).append(delivery_id)
        batches = [
            Batch(m, c, chunk)
            for (m, c), ids in groups.items()
            for chunk in _chunks(ids, settings.batch_size)
        ]
        try:
            await dispatcher.enqueue_batches(batches)
        except Exception:
            # Let the next sweep try again rather than wait out the lease.
            async with db.session() as s, s.begin():
                await s.execute(
                    update(DeliveryRow)
                    .where(DeliveryRow.id.in_([r[0] for r in due]))
                    .values(queued_until=None)
                    .execution_options(synchronize_session=False)
                )
            raise
        stats.enqueued = len(due)
    return stats
