"""The delivery engine driven directly: send -> route -> deliver -> sweep.

No broker and no worker processes: the ``database`` fixture installs a
``MemoryDispatcher`` that records routing jobs and batches, and each test
plays the worker by calling ``delivery.route`` / ``deliver`` / ``sweep``
itself. Channels use the ``memory`` egress (a ``MemoryEgress`` or a
``FunctionEgress`` installed for the test), except where the real HTTP
transport is the point. Every test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from _support import new_principals, unchanged
from sqlalchemy import insert, select, text, update

from channels_cli.devservers import WebhookReceiver
from channels_core import db, deliveries, delivery, endpoints, shared_redis
from channels_core.dispatch import Batch, MemoryDispatcher, RouteJob
from channels_core.errors import DispatchTimeout, NotFoundError, ValidationError
from channels_core.models import (
    AttemptRow,
    AttemptStatus,
    DeliveryRow,
    DeliveryStatus,
    OutboxRow,
    PrincipalRow,
    SubscriptionRow,
    utcnow,
)
from channels_core.permissions import SUBMIT
from channels_core.primitives import Channel, Message, Permission, Principal, Role
from channels_core.settings import Settings, configure, get_settings
from channels_core.signing import new_secret
from channels_core.transports.base import TransportResult
from channels_core.transports.http import HttpEgress
from channels_core.transports.memory import FunctionEgress, MemoryEgress
from channels_core.transports.registry import egress_registry

_serial = itertools.count(1)


# -- fixtures -------------------------------------------------------------------


@pytest.fixture
def tune(database: str) -> Iterator[Callable[..., Settings]]:
    """Layer setting values over the ones in force (the test's database URL
    included); the settings object in force before the test comes back after."""
    previous = get_settings()

    def apply(**values: Any) -> Settings:
        return configure(get_settings().model_copy(update=values))

    yield apply
    configure(previous)


@pytest.fixture
def install(database: str) -> Iterator[Callable[[Any], Any]]:
    """Install an egress instance under the name ``memory``; restored afterwards."""
    saved = egress_registry._instances.get("memory")

    def put(instance: Any) -> Any:
        egress_registry.set_instance("memory", instance)
        return instance

    yield put
    egress_registry._instances.pop("memory", None)
    if saved is not None:
        egress_registry._instances["memory"] = saved


@pytest.fixture
def memory(install: Callable[[Any], Any]) -> MemoryEgress:
    return install(MemoryEgress())  # type: ignore[no-any-return]


@pytest.fixture
async def real_http(database: str) -> Any:
    """A fresh HttpEgress under ``http``, closed and the registry restored afterwards."""
    saved = egress_registry._instances.get("http")
    egress = HttpEgress()
    egress_registry.set_instance("http", egress)
    yield egress
    await egress.aclose()
    egress_registry._instances.pop("http", None)
    if saved is not None:
        egress_registry._instances["http"] = saved


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver().start()
    yield server
    server.stop()


# -- builders and readers ---------------------------------------------------------


async def make_author(*, submit: bool = True) -> Principal:
    principal = Principal("service", username=f"author-{next(_serial)}")
    if submit:
        permission = await Permission.get_or_create(SUBMIT)
        assert permission.id is not None
        role = Role(f"senders-{next(_serial)}").add_permission(permission.id)
        await role.save()
        assert role.id is not None
        principal.add_role(role.id)
    return await principal.save()


async def make_channel(transport: str = "memory", title: str = "Engine room") -> Channel:
    return await Channel(f"{title} {next(_serial)}").set_alias("egress_transport", transport).save()


async def add_subscribers(
    channel: Channel, count: int, aliases: dict[str, str] | None = None
) -> list[int]:
    async with db.session() as s, s.begin():
        ids = list(
            await s.scalars(
                insert(PrincipalRow).returning(PrincipalRow.id),
                [{"kind": "bot", "aliases": dict(aliases or {})} for _ in range(count)],
            )
        )
        await s.execute(
            insert(SubscriptionRow), [{"channel_id": channel.id, "subscriber_id": i} for i in ids]
        )
    return sorted(ids)


async def send(author: Principal, channel: Channel, content: str = "hello") -> tuple[Message, Any]:
    message = Message(content, author_id=author.id)
    dispatch = await message.send(channel)
    return message, dispatch


async def delivery_rows(message_id: int) -> list[DeliveryRow]:
    async with db.session() as s:
        return list(
            await s.scalars(
                select(DeliveryRow)
                .where(DeliveryRow.message_id == message_id)
                .order_by(DeliveryRow.id)
            )
        )


async def attempt_rows(*delivery_ids: int) -> list[AttemptRow]:
    async with db.session() as s:
        return list(
            await s.scalars(
                select(AttemptRow)
                .where(AttemptRow.delivery_id.in_(delivery_ids))
                .order_by(AttemptRow.delivery_id, AttemptRow.attempt)
            )
        )


async def outbox_rows(message_id: int) -> list[OutboxRow]:
    async with db.session() as s:
        return list(
            await s.scalars(
                select(OutboxRow).where(OutboxRow.message_id == message_id).order_by(OutboxRow.id)
            )
        )


async def set_deliveries(ids: list[int], **values: Any) -> None:
    async with db.session() as s, s.begin():
        await s.execute(update(DeliveryRow).where(DeliveryRow.id.in_(ids)).values(**values))


def aware(value: datetime | None) -> datetime:
    """SQLite hands timestamps back naive; they are stored as UTC."""
    assert value is not None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def seconds_between(later: datetime | None, earlier: datetime | None) -> float:
    return (aware(later) - aware(earlier)).total_seconds()


async def routed(
    dispatcher: MemoryDispatcher,
    subscribers: int,
    *,
    transport: str = "memory",
    aliases: dict[str, str] | None = None,
    content: str = "hello",
) -> tuple[Message, Channel, list[int], list[Batch]]:
    """A message sent to a channel of ``subscribers`` subscribers and routed;
    returns the batches routing enqueued."""
    author = await make_author()
    channel = await make_channel(transport)
    await add_subscribers(channel, subscribers, aliases)
    message, _ = await send(author, channel, content)
    before = len(dispatcher.batches)
    await delivery.route(dispatcher.jobs[-1])
    batches = [b for b, _ in dispatcher.batches[before:]]
    ids = [d.id for d in await delivery_rows(message.id)]  # type: ignore[arg-type]
    return message, channel, ids, batches


# -- sending and routing ------------------------------------------------------------


async def test_send_writes_outbox_row_and_enqueues_one_route_job(
    dispatcher: MemoryDispatcher,
) -> None:
    author = await make_author()
    channel = await make_channel()
    await add_subscribers(channel, 3)

    before = utcnow()
    message, dispatch = await send(author, channel)

    [outbox] = await outbox_rows(message.id)  # type: ignore[arg-type]
    assert (outbox.channel_id, outbox.routed_at, outbox.relays) == (channel.id, None, 0)
    relay_in = seconds_between(outbox.relay_at, before)
    assert (
        get_settings().outbox_relay_after - 1 <= relay_in <= get_settings().outbox_relay_after + 5
    )
    assert dispatcher.jobs == [RouteJob(outbox.id, message.id, channel.id)]  # type: ignore[arg-type]
    assert dispatcher.batches == []
    assert await delivery_rows(message.id) == []  # type: ignore[arg-type]
    [result] = list(dispatch)
    assert (result.success, result.pending_count, result.channel_id) == (True, 3, channel.id)


async def test_send_without_submit_permission_writes_and_enqueues_nothing(
    dispatcher: MemoryDispatcher,
) -> None:
    author = await make_author(submit=False)
    channel = await make_channel()
    await add_subscribers(channel, 2)

    _, dispatch = await send(author, channel)

    [result] = list(dispatch)
    assert result.success is False
    assert any(SUBMIT in e for e in result.errors), result.errors
    async with db.session() as s:
        assert list(await s.scalars(select(OutboxRow.id))) == []
    assert dispatcher.jobs == []


async def test_route_creates_one_delivery_per_subscriber_in_batches_of_batch_size(
    dispatcher: MemoryDispatcher, tune: Callable[..., Settings]
) -> None:
    tune(batch_size=3)
    author = await make_author()
    channel = await make_channel()
    subscriber_ids = await add_subscribers(channel, 7)
    message, _ = await send(author, channel)

    stats = await delivery.route(dispatcher.jobs[0])

    rows = await delivery_rows(message.id)  # type: ignore[arg-type]
    assert sorted(r.subscriber_id for r in rows) == subscriber_ids
    assert {(r.status, r.attempts, r.transport, r.channel_id) for r in rows} == {
        (DeliveryStatus.PENDING, 0, "memory", channel.id)
    }
    assert (stats.deliveries, stats.batches, stats.transport, stats.skipped) == (
        7,
        3,
        "memory",
        False,
    )
    assert [len(b.delivery_ids) for b, _ in dispatcher.batches] == [3, 3, 1]
    assert {c for _, c in dispatcher.batches} == {0.0}
    assert {(b.message_id, b.channel_id) for b, _ in dispatcher.batches} == {
        (message.id, channel.id)
    }
    enqueued = [i for b, _ in dispatcher.batches for i in b.delivery_ids]
    assert sorted(enqueued) == [r.id for r in rows]
    [outbox] = await outbox_rows(message.id)  # type: ignore[arg-type]
    assert outbox.routed_at is not None and outbox.transport == "memory" and outbox.error is None


async def test_routing_the_same_job_twice_creates_and_enqueues_nothing_twice(
    dispatcher: MemoryDispatcher, memory: MemoryEgress
) -> None:
    message, _, ids, batches = await routed(dispatcher, 4)
    job = dispatcher.jobs[-1]
    enqueued = list(dispatcher.batches)

    again = await delivery.route(job)

    assert again.skipped is True and again.deliveries == 0 and again.batches == 0
    assert [d.id for d in await delivery_rows(message.id)] == ids  # type: ignore[arg-type]
    assert dispatcher.batches == enqueued

    # A routing task that died before marking the entry routed runs again: the
    # rows exist (ON CONFLICT DO NOTHING) and, once final, nothing is enqueued.
    for batch in batches:
        await delivery.deliver(batch, claimant="t1")
    async with db.session() as s, s.begin():
        await s.execute(
            update(OutboxRow).where(OutboxRow.id == job.outbox_id).values(routed_at=None)
        )
    enqueued = list(dispatcher.batches)
    rerun = await delivery.route(job)
    assert rerun.skipped is False and rerun.batches == 0
    assert [d.id for d in await delivery_rows(message.id)] == ids  # type: ignore[arg-type]
    assert dispatcher.batches == enqueued


async def test_routing_again_re_enqueues_pending_rows_beside_new_ones(
    dispatcher: MemoryDispatcher, memory: MemoryEgress
) -> None:
    """A routing task that died after its rows were committed, but before they
    were delivered, runs again: each pending row is enqueued again, with one
    for a subscriber who joined meanwhile, and no row is made twice."""
    message, channel, ids, _ = await routed(dispatcher, 3)
    job = dispatcher.jobs[-1]
    async with db.session() as s, s.begin():
        await s.execute(
            update(OutboxRow).where(OutboxRow.id == job.outbox_id).values(routed_at=None)
        )
    [joined] = await add_subscribers(channel, 1)
    before = len(dispatcher.batches)

    rerun = await delivery.route(job)

    rows = await delivery_rows(message.id)  # type: ignore[arg-type]
    assert len(rows) == 4 and [r.id for r in rows][:3] == ids
    assert rows[-1].subscriber_id == joined
    enqueued = [i for b, _ in dispatcher.batches[before:] for i in b.delivery_ids]
    assert sorted(enqueued) == [r.id for r in rows] and rerun.deliveries == 4


async def test_warm_up_runs_the_hot_statements_and_changes_nothing(
    dispatcher: MemoryDispatcher, memory: MemoryEgress
) -> None:
    """A worker process runs each statement of the hot path once at start,
    matching no row: whatever is routed, owed or delivered stays as it was."""
    if not db.is_postgres():
        pytest.skip("the statements warmed are PostgreSQL's")
    await routed(dispatcher, 3)
    async with unchanged():
        await delivery.warm_up()


async def test_route_pages_through_more_subscribers_than_a_page(
    dispatcher: MemoryDispatcher, tune: Callable[..., Settings]
) -> None:
    tune(route_page_size=4, batch_size=3)
    author = await make_author()
    channel = await make_channel()
    subscriber_ids = await add_subscribers(channel, 10)
    message, _ = await send(author, channel)

    stats = await delivery.route(dispatcher.jobs[0])

    rows = await delivery_rows(message.id)  # type: ignore[arg-type]
    assert sorted(r.subscriber_id for r in rows) == subscriber_ids
    assert stats.deliveries == 10
    sizes = [len(b.delivery_ids) for b, _ in dispatcher.batches]
    assert all(1 <= n <= 3 for n in sizes) and len(sizes) == stats.batches >= 4
    enqueued = [i for b, _ in dispatcher.batches for i in b.delivery_ids]
    assert sorted(enqueued) == [r.id for r in rows]  # every delivery once, none twice


async def test_route_enqueues_one_batch_before_paging_the_rest_of_a_large_channel(
    dispatcher: MemoryDispatcher, tune: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first page is one batch, so a large channel's first deliveries go
    out while the routing task pages through the rest."""
    tune(route_page_size=6, batch_size=2)
    author = await make_author()
    channel = await make_channel()
    await add_subscribers(channel, 11)
    message, _ = await send(author, channel)
    calls: list[list[int]] = []

    async def enqueue_batches(batches: Sequence[Batch], countdown: float = 0.0) -> None:
        calls.append([len(b.delivery_ids) for b in batches])

    monkeypatch.setattr(dispatcher, "enqueue_batches", enqueue_batches)
    stats = await delivery.route(dispatcher.jobs[0])

    assert calls == [[2], [2, 2, 2], [2, 1]]  # pages of 2, 6 and the last 3
    assert stats.deliveries == 11
    rows = await delivery_rows(message.id)  # type: ignore[arg-type]
    assert len(rows) == 11


async def test_route_of_a_channel_without_subscribers_finishes_the_dispatch(
    dispatcher: MemoryDispatcher, memory: MemoryEgress
) -> None:
    author = await make_author()
    channel = await make_channel()
    _, dispatch = await send(author, channel)

    stats = await delivery.route(dispatcher.jobs[0])

    assert (stats.deliveries, stats.batches) == (0, 0)
    [result] = await dispatch.wait(timeout=5)
    assert (result.success, result.delivered_count, result.pending_count) == (True, 0, 0)


# -- delivering a batch -------------------------------------------------------------


async def test_deliver_records_one_attempt_per_try_and_marks_delivered(
    dispatcher: MemoryDispatcher, memory: MemoryEgress
) -> None:
    message, channel, ids, [batch] = await routed(dispatcher, 2, content="payload")
    before = utcnow()

    stats = await delivery.deliver(batch, claimant="t1")

    after = utcnow()
    assert (stats.claimed, stats.delivered, stats.retrying, stats.dead, stats.skipped) == (
        2,
        2,
        0,
        0,
        0,
    )
    rows = await delivery_rows(message.id)  # type: ignore[arg-type]
    for row in rows:
        assert (row.status, row.attempts, row.claimed_by, row.claimed_until) == (
            DeliveryStatus.DELIVERED,
            1,
            None,
            None,
        )
        assert row.next_attempt_at is None and row.last_error is None
        assert (
            before - timedelta(seconds=1) <= aware(row.delivered_at) <= after + timedelta(seconds=1)
        )
    attempts = await attempt_rows(*ids)
    assert [(a.delivery_id, a.attempt, a.status, a.transport) for a in attempts] == [
        (i, 1, AttemptStatus.DELIVERED, "memory") for i in ids
    ]
    for a in attempts:
        assert a.latency_ms is not None and a.latency_ms >= 0 and a.error is None
        assert aware(a.started_at) <= aware(a.finished_at)
        assert before - timedelta(seconds=1) <= aware(a.started_at)
        assert aware(a.finished_at) <= after + timedelta(seconds=1)
    assert sorted((s.delivery_id, s.subscriber_id) for s in memory.sent) == sorted(
        (r.id, r.subscriber_id) for r in rows
    )
    assert {(s.message_id, s.channel_id, s.content) for s in memory.sent} == {
        (message.id, channel.id, "payload")
    }


async def test_a_delivered_message_carries_its_references_without_being_a_reply(
    dispatcher: MemoryDispatcher, install: Callable[[Any], Any]
) -> None:
    seen: list[tuple[int | None, list[int]]] = []

    async def record(message: Message, channel: Channel, subscriber: Principal) -> None:
        seen.append((message.reply_to_id, message.references))

    install(FunctionEgress(record, name="memory"))
    author = await make_author()
    channel = await make_channel("memory")
    await add_subscribers(channel, 2)
    first, _ = await send(author, channel, "first")
    second, _ = await send(author, channel, "second")
    third = Message("cites both", author_id=author.id)
    third.add_reference(second.id).add_reference(first.id)  # type: ignore[arg-type]
    await third.send(channel)
    before = len(dispatcher.batches)
    await delivery.route(dispatcher.jobs[-1])
    [batch] = [b for b, _ in dispatcher.batches[before:]]

    stats = await delivery.deliver(batch, claimant="t1")

    assert stats.delivered == 2
    assert seen == [(None, [second.id, first.id])] * 2


async def test_a_redelivered_batch_skips_final_deliveries_and_writes_no_attempts(
    dispatcher: MemoryDispatcher, memory: MemoryEgress
) -> None:
    message, _, ids, [batch] = await routed(dispatcher, 3)
    await delivery.deliver(batch, claimant="t1")
    sent, attempts = list(memory.sent), await attempt_rows(*ids)

    again = await delivery.deliver(batch, claimant="t1")

    assert (again.claimed, again.delivered, again.skipped) == (0, 0, 3)
    assert memory.sent == sent
    assert [(a.id, a.attempt) for a in await attempt_rows(*ids)] == [
        (a.id, a.attempt) for a in attempts
    ]
    assert {r.attempts for r in await delivery_rows(message.id)} == {1}  # type: ignore[arg-type]


async def test_a_claimed_delivery_is_left_to_its_claimant(
    dispatcher: MemoryDispatcher, memory: MemoryEgress
) -> None:
    message, _, [held, expired, free], [batch] = await routed(dispatcher, 3)
    now = utcnow()
    await set_deliveries([held], claimed_by="a", claimed_until=now + timedelta(seconds=60))
    await set_deliveries([expired], claimed_by="a", claimed_until=now - timedelta(seconds=1))

    by_b = await delivery.deliver(batch, claimant="b")

    assert (by_b.claimed, by_b.skipped, by_b.delivered) == (2, 1, 2)
    assert sorted(s.delivery_id for s in memory.sent) == sorted([expired, free])
    rows = {r.id: r for r in await delivery_rows(message.id)}  # type: ignore[arg-type]
    assert (rows[held].status, rows[held].attempts, rows[held].claimed_by) == (
        DeliveryStatus.PENDING,
        0,
        "a",
    )
    assert await attempt_rows(held) == []

    by_a = await delivery.deliver(batch, claimant="a")  # the claimant's redelivered task

    assert (by_a.claimed, by_a.delivered) == (1, 1)
    assert [s.delivery_id for s in memory.sent].count(held) == 1
    assert [a.attempt for a in await attempt_rows(held, expired, free)] == [1, 1, 1]


async def test_transient_failure_schedules_a_retry_from_the_schedule(
    dispatcher: MemoryDispatcher, install: Callable[[Any], Any], tune: Callable[..., Settings]
) -> None:
    tune(retry_schedule="0,0.5,0.5")
    outcomes: list[str] = ["fail", "ok"]

    async def flaky(
        message: Message, channel: Channel, subscriber: Principal
    ) -> TransportResult | None:
        if outcomes.pop(0) == "fail":
            return TransportResult.failed(subscriber.id, "receiver busy", status_code=503)
        return None

    install(FunctionEgress(flaky))
    message, channel, [delivery_id], [batch] = await routed(dispatcher, 1)
    enqueued = len(dispatcher.batches)

    stats = await delivery.deliver(batch, claimant="t1")

    assert (stats.retrying, stats.delivered, stats.dead) == (1, 0, 0)
    [row] = await delivery_rows(message.id)  # type: ignore[arg-type]
    assert (row.status, row.attempts, row.last_status_code, row.last_error) == (
        DeliveryStatus.RETRYING,
        1,
        503,
        "receiver busy",
    )
    assert row.claimed_by is None
    delay = seconds_between(row.next_attempt_at, row.updated_at)
    assert 0.45 - 1e-3 <= delay <= 0.55 + 1e-3  # 0.5 s ± 10 % jitter
    assert abs(seconds_between(row.next_attempt_at, utcnow()) - 0.5) < 2
    [(retry_batch, countdown)] = dispatcher.batches[enqueued:]
    assert retry_batch == Batch(message.id, channel.id, (delivery_id,))  # type: ignore[arg-type]
    assert countdown == pytest.approx(delay, abs=0.06)
    [attempt] = await attempt_rows(delivery_id)
    assert (attempt.status, attempt.status_code, attempt.error) == (
        AttemptStatus.TRANSIENT,
        503,
        "receiver busy",
    )

    second = await delivery.deliver(retry_batch, claimant="t2")

    assert second.delivered == 1
    [row] = await delivery_rows(message.id)  # type: ignore[arg-type]
    assert (row.status, row.attempts, row.next_attempt_at) == (DeliveryStatus.DELIVERED, 2, None)
    assert [(a.attempt, a.status) for a in await attempt_rows(delivery_id)] == [
        (1, AttemptStatus.TRANSIENT),
        (2, AttemptStatus.DELIVERED),
    ]


async def test_retry_after_from_the_receiver_is_honoured(
    dispatcher: MemoryDispatcher, install: Callable[[Any], Any], tune: Callable[..., Settings]
) -> None:
    tune(retry_schedule="0,0.5,0.5")

    async def slow_down(
        message: Message, channel: Channel, subscriber: Principal
    ) -> TransportResult:
        return TransportResult.failed(subscriber.id, "HTTP 429", status_code=429, retry_after=7)

    install(FunctionEgress(slow_down))
    message, _, [delivery_id], [batch] = await routed(dispatcher, 1)
    enqueued = len(dispatcher.batches)

    await delivery.deliver(batch, claimant="t1")

    [row] = await delivery_rows(message.id)  # type: ignore[arg-type]
    assert row.status == DeliveryStatus.RETRYING
    delay = seconds_between(row.next_attempt_at, row.updated_at)
    assert 7 - 1e-3 <= delay <= 7 * 1.1 + 1e-3  # never earlier than asked
    assert abs(seconds_between(row.next_attempt_at, utcnow()) - 7) < 2
    [(_, countdown)] = dispatcher.batches[enqueued:]
    assert countdown == pytest.approx(delay, abs=0.06)

    # Not due yet: an early copy of the retry task claims nothing.
    early = await delivery.deliver(
        Batch(row.message_id, row.channel_id, (delivery_id,)), claimant="t2"
    )
    assert (early.claimed, early.skipped) == (0, 1)
    assert len(await attempt_rows(delivery_id)) == 1


async def test_a_long_retry_waits_in_the_database_for_the_sweeper(
    dispatcher: MemoryDispatcher, install: Callable[[Any], Any], tune: Callable[..., Settings]
) -> None:
    tune(retry_schedule="0,0.5,0.5", countdown_max=30)

    async def much_later(
        message: Message, channel: Channel, subscriber: Principal
    ) -> TransportResult:
        return TransportResult.failed(subscriber.id, "HTTP 503", status_code=503, retry_after=600)

    install(FunctionEgress(much_later))
    message, channel, [delivery_id], [batch] = await routed(dispatcher, 1)
    enqueued = len(dispatcher.batches)

    await delivery.deliver(batch, claimant="t1")

    [row] = await delivery_rows(message.id)  # type: ignore[arg-type]
    assert row.status == DeliveryStatus.RETRYING and row.queued_until is None
    assert seconds_between(row.next_attempt_at, row.updated_at) >= 600 - 1e-3
    assert dispatcher.batches[enqueued:] == []  # no countdown beyond countdown_max
    assert (await delivery.sweep()).enqueued == 0  # not due yet

    await set_deliveries([delivery_id], next_attempt_at=utcnow() - timedelta(seconds=1))
    swept = await delivery.sweep()

    assert swept.enqueued == 1
    assert dispatcher.batches[enqueued:] == [
        (Batch(message.id, channel.id, (delivery_id,)), 0.0)  # type: ignore[arg-type]
    ]


async def test_permanent_failure_is_dead_after_one_attempt_with_the_reason(
    dispatcher: MemoryDispatcher, memory: MemoryEgress, tune: Callable[..., Settings]
) -> None:
    tune(retry_schedule="0,0.5,0.5")
    message, _, [gone, fine], [batch] = await routed(dispatcher, 2)
    [row] = [r for r in await delivery_rows(message.id) if r.id == gone]  # type: ignore[arg-type]
    memory.fail_with[row.subscriber_id] = TransportResult.failed(
        row.subscriber_id, "HTTP 410: endpoint gone", permanent=True, status_code=410
    )
    enqueued = len(dispatcher.batches)

    stats = await delivery.deliver(batch, claimant="t1")

    assert (stats.dead, stats.delivered, stats.retrying) == (1, 1, 0)
    rows = {r.id: r for r in await delivery_rows(message.id)}  # type: ignore[arg-type]
    assert (rows[gone].status, rows[gone].attempts, rows[gone].last_error) == (
        DeliveryStatus.DEAD,
        1,
        "HTTP 410: endpoint gone",
    )
    assert rows[gone].next_attempt_at is None and rows[gone].last_status_code == 410
    assert rows[fine].status == DeliveryStatus.DELIVERED
    [attempt] = await attempt_rows(gone)
    assert (attempt.status, attempt.status_code) == (AttemptStatus.PERMANENT, 410)
    assert dispatcher.batches[enqueued:] == []  # no retry scheduled


async def test_exhausted_retries_give_up_and_a_retry_gets_a_fresh_schedule(
    dispatcher: MemoryDispatcher, install: Callable[[Any], Any], tune: Callable[..., Settings]
) -> None:
    tune(retry_schedule="0,0.5,0.5")

    async def down(message: Message, channel: Channel, subscriber: Principal) -> TransportResult:
        return TransportResult.failed(subscriber.id, "connection refused")

    install(FunctionEgress(down))
    message, _, [delivery_id], [batch] = await routed(dispatcher, 1)

    statuses = []
    for n in range(3):
        await delivery.deliver(batch, claimant=f"t{n}")
        [row] = await delivery_rows(message.id)  # type: ignore[arg-type]
        statuses.append(row.status)

    assert statuses == [DeliveryStatus.RETRYING, DeliveryStatus.RETRYING, DeliveryStatus.DEAD]
    assert (row.attempts, row.next_attempt_at) == (3, None)
    assert row.last_error == "gave up after 3 attempts: connection refused"
    assert [a.status for a in await attempt_rows(delivery_id)] == [AttemptStatus.TRANSIENT] * 3
    [dead] = await deliveries.dead_letters()
    assert dead.id == delivery_id and len(dead.attempt_log) == 3

    view = await deliveries.retry(delivery_id)
    assert view.status == DeliveryStatus.RETRYING
    await delivery.deliver(batch, claimant="t9")

    # Attempt 4 is the fresh schedule's first: a retry is scheduled, not death.
    [row] = await delivery_rows(message.id)  # type: ignore[arg-type]
    assert (row.status, row.attempts, row.retry_base) == (DeliveryStatus.RETRYING, 4, 3)
    assert 0.45 - 1e-3 <= seconds_between(row.next_attempt_at, row.updated_at) <= 0.55 + 1e-3


async def test_a_transport_that_raises_costs_a_retry_not_the_batch(
    dispatcher: MemoryDispatcher, install: Callable[[Any], Any], tune: Callable[..., Settings]
) -> None:
    tune(retry_schedule="0,0.5,0.5")

    class Broken(MemoryEgress):
        async def send(self, message: Any, channel: Any, subscribers: Any) -> list[TransportResult]:
            raise RuntimeError("transport bug")

    install(Broken())
    message, _, ids, [batch] = await routed(dispatcher, 2)

    stats = await delivery.deliver(batch, claimant="t1")

    assert stats.retrying == 2
    rows = await delivery_rows(message.id)  # type: ignore[arg-type]
    assert {(r.status, r.last_error) for r in rows} == {
        (DeliveryStatus.RETRYING, "RuntimeError: transport bug")
    }
    assert [a.attempt for a in await attempt_rows(*ids)] == [1, 1]


async def test_a_breaker_settle_that_fails_costs_no_retry_and_leaves_nothing_running(
    dispatcher: MemoryDispatcher, memory: MemoryEgress, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The breakers are settled while the outcomes are written: a failure
    # there comes after the requests went through and must not undo them.
    async def broken(*_: Any) -> None:
        raise RuntimeError("health store down")

    monkeypatch.setattr(endpoints.Gate, "settle", broken)
    message, _, ids, [batch] = await routed(dispatcher, 2)

    stats = await delivery.deliver(batch, claimant="t1")

    assert (stats.delivered, stats.retrying) == (2, 0)
    rows = await delivery_rows(message.id)  # type: ignore[arg-type]
    assert {(r.status, r.claimed_by) for r in rows} == {(DeliveryStatus.DELIVERED, None)}
    assert [a.attempt for a in await attempt_rows(*ids)] == [1, 1]
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_a_batch_with_nothing_to_claim_leaves_nothing_running(
    dispatcher: MemoryDispatcher, memory: MemoryEgress
) -> None:
    # On PostgreSQL the message is read beside the claim; a batch that finds
    # everything final must not leave that read behind on the loop.
    message, _, ids, [batch] = await routed(dispatcher, 2)
    await delivery.deliver(batch, claimant="t1")

    again = await delivery.deliver(batch, claimant="t2")

    assert (again.claimed, again.skipped) == (0, 2) and len(memory.sent) == 2
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_a_manual_retry_does_not_break_the_claim_of_a_running_batch(
    dispatcher: MemoryDispatcher, memory: MemoryEgress
) -> None:
    message, _, [delivery_id], [batch] = await routed(dispatcher, 1)
    # Worker "a" has claimed the delivery and is sending it right now.
    await set_deliveries(
        [delivery_id], claimed_by="a", claimed_until=utcnow() + timedelta(seconds=300)
    )

    with contextlib.suppress(ValidationError):  # refusing is as good as leaving it alone
        await deliveries.retry(delivery_id)
    stolen = await delivery.deliver(batch, claimant="b")

    # Two copies in flight would also send it twice.
    assert stolen.claimed == 0
    assert memory.sent == []


async def test_a_batch_that_outlived_its_lease_leaves_the_new_claimant_s_state_alone(
    dispatcher: MemoryDispatcher, install: Callable[[Any], Any]
) -> None:
    message, _, ids, [batch] = await routed(dispatcher, 2)
    taken, kept = ids

    async def slow_send(_message: Any, _channel: Any, subscriber: Principal) -> None:
        # While "a" sends, its lease runs out and "b" claims one of its
        # deliveries, as the sweeper's re-enqueued task would.
        if subscriber.delivery_id == taken:
            await set_deliveries(
                [taken],
                claimed_by="b",
                claimed_until=utcnow() + timedelta(seconds=300),
                claims=1,
            )

    install(FunctionEgress(slow_send, name="memory"))

    stats = await delivery.deliver(batch, claimant="a")

    assert stats.delivered == 2  # both were sent; both attempts are recorded
    assert [(a.delivery_id, a.attempt) for a in await attempt_rows(*ids)] == [
        (taken, 1),
        (kept, 1),
    ]
    by_id = {r.id: r for r in await delivery_rows(message.id)}  # type: ignore[arg-type]
    # "b" holds the one it took: its claim and state are as "b" left them,
    # but "a"'s try is counted.
    assert (by_id[taken].claimed_by, by_id[taken].status, by_id[taken].attempts) == (
        "b",
        DeliveryStatus.PENDING,
        1,
    )
    assert (by_id[kept].claimed_by, by_id[kept].status, by_id[kept].attempts) == (
        None,
        DeliveryStatus.DELIVERED,
        1,
    )


@pytest.mark.parametrize("first", ["stale batch", "new claimant"])
async def test_both_tries_of_a_delivery_taken_over_are_recorded_under_numbers_of_their_own(
    dispatcher: MemoryDispatcher, install: Callable[[Any], Any], first: str
) -> None:
    """A batch that outlived its lease and the worker that took a delivery
    over both sent it: two attempt rows, numbered 1 and 2 in the order they
    were written, and the delivery counts two attempts, whichever records
    first."""
    message, _, [taken], [batch] = await routed(dispatcher, 1)
    sent: list[str] = []

    async def send(_message: Any, _channel: Any, subscriber: Principal) -> None:
        if not sent:  # "a" is sending: its lease runs out and "b" takes over
            sent.append("a")
            # "b" claims it: the claim it would make once "a"'s lease ran out.
            until = utcnow() + timedelta(seconds=300)
            await set_deliveries([taken], claimed_by="b", claimed_until=until, claims=0)
            if first == "new claimant":
                await delivery.deliver(Batch(batch.message_id, batch.channel_id, (taken,)), "b")
        else:
            sent.append("b")

    install(FunctionEgress(send, name="memory"))

    await delivery.deliver(batch, claimant="a")
    if first == "stale batch":
        await delivery.deliver(Batch(batch.message_id, batch.channel_id, (taken,)), "b")

    assert sent == ["a", "b"]
    rows = await attempt_rows(taken)
    assert [a.attempt for a in rows] == [1, 2]
    [row] = await delivery_rows(message.id)  # type: ignore[arg-type]
    assert (row.status, row.attempts, row.claimed_by) == (DeliveryStatus.DELIVERED, 2, None)


def _numbered(sql: str) -> str:
    """A statement's ``%(name)s`` parameters as ``$1``, ``$2``... (EXPLAIN GENERIC_PLAN)."""
    numbers: dict[str, int] = {}
    return re.sub(r"%\((\w+)\)s", lambda m: f"${numbers.setdefault(m[1], len(numbers) + 1)}", sql)


def _delivered_record(ids: Any, claimant: str, now: datetime) -> dict[str, Any]:
    """The record statement's parameters for ``ids`` all delivered with 200."""
    from channels_core import delivery_pg

    attempts = [
        {"delivery_id": i, "status": "delivered", "status_code": 200, "error": None}
        | {"latency_ms": 1.0}
        for i in ids
    ]
    states = [
        {"id": i, "status": DeliveryStatus.DELIVERED, "last_status_code": 200}
        | {"last_error": None, "next_attempt_at": None, "queued_until": None}
        for i in ids
    ]
    return delivery_pg.record_params(attempts, states, "memory", None, now, now, claimant)


async def test_a_stale_record_and_a_claim_locking_in_opposite_orders_both_complete(
    dispatcher: MemoryDispatcher,
) -> None:
    """Batch "a" outlived its lease: it still holds q, and "b" (whose lease ran
    out too) took p. While "a" records both tries, "c", re-enqueued by the
    sweeper, claims both. The record locks q, then p; the claim p, then q.
    PostgreSQL aborts one of the two; it runs again, and neither is lost."""
    if not db.is_postgres():
        pytest.skip("row locks and deadlocks are PostgreSQL's")
    from channels_core import delivery_pg

    message, _, [p, q], _ = await routed(dispatcher, 2)
    past = utcnow() - timedelta(seconds=5)
    await set_deliveries([p], claimed_by="b", claimed_until=past, next_attempt_at=past)
    await set_deliveries([q], claimed_by="a", claimed_until=past, next_attempt_at=past)
    now = utcnow()
    params = _delivered_record((p, q), "a", now)
    async with db.session() as s, s.begin():
        # Hold q so that the record stops between its two locks.
        await s.execute(
            select(DeliveryRow.id).where(DeliveryRow.id == q).with_for_update(key_share=False)
        )
        recording = asyncio.ensure_future(delivery_pg.record(params))
        await asyncio.sleep(0.3)
        claiming = asyncio.ensure_future(delivery_pg.claim([p, q], "c", utcnow(), 300))
        await asyncio.sleep(0.3)
    await asyncio.wait_for(asyncio.gather(recording, claiming), timeout=30)

    by_id = {r.id: r for r in await delivery_rows(message.id)}  # type: ignore[arg-type]
    assert sorted((a.delivery_id, a.attempt) for a in await attempt_rows(p, q)) == [(p, 1), (q, 1)]
    # Each try counted once; "c" holds whatever the record did not finish.
    assert (by_id[p].attempts, by_id[q].attempts) == (1, 1)
    assert by_id[p].claimed_by == "c" and by_id[p].status == DeliveryStatus.PENDING
    assert by_id[q].status == DeliveryStatus.DELIVERED or by_id[q].claimed_by == "c"


def _cte_plan(plan: str, name: str) -> str:
    """The lines of an EXPLAIN under ``CTE name``."""
    lines = plan.splitlines()
    [start] = [i for i, line in enumerate(lines) if line.strip() == f"CTE {name}"]
    depth = len(lines[start]) - len(lines[start].lstrip())
    end = next(
        (
            i
            for i in range(start + 1, len(lines))
            if len(lines[i]) - len(lines[i].lstrip()) <= depth
        ),
        len(lines),
    )
    return "\n".join(lines[start:end])


async def test_recording_a_batch_looks_for_deliveries_taken_over_by_index(
    dispatcher: MemoryDispatcher,
) -> None:
    """The record statement looks for deliveries another worker took over
    (none, as a rule) by the primary key's index, planned for the values or
    generic: a scan of the table would cost every batch its size."""
    if not db.is_postgres():
        pytest.skip("the plan is PostgreSQL's")
    from channels_core import delivery_pg

    message, channel, _, _ = await routed(dispatcher, 1)
    async with db.session() as s, s.begin():
        await s.execute(
            text(
                new_principals(20000)
                + " INSERT INTO deliveries (message_id, channel_id, subscriber_id, transport,"
                " status, attempts, retry_base, claims, claimed_by, created_at, updated_at)"
                " SELECT :message, :channel, id, 'memory', 'pending', 0, 0, 1, 'plan', now(), now()"
                " FROM p"
            ),
            {"message": message.id, "channel": channel.id},
        )
        ids = list(
            await s.scalars(
                select(DeliveryRow.id).where(DeliveryRow.claimed_by == "plan").limit(500)
            )
        )
    now = utcnow()
    statement = delivery_pg._record_statement(False)
    params = _delivered_record(ids, "plan", now)
    async with db.autocommit() as conn:
        await conn.exec_driver_sql("ANALYZE deliveries")
        compiled = statement.compile(dialect=conn.dialect)
        values = {**compiled.params, **params}
        for explain in ("EXPLAIN", "EXPLAIN (GENERIC_PLAN)"):
            sql = str(compiled) if explain == "EXPLAIN" else _numbered(str(compiled))
            plan = "\n".join(
                row[0]
                for row in await conn.exec_driver_sql(
                    f"{explain} {sql}", values if explain == "EXPLAIN" else ()
                )
            )
            stale = _cte_plan(plan, "stale")
            assert "Index Scan using pk_deliveries" in stale, plan
            assert "Seq Scan" not in stale, plan
        await conn.execute(statement, params)
    rows = await attempt_rows(*ids)
    assert [(a.attempt, a.status) for a in rows] == [(1, AttemptStatus.DELIVERED)] * 500


# -- the sweeper --------------------------------------------------------------------


async def test_sweep_relays_outbox_entries_whose_relay_time_passed(
    dispatcher: MemoryDispatcher, memory: MemoryEgress
) -> None:
    author = await make_author()
    channel = await make_channel()
    await add_subscribers(channel, 1)
    message, _ = await send(author, channel)
    [outbox] = await outbox_rows(message.id)  # type: ignore[arg-type]
    job = RouteJob(outbox.id, message.id, channel.id)  # type: ignore[arg-type]
    dispatcher.jobs.clear()  # as if the enqueue at send time was lost

    assert (await delivery.sweep()).relayed == 0  # not due yet
    assert dispatcher.jobs == []

    async def relay_due() -> None:
        async with db.session() as s, s.begin():
            await s.execute(
                update(OutboxRow)
                .where(OutboxRow.id == outbox.id)
                .values(relay_at=utcnow() - timedelta(seconds=1))
            )

    await relay_due()
    swept = await delivery.sweep()

    assert swept.relayed == 1
    assert dispatcher.jobs == [job]
    [outbox] = await outbox_rows(message.id)  # type: ignore[arg-type]
    assert outbox.relays == 1 and aware(outbox.relay_at) > utcnow()
    assert (await delivery.sweep()).relayed == 0  # pushed back: not relayed twice

    await delivery.route(job)
    await relay_due()
    assert (await delivery.sweep()).relayed == 0  # routed entries are never relayed
    assert dispatcher.jobs == [job]


async def test_sweep_enqueues_due_deliveries_whose_queue_lease_passed(
    dispatcher: MemoryDispatcher, memory: MemoryEgress, tune: Callable[..., Settings]
) -> None:
    tune(batch_size=2)
    message, channel, ids, _ = await routed(dispatcher, 6)
    lost, claimed, later, done, lost2, lost3 = ids
    past = utcnow() - timedelta(seconds=1)
    enqueued = len(dispatcher.batches)

    assert (await delivery.sweep()).enqueued == 0  # all queued within their lease

    await set_deliveries([lost, lost2, lost3, claimed, later, done], queued_until=past)
    await set_deliveries([claimed], claimed_by="w", claimed_until=utcnow() + timedelta(seconds=60))
    await set_deliveries([later], next_attempt_at=utcnow() + timedelta(seconds=60))
    await set_deliveries([done], status=DeliveryStatus.DELIVERED)

    swept = await delivery.sweep()

    assert swept.enqueued == 3
    new = dispatcher.batches[enqueued:]
    assert sorted(i for b, _ in new for i in b.delivery_ids) == sorted([lost, lost2, lost3])
    assert all(len(b.delivery_ids) <= 2 and c == 0.0 for b, c in new)
    assert {(b.message_id, b.channel_id) for b, _ in new} == {(message.id, channel.id)}
    rows = {r.id: r for r in await delivery_rows(message.id)}  # type: ignore[arg-type]
    assert aware(rows[lost].queued_until) > utcnow()
    assert (await delivery.sweep()).enqueued == 0  # queued again: not enqueued twice


# -- dead letters, retry and replay --------------------------------------------------


async def test_retry_and_replay_requeue_dead_letters_with_a_fresh_schedule(
    dispatcher: MemoryDispatcher, install: Callable[[Any], Any], tune: Callable[..., Settings]
) -> None:
    tune(retry_schedule="0,0.5,0.5")
    refuse = {"on": True}

    async def gate(
        message: Message, channel: Channel, subscriber: Principal
    ) -> TransportResult | None:
        if refuse["on"]:
            return TransportResult.failed(
                subscriber.id, "HTTP 404", permanent=True, status_code=404
            )
        return None

    install(FunctionEgress(gate))
    message, channel, [first, second], [batch] = await routed(dispatcher, 2)
    await delivery.deliver(batch, claimant="t1")

    dead = await deliveries.dead_letters()
    assert sorted(d.id for d in dead) == [first, second]
    assert {(d.status, d.last_error, len(d.attempt_log)) for d in dead} == {
        (DeliveryStatus.DEAD, "HTTP 404", 1)
    }
    assert [a.status for a in dead[0].attempt_log] == [AttemptStatus.PERMANENT]
    assert await deliveries.dead_letters(channel_id=channel.id + 1000) == []  # type: ignore[operator]

    refuse["on"] = False
    enqueued = len(dispatcher.batches)
    view = await deliveries.retry(first)

    assert (view.id, view.status) == (first, DeliveryStatus.RETRYING)
    rows = {r.id: r for r in await delivery_rows(message.id)}  # type: ignore[arg-type]
    assert (rows[first].status, rows[first].retry_base, rows[first].claimed_by) == (
        DeliveryStatus.RETRYING,
        1,
        None,
    )
    assert abs(seconds_between(rows[first].next_attempt_at, utcnow())) < 2
    assert rows[second].status == DeliveryStatus.DEAD
    [(retry_batch, _)] = dispatcher.batches[enqueued:]
    assert retry_batch == Batch(message.id, channel.id, (first,))  # type: ignore[arg-type]

    assert (await delivery.deliver(retry_batch, claimant="t2")).delivered == 1
    assert [d.id for d in await deliveries.dead_letters()] == [second]

    with pytest.raises(ValidationError):
        await deliveries.retry(first)  # delivered: nothing to retry
    with pytest.raises(NotFoundError):
        await deliveries.retry(10**9)

    enqueued = len(dispatcher.batches)
    replayed = await deliveries.replay(message.id)  # type: ignore[arg-type]

    assert [v.id for v in replayed] == [second]  # the delivered one is left alone
    [(replay_batch, _)] = dispatcher.batches[enqueued:]
    assert (await delivery.deliver(replay_batch, claimant="t3")).delivered == 1
    rows = {r.id: r for r in await delivery_rows(message.id)}  # type: ignore[arg-type]
    assert {r.status for r in rows.values()} == {DeliveryStatus.DELIVERED}
    assert (rows[first].attempts, rows[second].attempts) == (2, 2)
    assert await deliveries.dead_letters() == []
    assert await deliveries.replay(message.id) == []  # type: ignore[arg-type]


# -- Dispatch.wait ---------------------------------------------------------------------


async def test_dispatch_wait_returns_final_results_once_the_engine_has_run(
    dispatcher: MemoryDispatcher, memory: MemoryEgress
) -> None:
    author = await make_author()
    channel = await make_channel()
    subscriber_ids = await add_subscribers(channel, 3)
    memory.fail_with[subscriber_ids[0]] = TransportResult.failed(
        subscriber_ids[0], "mailbox gone", permanent=True
    )
    message, dispatch = await send(author, channel)

    with pytest.raises(DispatchTimeout):
        await dispatch.wait(timeout=0.1)  # nothing has run yet

    waiting = asyncio.ensure_future(dispatch.wait(timeout=5))
    await delivery.route(dispatcher.jobs[0])
    for batch, _ in list(dispatcher.batches):
        await delivery.deliver(batch, claimant="t1")
    [result] = await waiting

    assert (result.channel_id, result.message_id) == (channel.id, message.id)
    assert (result.delivered_count, result.failed_count, result.pending_count) == (2, 1, 0)
    assert result.success is False and result.final
    assert result.errors == [f"subscriber {subscriber_ids[0]}: mailbox gone"]


async def test_route_falls_back_to_the_first_available_transport(
    dispatcher: MemoryDispatcher, memory: MemoryEgress, real_http: HttpEgress
) -> None:
    memory.available = False

    message, _, _, _ = await routed(dispatcher, 2)

    assert {r.transport for r in await delivery_rows(message.id)} == {"http"}  # type: ignore[arg-type]
    [outbox] = await outbox_rows(message.id)  # type: ignore[arg-type]
    assert outbox.transport == "http"


# -- the real HTTP transport -----------------------------------------------------------


async def test_a_subscriber_without_the_alias_its_transport_needs_ends_dead(
    dispatcher: MemoryDispatcher, real_http: HttpEgress
) -> None:
    message, _, [delivery_id], [batch] = await routed(
        dispatcher, 1, transport="http", aliases={"email": "bot@example.com"}
    )

    stats = await delivery.deliver(batch, claimant="t1")

    assert stats.dead == 1
    [row] = await delivery_rows(message.id)  # type: ignore[arg-type]
    assert (row.status, row.attempts, row.transport) == (DeliveryStatus.DEAD, 1, "http")
    assert row.last_error is not None and "'endpoint'" in row.last_error
    [attempt] = await attempt_rows(delivery_id)
    assert attempt.status == AttemptStatus.PERMANENT and attempt.transport == "http"


async def test_http_webhook_secret_is_generated_on_first_use_and_kept(
    dispatcher: MemoryDispatcher, real_http: HttpEgress, receiver: WebhookReceiver
) -> None:
    author = await make_author()
    channel = await make_channel("http")
    fresh = await Principal("bot", aliases={"endpoint": receiver.url("/fresh")}).save()
    own_secret = new_secret()
    keeper = await Principal(
        "bot", aliases={"endpoint": receiver.url("/keeper"), "webhook_secret": own_secret}
    ).save()
    for p in (fresh, keeper):
        await channel.subscribe(p.id)  # type: ignore[arg-type]

    secrets_seen: list[str] = []
    for round_ in range(2):
        message, _ = await send(author, channel, f"round {round_}")
        before = len(dispatcher.batches)
        await delivery.route(dispatcher.jobs[-1])
        for batch, _ in dispatcher.batches[before:]:
            stats = await delivery.deliver(batch, claimant="t1")
            assert stats.delivered == len(batch.delivery_ids), stats.outcomes

        reloaded = await Principal.get(fresh.id)  # type: ignore[arg-type]
        assert reloaded is not None
        secret = reloaded.get_alias("webhook_secret")
        assert secret is not None and secret.startswith("whsec_")
        secrets_seen.append(secret)
        kept = await Principal.get(keeper.id)  # type: ignore[arg-type]
        assert kept is not None and kept.get_alias("webhook_secret") == own_secret

        rows = {r.subscriber_id: r.id for r in await delivery_rows(message.id)}  # type: ignore[arg-type]
        [got] = receiver.for_path("/fresh")[round_:]
        assert got.webhook_id == f"dlv_{rows[fresh.id]}"
        assert receiver.verify(got, secret)["data"]["content"] == f"round {round_}"
        [got] = receiver.for_path("/keeper")[round_:]
        assert receiver.verify(got, own_secret)["data"]["message_id"] == message.id

    assert secrets_seen[0] == secrets_seen[1]  # generated once, then reused


# -- endpoint health and poison batches ------------------------------------------------


async def test_an_open_breaker_defers_deliveries_without_spending_an_attempt(
    dispatcher: MemoryDispatcher,
    real_http: HttpEgress,
    receiver: WebhookReceiver,
    tune: Callable[..., Settings],
    broker_url: str,
) -> None:
    tune(broker_url=broker_url)
    url = receiver.url(f"/open-{next(_serial)}-{uuid.uuid4().hex[:6]}")
    client = shared_redis.client()
    assert client is not None
    seconds, micros = await client.time()
    until = seconds + micros / 1e6 + 20
    await client.hset(endpoints.breaker_key(url), mapping={"state": "open", "until": until})
    message, _, ids, [batch] = await routed(
        dispatcher, 3, transport="http", aliases={"endpoint": url}
    )
    before = len(dispatcher.batches)
    started = utcnow()

    stats = await delivery.deliver(batch, claimant="t1")

    assert (stats.deferred, stats.delivered, stats.retrying, stats.dead) == (3, 0, 0, 0)
    assert receiver.for_path(url.removeprefix(receiver.base_url)) == []
    assert await attempt_rows(*ids) == []
    for row in await delivery_rows(message.id):  # type: ignore[arg-type]
        assert (row.status, row.attempts, row.claimed_by, row.claims) == ("pending", 0, None, 0)
        assert 15 <= seconds_between(row.next_attempt_at, started) <= 21
    # They come back on a countdown when the breaker's cool-down ends.
    [(again, countdown)] = dispatcher.batches[before:]
    assert sorted(again.delivery_ids) == sorted(ids) and 15 <= countdown <= 21
    await client.delete(endpoints.breaker_key(url))


async def test_a_batch_that_killed_its_worker_is_split_and_the_poison_ends_dead(
    dispatcher: MemoryDispatcher, memory: MemoryEgress
) -> None:
    message, _, ids, [batch] = await routed(dispatcher, 3)
    # As a worker SIGKILLed mid-batch leaves them: claimed once, lease run out.
    past = utcnow() - timedelta(seconds=1)
    await set_deliveries(ids, claims=1, claimed_by="dead-task", claimed_until=past)
    before = len(dispatcher.batches)

    stats = await delivery.deliver(batch, claimant="dead-task")

    assert (stats.split, stats.delivered) == (3, 0) and memory.sent == []
    singles = [b.delivery_ids for b, _ in dispatcher.batches[before:]]
    assert sorted(singles) == [(i,) for i in ids]
    rows = await delivery_rows(message.id)  # type: ignore[arg-type]
    assert {(r.claims, r.claimed_by, r.status) for r in rows} == {(1, None, "pending")}

    # The poisonous one kills its worker once more on its own; then it is dead.
    poison, *healthy = ids
    await set_deliveries([poison], claims=get_settings().poison_claims - 1)
    dead = await delivery.deliver(Batch(message.id, batch.channel_id, (poison,)), "single-1")  # type: ignore[arg-type]
    assert dead.dead == 1 and memory.sent == []
    for i in healthy:
        assert (
            await delivery.deliver(Batch(message.id, batch.channel_id, (i,)), f"s{i}")
        ).delivered == 1  # type: ignore[arg-type]
    by_id = {r.id: r for r in await delivery_rows(message.id)}  # type: ignore[arg-type]
    assert by_id[poison].status == DeliveryStatus.DEAD
    assert (
        by_id[poison].last_error == "its worker died 2 times while delivering it; not tried again"
    )
    [attempt] = await attempt_rows(poison)
    assert attempt.status == AttemptStatus.PERMANENT
    assert {by_id[i].status for i in healthy} == {DeliveryStatus.DELIVERED}


@pytest.fixture
def health(
    tune: Callable[..., Settings], broker_url: str, real_http: HttpEgress
) -> Callable[..., Settings]:
    """The real HTTP transport, endpoint health on the real Valkey; ``tune`` for the rest."""
    tune(broker_url=broker_url)
    return tune


@dataclass
class _Crowd:
    message: Message
    ids: list[int]
    batch: Batch
    before: int  # batches enqueued before the test's delivery
    gate: endpoints.Gate  # the other worker's
    other: endpoints.Admission  # the other worker's batch, holding the host's room
    url: str  # every subscriber's endpoint


def _on(url: str, count: int = 1) -> list[Principal]:
    """Recipients of another worker's batch to ``url``."""
    found = []
    for _ in range(count):
        principal = Principal("bot").set_alias("endpoint", url)
        principal.id = 10**9 + next(_serial)
        principal.delivery_id = 10**9 + principal.id
        found.append(principal)
    return found


def _endpoint(principal: Principal) -> str | None:
    return principal.get_alias("endpoint")


@contextlib.asynccontextmanager
async def _host_filled_by_another_batch(
    dispatcher: MemoryDispatcher,
    receiver: WebhookReceiver,
    subscribers: int,
    *,
    known_good: bool = False,
) -> AsyncIterator[_Crowd]:
    """A batch routed to ``subscribers`` subscribers of one endpoint on the
    receiver's host, with the host's in-flight cap (5) taken by another
    worker's batch. ``known_good``: the endpoint has answered lately (no canary).

    Leases other tests left on this host (admitted, never settled) are
    cleared first, so they do not count here.
    """
    url = receiver.url(f"/crowded-{next(_serial)}-{uuid.uuid4().hex[:6]}")
    client = shared_redis.client()
    assert client is not None
    keys = endpoints._host_flight_keys(endpoints.host_of(url))
    await client.delete(*keys)
    try:
        message, _, ids, [batch] = await routed(
            dispatcher, subscribers, transport="http", aliases={"endpoint": url}
        )
        before = len(dispatcher.batches)
        gate = endpoints.Gate()
        if known_good:
            probe = await gate.admit(_endpoint, _on(url))
            [p] = probe.allowed
            await gate.settle(probe, [TransportResult.delivered(p.id, status_code=200)])
        others = [p for i in range(5) for p in _on(f"{url}-other-{i}")]
        other = await gate.admit(_endpoint, others)
        assert len(other.allowed) + len(other.held) == 5  # the host is full
        yield _Crowd(message, ids, batch, before, gate, other, url)
    finally:
        await client.delete(*keys)


async def test_a_batch_crowded_out_of_the_host_cap_waits_for_room_and_sends_it_all(
    dispatcher: MemoryDispatcher, receiver: WebhookReceiver, health: Callable[..., Settings]
) -> None:
    health(host_max_in_flight=5, in_flight_hold=5.0)
    async with _host_filled_by_another_batch(dispatcher, receiver, 8) as crowd:
        running = asyncio.ensure_future(delivery.deliver(crowd.batch, claimant="t1"))
        await asyncio.sleep(0.3)
        assert not running.done() and receiver.count() == 0
        await crowd.gate.settle(crowd.other, [])  # the other batch ends: room for 5 of the 8
        stats = await asyncio.wait_for(running, 10)

    # All of it went out in this run (a canary, 4 behind it, then 3) without
    # going back to the queue.
    assert (stats.delivered, stats.deferred) == (8, 0), stats
    assert receiver.count() == 8
    assert dispatcher.batches[crowd.before :] == []
    assert [a.attempt for a in await attempt_rows(*crowd.ids)] == [1] * 8
    rows = await delivery_rows(crowd.message.id)  # type: ignore[arg-type]
    assert {(r.status, r.attempts) for r in rows} == {(DeliveryStatus.DELIVERED, 1)}


async def test_a_batch_still_crowded_after_the_hold_goes_back_to_the_queue_untried(
    dispatcher: MemoryDispatcher, receiver: WebhookReceiver, health: Callable[..., Settings]
) -> None:
    health(host_max_in_flight=5, in_flight_hold=0.3)
    async with _host_filled_by_another_batch(dispatcher, receiver, 3) as crowd:
        started = asyncio.get_running_loop().time()
        stats = await delivery.deliver(crowd.batch, claimant="t1")
        waited = asyncio.get_running_loop().time() - started
        await crowd.gate.settle(crowd.other, [])

    assert (stats.deferred, stats.delivered, stats.retrying) == (3, 0, 0), stats
    assert 0.2 <= waited < 2, waited
    assert receiver.count() == 0 and await attempt_rows(*crowd.ids) == []
    for row in await delivery_rows(crowd.message.id):  # type: ignore[arg-type]
        assert (row.status, row.attempts, row.claimed_by) == ("pending", 0, None)
    [(again, countdown)] = dispatcher.batches[crowd.before :]
    assert sorted(again.delivery_ids) == sorted(crowd.ids) and 0 < countdown <= 1


async def _held_on_host(url: str) -> int:
    client = shared_redis.client()
    assert client is not None
    flight, _ = endpoints._host_flight_keys(endpoints.host_of(url))
    return sum(int(v) for v in await client.hvals(flight))


async def test_a_batch_booked_wholly_for_later_frees_its_room_at_once(
    dispatcher: MemoryDispatcher, receiver: WebhookReceiver, health: Callable[..., Settings]
) -> None:
    # Every slot is booked beyond the hold, so nothing is sent now.
    health(rate_limit_burst=0.1, rate_limit_hold=0.0)
    async with _host_filled_by_another_batch(dispatcher, receiver, 3) as crowd:
        await crowd.gate.settle(crowd.other, [])  # the host is free again
        # Bookings are keyed by delivery id, which the other database's run reused.
        client = shared_redis.client()
        assert client is not None
        bookings = [endpoints._booking_key(i) for i in crowd.ids]
        await client.delete(*bookings)
        await endpoints.set_rate_limit(crowd.url, 10)  # a burst of 1 ...
        spent = await crowd.gate.admit(_endpoint, _on(crowd.url))
        await crowd.gate.settle(spent, [])  # ... taken: every slot now is a later one
        try:
            stats = await delivery.deliver(crowd.batch, claimant="t1")
            held = await _held_on_host(crowd.url)
        finally:
            await endpoints.set_rate_limit(crowd.url, None)
            await client.delete(*bookings)

    assert (stats.deferred, stats.delivered) == (3, 0), stats
    assert receiver.count() == 0
    assert held == 0  # no room is held for sends booked for later


async def test_what_went_out_stays_delivered_when_asking_again_for_room_fails(
    dispatcher: MemoryDispatcher,
    receiver: WebhookReceiver,
    health: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    health(host_max_in_flight=5, in_flight_hold=5.0)
    admit = endpoints.Gate.admit
    asked = 0

    async def second_ask_fails(self: endpoints.Gate, *args: Any, **kwargs: Any) -> Any:
        nonlocal asked
        asked += 1
        if asked == 2:
            raise RuntimeError("Redis went away between two asks")
        return await admit(self, *args, **kwargs)

    async with _host_filled_by_another_batch(dispatcher, receiver, 8, known_good=True) as crowd:
        await crowd.gate.settle(crowd.other, [])  # room for 5 of the 8
        monkeypatch.setattr(endpoints.Gate, "admit", second_ask_fails)
        stats = await delivery.deliver(crowd.batch, claimant="t1")

    assert asked == 2 and receiver.count() == 5
    # The 5 sent are delivered; the 3 never sent wait for a retry.
    assert (stats.delivered, stats.retrying) == (5, 3), stats
    rows = await delivery_rows(crowd.message.id)  # type: ignore[arg-type]
    assert (
        sorted(r.status for r in rows)
        == [DeliveryStatus.DELIVERED] * 5 + [DeliveryStatus.RETRYING] * 3
    )
