"""The Celery app: ``celery -A workers worker`` and ``celery -A workers beat``.

Settings that make delivery safe, each on purpose:
- JSON only (no pickle): task arguments are ids, never objects.
- ``acks_late`` + ``reject_on_worker_lost``: a task whose worker dies is
  redelivered, not lost; the engine's claims make the second run harmless.
- prefetch 1: a worker holds one batch it is not running, not hundreds.
- cancel long-running tasks on connection loss: with the connection gone
  their acks would be lost and the broker would redeliver them anyway.
- task events on, so Flower shows every task by its readable name.
"""

from __future__ import annotations

from celery import Celery
from kombu.entity import Queue

from channels_core import embedded
from channels_core.names import (
    ALL_QUEUES,
    DELIVER_QUEUE,
    DELIVER_TASK,
    ROUTE_QUEUE,
    ROUTE_TASK,
    SWEEP_QUEUE,
    SWEEP_TASK,
)
from channels_core.settings import get_settings

__all__ = ["app"]


def make_app() -> Celery:
    settings = get_settings()
    app = Celery("channels")
    app.conf.update(
        broker_url=embedded.broker_url(),
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        task_queues=[Queue(name, durable=True) for name in ALL_QUEUES],
        task_default_queue=ROUTE_QUEUE,
        task_routes={
            ROUTE_TASK: {"queue": ROUTE_QUEUE},
            DELIVER_TASK: {"queue": DELIVER_QUEUE},
            SWEEP_TASK: {"queue": SWEEP_QUEUE},
        },
        beat_schedule={
            "sweep": {
                "task": SWEEP_TASK,
                "schedule": settings.sweep_interval,
                "options": {"queue": SWEEP_QUEUE, "expires": max(1.0, settings.sweep_interval * 2)},
            }
        },
        beat_schedule_filename=str(settings.home / "celerybeat-schedule"),
    )
    return app


app = make_app()
