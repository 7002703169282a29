"""WebSocket egress: deliveries to subscribers' live gateway connections.

The gateway (``channels gateway``, ``workers/gateway.py``) holds the
sockets; this transport finds, through presence keys in Redis, which
gateways hold a subscriber, hands each of them the delivery and waits for
their answer. Any number of gateways on any number of hosts share one
Redis-compatible server (the broker's, or ``CHANNELS_QUEUE_URL`` when the
broker is not Redis). This module is the protocol's one definition: the
gateway imports its keys and frames from here. It must never import a
WebSocket library: the worker side only talks to Redis.

Keys (``KEY_PREFIX`` is ``channels:``; TTLs are ``ws_presence_ttl``,
refreshed by each gateway every third of it)::

    channels:ws:gateways                set of gateway ids (pruned by gateways)
    channels:ws:gateway:{gateway_id}    liveness, JSON about the gateway, with TTL
    channels:ws:presence:{principal_id} set of gateway ids holding a socket of it, TTL
    channels:ws:gw:{gateway_id}         the gateway's inbox: a list it BLPOPs
    channels:ws:ack:{token}             answers for one ``send`` call: a list, short TTL

A ``send`` pushes one request per gateway (all the batch's subscribers that
gateway holds, the message serialized once)::

    {"ack": "channels:ws:ack:...", "message": {...},
     "deliveries": [[delivery_id, principal_id], ...]}

and BLPOPs the ack list until every gateway answered or
``gateway_ack_timeout`` passed; a gateway answers once per request::

    {"gateway": "...", "outcomes": [[principal_id, "delivered" | "not_connected"], ...]}

Outcomes: a subscriber no live gateway holds, or whose every gateway
answered ``not_connected``, fails permanently ("subscriber N is not
connected": a socket that is not there will not appear by retrying, and the
client gets the delivery back by resuming). A gateway that does not answer
in time makes the attempt transient, so the retry schedule applies.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import weakref
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import redis
import redis.asyncio
from redis.exceptions import RedisError

from channels_core.names import KEY_PREFIX
from channels_core.settings import get_settings
from channels_core.shared_redis import redis_url as presence_url
from channels_core.transports.base import EgressTransport, TransportResult

if TYPE_CHECKING:
    from channels_core.primitives import Channel, Message, Principal

__all__ = [
    "WebSocketEgress",
    "GATEWAYS_KEY",
    "gateway_key",
    "presence_key",
    "inbox_key",
    "ack_key",
    "DELIVERED",
    "NOT_CONNECTED",
    "CLOSE_BAD_REQUEST",
    "CLOSE_UNAUTHORIZED",
    "CLOSE_FORBIDDEN",
    "message_payload",
    "delivery_frame",
    "presence_url",
    "not_connected",
]

GATEWAYS_KEY = f"{KEY_PREFIX}ws:gateways"

# A gateway's answer for one principal.
DELIVERED = "delivered"
NOT_CONNECTED = "not_connected"

# Application close codes (4000-4999), after HTTP's: browsers cannot read a
# refused handshake's status, but they do see a close code.
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403

# is_available() runs on every routing decision; one probe a second is plenty.
AVAILABILITY_CACHE_SECONDS = 1.0
# A sync probe must not stall the worker's loop when Redis is unreachable.
_PROBE_TIMEOUT = 0.5
# Beyond the ack wait, for the Redis round trips around it.
_REDIS_GRACE = 5.0


def gateway_key(gateway_id: str) -> str:
    return f"{KEY_PREFIX}ws:gateway:{gateway_id}"


def presence_key(principal_id: int) -> str:
    return f"{KEY_PREFIX}ws:presence:{principal_id}"


def inbox_key(gateway_id: str) -> str:
    return f"{KEY_PREFIX}ws:gw:{gateway_id}"


def ack_key(token: str) -> str:
    return f"{KEY_PREFIX}ws:ack:{token}"


def not_connected(subscriber_id: int | None) -> TransportResult:
    return TransportResult.failed(
        subscriber_id, f"subscriber {subscriber_id} is not connected", permanent=True
    )


class _MessageLike(Protocol):
    """What a frame needs of a message: the ``Message`` primitive and ``MessageRow`` both fit."""

    @property
    def id(self) -> int | None: ...
    @property
    def author_id(self) -> int | None: ...
    @property
    def content(self) -> str | None: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def reply_to_id(self) -> int | None: ...
    @property
    def conversation_id(self) -> int | None: ...
    @property
    def created_at(self) -> datetime | None: ...


def message_payload(message: _MessageLike, channel_id: int | None) -> dict[str, Any]:
    """The ``message`` object of a delivery frame."""
    return {
        "id": message.id,
        "channel_id": channel_id,
        "author_id": message.author_id,
        "content": message.content,
        "content_type": message.content_type,
        "reply_to_id": message.reply_to_id,
        "conversation_id": message.conversation_id,
        "created_at": message.created_at.isoformat() if message.created_at else None,
    }


def delivery_frame(delivery_id: int | None, payload: dict[str, Any]) -> bytes:
    """The text frame a client receives for one delivery (UTF-8 JSON)."""
    frame = {"type": "delivery", "delivery_id": delivery_id, "message": payload}
    return json.dumps(frame, separators=(",", ":")).encode()


class WebSocketEgress(EgressTransport):
    """Hand each delivery to the gateways holding the subscriber's sockets.

    Available while at least one gateway is alive, so until one runs,
    resolution falls through to the next transport instead of marking every
    delivery "not connected".
    """

    name = "websocket"

    def __init__(self) -> None:
        # Connections belong to the loop that opened them (as in db.py).
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, redis.asyncio.Redis] = (
            weakref.WeakKeyDictionary()
        )
        self._probe_client: tuple[str, redis.Redis] | None = None
        self._available = False
        self._checked_until = 0.0

    # -- availability (sync: resolution calls it outside any coroutine) --------------

    def is_available(self) -> bool:
        now = time.monotonic()
        if now >= self._checked_until:
            self._available = self._probe()
            self._checked_until = now + AVAILABILITY_CACHE_SECONDS
        return self._available

    def _probe(self) -> bool:
        url = presence_url(start=False)
        if url is None:
            return False
        try:
            if self._probe_client is None or self._probe_client[0] != url:
                client = redis.Redis.from_url(
                    url,
                    socket_timeout=_PROBE_TIMEOUT,
                    socket_connect_timeout=_PROBE_TIMEOUT,
                    decode_responses=True,
                )
                self._probe_client = (url, client)
            client = self._probe_client[1]
            ids = client.smembers(GATEWAYS_KEY)
            if not ids:
                return False
            return int(client.exists(*(gateway_key(str(g)) for g in ids))) > 0
        except (RedisError, OSError):
            return False

    # -- delivery ----------------------------------------------------------------------

    def _client(self) -> redis.asyncio.Redis:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = redis.asyncio.Redis.from_url(
                presence_url() or "",
                socket_connect_timeout=5,
                # No read timeout: BLPOP waits up to gateway_ack_timeout, and
                # send() bounds every call with asyncio.timeout instead.
                socket_timeout=None,
                decode_responses=True,
                health_check_interval=30,
            )
            self._clients[loop] = client
        return client

    async def aclose(self) -> None:
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()
        if self._probe_client is not None:
            self._probe_client[1].close()
            self._probe_client = None

    async def send(
        self, message: Message, channel: Channel, subscribers: Sequence[Principal]
    ) -> list[TransportResult]:
        if not subscribers:
            return []
        if presence_url(start=False) is None and get_settings().broker_url:
            return [
                TransportResult.failed(
                    s.id, "websocket delivery needs a Redis broker or CHANNELS_QUEUE_URL"
                )
                for s in subscribers
            ]
        timeout = get_settings().gateway_ack_timeout
        try:
            # The ack wait is bounded inside; this bounds a Redis that hangs.
            async with asyncio.timeout(timeout + _REDIS_GRACE):
                return await self._send(message, channel, subscribers, timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            reason = f"gateway presence store unavailable: {type(exc).__name__}: {exc}"
            return [TransportResult.failed(s.id, reason) for s in subscribers]

    async def _send(
        self,
        message: Message,
        channel: Channel,
        subscribers: Sequence[Principal],
        timeout: float,
    ) -> list[TransportResult]:
        client = self._client()
        started = time.perf_counter()
        async with client.pipeline(transaction=False) as pipe:
            for s in subscribers:
                pipe.smembers(presence_key(s.id))  # type: ignore[arg-type]
            members: list[set[str]] = await pipe.execute()
        held = {s.id: sorted(m) for s, m in zip(subscribers, members, strict=True)}
        named = sorted({g for gateways in held.values() for g in gateways})
        alive: set[str] = set()
        if named:
            async with client.pipeline(transaction=False) as pipe:
                for g in named:
                    pipe.exists(gateway_key(g))
                flags = await pipe.execute()
            alive = {g for g, flag in zip(named, flags, strict=True) if flag}

        results: dict[int | None, TransportResult] = {}
        requests: dict[str, list[tuple[int | None, int | None]]] = {}
        for s in subscribers:
            live = [g for g in held[s.id] if g in alive]
            if not live:
                results[s.id] = not_connected(s.id)
            for g in live:
                requests.setdefault(g, []).append((s.delivery_id, s.id))
        if not requests:
            return [results[s.id] for s in subscribers]

        key = ack_key(secrets.token_hex(12))
        payload = message_payload(message, channel.id)
        ttl_ms = int(get_settings().ws_presence_ttl * 1000)
        async with client.pipeline(transaction=False) as pipe:
            for g, deliveries in requests.items():
                request = {"ack": key, "message": payload, "deliveries": deliveries}
                pipe.rpush(inbox_key(g), json.dumps(request, separators=(",", ":")))
                # A gateway that dies leaves its inbox to expire, not to grow.
                pipe.pexpire(inbox_key(g), ttl_ms)
            for sid, gateways in held.items():
                stale = [g for g in gateways if g not in alive]
                if stale and sid is not None:
                    pipe.srem(presence_key(sid), *stale)
            await pipe.execute()

        answers: dict[int, dict[str, str]] = {}
        answered_at: dict[int, float] = {}
        waiting = set(requests)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while waiting:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                # BLPOP's 0 means "forever": never pass it by rounding down.
                popped = await client.blpop([key], timeout=max(remaining, 0.01))  # type: ignore[misc]
                if popped is None:
                    break
                answer = json.loads(popped[1])
                gateway = str(answer["gateway"])
                waiting.discard(gateway)
                for principal_id, outcome in answer["outcomes"]:
                    answers.setdefault(int(principal_id), {})[gateway] = str(outcome)
                    answered_at.setdefault(int(principal_id), time.perf_counter())
        finally:
            await client.delete(key)

        for s in subscribers:
            if s.id in results:
                continue
            mine = [g for g in held[s.id] if g in requests]
            outcomes = answers.get(s.id or 0, {})
            latency = (answered_at.get(s.id or 0, time.perf_counter()) - started) * 1000
            if DELIVERED in outcomes.values():
                results[s.id] = TransportResult.delivered(s.id, latency_ms=latency)
            elif all(outcomes.get(g) == NOT_CONNECTED for g in mine):
                results[s.id] = not_connected(s.id)
            else:
                silent = ", ".join(g for g in mine if g not in outcomes)
                results[s.id] = TransportResult.failed(
                    s.id,
                    f"gateway {silent} did not answer within {timeout:g}s",
                    latency_ms=latency,
                )
        return [results[s.id] for s in subscribers]
