"""The tasks, by the names in ``channels_core.names``.

Each is a thin shell around ``channels_core.delivery``: arguments are ids
only (Flower shows them, and ``channels deliveries MESSAGE_ID`` goes from a
task to its rows). Failures are not retried by Celery: the database holds
what is owed, and the sweeper enqueues it again.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown

from channels_core import delivery
from channels_core.dispatch import Batch, RouteJob, set_dispatcher
from channels_core.names import DELIVER_TASK, ROUTE_TASK, SWEEP_TASK
from producer.broker import BrokerDispatcher
from workers import in_place, runtime
from workers.app import app
from workers.in_place import DeliverInPlace, batch_summary, in_place_id

__all__ = ["route_message", "deliver_batch", "sweep"]

log = logging.getLogger("channels.workers")

# Follow-up work (batches, retries, relays) goes out on this app's own pool.
_broker = BrokerDispatcher(app)
set_dispatcher(_broker)


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    runtime.reset_after_fork()
    runtime.warm_up()


@worker_process_shutdown.connect
def _before_exit(**_: Any) -> None:
    runtime.shutdown()
    in_place.close()


@app.task(name=ROUTE_TASK, bind=True)
def route_message(self: Any, jobs: list[list[int]]) -> dict[str, int]:
    """Route outbox entries: ``jobs`` is ``[[outbox_id, message_id, channel_id], ...]``.

    A task routing one message delivers a single small batch itself
    (``workers.in_place``); several messages fan out over the pool as batches.
    """
    total = {"deliveries": 0, "batches": 0, "skipped": 0, "in_place": 0}
    for outbox_id, message_id, channel_id in jobs:
        job = RouteJob(outbox_id, message_id, channel_id)
        if len(jobs) == 1:
            here = DeliverInPlace(
                app,
                _broker,
                in_place_id(self.request.id, outbox_id),
                hostname=self.request.hostname,
                parent_id=self.request.id,
                root_id=self.request.root_id,
            )
            set_dispatcher(here)
            try:
                stats = runtime.run(delivery.route(job))
            finally:
                set_dispatcher(_broker)
            total["in_place"] += here.delivered
        else:
            stats = runtime.run(delivery.route(job))
        total["deliveries"] += stats.deliveries
        total["batches"] += stats.batches
        total["skipped"] += int(stats.skipped)
        log.info(
            "routed message %s on channel %s: %d deliveries in %d batches via %s",
            message_id,
            channel_id,
            stats.deliveries,
            stats.batches,
            stats.transport,
            extra={"message_id": message_id, "channel_id": channel_id},
        )
    return total


@app.task(name=DELIVER_TASK, bind=True)
def deliver_batch(
    self: Any, message_id: int, channel_id: int, delivery_ids: list[int]
) -> dict[str, int]:
    """Deliver one batch of one message on one channel."""
    stats = runtime.run(
        delivery.deliver(
            Batch(message_id, channel_id, tuple(delivery_ids)), claimant=self.request.id
        )
    )
    return batch_summary(stats)


@app.task(name=SWEEP_TASK)
def sweep() -> dict[str, int]:
    """Relay stale outbox entries and enqueue due deliveries (run by beat)."""
    stats = runtime.run(delivery.sweep())
    return {"relayed": stats.relayed, "enqueued": stats.enqueued}
