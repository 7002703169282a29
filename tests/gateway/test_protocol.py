"""The worker's side of the protocol against a real Redis, and a slow client.

These speak the gateway protocol directly (keys, requests, answers), so a
change to either side that breaks the other fails here with the frame in
hand, not as a timeout somewhere in the end-to-end suite.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import inspect
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio
from e2e.helpers import channel, subscribers
from sqlalchemy import insert
from websockets.asyncio.client import connect

from channels_core import db
from channels_core.models import DeliveryRow, DeliveryStatus, MessageRow, utcnow
from channels_core.primitives import Message, Principal
from channels_core.settings import configure, get_settings
from channels_core.transports.websocket import (
    NOT_CONNECTED,
    WebSocketEgress,
    ack_key,
    gateway_key,
    inbox_key,
    presence_key,
)

from .conftest import Gateway, Stack, start_gateway, token_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture
async def r(live: Stack) -> AsyncIterator[redis.asyncio.Redis]:
    # No read timeout: the BLPOPs below are bounded by their own timeouts.
    client = redis.asyncio.Redis.from_url(
        live.broker_url, decode_responses=True, socket_timeout=None
    )
    yield client
    await client.aclose()


@pytest.fixture
async def egress() -> AsyncIterator[Callable[[], WebSocketEgress]]:
    """Fresh transports (no cached availability), closed afterwards."""
    made: list[WebSocketEgress] = []

    def make() -> WebSocketEgress:
        made.append(WebSocketEgress())
        return made[-1]

    yield make
    for transport in made:
        await transport.aclose()


@pytest.mark.parametrize("name", ["channels_core.transports.websocket", "workers.gateway"])
def test_exported_members(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(exported) == len(set(exported))
    assert [n for n in exported if not hasattr(module, n)] == []
    defined = {
        n
        for n, obj in vars(module).items()
        if not n.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and obj.__module__ == name
    }
    assert sorted(defined - set(exported)) == []


async def test_available_only_while_a_gateway_is_alive(
    live: Stack,
    gateways: list[Gateway],
    r: redis.asyncio.Redis,
    egress: Callable[[], WebSocketEgress],
) -> None:
    assert egress().is_available() is True
    # Nothing alive: the set still names gateways, but their liveness keys are gone.
    saved = {g.id: await r.get(gateway_key(g.id)) for g in gateways}
    try:
        await r.delete(*(gateway_key(g) for g in saved))
        assert egress().is_available() is False
    finally:
        for g, value in saved.items():
            if value is not None:
                await r.set(gateway_key(g), value, px=15000, nx=True)
    assert egress().is_available() is True


async def test_a_gateway_that_does_not_answer_makes_the_attempt_transient(
    live: Stack, r: redis.asyncio.Redis, egress: Callable[[], WebSocketEgress]
) -> None:
    ch = await channel("websocket")
    held, nobody = await subscribers(ch, [{}, {}])
    silent = f"silent-{os.getpid()}-{time.monotonic_ns()}"
    await r.set(gateway_key(silent), "{}", px=30000)
    await r.sadd(presence_key(held), silent)  # type: ignore[misc]
    previous = get_settings()
    configure(previous, gateway_ack_timeout=0.5)
    try:
        principals = [Principal("bot"), Principal("bot")]
        principals[0].id, principals[1].id = held, nobody
        principals[0].delivery_id = 991
        message = Message().set_content("ping")
        started = time.perf_counter()
        results = await egress().send(message, ch, principals)
        elapsed = time.perf_counter() - started
    finally:
        configure(previous)
        await r.delete(gateway_key(silent), presence_key(held))
    waited, absent = results
    assert (waited.success, waited.permanent) == (False, False)
    assert waited.errors == [f"gateway {silent} did not answer within 0.5s"]
    assert (absent.success, absent.permanent) == (False, True)
    assert absent.errors == [f"subscriber {nobody} is not connected"]
    assert 0.5 <= elapsed < 3

    # What the gateway would have read from its inbox.
    raw: Any = await r.lpop(inbox_key(silent))  # type: ignore[misc]
    await r.delete(inbox_key(silent))
    request = json.loads(raw)
    assert request["ack"].startswith(ack_key(""))
    assert request["deliveries"] == [[991, held]]
    assert request["message"]["content"] == "ping"
    assert request["message"]["channel_id"] == ch.id
    # The worker cleans up its answer list.
    assert not await r.exists(request["ack"])


def _raw_client(port: int, token: str) -> socket.socket:
    """A WebSocket client that completes the handshake, reads ``ready`` and then
    never reads again: the slow client a bounded queue exists for."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    seen = b""
    deadline = time.monotonic() + 10
    while b'"ready"' not in seen:
        assert time.monotonic() < deadline, seen
        seen += sock.recv(4096)
    assert seen.startswith(b"HTTP/1.1 101"), seen[:200]
    return sock


async def test_a_client_that_does_not_read_is_cut_off(live: Stack, r: redis.asyncio.Redis) -> None:
    limit = 65536
    gateway = start_gateway(live, "gateway-small-queue", CHANNELS_WS_MAX_QUEUE_BYTES=str(limit))
    try:
        ch = await channel("websocket")
        (principal,) = await subscribers(ch, [{}])
        sock = await asyncio.to_thread(_raw_client, gateway.port, await token_for(principal))
        try:
            assert await r.smembers(presence_key(principal)) == {gateway.id}  # type: ignore[misc]
            # 400 frames of 20 kB: far more than the socket buffers can hide.
            key = ack_key(f"slow-{principal}")
            message = {"id": 1, "channel_id": ch.id, "content": "x" * 20000}
            async with r.pipeline(transaction=False) as pipe:
                for n in range(400):
                    request = {"ack": key, "message": message, "deliveries": [[n + 1, principal]]}
                    pipe.rpush(inbox_key(gateway.id), json.dumps(request))
                await pipe.execute()
            outcomes: list[str] = []
            for _ in range(400):
                popped = await r.blpop([key], timeout=10)  # type: ignore[misc]
                assert popped is not None, gateway.process.log()[-2000:]
                outcomes.extend(status for _, status in json.loads(popped[1])["outcomes"])
            await r.delete(key)
            # Some went out before the buffers filled; then the connection was
            # dropped, and from then on the principal is not connected here.
            first_refused = outcomes.index(NOT_CONNECTED)
            assert first_refused > 0
            assert set(outcomes[first_refused:]) == {NOT_CONNECTED}
            assert not await r.sismember(presence_key(principal), gateway.id)  # type: ignore[misc]
            assert f"over {limit} bytes queued" in gateway.process.log()
        finally:
            sock.close()
    finally:
        gateway.process.stop()


async def test_live_deliveries_during_a_resume_wait_and_are_not_sent_twice(
    live: Stack, gateways: list[Gateway], r: redis.asyncio.Redis
) -> None:
    """A resume too big for the socket buffers keeps the client busy while
    live requests arrive: they are held until the resume ends, and the one
    the resume already sent is not sent again."""
    gateway = gateways[0]
    ch = await channel("websocket")
    (principal,) = await subscribers(ch, [{}])
    now = utcnow()
    async with db.session() as s, s.begin():
        message_ids = list(
            await s.scalars(
                insert(MessageRow).returning(MessageRow.id),
                [{"content": f"{n:03d}" + "x" * 200_000, "created_at": now} for n in range(100)],
            )
        )
        backlog = list(
            await s.scalars(
                insert(DeliveryRow).returning(DeliveryRow.id),
                [
                    {
                        "message_id": m,
                        "channel_id": ch.id,
                        "subscriber_id": principal,
                        "transport": "websocket",
                        "status": DeliveryStatus.DEAD,
                        "attempts": 1,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for m in message_ids
                ],
            )
        )
    # A small receive buffer and a one-frame queue: the client reads next to
    # nothing until the test calls recv(), so the ~20 MB resume stalls.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gateway.port))
    token = await token_for(principal)
    async with asyncio.timeout(30):
        ws = await connect(gateway.url(token=token, last_delivery_id=0), sock=sock, max_queue=1)
    try:
        async with asyncio.timeout(10):
            while not await r.sismember(presence_key(principal), gateway.id):  # type: ignore[misc]
                await asyncio.sleep(0.05)
        key = ack_key(f"during-resume-{principal}")
        small = {"id": 0, "channel_id": ch.id, "content": "live"}
        fresh_id = backlog[-1] + 10_000_000
        for delivery_id in (backlog[5], fresh_id):
            request = {"ack": key, "message": small, "deliveries": [[delivery_id, principal]]}
            await r.rpush(inbox_key(gateway.id), json.dumps(request))  # type: ignore[misc]
        answers = [await r.blpop([key], timeout=10) for _ in range(2)]  # type: ignore[misc]
        await r.delete(key)
        assert [json.loads(a[1])["outcomes"] for a in answers if a] == [
            [[principal, "delivered"]],
            [[principal, "delivered"]],
        ]

        frames: list[dict[str, Any]] = []
        async with asyncio.timeout(60):
            while len(frames) < len(backlog) + 2:
                frames.append(json.loads(await ws.recv()))
        assert [f.get("delivery_id") for f in frames[: len(backlog)]] == backlog
        assert frames[len(backlog)]["type"] == "ready"
        assert frames[len(backlog)]["resumed"] == len(backlog)
        assert frames[-1]["delivery_id"] == fresh_id
        assert frames[-1]["message"]["content"] == "live"
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await ws.recv()
    finally:
        await ws.close()
