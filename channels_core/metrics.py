"""Prometheus metrics: what the system did, and what it still owes.

Two faces, because deliveries happen in worker processes, often on other hosts:

- ``exposition()`` is the text the HTTP ingress serves at ``GET /metrics``.
  Its numbers are read from the database and the broker at scrape time, so
  they are the truth of the whole system whichever process delivered:
  ``channels_attempts_total`` and ``channels_attempt_latency_seconds`` are
  tallied from the attempt rows (never deleted, so a valid counter), the
  gauges from the delivery and outbox indexes, queue depth from the broker.
- ``record_batch()`` feeds in-process counters and histograms
  (``channels_worker_*``) from ``delivery.deliver``; the worker exporter
  (``workers/metrics.py``) serves them from every pool child at once with
  prometheus_client's multiprocess mode. It does no I/O and never raises
  into a delivery.

Scrapes stay cheap and bounded: attempts are tallied incrementally (rows
below a watermark are counted once per process and remembered), every
other query rides an index, and PostgreSQL is given a statement timeout.
A scrape never fails because a source is down: it reports
``channels_metrics_source_up{source=...} 0`` instead, so an alert can fire.

This module must never import Celery or kombu (the domain knows no queue);
it reads the broker with the ``redis`` client directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, case, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from channels_core import db
from channels_core.models import AttemptRow, DeliveryRow, DeliveryStatus, OutboxRow, utcnow
from channels_core.names import ALL_QUEUES
from channels_core.settings import get_settings

__all__ = [
    "LATENCY_BUCKETS",
    "Snapshot",
    "exposition",
    "snapshot",
    "record_batch",
    "reset",
]

log = logging.getLogger("channels.metrics")

# Seconds; from a fast local webhook to a slow SMTP relay near its deadline.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# An attempt row is counted for good once it finished this long ago: ids are
# taken just before the row's short transaction commits, so no row with a
# smaller id can still appear later (allowing for clock skew between hosts).
SETTLE_SECONDS = 30.0
# At most this many attempt rows are read per scrape, so the first scrape of
# a large table catches up over a few scrapes instead of scanning it whole.
TALLY_CHUNK = 500_000
# Deliveries by state: the final ``delivered`` state grows without bound and
# is already counted by channels_attempts_total{status="delivered"}.
_GAUGED_STATES = (DeliveryStatus.PENDING, DeliveryStatus.RETRYING, DeliveryStatus.DEAD)
# kombu's Redis transport keeps priorities 3, 6, 9 of a queue in keys of
# their own (``queue\x06\x16<priority>``); depth is the sum.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)
_BROKER_TIMEOUT = 2.0
_STATEMENT_TIMEOUT_MS = 5000


# -- the database and broker snapshot -------------------------------------------


@dataclass
class _Tally:
    """Attempts of one (transport, status): count, latency buckets, latency sum."""

    count: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    latency_ms: float = 0.0

    def add(self, other: _Tally) -> None:
        self.count += other.count
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        self.latency_ms += other.latency_ms

    def copy(self) -> _Tally:
        return _Tally(self.count, list(self.buckets), self.latency_ms)


@dataclass
class _Settled:
    """Attempts with ids up to ``upto``, counted once by this process."""

    upto: int = 0
    tallies: dict[tuple[str, str], _Tally] = field(default_factory=dict)


# One per database this process has scraped (tests switch databases).
_settled: dict[tuple[str | None, str], _Settled] = {}


def reset() -> None:
    """Forget the attempts this process has counted.

    For a database emptied behind the process's back (tests, a restore the
    id check cannot see): the next scrape counts from the rows there are.
    """
    _settled.clear()


@dataclass
class Snapshot:
    """What one scrape read. ``None`` / empty where a source was unreachable."""

    attempts: dict[tuple[str, str], _Tally] = field(default_factory=dict)
    deliveries: dict[str, int] = field(default_factory=dict)
    retries_due: int = 0
    lag_seconds: float = 0.0
    outbox_unrouted: int = 0
    queue_depth: dict[str, int] = field(default_factory=dict)
    broker_unacked: int | None = None
    database_up: bool = False
    broker_up: bool | None = None  # None: not a Redis broker, depth not read
    seconds: float = 0.0

    @property
    def dead_letters(self) -> int:
        return self.deliveries.get(DeliveryStatus.DEAD, 0)

    def attempts_total(self, transport: str, status: str) -> int:
        tally = self.attempts.get((transport, status))
        return tally.count if tally else 0


async def _tally(s: AsyncSession, low: int, high: int) -> dict[tuple[str, str], _Tally]:
    """Tally attempt rows with ``low < id <= high`` in one pass over the key range."""
    if high <= low:
        return {}
    latency = AttemptRow.latency_ms
    columns: list[Any] = [
        AttemptRow.transport,
        AttemptRow.status,
        func.count(),
        func.coalesce(func.sum(latency), 0.0),
        *(func.sum(case((latency <= bound * 1000, 1), else_=0)) for bound in LATENCY_BUCKETS),
    ]
    rows = await s.execute(
        select(*columns)
        .where(AttemptRow.id > low, AttemptRow.id <= high)
        .group_by(AttemptRow.transport, AttemptRow.status)
    )
    found: dict[tuple[str, str], _Tally] = {}
    for transport, status, count, latency_sum, *buckets in rows:
        found[(transport, status)] = _Tally(
            int(count), [int(b or 0) for b in buckets], float(latency_sum or 0.0)
        )
    return found


async def _attempts(s: AsyncSession, key: tuple[str | None, str]) -> dict[tuple[str, str], _Tally]:
    settled = _settled.setdefault(key, _Settled())
    if settled.upto:
        top = await s.scalar(select(func.max(AttemptRow.id)))
        if top is None or top < settled.upto:
            # Ids never go back unless the table was emptied or restored from
            # a backup: what was counted is gone, start over.
            settled = _settled[key] = _Settled()
    low = settled.upto
    high = low + TALLY_CHUNK
    cutoff = utcnow() - timedelta(seconds=SETTLE_SECONDS)
    upto = await s.scalar(
        select(func.max(AttemptRow.id)).where(
            AttemptRow.id > low, AttemptRow.id <= high, AttemptRow.finished_at < cutoff
        )
    )
    upto = int(upto) if upto is not None else low
    newly_settled = await _tally(s, low, upto)
    fresh = await _tally(s, upto, high)
    total = {k: v.copy() for k, v in settled.tallies.items()}
    for part in (newly_settled, fresh):
        for k, v in part.items():
            total.setdefault(k, _Tally()).add(v)
    # No await from here on: a concurrent scrape either saw the old
    # watermark (and does not advance it) or sees the new one.
    if settled.upto == low and upto > low:
        for k, v in newly_settled.items():
            settled.tallies.setdefault(k, _Tally()).add(v)
        settled.upto = upto
    return total


async def _read_database(into: Snapshot) -> None:
    settings = get_settings()
    now = utcnow()
    not_final = (DeliveryStatus.PENDING, DeliveryStatus.RETRYING)
    async with db.session() as s, s.begin():
        if db.is_postgres():
            # A scrape that would take longer is a scrape to skip, not to wait for.
            await s.execute(text(f"SET LOCAL statement_timeout = {_STATEMENT_TIMEOUT_MS}"))
        into.attempts = await _attempts(s, (settings.database_url, str(settings.home)))
        rows = await s.execute(
            select(DeliveryRow.status, func.count())
            .where(DeliveryRow.status.in_(_GAUGED_STATES))
            .group_by(DeliveryRow.status)
        )
        into.deliveries = {status: 0 for status in _GAUGED_STATES}
        into.deliveries.update({status: int(n) for status, n in rows})
        into.retries_due = int(
            await s.scalar(
                select(func.count()).where(
                    DeliveryRow.status == DeliveryStatus.RETRYING,
                    DeliveryRow.next_attempt_at <= now,
                )
            )
            or 0
        )
        oldest = await s.scalar(
            select(func.min(DeliveryRow.next_attempt_at)).where(
                and_(DeliveryRow.status.in_(not_final), DeliveryRow.next_attempt_at <= now)
            )
        )
        into.lag_seconds = max(0.0, (now - oldest).total_seconds()) if oldest else 0.0
        into.outbox_unrouted = int(
            await s.scalar(select(func.count()).where(OutboxRow.routed_at.is_(None))) or 0
        )
    into.database_up = True


async def _read_broker(into: Snapshot) -> None:
    from channels_core import embedded

    url = embedded.broker_url()
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return  # RabbitMQ and friends: read depth from their own exporter
    import redis.asyncio as aioredis

    client = aioredis.from_url(
        url, socket_timeout=_BROKER_TIMEOUT, socket_connect_timeout=_BROKER_TIMEOUT
    )
    try:
        async with client.pipeline(transaction=False) as pipe:
            for queue in ALL_QUEUES:
                pipe.llen(queue)
                for step in _PRIORITY_STEPS:
                    pipe.llen(f"{queue}{_PRIORITY_SEP}{step}")
            pipe.hlen("unacked")
            replies = await pipe.execute()
    finally:
        await client.aclose()
    per_queue = 1 + len(_PRIORITY_STEPS)
    into.queue_depth = {
        queue: sum(int(n) for n in replies[i * per_queue : (i + 1) * per_queue])
        for i, queue in enumerate(ALL_QUEUES)
    }
    into.broker_unacked = int(replies[-1])
    into.broker_up = True


async def snapshot() -> Snapshot:
    """Read the database and the broker once; a source that fails is marked down."""
    started = time.perf_counter()
    found = Snapshot()
    try:
        await _read_database(found)
    except Exception:  # a scrape answers even when the database does not
        log.warning("metrics: reading the database failed", exc_info=True)
    try:
        await _read_broker(found)
    except Exception:
        found.broker_up = False
        log.warning("metrics: reading the broker failed", exc_info=True)
    found.seconds = time.perf_counter() - started
    return found


class _SnapshotCollector:
    """Turns one snapshot into metric families (prometheus_client's Collector protocol)."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        snap = self.snap
        up = GaugeMetricFamily(
            "channels_metrics_source_up",
            "Whether this scrape could read the source (1) or not (0).",
            labels=["source"],
        )
        up.add_metric(["database"], 1.0 if snap.database_up else 0.0)
        if snap.broker_up is not None:
            up.add_metric(["broker"], 1.0 if snap.broker_up else 0.0)
        yield up
        yield GaugeMetricFamily(
            "channels_metrics_scrape_seconds",
            "How long reading the database and the broker took for this scrape.",
            value=snap.seconds,
        )
        if snap.database_up:
            yield from self._database()
        if snap.broker_up:
            depth = GaugeMetricFamily(
                "channels_queue_depth",
                "Tasks waiting in a channels.* queue on the broker (all priorities).",
                labels=["queue"],
            )
            for queue, n in sorted(snap.queue_depth.items()):
                depth.add_metric([queue], float(n))
            yield depth
            if snap.broker_unacked is not None:
                yield GaugeMetricFamily(
                    "channels_broker_unacked",
                    "Tasks handed to workers and not yet acknowledged (running or held "
                    "for a countdown).",
                    value=float(snap.broker_unacked),
                )

    def _database(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        snap = self.snap
        attempts = CounterMetricFamily(
            "channels_attempts",
            "Delivery attempts recorded, by transport and outcome "
            "(delivered, transient, permanent); from every worker.",
            labels=["transport", "status"],
        )
        by_transport: dict[str, _Tally] = {}
        for (transport, status), tally in sorted(snap.attempts.items()):
            attempts.add_metric([transport, status], float(tally.count))
            by_transport.setdefault(transport, _Tally()).add(tally)
        yield attempts
        latency = HistogramMetricFamily(
            "channels_attempt_latency_seconds",
            "Latency of delivery attempts, by transport; from every worker.",
            labels=["transport"],
        )
        for transport, tally in sorted(by_transport.items()):
            buckets: list[tuple[str, float]] = [
                (_bound(b), float(n)) for b, n in zip(LATENCY_BUCKETS, tally.buckets, strict=True)
            ]
            buckets.append(("+Inf", float(tally.count)))
            latency.add_metric([transport], buckets, sum_value=tally.latency_ms / 1000)
        yield latency
        deliveries = GaugeMetricFamily(
            "channels_deliveries",
            "Deliveries not yet delivered, by state (pending, retrying, dead).",
            labels=["status"],
        )
        for status, n in sorted(snap.deliveries.items()):
            deliveries.add_metric([status], float(n))
        yield deliveries
        yield GaugeMetricFamily(
            "channels_dead_letters",
            "Deliveries that gave up: listed by `channels dead-letters`, replayable.",
            value=float(snap.dead_letters),
        )
        yield GaugeMetricFamily(
            "channels_retries_due",
            "Retrying deliveries whose next attempt is due now.",
            value=float(snap.retries_due),
        )
        yield GaugeMetricFamily(
            "channels_delivery_lag_seconds",
            "How long the oldest due, unfinished delivery has been waiting.",
            value=snap.lag_seconds,
        )
        yield GaugeMetricFamily(
            "channels_outbox_unrouted",
            "Messages sent to a channel and not routed yet.",
            value=float(snap.outbox_unrouted),
        )


def _bound(seconds: float) -> str:
    from prometheus_client.utils import floatToGoString

    return str(floatToGoString(seconds))


async def exposition() -> tuple[bytes, str]:
    """The body and content type of ``GET /metrics``.

    The system's state from the database and broker, then this process's
    own metrics (the default registry: process, GC and whatever the serving
    process registers).
    """
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry
    from prometheus_client import generate_latest as render

    snap = await snapshot()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snap))  # type: ignore[arg-type]
    return render(registry) + render(REGISTRY), CONTENT_TYPE_LATEST


# -- in-process metrics, recorded by the engine ----------------------------------------------


@dataclass
class _WorkerMetrics:
    attempts: Any
    latency: Any
    batch_seconds: Any
    dead_letters: Any
    retries: Any


_worker: _WorkerMetrics | None = None


def _worker_metrics() -> _WorkerMetrics:
    """Made on first use, not at import: prometheus_client picks single- or
    multi-process storage when a metric is made, and the worker exporter
    chooses that (``PROMETHEUS_MULTIPROC_DIR``) after this module is imported."""
    global _worker
    if _worker is None:
        from prometheus_client import Counter, Histogram

        _worker = _WorkerMetrics(
            attempts=Counter(
                "channels_worker_attempts",
                "Delivery attempts made by this worker, by transport and outcome.",
                ["transport", "status"],
            ),
            latency=Histogram(
                "channels_worker_attempt_latency_seconds",
                "Latency of this worker's delivery attempts, by transport.",
                ["transport"],
                buckets=LATENCY_BUCKETS,
            ),
            batch_seconds=Histogram(
                "channels_worker_batch_seconds",
                "Time a batch spent in its transport, by transport.",
                ["transport"],
                buckets=LATENCY_BUCKETS,
            ),
            dead_letters=Counter(
                "channels_worker_dead_letters",
                "Deliveries this worker gave up on, by transport.",
                ["transport"],
            ),
            retries=Counter(
                "channels_worker_retries_scheduled",
                "Retries this worker scheduled after a transient failure, by transport.",
                ["transport"],
            ),
        )
    return _worker


def record_batch(
    transport: str,
    attempts: Iterable[tuple[str, float | None]],
    *,
    seconds: float,
    dead: int = 0,
    retrying: int = 0,
) -> None:
    """Record one delivered batch: ``attempts`` is ``(status, latency_ms)`` per attempt.

    Memory only (multiprocess mode writes to a memory-mapped file); a
    failure here is logged and swallowed, never a failed delivery.
    """
    try:
        m = _worker_metrics()
        latency = m.latency.labels(transport)
        counts: dict[str, int] = {}
        for status, latency_ms in attempts:
            counts[status] = counts.get(status, 0) + 1
            if latency_ms is not None:
                latency.observe(latency_ms / 1000)
        # One labelled child per status, not one look-up per attempt.
        for status, count in counts.items():
            m.attempts.labels(transport, status).inc(count)
        m.batch_seconds.labels(transport).observe(seconds)
        if dead:
            m.dead_letters.labels(transport).inc(dead)
        if retrying:
            m.retries.labels(transport).inc(retrying)
    except Exception:
        log.warning("metrics: recording a batch failed", exc_info=True)
