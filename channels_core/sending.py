"""Sending, queue-backed: one transaction for messages and outbox, then enqueue.

For each (message, channel) the author may submit to, an outbox entry is
written in the same transaction as the message. Only after the commit are
routing jobs handed to the dispatcher; if that fails the entries wait for
the sweeper's relay. A channel the author may not submit to gets a failed
``TransportResult`` naming the permission, and nothing is written for it.

Every input is checked before the transaction opens, so a bad one changes
nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from typing import Any

from sqlalchemy import (
    CompoundSelect,
    Executable,
    bindparam,
    case,
    cast,
    func,
    insert,
    literal_column,
    null,
    select,
    true,
    union_all,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from channels_core import db
from channels_core.dispatch import RouteJob, get_dispatcher
from channels_core.errors import DispatchTimeout, NotFoundError, ValidationError
from channels_core.models import (
    ChannelRow,
    ConversationRow,
    DeliveryRow,
    DeliveryStatus,
    MessageRow,
    OutboxRow,
    PrincipalRow,
    SubscriptionRow,
    utcnow,
)
from channels_core.permissions import SUBMIT, holds
from channels_core.primitives import Channel, Message
from channels_core.settings import get_settings
from channels_core.transports.base import TransportResult

__all__ = ["Dispatch", "send_messages", "check_messages", "channel_results", "BeforeCommit"]

# Runs inside send_messages' transaction after its writes: what it writes
# commits with the messages and outbox entries, or not at all.
BeforeCommit = Callable[[AsyncSession, Sequence[Message]], Awaitable[None]]

log = logging.getLogger("channels.sending")


@dataclass
class _Entry:
    channel_id: int
    outbox_id: int | None  # None: refused, nothing enqueued
    result: TransportResult


class Dispatch:
    """What ``Message.send`` returns: per-channel results, now and final.

    Iterating a Dispatch yields the per-channel ``TransportResult`` objects
    (pending counts right after the send), as the seed's ``results`` list.
    """

    def __init__(self, message_id: int | None, entries: list[_Entry]) -> None:
        self.message_id = message_id
        self._entries = entries

    @classmethod
    async def track(cls, message_id: int) -> Dispatch:
        """A Dispatch for a message sent earlier, over every channel it was accepted on."""
        async with db.session() as s:
            if await s.get(MessageRow, message_id) is None:
                raise NotFoundError("message", message_id)
            rows = (
                await s.execute(
                    select(OutboxRow.channel_id, OutboxRow.id)
                    .where(OutboxRow.message_id == message_id)
                    .order_by(OutboxRow.id)
                )
            ).all()
        entries = [
            _Entry(
                c,
                o,
                TransportResult(success=True, pending_count=1, channel_id=c, message_id=message_id),
            )
            for c, o in rows
        ]
        dispatch = cls(message_id, entries)
        await dispatch.refresh()
        return dispatch

    @property
    def results(self) -> list[TransportResult]:
        return [e.result for e in self._entries]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.results)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> TransportResult:
        return self.results[index]

    def __await__(self):  # type: ignore[no-untyped-def]
        """``await dispatch`` is ``await dispatch.wait()``."""
        return self.wait().__await__()

    @property
    def accepted(self) -> bool:
        return any(e.outbox_id is not None for e in self._entries)

    async def refresh(self) -> list[TransportResult]:
        accepted = [e for e in self._entries if e.outbox_id is not None]
        if accepted:
            assert self.message_id is not None
            fresh = await channel_results(self.message_id, [e.channel_id for e in accepted])
            for e in accepted:
                e.result = fresh[e.channel_id]
        return self.results

    async def wait(self, timeout: float = 30.0) -> list[TransportResult]:
        """Poll until every delivery of every accepted channel is final."""
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            results = await self.refresh()
            if all(r.final for r in results):
                return results
            if time.monotonic() >= deadline:
                raise DispatchTimeout(
                    f"message {self.message_id}: {sum(r.pending_count for r in results)} "
                    f"deliveries still pending after {timeout:g}s"
                )
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 0.5)


async def channel_results(
    message_id: int, channel_ids: Sequence[int]
) -> dict[int, TransportResult]:
    """Per-channel results of a message from the delivery rows.

    A channel whose outbox entry is not routed yet counts its current
    subscribers as pending.
    """
    async with db.session() as s:
        # The outbox first: routing commits its delivery rows before it marks
        # the entry routed, so rows counted after a routed entry are all of
        # them. Counted the other way round, a routing that finishes between
        # the two reads looks final with no deliveries.
        outbox = dict(
            (
                await s.execute(
                    select(OutboxRow.channel_id, OutboxRow.routed_at).where(
                        OutboxRow.message_id == message_id, OutboxRow.channel_id.in_(channel_ids)
                    )
                )
            ).all()
        )
        counts = await s.execute(
            select(DeliveryRow.channel_id, DeliveryRow.status, func.count())
            .where(DeliveryRow.message_id == message_id, DeliveryRow.channel_id.in_(channel_ids))
            .group_by(DeliveryRow.channel_id, DeliveryRow.status)
        )
        by_channel: dict[int, dict[str, int]] = {}
        for channel_id, status, n in counts:
            by_channel.setdefault(channel_id, {})[status] = n
        unrouted = [c for c in channel_ids if outbox.get(c) is None]
        waiting: dict[int, int] = {}
        if unrouted:
            waiting = dict(
                (
                    await s.execute(
                        select(SubscriptionRow.channel_id, func.count())
                        .where(SubscriptionRow.channel_id.in_(unrouted))
                        .group_by(SubscriptionRow.channel_id)
                    )
                ).all()
            )
            # A channel with no subscribers still needs its routing job to run.
            waiting = {c: max(1, waiting.get(c, 0)) for c in unrouted}
        errors: dict[int, list[str]] = {}
        failed_rows = await s.execute(
            select(DeliveryRow.channel_id, DeliveryRow.subscriber_id, DeliveryRow.last_error)
            .where(
                DeliveryRow.message_id == message_id,
                DeliveryRow.channel_id.in_(channel_ids),
                DeliveryRow.status == DeliveryStatus.DEAD,
            )
            .limit(100)
        )
        for channel_id, subscriber_id, error in failed_rows:
            errors.setdefault(channel_id, []).append(f"subscriber {subscriber_id}: {error}")
    results = {}
    for channel_id in channel_ids:
        c = by_channel.get(channel_id, {})
        delivered = c.get(DeliveryStatus.DELIVERED, 0)
        dead = c.get(DeliveryStatus.DEAD, 0)
        pending = c.get(DeliveryStatus.PENDING, 0) + c.get(DeliveryStatus.RETRYING, 0)
        pending += waiting.get(channel_id, 0)
        results[channel_id] = TransportResult(
            success=dead == 0,
            delivered_count=delivered,
            failed_count=dead,
            pending_count=pending,
            errors=errors.get(channel_id, []),
            channel_id=channel_id,
            message_id=message_id,
        )
    return results


async def check_messages(messages: Sequence[Message]) -> None:
    """Refuse what ``send_messages`` would refuse for these messages, writing nothing.

    ``send_messages`` checks its own messages before its transaction commits;
    a caller that splits one batch over several calls (``AsyncProducer.send_many``
    with a ``chunk``) runs this first, so a bad message in a later call is
    refused before an earlier call commits. The ids messages name are looked
    up in bulk, a few queries however many messages there are.
    """
    for m in messages:
        if m.author_id is None:
            raise ValidationError("a message needs an author_id before it is sent")
        m._validate()
    wanted: list[tuple[str, InstrumentedAttribute[int], list[int]]] = [
        ("principal", PrincipalRow.id, [m.author_id for m in messages if m.author_id is not None]),
        (
            "conversation",
            ConversationRow.id,
            [m.conversation_id for m in messages if m.conversation_id is not None],
        ),
        (
            "message",
            MessageRow.id,
            [
                ref
                for m in messages
                for ref in (m.id, m.reply_to_id, *m.references)
                if ref is not None
            ],
        ),
    ]
    async with db.session() as s:
        for kind, column, named in wanted:
            ids = list(dict.fromkeys(named))  # first named first: the error names that one
            found = await db.existing_ids(s, column, ids)
            for ident in ids:
                if ident not in found:
                    raise NotFoundError(kind, ident)


@cache
def _look_up_statement(postgres: bool, single: bool = False) -> CompoundSelect:
    """Each channel's subscriber count and each author's submit permission.

    The channels' subscriptions are counted by the ids given, not per
    channel row: correlated to the row, PostgreSQL estimated every channel
    at the table's average, and once one channel had 100,000 subscribers it
    counted a ten-subscriber channel with a scan of the whole table (a send
    took 7.6 ms instead of 1.3). Given the ids, it knows each one's share.

    With ``single``, ``channels`` and ``authors`` are one id each, not
    arrays. PostgreSQL plans a prepared statement afresh on every execute
    while its generic plan looks dearer than the plans for the values
    given; with arrays it always did (10 ids assumed against the 1 sent),
    and planning took 0.5 ms of a one-message send's 1.3 ms statement.
    """

    def one_of(column: Any, name: str) -> Any:
        if single:
            return column == bindparam(name, type_=column.type)
        return db.one_of_param(column, name, postgres)

    counts = (
        select(SubscriptionRow.channel_id, func.count().label("subscribers"))
        .where(one_of(SubscriptionRow.channel_id, "channels"))
        .group_by(SubscriptionRow.channel_id)
        .subquery("counts")
    )
    submits = case((holds(PrincipalRow.id, SUBMIT), 1), else_=0)
    return union_all(
        select(
            literal_column("0").label("kind"),
            ChannelRow.id.label("ident"),
            func.coalesce(counts.c.subscribers, 0).label("value"),
        )
        .select_from(ChannelRow.__table__.outerjoin(counts, counts.c.channel_id == ChannelRow.id))
        .where(one_of(ChannelRow.id, "channels")),
        select(literal_column("1"), PrincipalRow.id, submits).where(
            one_of(PrincipalRow.id, "authors")
        ),
    )


async def _look_up(
    conn: AsyncConnection, channel_ids: Sequence[int], authors: Sequence[int]
) -> tuple[dict[int, int], dict[int, bool]]:
    """Each existing channel's subscriber count, and whether each existing
    author may submit: one query for both, built once per backend."""
    postgres = conn.dialect.name == "postgresql"
    found = await conn.execute(
        _look_up_statement(postgres),
        {
            "channels": db.one_of_value(ChannelRow.id, channel_ids, postgres),
            "authors": db.one_of_value(PrincipalRow.id, authors, postgres),
        },
    )
    return _looked_up(found)


def _looked_up(rows: Iterable[Sequence[Any]]) -> tuple[dict[int, int], dict[int, bool]]:
    """Subscriber counts by channel and permission by author, from the
    look-up's rows (kind 0: a channel, 1: an author; others are not its)."""
    counts: dict[int, int] = {}
    permitted: dict[int, bool] = {}
    for kind, ident, value, *_ in rows:
        if kind == 1:
            permitted[ident] = bool(value)
        elif kind == 0:
            counts[ident] = value
    return counts, permitted


async def send_messages(
    messages: Sequence[Message],
    channels: Sequence[Channel],
    *,
    before_commit: BeforeCommit | None = None,
) -> list[Dispatch]:
    """Persist messages with their outbox entries in one transaction, then enqueue.

    Returns one ``Dispatch`` per message, in order. ``before_commit(session,
    messages)`` runs in that transaction after the writes (the HTTP ingress
    stores idempotency keys there); if it raises, nothing is committed and
    nothing is enqueued.
    """
    if not messages:
        return []
    if not channels:
        raise ValidationError("send() needs at least one channel")
    channel_ids: list[int] = []
    for channel in channels:
        if channel.id is None:
            raise ValidationError("a channel must be saved before sending to it")
        if channel.id not in channel_ids:
            channel_ids.append(channel.id)
    for m in messages:
        if m.author_id is None:
            raise ValidationError("a message needs an author_id before it is sent")
        m._validate()

    authors = list(dict.fromkeys(m.author_id for m in messages if m.author_id is not None))
    if before_commit is None and db.is_postgres() and all(_plain_new(m) for m in messages):
        try:
            return await _send_new(messages, channel_ids, authors)
        except IntegrityError:
            # A link named by a message is missing (or a channel went away
            # meanwhile). Nothing was written: the checked path names it.
            pass
    async with db.session() as s, s.begin():
        # Core statements on the session's own connection: for a single
        # message the ORM's work per statement cost more than the round trips.
        conn = await s.connection()
        subscriber_counts, permitted = await _look_up(conn, channel_ids, authors)
        _require(channel_ids, subscriber_counts, authors, permitted)
        # Saved if needed, but a message no channel accepts and that was
        # never saved stays unsaved: a refused send changes nothing.
        fresh: list[Message] = []
        for m in messages:
            if m.id is not None:
                await m._write(s)
            elif permitted[m.author_id]:  # type: ignore[index]
                fresh.append(m)
        if fresh:
            await Message._insert_many(s, fresh, authors_exist=True)
        now = utcnow()
        relay_at = now + timedelta(seconds=get_settings().outbox_relay_after)
        rows: list[dict[str, object]] = []
        for m in messages:
            if m.id is not None and permitted[m.author_id]:  # type: ignore[index]
                rows.extend(
                    {
                        "message_id": m.id,
                        "channel_id": c,
                        "created_at": now,
                        "relay_at": relay_at,
                    }
                    for c in channel_ids
                )
        outbox_ids: dict[tuple[int, int], int] = {}
        if rows:
            returning = ("id", "message_id", "channel_id")
            if db.is_postgres():
                # One short statement for any number of rows (see db.insert_rows).
                inserted = await conn.execute(*db.insert_rows(OutboxRow, rows, returning=returning))
            else:
                columns = (OutboxRow.__table__.c[n] for n in returning)
                inserted = await conn.execute(insert(OutboxRow).returning(*columns), rows)
            for new_id, message_id, channel_id in inserted:
                outbox_ids[(message_id, channel_id)] = new_id
        dispatches, jobs = _dispatches(messages, channel_ids, outbox_ids, subscriber_counts)
        if before_commit is not None:
            await before_commit(s, messages)
    await _enqueue(jobs)
    return dispatches


def _plain_new(m: Message) -> bool:
    """Unsaved, without references, every link an id the database can hold:
    a message ``_send_new`` writes in its one statement."""
    links = (m.author_id, m.reply_to_id, m.conversation_id)
    return m.id is None and not m.references and all(i is None or i < 2**63 for i in links)


def _require(
    channel_ids: Sequence[int],
    subscriber_counts: dict[int, int],
    authors: Sequence[int],
    permitted: dict[int, bool],
) -> None:
    for channel_id in channel_ids:
        if channel_id not in subscriber_counts:
            raise NotFoundError("channel", channel_id)
    for author_id in authors:
        if author_id not in permitted:
            raise NotFoundError("principal", author_id)


@cache
def _new_statement(columns: tuple[str, ...], single: bool) -> Executable:
    """The look-up, new messages, and their outbox entries for every channel,
    in one statement (PostgreSQL): atomic without a transaction around it.

    Messages are written only if every channel and every author exists, and
    only those whose author may submit; the look-up's rows come back beside
    the outbox entries (kind 2), so the caller refuses what the transaction
    path would, with nothing written.
    """
    look = _look_up_statement(True, single).cte("look")
    kinds = func.count().filter(look.c.kind == 0), func.count().filter(look.c.kind == 1)
    channels_found = select(kinds[0]).select_from(look).scalar_subquery()
    authors_found = select(kinds[1]).select_from(look).scalar_subquery()
    source = db.unnest(MessageRow, "r", columns, ordinal=True)
    submitters = select(look.c.ident).where(look.c.kind == 1, look.c.value == 1)
    messages = (
        postgresql.insert(MessageRow)
        .from_select(
            columns,
            select(*(source.c[c] for c in columns))
            .where(
                channels_found == bindparam("channel_count"),
                authors_found == bindparam("author_count"),
                source.c.author_id.in_(submitters),
            )
            .order_by(source.c.ordinal),
        )
        .returning(MessageRow.id)
        .cte("new_messages")
    )
    targets = db.unnest(OutboxRow, "o", ["channel_id"])
    outbox = (
        postgresql.insert(OutboxRow)
        .from_select(
            ["message_id", "channel_id", "created_at", "relay_at", "relays"],
            select(
                messages.c.id,
                targets.c.channel_id,
                bindparam("outbox_created_at", type_=OutboxRow.created_at.type),
                bindparam("outbox_relay_at", type_=OutboxRow.relay_at.type),
                literal_column("0"),
            ).select_from(messages.join(targets, true())),
        )
        .returning(OutboxRow.id, OutboxRow.message_id, OutboxRow.channel_id)
        .cte("new_outbox")
    )
    nothing = cast(null(), OutboxRow.id.type)
    return union_all(
        select(look.c.kind, look.c.ident, look.c.value, nothing),
        select(literal_column("2"), outbox.c.id, outbox.c.message_id, outbox.c.channel_id),
    )


async def _send_new(
    messages: Sequence[Message], channel_ids: list[int], authors: list[int]
) -> list[Dispatch]:
    """``send_messages`` for new messages on PostgreSQL in one round trip
    (``_new_statement``). Links are left to the foreign keys: a missing one
    raises IntegrityError, and nothing is written."""
    now = utcnow()
    rows = [{**m._values(), "created_at": now} for m in messages]
    single = len(channel_ids) == 1 and len(authors) == 1
    params = db.arrays(MessageRow, "r", list(rows[0]), rows)
    params.update(
        db.arrays(OutboxRow, "o", ["channel_id"], [{"channel_id": c} for c in channel_ids]),
        channels=channel_ids[0] if single else db.one_of_value(ChannelRow.id, channel_ids, True),
        authors=authors[0] if single else db.one_of_value(PrincipalRow.id, authors, True),
        channel_count=len(channel_ids),
        author_count=len(authors),
        outbox_created_at=now,
        outbox_relay_at=now + timedelta(seconds=get_settings().outbox_relay_after),
    )
    async with db.autocommit() as conn:
        found = (await conn.execute(_new_statement(tuple(rows[0]), single), params)).all()
    subscriber_counts, permitted = _looked_up(found)
    _require(channel_ids, subscriber_counts, authors, permitted)
    inserted = [(new_id, message_id, c) for kind, new_id, message_id, c in found if kind == 2]
    # A message no channel accepts stays unsaved: a refused send changes nothing.
    accepted = [m for m in messages if permitted[m.author_id]]  # type: ignore[index]
    # Rows are numbered in their order (db.insert_rows): sorted ids are theirs in order.
    ids = sorted({message_id for _, message_id, _ in inserted})
    for m, message_id in zip(accepted, ids, strict=True):
        m.id, m.created_at = message_id, now
    outbox_ids = {(message_id, c): new_id for new_id, message_id, c in inserted}
    dispatches, jobs = _dispatches(messages, channel_ids, outbox_ids, subscriber_counts)
    await _enqueue(jobs)
    return dispatches


def _dispatches(
    messages: Sequence[Message],
    channel_ids: Sequence[int],
    outbox_ids: dict[tuple[int, int], int],
    subscriber_counts: dict[int, int],
) -> tuple[list[Dispatch], list[RouteJob]]:
    """Each message's Dispatch, and the routing jobs of its accepted channels."""
    dispatches: list[Dispatch] = []
    jobs: list[RouteJob] = []
    for m in messages:
        entries = []
        for c in channel_ids:
            outbox_id: int | None = outbox_ids.get((m.id, c)) if m.id is not None else None
            if outbox_id is None:
                result = TransportResult(
                    success=False,
                    errors=[f"principal {m.author_id} lacks permission {SUBMIT!r} on channel {c}"],
                    channel_id=c,
                    message_id=m.id,
                )
            else:
                assert m.id is not None
                jobs.append(RouteJob(outbox_id, m.id, c))
                result = TransportResult(
                    success=True,
                    pending_count=subscriber_counts.get(c, 0),
                    channel_id=c,
                    message_id=m.id,
                )
            entries.append(_Entry(c, outbox_id, result))
        dispatches.append(Dispatch(m.id, entries))
    return dispatches, jobs


async def _enqueue(jobs: list[RouteJob]) -> None:
    if not jobs:
        return
    try:
        await get_dispatcher().enqueue_routes(jobs)
    except Exception as exc:
        # Committed is accepted: the sweeper relays these entries later.
        log.warning(
            "enqueue failed for %d routing jobs; the outbox relay will retry: %s", len(jobs), exc
        )
