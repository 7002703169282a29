"""The Celery app: ``celery -A workers worker`` and ``celery -A workers beat``.

Settings that make delivery safe, each on purpose:
- JSON only (no pickle): task arguments are ids, never objects.
- ``acks_late`` + ``reject_on_worker_lost``: a task whose worker dies is
  redelivered, not lost; the engine's claims make the second run harmless.
- prefetch 2 (``CHANNELS_WORKER_PREFETCH``): a pool process has its next
  batch at hand when one ends, and a worker holds at most one batch per
  process it is not running, not hundreds. One it never starts (the worker
  is killed) is enqueued again by the sweeper after ``queue_lease``.
- cancel long-running tasks on connection loss: with the connection gone
  their acks would be lost and the broker would redeliver them anyway.
- task events on, so Flower shows every task by its readable name.

With ``CHANNELS_LOG_FORMAT=json`` every log line of the worker and beat is
one JSON object (``channels_core.logs``) carrying the running task's id.
Importing this module also connects the worker's metrics exporter
(``workers.metrics``, on when ``CHANNELS_METRICS_PORT`` is set).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery._state import get_current_task
from celery.signals import after_setup_logger, after_setup_task_logger
from kombu.entity import Queue

from channels_core import embedded, logs
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
from workers import metrics as _metrics  # noqa: F401  (connects the exporter to worker signals)
from workers import runtime

__all__ = ["app"]


def _reconnect_instead_of_dying() -> None:
    """Turn kombu's crash on a restarted Redis into the reconnect it should be.

    When the broker restarts, the poller can still read the pub/sub socket of
    a channel kombu has already closed; rebuilding that channel's client
    then dereferences the closed connection (``None.hostname``) and the
    AttributeError kills the worker's main process ("Unrecoverable error").
    Raised as the ConnectionError it is, Celery's consumer reconnects and
    goes on, as it does for every other broker outage (chaos: broker_restart).
    """
    from kombu.transport import redis as kombu_redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    original = kombu_redis.Channel._connparams
    if getattr(original, "_channels_guarded", False):
        return

    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        if self.connection is None or self.connection.client is None:
            raise RedisConnectionError("broker channel closed while reconnecting")
        return original(self, asynchronous)

    _connparams._channels_guarded = True  # type: ignore[attr-defined]
    kombu_redis.Channel._connparams = _connparams  # type: ignore[method-assign]


_reconnect_instead_of_dying()


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
        worker_prefetch_multiplier=settings.worker_prefetch,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # Notice a dead or restarted broker in seconds, not minutes: a
            # consumer on a half-open socket would otherwise sit until TCP
            # gives up, its tasks unacked (chaos: broker_conn_reset). While
            # prefetch is full kombu pauses its BRPOP socket and ignores it,
            # so a reset connection is only found by the periodic health
            # check (pub/sub PING, overdue BRPOP after brpop_timeout +
            # interval): 2 s finds it in ~2-5 s instead of the ~20 s that
            # 10 s took, for one PING per idle connection every 2 s.
            "socket_timeout": 30,
            "socket_connect_timeout": 5,
            "socket_keepalive": True,
            "health_check_interval": 2,
        },
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


# -- structured logs (CHANNELS_LOG_FORMAT=json) ----------------------------------------


def _task_context() -> dict[str, Any]:
    acting = runtime.acting_task()
    if acting is not None:  # a batch delivered in place is its own deliver_batch
        return {"task_id": acting[1], "task_name": acting[0]}
    # Celery's own task formatter finds the running task the same way.
    task = get_current_task()
    if task is None or task.request.id is None:
        return {}
    return {"task_id": task.request.id, "task_name": task.name}


@after_setup_logger.connect
@after_setup_task_logger.connect
def _json_logs(logger: logging.Logger, **_: Any) -> None:
    if logs.wants_json(get_settings().log_format):
        logs.use_json([logger], context=_task_context)
