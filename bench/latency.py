"""S4: latency at light load, send to delivered.

The producer sends ``rate`` messages a second for ``seconds`` to a channel of
``subscribers`` webhook subscribers on the fast sink; latency is each attempt
row's ``finished_at`` minus the moment the send was called. The naive
baseline gets the same schedule (its ``route`` task carries the send time,
its result row the time it was written). Both clocks are this machine's.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid

import psycopg

from bench.common import Figure, Machine
from bench.fanout import http_aliases, setup
from bench.throughput import naive_worker
from channels_core import db
from producer.core import AsyncProducer

__all__ = ["latency", "percentile"]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def _channels_once(
    machine: Machine, port: int, rate: float, seconds: float, subscribers: int
) -> list[float]:
    author_id, channel = await setup(subscribers, http_aliases(port))
    producer = AsyncProducer()
    sent_at: dict[int, float] = {}
    count = int(rate * seconds)
    start = time.perf_counter()
    try:
        for i in range(count):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            at = time.time()
            dispatch = await producer.send(channel, f"latency probe {i}", author_id=author_id)
            assert dispatch.message_id is not None
            sent_at[dispatch.message_id] = at
        expected = count * subscribers
        deadline = time.perf_counter() + 120
        async with await psycopg.AsyncConnection.connect(
            machine.observer_dsn, autocommit=True
        ) as conn:
            rows: list[tuple[int, float]] = []
            while time.perf_counter() < deadline:
                cursor = await conn.execute(
                    "SELECT d.message_id, extract(epoch FROM a.finished_at)::float8"
                    " FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id"
                    " WHERE d.channel_id = %s AND a.attempt = 1",
                    (channel.id,),
                )
                rows = [(int(m), float(f)) for m, f in await cursor.fetchall()]
                if len(rows) >= expected:
                    break
                await asyncio.sleep(0.2)
    finally:
        await db.dispose()
    return [(finished - sent_at[m]) * 1000 for m, finished in rows if m in sent_at]


def _naive_once(
    machine: Machine, port: int, rate: float, seconds: float, subscribers: int
) -> list[float]:
    from bench.naive import app

    run = uuid.uuid4().hex
    urls = [f"http://127.0.0.1:{port}/naive/{i}" for i in range(subscribers)]
    count = int(rate * seconds)
    start = time.perf_counter()
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        app.send_task("naive.route", args=[run, urls, time.time()], queue="naive")
    deadline = time.perf_counter() + 120
    rows: list[tuple[float, float]] = []
    with psycopg.connect(machine.observer_dsn, autocommit=True) as conn:
        while time.perf_counter() < deadline:
            rows = [
                (float(s), float(f))
                for s, f in conn.execute(
                    "SELECT sent_at, extract(epoch FROM finished_at)::float8"
                    " FROM naive_results WHERE run = %s",
                    (run,),
                ).fetchall()
            ]
            if len(rows) >= count * subscribers:
                break
            time.sleep(0.2)
    return [(finished - sent) * 1000 for sent, finished in rows]


def _figures(system: str, per_run: list[list[float]], notes: str) -> list[Figure]:
    figures = []
    for q in (50, 99):
        figure = Figure(
            "S4",
            system,
            metric=f"p{q} send→delivered",
            unit="ms",
            higher_is_better=False,
            notes=notes,
        )
        figure.runs = [percentile(values, q) for values in per_run]
        figures.append(figure)
    figures[0].extra = {
        "samples": [len(v) for v in per_run],
        "mean_ms": [statistics.fmean(v) if v else None for v in per_run],
        # Where the tail starts: p90 far from p50 is queueing, not a slow path.
        "p90_ms": [percentile(v, 90) if v else None for v in per_run],
        "max_ms": [max(v) if v else None for v in per_run],
    }
    return figures


def latency(
    machine: Machine,
    port: int,
    runs: int,
    concurrency: int,
    *,
    rate: float = 20.0,
    seconds: float = 15.0,
    subscribers: int = 10,
) -> tuple[list[Figure], dict[str, list[float]]]:
    """S4 for channels and for naive; the figures and every latency sample."""
    notes = f"{rate:g} msg/s for {seconds:g} s, {subscribers} subscribers each, pool={concurrency}"
    ours: list[list[float]] = []
    with machine.worker("S4", concurrency):
        for _ in range(runs):
            ours.append(asyncio.run(_channels_once(machine, port, rate, seconds, subscribers)))
    naive: list[list[float]] = []
    machine.settle()
    with naive_worker(machine, "S4", concurrency):
        for _ in range(runs):
            naive.append(_naive_once(machine, port, rate, seconds, subscribers))
    figures = _figures("channels", ours, notes) + _figures("naive Celery", naive, notes)
    samples = {
        "channels": [x for run in ours for x in run],
        "naive Celery": [x for run in naive for x in run],
    }
    return figures, samples
