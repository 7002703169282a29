"""Queue egress: a JSON envelope per delivery, published with kombu.

Each subscriber names a queue (alias ``queue``); the envelope goes through
the default exchange with that routing key, to a durable queue, as a
persistent message, on ``CHANNELS_QUEUE_URL`` (the broker by default). Any
kombu consumer (or Celery, or a plain Redis/AMQP client) can read it; the
envelope's ``id`` is the delivery's stable id for deduplication.

kombu is synchronous, so a batch publishes on one connection in a thread.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from channels_core.errors import ValidationError
from channels_core.transports.base import EgressTransport, TransportResult, event_data
from channels_core.validation import check_queue_name

if TYPE_CHECKING:
    from channels_core.primitives import Channel, Message, Principal

__all__ = ["QueueEgress", "envelope"]


def envelope(message: Message, channel: Channel, subscriber: Principal) -> dict[str, Any]:
    return {
        "id": f"dlv_{subscriber.delivery_id}"
        if subscriber.delivery_id
        else f"msg_{message.id}_{subscriber.id}",
        "type": "message.created",
        "timestamp": (message.created_at or datetime.now(UTC)).isoformat(),
        "delivery_id": subscriber.delivery_id,
        "subscriber_id": subscriber.id,
        "data": event_data(message, channel),
    }


class QueueEgress(EgressTransport):
    name = "queue"

    def __init__(self) -> None:
        self._declared: set[str] = set()

    def is_available(self) -> bool:
        try:
            import kombu  # noqa: F401
        except ImportError:
            return False
        return True

    def _url(self) -> str:
        from channels_core import embedded
        from channels_core.settings import get_settings

        return get_settings().queue_url or embedded.broker_url()

    async def send(
        self, message: Message, channel: Channel, subscribers: Sequence[Principal]
    ) -> list[TransportResult]:
        results: dict[int | None, TransportResult] = {}
        work: list[tuple[Principal, str, bytes]] = []
        for subscriber in subscribers:
            name = subscriber.get_alias("queue")
            try:
                if not name:
                    raise ValidationError(f"subscriber {subscriber.id} has no 'queue' alias")
                check_queue_name(name)
            except ValidationError as exc:
                results[subscriber.id] = TransportResult.failed(
                    subscriber.id, str(exc), permanent=True
                )
                continue
            body = json.dumps(envelope(message, channel, subscriber)).encode()
            work.append((subscriber, name, body))
        if work:
            results.update(await asyncio.to_thread(self._publish, work))
        return [results[s.id] for s in subscribers]

    def _publish(
        self, work: list[tuple[Principal, str, bytes]]
    ) -> dict[int | None, TransportResult]:
        from kombu.connection import Connection
        from kombu.entity import Queue
        from kombu.exceptions import KombuError

        results: dict[int | None, TransportResult] = {}
        try:
            with Connection(self._url(), connect_timeout=5) as conn:
                conn.ensure_connection(max_retries=1)
                producer = conn.Producer(serializer=None)
                for subscriber, name, body in work:
                    started = time.perf_counter()
                    try:
                        if name not in self._declared:
                            Queue(name, durable=True, channel=conn.default_channel).declare()
                            self._declared.add(name)
                        producer.publish(
                            body,
                            exchange="",
                            routing_key=name,
                            content_type="application/json",
                            content_encoding="utf-8",
                            delivery_mode=2,
                            headers={"delivery_id": subscriber.delivery_id},
                            retry=False,
                        )
                    except (KombuError, OSError) as exc:
                        results[subscriber.id] = TransportResult.failed(
                            subscriber.id, f"publish to queue {name!r} failed: {exc}"
                        )
                        continue
                    results[subscriber.id] = TransportResult.delivered(
                        subscriber.id, latency_ms=(time.perf_counter() - started) * 1000
                    )
        except (KombuError, OSError) as exc:
            for subscriber, _, _ in work:
                results.setdefault(
                    subscriber.id,
                    TransportResult.failed(subscriber.id, f"queue broker unreachable: {exc}"),
                )
        return results
