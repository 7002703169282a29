"""A routed message's one small batch, delivered by its routing task itself.

A message to a small channel used to take two broker hops: ``route_message``
enqueued one ``deliver_batch`` and another pool process picked it up. At
light load that second hop (its publish, its task, the wait for a free
process) was a third of the send-to-delivered time and half the tasks. A
routing task for one message whose routing yields one batch of at most
``IN_PLACE_MAX`` deliveries now delivers that batch at once, as a
``deliver_batch`` of its own:

- it has a task id, derived from the routing task's id and the outbox
  entry, and claims under it; its log lines carry that id and the name
  ``channels.deliver_batch``, and Flower gets its received, started and
  succeeded (or failed) events, with the routing task as its parent;
- it runs inside ``delivery.route``, after the deliveries are committed and
  before the outbox entry is marked routed. If the process dies there, the
  routing task (acks_late, reject_on_worker_lost) is redelivered with the
  same id, routes again (the rows exist; the undelivered ones form the
  batch again) and delivers as the same claimant: it re-claims its own
  claims, and a batch claimed twice is split into singles like any
  redelivered ``deliver_batch``;
- if delivering raises, the batch goes to the broker as a ``deliver_batch``
  task under the same id, which may re-claim what this one claimed.

Everything else (more batches, retries, splits, a task routing several
messages) is enqueued as before. It must never deliver a batch that was not
committed, nor swallow one it could neither deliver nor enqueue.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery

from channels_core import delivery
from channels_core.dispatch import Batch, RouteJob
from channels_core.names import DELIVER_TASK
from producer.broker import BrokerDispatcher, batch_args
from workers import runtime

__all__ = ["IN_PLACE_MAX", "DeliverInPlace", "batch_summary", "close", "in_place_id"]

log = logging.getLogger("channels.workers")

# Deliveries a routing task delivers itself. A larger batch goes to the
# broker so that a pool process does not hold the routing queue for long.
IN_PLACE_MAX = 50

_ID_NAMESPACE = uuid.UUID("6f1d1f7e-4a39-5a8e-9d0e-6c7a0d3b1c52")


def in_place_id(route_task_id: str | None, outbox_id: int) -> str:
    """The id of the batch delivered in place: the same on a redelivered routing task."""
    if not route_task_id:
        return str(uuid.uuid4())
    return str(uuid.uuid5(_ID_NAMESPACE, f"{route_task_id}/{outbox_id}"))


def batch_summary(stats: delivery.BatchStats) -> dict[str, int]:
    """What ``deliver_batch`` returns (Flower shows it as the task's result)."""
    return {
        "claimed": stats.claimed,
        "delivered": stats.delivered,
        "retrying": stats.retrying,
        "dead": stats.dead,
        "skipped": stats.skipped,
    }


class DeliverInPlace:
    """The dispatcher one routing job runs under: its first small batch is delivered here."""

    def __init__(
        self,
        app: Celery,
        broker: BrokerDispatcher,
        task_id: str,
        *,
        hostname: str | None,
        parent_id: str | None,
        root_id: str | None,
    ) -> None:
        self._app = app
        self._broker = broker
        self.task_id = task_id
        self._hostname = hostname
        self._parent_id = parent_id
        self._root_id = root_id or parent_id
        self._spent = False
        self.delivered = 0  # batches delivered here: 0 or 1

    async def enqueue_routes(self, jobs: Sequence[RouteJob]) -> None:
        await self._broker.enqueue_routes(jobs)

    async def enqueue_batches(self, batches: Sequence[Batch], countdown: float = 0.0) -> None:
        small = len(batches) == 1 and len(batches[0].delivery_ids) <= IN_PLACE_MAX
        if self._spent or countdown or not small:
            await self._broker.enqueue_batches(batches, countdown)
            return
        # Whatever this delivery enqueues itself (retries, a split) goes to the broker.
        self._spent = True
        await self._deliver(batches[0])

    async def _deliver(self, batch: Batch) -> None:
        received = time.time()
        started = time.monotonic()
        events: list[tuple[str, dict[str, Any]]] = [
            (
                "task-received",
                {
                    "name": DELIVER_TASK,
                    "args": repr(batch_args(batch)),
                    "kwargs": "{}",
                    "retries": 0,
                    "timestamp": received,
                },
            ),
            ("task-started", {"timestamp": received}),
        ]
        try:
            with runtime.acting_as(DELIVER_TASK, self.task_id):
                stats = await delivery.deliver(batch, claimant=self.task_id)
        except Exception as exc:
            with runtime.acting_as(DELIVER_TASK, self.task_id):
                log.exception(
                    "delivering batch of message %s in place failed; enqueued as task %s",
                    batch.message_id,
                    self.task_id,
                    extra={"message_id": batch.message_id, "channel_id": batch.channel_id},
                )
            events.append(
                ("task-failed", {"exception": repr(exc), "traceback": traceback.format_exc()})
            )
            _events.send(self._app, self._hostname, self._ids(), events)
            # Under the same id: it may re-claim whatever this attempt claimed.
            self._broker.send_batches([batch], task_ids=[self.task_id])
            return
        self.delivered += 1
        result = repr(batch_summary(stats))
        events.append(("task-succeeded", {"result": result, "runtime": time.monotonic() - started}))
        _events.send(self._app, self._hostname, self._ids(), events)

    def _ids(self) -> dict[str, Any]:
        return {"uuid": self.task_id, "parent_id": self._parent_id, "root_id": self._root_id}


class _TaskEvents:
    """Flower's events for batches delivered in place: one dispatcher per pool
    process, on a connection of its own, one message per batch.

    The worker sends these for every task it runs; a batch delivered in place
    is not one Celery ran, so its process tells Flower what happened, with
    the times it happened at, once the batch is done (a batch of at most
    ``IN_PLACE_MAX`` takes milliseconds; its routing task shows as started
    meanwhile). Events are for watching: failing to send them is logged and
    never fails a delivery.
    """

    def __init__(self) -> None:
        self._pid = 0
        self._dispatcher: Any = None

    def send(
        self,
        app: Celery,
        hostname: str | None,
        ids: dict[str, Any],
        events: list[tuple[str, dict[str, Any]]],
    ) -> None:
        if not app.conf.worker_send_task_events:
            return
        try:
            if self._dispatcher is None or self._pid != os.getpid():
                self._pid = os.getpid()  # a forked child builds its own
                self._dispatcher = app.events.Dispatcher(
                    connection=app.connection_for_write(),
                    hostname=hostname,
                    buffer_while_offline=False,
                    buffer_group=("task",),  # all of a batch's events in one message
                )
            for kind, fields in events:
                self._dispatcher.send(kind, **ids, **fields)
            self._dispatcher.flush(errors=False)
        except Exception as exc:  # noqa: BLE001  (events are for watching, not for delivery)
            log.warning("task events of %s not sent: %s", ids.get("uuid"), exc)
            self.close()

    def close(self) -> None:
        dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None:
            with contextlib.suppress(Exception):
                dispatcher.close()
                dispatcher.connection.release()


_events = _TaskEvents()


def close() -> None:
    """Release this process's event connection (the pool process is exiting)."""
    _events.close()
