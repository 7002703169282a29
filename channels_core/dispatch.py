"""How committed work reaches the queue: the dispatcher boundary.

``Message.send`` commits the message and its outbox entries, then hands the
routing jobs to a dispatcher. The domain does not know what a broker or a
Celery task is: the dispatcher in force is named by ``CHANNELS_DISPATCHER``
(``producer.broker:BrokerDispatcher`` by default, which publishes Celery
tasks by name) and loaded lazily, like a transport.

If a dispatcher fails (the broker is down), nothing is lost: the outbox
entry stays unrouted and the sweeper relays it later.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from channels_core.errors import ConfigurationError
from channels_core.settings import get_settings

__all__ = [
    "RouteJob",
    "Batch",
    "Dispatcher",
    "MemoryDispatcher",
    "get_dispatcher",
    "set_dispatcher",
]


@dataclass(frozen=True)
class RouteJob:
    """One outbox entry to route: a message on a channel."""

    outbox_id: int
    message_id: int
    channel_id: int


@dataclass(frozen=True)
class Batch:
    """Deliveries of one message on one channel, delivered by one task."""

    message_id: int
    channel_id: int
    delivery_ids: tuple[int, ...]


@runtime_checkable
class Dispatcher(Protocol):
    async def enqueue_routes(self, jobs: Sequence[RouteJob]) -> None:
        """Enqueue routing for these jobs; raise if they could not be enqueued."""

    async def enqueue_batches(self, batches: Sequence[Batch], countdown: float = 0.0) -> None:
        """Enqueue delivery of these batches, ``countdown`` seconds from now."""


class MemoryDispatcher:
    """Records jobs instead of enqueuing them: for tests without a broker."""

    def __init__(self) -> None:
        self.jobs: list[RouteJob] = []
        self.batches: list[tuple[Batch, float]] = []

    async def enqueue_routes(self, jobs: Sequence[RouteJob]) -> None:
        self.jobs.extend(jobs)

    async def enqueue_batches(self, batches: Sequence[Batch], countdown: float = 0.0) -> None:
        self.batches.extend((b, countdown) for b in batches)


_dispatcher: Dispatcher | None = None
_loaded_name: str | None = None


def set_dispatcher(dispatcher: Dispatcher | None) -> None:
    """Use this dispatcher in this process (``None`` returns to the setting)."""
    global _dispatcher, _loaded_name
    _dispatcher = dispatcher
    _loaded_name = "<set>" if dispatcher is not None else None


def get_dispatcher() -> Dispatcher:
    global _dispatcher, _loaded_name
    name = get_settings().dispatcher
    if _dispatcher is not None and _loaded_name in ("<set>", name):
        return _dispatcher
    module_name, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"CHANNELS_DISPATCHER {name!r} cannot be loaded: {exc}") from exc
    _dispatcher = cls()
    _loaded_name = name
    return _dispatcher
