"""One event loop per worker process, made after the fork.

Tasks are synchronous to Celery; their bodies are coroutines run on this
loop, so the HTTP session, SMTP settings and the database pool live across
tasks in the same process instead of being rebuilt per task.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

from channels_core import db, delivery, shared_redis
from channels_core.transports.registry import egress_registry

__all__ = ["acting_as", "acting_task", "run", "shutdown", "warm_up"]

T = TypeVar("T")

_loop: asyncio.AbstractEventLoop | None = None

# (task name, task id) of work run inside another task under a name of its
# own: a batch delivered in place by its routing task (workers.in_place).
_acting: ContextVar[tuple[str, str] | None] = ContextVar("channels_acting_task", default=None)


@contextmanager
def acting_as(name: str, task_id: str) -> Iterator[None]:
    """Log lines written inside this block name this task, not the running one."""
    token = _acting.set((name, task_id))
    try:
        yield
    finally:
        _acting.reset(token)


def acting_task() -> tuple[str, str] | None:
    return _acting.get()


def _new_loop() -> asyncio.AbstractEventLoop:
    # uvloop roughly halves the CPU the HTTP client spends per request; the
    # standard loop serves where uvloop is not installed.
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(coro: Coroutine[Any, Any, T]) -> T:
    global _loop
    if _loop is None or _loop.is_closed():
        _loop = _new_loop()
        asyncio.set_event_loop(_loop)
    return _loop.run_until_complete(coro)


async def _warm() -> None:
    from sqlalchemy import text

    from channels_core.transports.http import HttpEgress

    http = egress_registry.get("http")
    if isinstance(http, HttpEgress):
        http._client()  # its TLS context and connection pool
    async with db.session() as s:
        await s.execute(text("SELECT 1"))
    await delivery.warm_up()


def warm_up() -> None:
    """Pay a pool process's one-off costs before its first batch, not during it.

    Building the HTTP client's TLS context, the database engine and its
    first connection took ~15% of a short run's worker time, all inside the
    first batch each process ran; building and compiling the hot path's
    statements (``delivery.warm_up``) held up each process's first message
    by tens of milliseconds. A failure here (the database not up yet) is
    left for the first task to meet and report.
    """
    try:
        # Celery gives a new pool process 4 s to report in (worker_proc_alive_timeout).
        run(asyncio.wait_for(_warm(), timeout=2.0))
    except Exception as exc:  # noqa: BLE001  (the task will say what is wrong)
        logging.getLogger("channels.workers").warning("warm-up skipped: %s", exc)
    # Everything alive now (Celery, SQLAlchemy, the pools) lives as long as the
    # process: out of the collector's sight, and collections made rarer. A batch
    # allocates thousands of short-lived objects, and the default thresholds
    # ran full collections over the whole heap often enough to cost ~8% of
    # the worker's CPU (S1 benchmark, 0.269 -> 0.247 ms per delivery).
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def reset_after_fork() -> None:
    """A forked child must not reuse its parent's loop or connections."""
    global _loop
    _loop = None


async def _close() -> None:
    for name in list(egress_registry._instances):
        transport = egress_registry._instances[name]
        aclose = getattr(transport, "aclose", None)
        if aclose is not None:
            await aclose()
    await shared_redis.aclose()
    await db.dispose()


def shutdown() -> None:
    global _loop
    if _loop is not None and not _loop.is_closed():
        _loop.run_until_complete(_close())
        _loop.close()
    _loop = None
