"""The exposition read from the database and the broker, without worker processes.

Runs on SQLite and PostgreSQL (the ``database`` fixture); attempt rows are
written directly where exact values are the point, and by the engine where
the engine's own recording is.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from _support import override_settings, principal_with
from prometheus_client import REGISTRY
from sqlalchemy import delete, insert, update

from channels_core import db, delivery, metrics
from channels_core.dispatch import MemoryDispatcher
from channels_core.models import (
    AttemptRow,
    AttemptStatus,
    DeliveryRow,
    DeliveryStatus,
    PrincipalRow,
    SubscriptionRow,
    utcnow,
)
from channels_core.permissions import SUBMIT
from channels_core.primitives import Channel, Message
from channels_core.transports.base import TransportResult
from channels_core.transports.memory import MemoryEgress
from channels_core.transports.registry import egress_registry

from .promtext import Samples, samples, value

pytestmark = pytest.mark.timeout(60)

# Attempt numbers are unique per delivery; tests write many rows for one.
_attempt_numbers = itertools.count(1)


@pytest.fixture
def memory(database: str) -> Iterator[MemoryEgress]:
    saved = egress_registry._instances.get("memory")
    egress = MemoryEgress()
    egress_registry.set_instance("memory", egress)
    yield egress
    egress_registry._instances.pop("memory", None)
    if saved is not None:
        egress_registry._instances["memory"] = saved


async def _routed(dispatcher: MemoryDispatcher, n: int) -> tuple[Message, list[int]]:
    """A message routed to ``n`` subscribers of a ``memory`` channel; its delivery ids."""
    sender = await principal_with(SUBMIT, kind="service")
    channel = await Channel("metrics").set_alias("egress_transport", "memory").save()
    async with db.session() as s, s.begin():
        ids = list(
            await s.scalars(insert(PrincipalRow).returning(PrincipalRow.id), [{"kind": "bot"}] * n)
        )
        await s.execute(
            insert(SubscriptionRow), [{"channel_id": channel.id, "subscriber_id": i} for i in ids]
        )
    message = Message("hello", author_id=sender.id)
    await message.send(channel)
    await delivery.route(dispatcher.jobs[-1])
    async with db.session() as s:
        rows = await s.scalars(
            DeliveryRow.__table__.select()
            .with_only_columns(DeliveryRow.id)
            .where(DeliveryRow.message_id == message.id)
            .order_by(DeliveryRow.id)
        )
        return message, list(rows)


async def _attempts(rows: list[tuple[int, str, str, float | None]], *, age: float = 0.0) -> None:
    """Write attempts ``(delivery_id, transport, status, latency_ms)`` finished ``age`` s ago."""
    finished = utcnow() - timedelta(seconds=age)
    async with db.session() as s, s.begin():
        await s.execute(
            insert(AttemptRow),
            [
                {
                    "delivery_id": d,
                    "attempt": next(_attempt_numbers),
                    "transport": transport,
                    "status": status,
                    "latency_ms": latency,
                    "started_at": finished,
                    "finished_at": finished,
                }
                for d, transport, status, latency in rows
            ],
        )


async def _scrape() -> Samples:
    body, content_type = await metrics.exposition()
    assert content_type == "text/plain; version=1.0.0; charset=utf-8"
    return samples(body.decode())


async def test_attempts_are_counted_by_transport_and_status_with_latency(
    dispatcher: MemoryDispatcher,
) -> None:
    _, [d1, d2] = await _routed(dispatcher, 2)
    await _attempts(
        [
            (d1, "http", AttemptStatus.DELIVERED, 3.0),
            (d1, "http", AttemptStatus.DELIVERED, 40.0),
            (d1, "http", AttemptStatus.DELIVERED, 2000.0),
            (d1, "http", AttemptStatus.TRANSIENT, None),
        ]
    )
    await _attempts([(d2, "email", AttemptStatus.PERMANENT, 120.0)])

    found = await _scrape()

    total = "channels_attempts_total"
    assert value(found, total, transport="http", status="delivered") == 3
    assert value(found, total, transport="http", status="transient") == 1
    assert value(found, total, transport="email", status="permanent") == 1
    assert value(found, total, transport="email", status="delivered") == 0
    hist = "channels_attempt_latency_seconds"
    http = {"transport": "http"}
    assert value(found, f"{hist}_bucket", le="0.005", **http) == 1
    assert value(found, f"{hist}_bucket", le="0.05", **http) == 2
    assert value(found, f"{hist}_bucket", le="1.0", **http) == 2
    assert value(found, f"{hist}_bucket", le="2.5", **http) == 3
    # An attempt without a latency counts, in +Inf only.
    assert value(found, f"{hist}_bucket", le="+Inf", **http) == 4
    assert value(found, f"{hist}_count", **http) == 4
    assert value(found, f"{hist}_sum", **http) == pytest.approx(2.043)
    assert value(found, f"{hist}_bucket", le="0.25", transport="email") == 1
    assert value(found, "channels_metrics_source_up", source="database") == 1


async def test_the_tally_settles_once_and_catches_up_in_bounded_chunks(
    dispatcher: MemoryDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "TALLY_CHUNK", 2)
    _, [d] = await _routed(dispatcher, 1)
    await _attempts([(d, "http", "delivered", 1.0)] * 5, age=3600)

    def total(found: Samples) -> float:
        return value(found, "channels_attempts_total", transport="http", status="delivered")

    # Two rows per scrape at most: the counter climbs to the truth, never back.
    assert [total(await _scrape()) for _ in range(4)] == [2, 4, 5, 5]

    async with db.session() as s, s.begin():
        # Counted rows are not read again: changing one changes nothing...
        await s.execute(update(AttemptRow).values(status="transient"))
    assert total(await _scrape()) == 5

    # A new row counts on top of what was counted.
    await _attempts([(d, "http", "delivered", 1.0)])
    assert total(await _scrape()) == 6

    # A table emptied (a restore, a truncate) starts the tally over.
    async with db.session() as s, s.begin():
        await s.execute(delete(AttemptRow))
    assert total(await _scrape()) == 0


async def test_fresh_rows_are_counted_on_every_scrape_until_they_settle(
    dispatcher: MemoryDispatcher,
) -> None:
    _, [d] = await _routed(dispatcher, 1)
    await _attempts([(d, "queue", "delivered", 1.0)] * 3, age=3600)
    await _attempts([(d, "queue", "delivered", 1.0)] * 2)

    def total(found: Samples) -> float:
        return value(found, "channels_attempts_total", transport="queue", status="delivered")

    assert [total(await _scrape()) for _ in range(3)] == [5, 5, 5]


async def test_delivery_gauges(dispatcher: MemoryDispatcher) -> None:
    _, ids = await _routed(dispatcher, 6)
    now = utcnow()
    async with db.session() as s, s.begin():
        await s.execute(
            update(DeliveryRow)
            .where(DeliveryRow.id.in_(ids[:2]))
            .values(status=DeliveryStatus.RETRYING, next_attempt_at=now - timedelta(seconds=100))
        )
        await s.execute(
            update(DeliveryRow)
            .where(DeliveryRow.id == ids[2])
            .values(status=DeliveryStatus.RETRYING, next_attempt_at=now + timedelta(hours=1))
        )
        await s.execute(
            update(DeliveryRow)
            .where(DeliveryRow.id == ids[3])
            .values(status=DeliveryStatus.DEAD, next_attempt_at=None)
        )
        await s.execute(
            update(DeliveryRow)
            .where(DeliveryRow.id == ids[4])
            .values(status=DeliveryStatus.DELIVERED, next_attempt_at=None)
        )
    # A second message, sent and not routed: owed to the outbox.
    sender = await principal_with(SUBMIT, kind="service")
    await Message("later", author_id=sender.id).send(await Channel("other").save())

    found = await _scrape()

    assert value(found, "channels_deliveries", status="pending") == 1
    assert value(found, "channels_deliveries", status="retrying") == 3
    assert value(found, "channels_deliveries", status="dead") == 1
    assert ("channels_deliveries", (("status", "delivered"),)) not in found
    assert value(found, "channels_dead_letters") == 1
    assert value(found, "channels_retries_due") == 2
    assert 100 <= value(found, "channels_delivery_lag_seconds") < 200
    assert value(found, "channels_outbox_unrouted") == 1


async def test_queue_depth_counts_every_priority_of_each_queue(
    database: str, broker_url: str
) -> None:
    import redis

    # A database of the broker's own, so no worker of another suite sees these.
    url = broker_url.rsplit("/", 1)[0] + "/7"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        client.lpush("channels.deliver", "a", "b")
        client.lpush("channels.deliver\x06\x163", "c")
        client.lpush("channels.route\x06\x169", "d")
        client.hset("unacked", "tag", "x")
        with override_settings(broker_url=url):
            found = await _scrape()
    finally:
        client.flushdb()
        client.close()
    assert value(found, "channels_queue_depth", queue="channels.deliver") == 3
    assert value(found, "channels_queue_depth", queue="channels.route") == 1
    assert value(found, "channels_queue_depth", queue="channels.sweep") == 0
    assert value(found, "channels_broker_unacked") == 1
    assert value(found, "channels_metrics_source_up", source="broker") == 1


async def test_a_scrape_answers_when_the_database_and_broker_are_down(
    database: str, caplog: pytest.LogCaptureFixture
) -> None:
    from channels_cli.devservers import free_port

    port = free_port()  # nothing listens there
    with override_settings(
        database_url=f"postgresql+psycopg://nobody@127.0.0.1:{port}/none",
        broker_url=f"redis://127.0.0.1:{port}/0",
    ):
        try:
            found = await _scrape()
        finally:
            await db.dispose()
    assert value(found, "channels_metrics_source_up", source="database") == 0
    assert value(found, "channels_metrics_source_up", source="broker") == 0
    assert not any(name == "channels_attempts_total" for name, _ in found)
    assert "reading the database failed" in caplog.text


async def test_a_broker_that_is_not_redis_is_left_to_its_own_exporter(database: str) -> None:
    with override_settings(broker_url="amqp://guest@127.0.0.1:1//"):
        found = await _scrape()
    assert ("channels_metrics_source_up", (("source", "broker"),)) not in found
    assert not any(name == "channels_queue_depth" for name, _ in found)


# -- what the engine records in process (served by the worker exporter) --------------------


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_deliver_records_worker_metrics_and_one_log_line_per_batch_and_failure(
    dispatcher: MemoryDispatcher, memory: MemoryEgress, caplog: pytest.LogCaptureFixture
) -> None:
    message, ids = await _routed(dispatcher, 3)
    [batch] = [b for b, _ in dispatcher.batches]
    async with db.session() as s:
        subscriber_of = dict(
            (
                await s.execute(
                    DeliveryRow.__table__.select()
                    .with_only_columns(DeliveryRow.id, DeliveryRow.subscriber_id)
                    .where(DeliveryRow.id.in_(ids))
                )
            ).all()
        )
    memory.fail_with = {
        subscriber_of[ids[0]]: TransportResult.failed(
            subscriber_of[ids[0]], "gone", permanent=True, status_code=410
        )
    }
    labels: dict[str, Any] = {"transport": "memory"}
    before = {
        "delivered": _sample("channels_worker_attempts_total", status="delivered", **labels),
        "permanent": _sample("channels_worker_attempts_total", status="permanent", **labels),
        "latency": _sample("channels_worker_attempt_latency_seconds_count", **labels),
        "dead": _sample("channels_worker_dead_letters_total", **labels),
        "batches": _sample("channels_worker_batch_seconds_count", **labels),
    }

    with caplog.at_level(logging.INFO, logger="channels.delivery"):
        await delivery.deliver(batch, claimant="task-1")

    after = {
        "delivered": _sample("channels_worker_attempts_total", status="delivered", **labels),
        "permanent": _sample("channels_worker_attempts_total", status="permanent", **labels),
        "latency": _sample("channels_worker_attempt_latency_seconds_count", **labels),
        "dead": _sample("channels_worker_dead_letters_total", **labels),
        "batches": _sample("channels_worker_batch_seconds_count", **labels),
    }
    assert {k: after[k] - before[k] for k in before} == {
        "delivered": 2,
        "permanent": 1,
        "latency": 3,
        "dead": 1,
        "batches": 1,
    }

    records = [r for r in caplog.records if r.name == "channels.delivery"]
    [line] = [r for r in records if getattr(r, "delivery_ids", None) is not None]
    assert (line.message_id, line.channel_id) == (message.id, batch.channel_id)  # type: ignore[attr-defined]
    assert sorted(line.delivery_ids) == sorted(ids)  # type: ignore[attr-defined]
    assert (line.delivered, line.dead, line.retrying) == (2, 1, 0)  # type: ignore[attr-defined]
    [dead] = [r for r in records if getattr(r, "delivery_id", None) is not None]
    assert dead.levelno == logging.WARNING
    assert (dead.delivery_id, dead.message_id, dead.reason) == (ids[0], message.id, "gone")  # type: ignore[attr-defined]
    assert dead.status_code == 410  # type: ignore[attr-defined]


def test_record_batch_never_raises_into_a_delivery(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> Any:
        raise RuntimeError("metrics storage is gone")

    monkeypatch.setattr(metrics, "_worker_metrics", broken)
    metrics.record_batch("memory", [("delivered", 1.0)], seconds=0.1)
    assert "recording a batch failed" in caplog.text
