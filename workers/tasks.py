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
from workers import runtime
from workers.app import app

__all__ = ["route_message", "deliver_batch", "sweep"]

log = logging.getLogger("channels.workers")

# Follow-up work (batches, retries, relays) goes out on this app's own pool.
set_dispatcher(BrokerDispatcher(app))


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    runtime.reset_after_fork()
    runtime.warm_up()


@worker_process_shutdown.connect
def _before_exit(**_: Any) -> None:
    runtime.shutdown()


@app.task(name=ROUTE_TASK, bind=True)
def route_message(self: Any, jobs: list[list[int]]) -> dict[str, int]:
    """Route outbox entries: ``jobs`` is ``[[outbox_id, message_id, channel_id], ...]``."""
    total = {"deliveries": 0, "batches": 0, "skipped": 0}
    for outbox_id, message_id, channel_id in jobs:
        stats = runtime.run(delivery.route(RouteJob(outbox_id, message_id, channel_id)))
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
    return {
        "claimed": stats.claimed,
        "delivered": stats.delivered,
        "retrying": stats.retrying,
        "dead": stats.dead,
        "skipped": stats.skipped,
    }


@app.task(name=SWEEP_TASK)
def sweep() -> dict[str, int]:
    """Relay stale outbox entries and enqueue due deliveries (run by beat)."""
    stats = runtime.run(delivery.sweep())
    return {"relayed": stats.relayed, "enqueued": stats.enqueued}
