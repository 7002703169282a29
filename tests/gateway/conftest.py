"""Gateway fixtures: ``channels gateway`` processes over the end-to-end stack.

The stack (embedded PostgreSQL and Valkey, a real Celery worker and beat) is
the end-to-end suite's. Gateways are started the way users start them,
``python -m channels_cli.main gateway --port P``, with the worker's
environment, and stopped by PID. Clients are the ``websockets`` library's.

``tests/`` is on ``sys.path`` (the root conftest lives there and has no
``__init__.py``), so ``e2e.conftest`` is the very module pytest loads for
the end-to-end suite: one copy of the fixtures, not two (``tests.e2e`` is not
importable under ``.venv/bin/pytest``).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import pytest
from e2e.conftest import Stack as Stack
from e2e.conftest import e2e_database_url, live, stack  # noqa: F401
from websockets.asyncio.client import ClientConnection, connect

from channels_cli.devservers import free_port
from channels_cli.processes import Process
from channels_core import tokens
from channels_core.primitives import Channel

pytestmark = pytest.mark.e2e

# The gateway's own settings. Its catch-up pass for racing dead letters runs
# gateway_ack_timeout + 1 s after a resume; short here so a test can wait it out.
GATEWAY_ENV = {
    "CHANNELS_GATEWAY_HOST": "127.0.0.1",
    "CHANNELS_GATEWAY_ACK_TIMEOUT": "1",
    "CHANNELS_WS_HEARTBEAT": "5",
    "CHANNELS_WS_PRESENCE_TTL": "15",
}
# Every wait on a socket is bounded by this.
RECV_TIMEOUT = 10.0


@dataclass
class Gateway:
    process: Process
    port: int
    id: str

    def url(self, **query: object) -> str:
        params = {k: v for k, v in query.items() if v is not None}
        return f"ws://127.0.0.1:{self.port}/" + (f"?{urlencode(params)}" if params else "")


def start_gateway(on: Stack, name: str, **env: str) -> Gateway:
    """``channels gateway`` on a free port, with the worker's environment."""
    port = free_port()
    process = Process(
        name,
        [sys.executable, "-m", "channels_cli.main", "gateway", "--port", str(port)],
        {**on.env, **GATEWAY_ENV, **env},
        on.logs / f"{name}.log",
    )
    try:
        process.wait_for_log("listening on", timeout=60)
    except BaseException:
        process.stop()
        raise
    found = re.search(r"gateway (\S+) listening on", process.log())
    assert found, process.log()[-2000:]
    return Gateway(process, port, found.group(1))


@pytest.fixture(scope="module")
def gateways(stack: Stack) -> Iterator[list[Gateway]]:  # noqa: F811 (the fixture)
    """Two gateway processes on 127.0.0.1, as two hosts would run them."""
    started: list[Gateway] = []
    try:
        for name in ("gateway-a", "gateway-b"):
            started.append(start_gateway(stack, name))
        yield started
    finally:
        for gateway in started:
            gateway.process.stop()


@dataclass
class Client:
    """One open socket, after its ``ready`` frame."""

    ws: ClientConnection
    ready: dict[str, Any]
    resumed: list[dict[str, Any]] = field(default_factory=list)

    async def recv(self, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            frame = await self.ws.recv()
        parsed: dict[str, Any] = json.loads(frame)
        return parsed

    async def nothing_more(self, wait: float) -> None:
        """Assert that no frame arrives within ``wait`` seconds."""
        try:
            async with asyncio.timeout(wait):
                frame = await self.ws.recv()
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame: {frame!r}")

    async def close(self) -> None:
        await self.ws.close()


async def open_client(
    url: str, *, headers: dict[str, str] | None = None, timeout: float = RECV_TIMEOUT
) -> Client:
    """Connect and read up to ``ready``; the frames before it are the resumed ones."""
    async with asyncio.timeout(timeout):
        ws = await connect(url, additional_headers=headers, open_timeout=timeout)
        resumed: list[dict[str, Any]] = []
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "ready":
                return Client(ws, frame, resumed)
            resumed.append(frame)


async def token_for(principal_id: int) -> str:
    return (await tokens.issue(principal_id)).token


async def websocket_channel() -> Channel:
    from e2e.helpers import channel

    return await channel("websocket")
