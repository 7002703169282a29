"""Enqueuing by task name: the default dispatcher (``CHANNELS_DISPATCHER``).

Publishes Celery tasks by their names from ``channels_core.names``, on a
client-only Celery app, so an application can send without importing
``workers``. Publishing is synchronous in kombu; from async code it runs in
a thread. A broker that is down makes ``enqueue_*`` raise after one quick
retry: the caller's outbox or delivery rows are already committed, and the
sweeper relays them when the broker is back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from celery import Celery

from channels_core import embedded
from channels_core.dispatch import Batch, RouteJob
from channels_core.names import DELIVER_QUEUE, DELIVER_TASK, ROUTE_QUEUE, ROUTE_TASK
from channels_core.settings import get_settings

__all__ = ["BrokerDispatcher", "client_app", "route_args", "batch_args"]

# Routing jobs per task when many messages are sent at once.
ROUTE_CHUNK = 100

_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}


def client_app() -> Celery:
    """A Celery app that only publishes: JSON, the configured broker."""
    settings = get_settings()
    app = Celery("channels-producer", set_as_current=False)
    app.conf.update(
        broker_url=embedded.broker_url(),
        task_serializer="json",
        accept_content=["json"],
        broker_connection_timeout=3,
        broker_connection_retry_on_startup=False,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        task_ignore_result=True,
    )
    return app


def route_args(jobs: Sequence[RouteJob]) -> list[Any]:
    return [[[j.outbox_id, j.message_id, j.channel_id] for j in jobs]]


def batch_args(batch: Batch) -> list[Any]:
    return [batch.message_id, batch.channel_id, list(batch.delivery_ids)]


class BrokerDispatcher:
    """Enqueue routing and delivery tasks by name on a Celery app's broker."""

    def __init__(self, app: Celery | None = None) -> None:
        self._app = app
        self._sync = app is not None  # inside a worker: publish inline

    @property
    def app(self) -> Celery:
        if self._app is None:
            self._app = client_app()
        return self._app

    def send_routes(self, jobs: Sequence[RouteJob]) -> None:
        for i in range(0, len(jobs), ROUTE_CHUNK):
            self.app.send_task(
                ROUTE_TASK,
                args=route_args(jobs[i : i + ROUTE_CHUNK]),
                queue=ROUTE_QUEUE,
                retry=True,
                retry_policy=_RETRY_POLICY,
            )

    def send_batches(
        self,
        batches: Sequence[Batch],
        countdown: float = 0.0,
        task_ids: Sequence[str] | None = None,
    ) -> None:
        """``task_ids``, one per batch, when the claimant must be a known one
        (a batch handed over by the task that had started delivering it)."""
        if task_ids is not None and len(task_ids) != len(batches):
            raise ValueError(f"{len(task_ids)} task ids for {len(batches)} batches")
        for i, batch in enumerate(batches):
            self.app.send_task(
                DELIVER_TASK,
                args=batch_args(batch),
                queue=DELIVER_QUEUE,
                countdown=countdown or None,
                task_id=task_ids[i] if task_ids is not None else None,
                retry=True,
                retry_policy=_RETRY_POLICY,
            )

    async def enqueue_routes(self, jobs: Sequence[RouteJob]) -> None:
        if self._sync:
            self.send_routes(jobs)
        else:
            await asyncio.to_thread(self.send_routes, jobs)

    async def enqueue_batches(self, batches: Sequence[Batch], countdown: float = 0.0) -> None:
        if self._sync:
            self.send_batches(batches, countdown)
        else:
            await asyncio.to_thread(self.send_batches, batches, countdown)
