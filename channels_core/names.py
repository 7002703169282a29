"""Task, queue and key names: defined once, imported by producer and workers.

The producer enqueues by these names and never imports ``workers``; the
workers register their tasks under them. Flower shows them as they are.
"""

from __future__ import annotations

__all__ = [
    "ROUTE_TASK",
    "DELIVER_TASK",
    "SWEEP_TASK",
    "ROUTE_QUEUE",
    "DELIVER_QUEUE",
    "SWEEP_QUEUE",
    "ALL_QUEUES",
    "KEY_PREFIX",
]

ROUTE_TASK = "channels.route_message"
DELIVER_TASK = "channels.deliver_batch"
SWEEP_TASK = "channels.sweep"

ROUTE_QUEUE = "channels.route"
DELIVER_QUEUE = "channels.deliver"
SWEEP_QUEUE = "channels.sweep"
ALL_QUEUES = (ROUTE_QUEUE, DELIVER_QUEUE, SWEEP_QUEUE)

# Prefix of every Redis key the system itself writes (presence, breakers, limits).
KEY_PREFIX = "channels:"
