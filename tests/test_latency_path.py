"""A routing task's one small batch, delivered in place (``workers.in_place``).

No worker process: the ``database`` fixture's real database (SQLite and
PostgreSQL), the ``memory`` egress, and a broker dispatcher that records
what it would publish instead of publishing it. Each test plays the routing
task by running ``delivery.route`` under a ``DeliverInPlace``, as
``route_message`` does.
"""

from __future__ import annotations

import ast
import itertools
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import insert

from channels_core import db, delivery
from channels_core.dispatch import Batch, MemoryDispatcher, RouteJob, set_dispatcher
from channels_core.models import (
    DeliveryStatus,
    OutboxRow,
    PrincipalRow,
    SubscriptionRow,
)
from channels_core.names import DELIVER_TASK
from channels_core.permissions import SUBMIT
from channels_core.primitives import Channel, Message, Permission, Principal, Role
from channels_core.transports.memory import MemoryEgress
from channels_core.transports.registry import egress_registry
from producer.broker import BrokerDispatcher
from tests.e2e.helpers import deliveries
from workers import in_place, runtime
from workers.app import _task_context

pytestmark = pytest.mark.timeout(60)

_serial = itertools.count(1)
ROUTE_ID = "7b0c2f8e-1111-4222-8333-944455556666"


class RecordingBroker(BrokerDispatcher):
    """Publishes nothing: records the batches it was handed."""

    def __init__(self) -> None:
        super().__init__(Celery("test-latency-path", set_as_current=False))
        self.sent: list[tuple[list[Batch], float, list[str] | None]] = []

    def send_routes(self, jobs: Sequence[RouteJob]) -> None:
        raise AssertionError("routing enqueues no routes")

    def send_batches(
        self,
        batches: Sequence[Batch],
        countdown: float = 0.0,
        task_ids: Sequence[str] | None = None,
    ) -> None:
        self.sent.append((list(batches), countdown, list(task_ids) if task_ids else None))


class Died(BaseException):
    """Stands for the pool process dying: nothing below the task catches it."""


@pytest.fixture
def memory(database: str) -> Iterator[MemoryEgress]:
    saved = egress_registry._instances.get("memory")
    egress = MemoryEgress()
    egress_registry.set_instance("memory", egress)
    yield egress
    egress_registry._instances.pop("memory", None)
    if saved is not None:
        egress_registry._instances["memory"] = saved


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The Flower events the in-place batches would have sent, in order."""
    sent: list[dict[str, Any]] = []

    def record(
        app: Celery,
        hostname: str | None,
        ids: dict[str, Any],
        batch: list[tuple[str, dict[str, Any]]],
    ) -> None:
        assert app.conf.worker_send_task_events
        sent.extend({"type": kind, "hostname": hostname, **ids, **fields} for kind, fields in batch)

    monkeypatch.setattr(in_place._events, "send", record)
    return sent


async def small_channel(subscribers: int) -> tuple[Principal, Channel]:
    permission = await Permission.get_or_create(SUBMIT)
    assert permission.id is not None
    role = await Role(f"senders-{next(_serial)}").add_permission(permission.id).save()
    assert role.id is not None
    author = await Principal("service", username=f"author-{next(_serial)}").add_role(role.id).save()
    channel = await Channel(f"small {next(_serial)}").set_alias("egress_transport", "memory").save()
    async with db.session() as s, s.begin():
        ids = list(
            await s.scalars(
                insert(PrincipalRow).returning(PrincipalRow.id),
                [{"kind": "bot", "aliases": {}} for _ in range(subscribers)],
            )
        )
        await s.execute(
            insert(SubscriptionRow), [{"channel_id": channel.id, "subscriber_id": i} for i in ids]
        )
    return author, channel


async def sent_job(dispatcher: MemoryDispatcher, subscribers: int) -> RouteJob:
    author, channel = await small_channel(subscribers)
    await Message(f"hello {next(_serial)}", author_id=author.id).send(channel)
    return dispatcher.jobs.pop()


async def route_in_place(
    job: RouteJob, broker: RecordingBroker, route_id: str = ROUTE_ID
) -> in_place.DeliverInPlace:
    """What ``route_message`` does for a task carrying this one job."""
    app = Celery("test-latency-path-app", set_as_current=False)
    app.conf.worker_send_task_events = True
    here = in_place.DeliverInPlace(
        app,
        broker,
        in_place.in_place_id(route_id, job.outbox_id),
        hostname="worker-1@host",
        parent_id=route_id,
        root_id=None,
    )
    set_dispatcher(here)
    try:
        await delivery.route(job)
    finally:
        set_dispatcher(None)
    return here


async def routed_at(outbox_id: int) -> Any:
    async with db.session() as s:
        row = await s.get(OutboxRow, outbox_id)
        assert row is not None
        return row.routed_at


# -- the path -------------------------------------------------------------------------


async def test_one_small_batch_is_delivered_by_the_routing_task_and_shown_as_deliver_batch(
    dispatcher: MemoryDispatcher, memory: MemoryEgress, events: list[dict[str, Any]]
) -> None:
    job = await sent_job(dispatcher, 3)
    broker = RecordingBroker()
    here = await route_in_place(job, broker)

    assert broker.sent == []  # no second hop
    assert here.delivered == 1
    found = await deliveries(job.message_id)
    assert [r.status for r in found] == [DeliveryStatus.DELIVERED] * 3
    assert all(r.claimed_by is None for r in found)
    assert sorted(s.delivery_id or 0 for s in memory.sent) == [r.id for r in found]
    assert await routed_at(job.outbox_id) is not None

    # Flower sees a deliver_batch with the usual arguments, child of its routing task.
    assert [e["type"] for e in events] == ["task-received", "task-started", "task-succeeded"]
    assert {e["uuid"] for e in events} == {here.task_id}
    assert all(e["parent_id"] == ROUTE_ID and e["hostname"] == "worker-1@host" for e in events)
    received = events[0]
    assert received["name"] == DELIVER_TASK
    args = ast.literal_eval(received["args"])
    assert args == [job.message_id, job.channel_id, [r.id for r in found]]
    assert ast.literal_eval(events[2]["result"])["delivered"] == 3


async def test_a_batch_too_big_for_in_place_goes_to_the_broker(
    dispatcher: MemoryDispatcher,
    memory: MemoryEgress,
    events: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(in_place, "IN_PLACE_MAX", 2)
    job = await sent_job(dispatcher, 3)
    broker = RecordingBroker()
    here = await route_in_place(job, broker)

    assert here.delivered == 0 and memory.sent == [] and events == []
    [(batches, countdown, task_ids)] = broker.sent
    assert [len(b.delivery_ids) for b in batches] == [3]
    assert (countdown, task_ids) == (0.0, None)
    assert {r.status for r in await deliveries(job.message_id)} == {DeliveryStatus.PENDING}


async def test_a_redelivered_routing_task_reclaims_what_it_had_claimed(
    dispatcher: MemoryDispatcher,
    memory: MemoryEgress,
    events: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job = await sent_job(dispatcher, 1)
    broker = RecordingBroker()

    async def dies(*_: Any) -> Any:
        raise Died

    with monkeypatch.context() as patch:
        patch.setattr(memory, "send", dies)
        with pytest.raises(Died):
            await route_in_place(job, broker)
    [row] = await deliveries(job.message_id)
    task_id = in_place.in_place_id(ROUTE_ID, job.outbox_id)
    # Claimed, not delivered, not routed: as a dead process leaves it.
    assert (row.status, row.claimed_by) == (DeliveryStatus.PENDING, task_id)
    assert await routed_at(job.outbox_id) is None

    # The broker hands the routing task back under its id: same claimant, no wait.
    again = await route_in_place(job, broker)
    assert again.task_id == task_id and again.delivered == 1
    [row] = await deliveries(job.message_id)
    assert (row.status, row.claimed_by, row.attempts) == (DeliveryStatus.DELIVERED, None, 1)
    assert broker.sent == []
    assert await routed_at(job.outbox_id) is not None


async def test_a_batch_claimed_twice_is_split_into_singles_on_the_broker(
    dispatcher: MemoryDispatcher,
    memory: MemoryEgress,
    events: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job = await sent_job(dispatcher, 2)
    broker = RecordingBroker()

    async def dies(*_: Any) -> Any:
        raise Died

    with monkeypatch.context() as patch:
        patch.setattr(memory, "send", dies)
        with pytest.raises(Died):
            await route_in_place(job, broker)
    await route_in_place(job, broker)  # redelivered: the batch may be what kills

    ids = [r.id for r in await deliveries(job.message_id)]
    singles = [b.delivery_ids for batches, _, _ in broker.sent for b in batches]
    assert sorted(singles) == [(i,) for i in ids]
    assert memory.sent == []


async def test_a_failing_delivery_is_handed_to_the_broker_under_the_same_id(
    dispatcher: MemoryDispatcher,
    memory: MemoryEgress,
    events: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job = await sent_job(dispatcher, 2)
    broker = RecordingBroker()

    async def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("database went away")

    monkeypatch.setattr(delivery, "deliver", broken)
    here = await route_in_place(job, broker)

    assert here.delivered == 0
    [(batches, countdown, task_ids)] = broker.sent
    assert [b.delivery_ids for b in batches] == [
        tuple(r.id for r in await deliveries(job.message_id))
    ]
    assert task_ids == [here.task_id] and countdown == 0.0
    assert [e["type"] for e in events] == ["task-received", "task-started", "task-failed"]
    assert "database went away" in events[2]["exception"]
    assert await routed_at(job.outbox_id) is not None  # the batch is on the broker now


def test_the_in_place_id_is_stable_per_routing_task_and_entry() -> None:
    first = in_place.in_place_id(ROUTE_ID, 5)
    assert first == in_place.in_place_id(ROUTE_ID, 5)
    assert first != in_place.in_place_id(ROUTE_ID, 6)
    assert first != in_place.in_place_id(str(uuid.uuid4()), 5)
    assert uuid.UUID(first).version == 5
    assert in_place.in_place_id(None, 5) != in_place.in_place_id(None, 5)


def test_log_lines_inside_an_in_place_batch_name_deliver_batch() -> None:
    assert _task_context() == {}
    with runtime.acting_as(DELIVER_TASK, "abc"):
        assert _task_context() == {"task_id": "abc", "task_name": DELIVER_TASK}
    assert _task_context() == {}
