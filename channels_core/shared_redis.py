"""The Redis-compatible server workers share state through.

WebSocket presence and endpoint health (breakers, rate limits, in-flight
caps) live here rather than in the database: they change on every request
and must be seen by every worker at once, but losing them costs a little
caution, never a delivery.
"""

from __future__ import annotations

import asyncio
import weakref

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from channels_core.settings import get_settings

__all__ = ["redis_url", "client"]

_REDIS_SCHEMES = ("redis", "rediss", "valkey", "valkeys", "unix")

# Connections belong to the loop that opened them (as in db.py); one client per URL.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, redis.asyncio.Redis]] = (
    weakref.WeakKeyDictionary()
)


def redis_url(*, start: bool = True) -> str | None:
    """The shared server's URL, or ``None`` when there is none.

    The broker when it speaks Redis, else ``CHANNELS_QUEUE_URL`` when that
    does; with neither configured, the embedded Valkey (started only when
    ``start``: an availability probe must not start servers).
    """
    from channels_core import embedded

    settings = get_settings()
    for url in (settings.broker_url, settings.queue_url):
        if url and url.split(":", 1)[0].lower() in _REDIS_SCHEMES:
            return url
    if settings.broker_url:
        return None  # RabbitMQ or another broker, and no Redis beside it
    if start:
        return embedded.broker_url()
    if not (settings.home / "state.json").exists():
        return None
    running = [s for s in embedded.status() if s.name == "valkey" and s.running]
    return running[0].url if running else None


def client() -> redis.asyncio.Redis | None:
    """This loop's client to the shared server, or ``None`` without one."""
    url = redis_url()
    if url is None:
        return None
    held = _clients.setdefault(asyncio.get_running_loop(), {})
    found = held.get(url)
    if found is None:
        found = held[url] = redis.asyncio.Redis.from_url(
            url,
            socket_connect_timeout=5,
            socket_timeout=10,
            decode_responses=True,
            health_check_interval=30,
            # A restarted server leaves this client a dead connection; one
            # retry on a fresh one, instead of failing the first call after.
            retry=Retry(NoBackoff(), 1),
        )
    return found


async def aclose() -> None:
    """Close this loop's clients (a worker calls it on exit)."""
    for found in _clients.pop(asyncio.get_running_loop(), {}).values():
        await found.aclose()
