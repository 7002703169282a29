"""S6: the producer. ``Producer.send_many`` persisting and enqueuing ``n``
messages, against Celery's own ``.delay()`` loop of a no-op task on the same
broker. No worker runs: this is the sending side alone; the queues both
fill are emptied afterwards so no later scenario inherits them.
"""

from __future__ import annotations

import asyncio
import os
import time

from bench.common import Figure, Machine
from bench.fanout import http_aliases, setup
from channels_core import db
from producer.core import Producer

__all__ = ["send_many", "celery_delay"]


def send_many(machine: Machine, n: int, port: int, runs: int) -> Figure:
    figure = Figure("S6", "channels Producer.send_many", unit="messages/s", notes=f"n={n}")

    async def prepare() -> tuple[int, int]:
        try:
            author_id, channel = await setup(1, http_aliases(port))
        finally:
            await db.dispose()
        assert channel.id is not None
        return author_id, channel.id

    author_id, channel_id = asyncio.run(prepare())
    for run in range(runs):
        messages = [
            {"content": f"producer bench {run}.{i}", "author_id": author_id} for i in range(n)
        ]
        meter = machine.cpu_meter(producer=[os.getpid()])
        with Producer() as producer:
            producer.send_many(messages[:10], channel_id)  # connect the pool first
            meter.start()
            started = time.perf_counter()
            dispatches = producer.send_many(messages, channel_id)
            elapsed = time.perf_counter() - started
            meter.stop()
        figure.runs.append(len(dispatches) / elapsed)
        figure.cpu_s_per_item = meter.per(len(dispatches))
        machine.flush_broker()
    return figure


def celery_delay(machine: Machine, n: int, runs: int) -> Figure:
    os.environ["NAIVE_BROKER_URL"] = machine.broker_url
    os.environ.setdefault("NAIVE_DSN", machine.dsn)
    from bench.naive import noop

    figure = Figure("S6", "Celery .delay() of a no-op", unit="messages/s", notes=f"n={n}")
    for _ in range(runs):
        noop.delay()  # connect first, as above
        meter = machine.cpu_meter(producer=[os.getpid()])
        meter.start()
        started = time.perf_counter()
        for _ in range(n):
            noop.delay()
        elapsed = time.perf_counter() - started
        meter.stop()
        figure.runs.append(n / elapsed)
        figure.cpu_s_per_item = meter.per(n)
        machine.flush_broker()
    return figure
