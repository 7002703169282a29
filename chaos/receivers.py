"""Receivers that record every delivery id they get, some of them hostile.

- ``HttpSink``: an aiohttp server on 127.0.0.1. The path names a behaviour
  (``/ok/..``, ``/slow/..``, ``/stall/..``, ``/drip/..``, ``/redirect/..``,
  ``/gone/..``, ``/limit/..``, ``/reset/..``, ``/flaky/..``); every request is
  recorded with its ``webhook-id`` and whether the sink *acknowledged* it
  (a complete 2xx answer written). It also counts requests for one delivery
  id that overlap in time: two copies of one delivery running in parallel.
- ``FaultySmtp``: a small SMTP server written on asyncio streams, so it can
  answer 421 at the greeting, 451 / 550 at RCPT, and hang up during DATA.
- ``Receipt`` is what the ledger reads from either.

Every server binds 127.0.0.1 and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from channels_cli.devservers import free_port

__all__ = ["Receipt", "HttpSink", "FaultySmtp", "LoopThread", "queue_receipts"]

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Receipt:
    """One delivery attempt as a receiver saw it."""

    receiver: str
    delivery_id: int | None
    message_id: int | None
    subscriber_key: str  # path or address: the ledger maps it to a subscriber id
    acked: bool
    at: float


class LoopThread:
    """An asyncio loop on a daemon thread, for servers sync code starts and stops."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        """As ``asyncio.run`` ends: what still runs (a session waiting on its
        client) is cancelled and let finish, so no transport outlives the loop."""

        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(drain(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


def _delivery_id(value: str | None) -> int | None:
    match = re.fullmatch(r"<?dlv[_-](\d+)(@[^>]*)?>?", (value or "").strip())
    return int(match.group(1)) if match else None


@dataclass
class _Scripts:
    """Per-delivery-id counters, so a flaky behaviour fails the first N tries."""

    seen: Counter[str] = field(default_factory=Counter)

    def nth(self, key: str) -> int:
        self.seen[key] += 1
        return self.seen[key]


class HttpSink:
    """Records every request; answers by the behaviour the path names."""

    def __init__(self, *, hold: float = 0.0, redirect_to: str = "", fail_first: int = 1) -> None:
        self.port = free_port()
        self.hold = hold  # how long every request is held: long enough to see overlaps
        self.redirect_to = redirect_to
        self.fail_first = fail_first
        self.receipts: list[Receipt] = []
        self.overlaps: list[str] = []  # delivery ids seen in two requests at once
        self.arrivals: dict[str, list[float]] = {}
        self._inflight: Counter[str] = Counter()
        self._scripts = _Scripts()
        self._lock = threading.Lock()
        self._loop: LoopThread | None = None
        self._runner: Any = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def requests(self) -> int:
        with self._lock:
            return len(self.receipts)

    def snapshot(self) -> list[Receipt]:
        with self._lock:
            return list(self.receipts)

    def _record(self, wid: str, path: str, message_id: int | None, acked: bool) -> None:
        with self._lock:
            self.receipts.append(
                Receipt("http", _delivery_id(wid), message_id, path, acked, time.time())
            )

    async def _handle(self, request: Any) -> Any:

        body = await request.read()
        wid = request.headers.get("webhook-id", "")
        try:
            message_id = int(json.loads(body)["data"]["message_id"])
        except (ValueError, KeyError, TypeError):
            message_id = None
        behaviour = request.path.strip("/").split("/", 1)[0]
        with self._lock:
            self.arrivals.setdefault(wid, []).append(time.monotonic())
            self._inflight[wid] += 1
            if self._inflight[wid] > 1:
                self.overlaps.append(wid)
            nth = self._scripts.nth(wid)
        try:
            if self.hold:
                await asyncio.sleep(self.hold)
            return await self._answer(request, behaviour, wid, message_id, nth)
        finally:
            with self._lock:
                self._inflight[wid] -= 1

    async def _answer(
        self, request: Any, behaviour: str, wid: str, message_id: int | None, nth: int
    ) -> Any:
        from aiohttp import web

        path = request.path
        if behaviour == "slow":  # slower than usual, inside the read timeout
            await asyncio.sleep(0.5)
        elif behaviour == "stall":  # answers after the client's deadline, if ever
            await asyncio.sleep(6.0)
            closing = request.transport is None or request.transport.is_closing()
            self._record(wid, path, message_id, acked=not closing)
            return web.Response(status=200, text="late")
        elif behaviour == "drip":
            # The status line and headers trickle in a byte at a time for ~10 s:
            # a client without an overall deadline would wait for all of it.
            complete = False
            transport = request.transport
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            for byte in answer[:-4]:
                if transport is None or transport.is_closing():
                    break
                transport.write(bytes([byte]))
                await asyncio.sleep(0.25)
            else:
                if transport is not None and not transport.is_closing():
                    transport.write(answer[-4:])
                    complete = True
            self._record(wid, path, message_id, acked=complete)
            if transport is not None:
                transport.close()
            # Written to a closed transport: aiohttp drops it.
            return web.Response(status=200, text="")
        elif behaviour == "redirect":
            self._record(wid, path, message_id, acked=False)
            return web.Response(status=302, headers={"Location": self.redirect_to + path})
        elif behaviour == "gone":
            self._record(wid, path, message_id, acked=False)
            return web.Response(status=410, text="gone")
        elif behaviour == "limit" and nth <= self.fail_first:
            self._record(wid, path, message_id, acked=False)
            return web.Response(status=429, headers={"Retry-After": "1"}, text="slow down")
        elif behaviour == "reset" and nth <= self.fail_first:
            # Half a status line, then a TCP reset: the answer never completes.
            self._record(wid, path, message_id, acked=False)
            transport = request.transport
            if transport is not None:
                transport.write(b"HTTP/1.1 200 OK\r\nContent-Le")
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    import socket
                    import struct

                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                transport.abort()
            # Written to a closed transport: aiohttp drops it.
            return web.Response(status=200, text="never seen")
        elif behaviour == "flaky" and nth <= self.fail_first:
            self._record(wid, path, message_id, acked=False)
            return web.Response(status=503, text="later")
        self._record(wid, path, message_id, acked=True)
        return web.Response(status=200, text="ok")

    def start(self) -> HttpSink:
        from aiohttp import web

        self._loop = LoopThread("http-sink")

        async def serve() -> Any:
            app = web.Application(client_max_size=8 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            await web.TCPSite(runner, HOST, self.port, backlog=1024).start()
            return runner

        self._runner = self._loop.run(serve())
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(Exception):
            self._loop.run(self._runner.cleanup(), timeout=10)
        self._loop.stop()
        self._loop = None


# -- SMTP ----------------------------------------------------------------------------


class FaultySmtp:
    """A minimal SMTP server: one mail per transaction, scripted faults.

    Recipients' local parts name the behaviour: ``ok-*`` accept; ``grey-*``
    get ``451`` at RCPT on the first try; ``reject-*`` always ``550``;
    ``drop-*`` see the connection closed during DATA on the first try.
    ``busy_first`` connections are greeted with ``421`` and closed. A client
    that hangs up inside DATA, before the final ``.``, sent no mail: as a
    real server does, this one discards it (a try, never acknowledged).
    """

    def __init__(self, *, busy_first: int = 0) -> None:
        self.port = free_port()
        self.busy_first = busy_first
        self.connections = 0
        self.receipts: list[Receipt] = []
        self._tries: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._loop: LoopThread | None = None
        self._server: asyncio.AbstractServer | None = None

    def snapshot(self) -> list[Receipt]:
        with self._lock:
            return list(self.receipts)

    def rearm(self, *, busy_first: int = 0) -> FaultySmtp:
        """Forget everything seen: one server serves the whole run, a scenario at a time."""
        with self._lock:
            self.busy_first = busy_first
            self.connections = 0
            self.receipts = []
            self._tries = Counter()
        return self

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self.connections += 1
            busy = self.connections <= self.busy_first

        async def reply(line: str) -> None:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()

        try:
            if busy:
                await reply("421 4.3.2 too busy, try later")
                return
            await reply("220 chaos ESMTP")
            rcpts: list[str] = []
            while True:
                raw = await asyncio.wait_for(reader.readline(), 30)
                if not raw:
                    return
                line = raw.decode(errors="replace").strip()
                verb = line.split(" ", 1)[0].upper()
                if verb in ("EHLO", "HELO"):
                    await reply("250-chaos\r\n250 8BITMIME" if verb == "EHLO" else "250 chaos")
                elif verb == "MAIL":
                    rcpts = []
                    await reply("250 OK")
                elif verb == "RCPT":
                    address = line.split(":", 1)[1].strip().strip("<>").lower()
                    answer = self._rcpt(address)
                    if answer.startswith("250"):
                        rcpts.append(address)
                    await reply(answer)
                elif verb == "DATA":
                    if not rcpts:
                        await reply("503 no valid recipients")
                        continue
                    await reply("354 go ahead")
                    data = bytearray()
                    while (chunk := await asyncio.wait_for(reader.readline(), 30)) != b".\r\n":
                        if not chunk:
                            # Gone before the final dot (its worker killed, or its send
                            # interrupted after the 354): a real server discards what
                            # came. Taken as a mail, an empty one was an acknowledged
                            # receipt of no delivery, a stranger to the ledger.
                            self._unfinished(rcpts, bytes(data))
                            return
                        data += chunk
                    if await self._data(rcpts, bytes(data)):
                        await reply("250 queued")
                    else:
                        return  # hang up without answering DATA
                elif verb == "RSET":
                    rcpts = []
                    await reply("250 OK")
                elif verb == "QUIT":
                    await reply("221 bye")
                    return
                else:
                    await reply("250 OK")
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    def _rcpt(self, address: str) -> str:
        local = address.split("@", 1)[0]
        with self._lock:
            self._tries[f"rcpt:{address}"] += 1
            tries = self._tries[f"rcpt:{address}"]
        if local.startswith("reject-"):
            return "550 5.1.1 no such user"
        if local.startswith("grey-") and tries <= 1:
            return "451 4.7.1 greylisted, try again"
        return "250 OK"

    @staticmethod
    def _ids(data: bytes) -> tuple[int | None, int | None]:
        """(delivery id, message id) a mail's headers carry."""
        from email import message_from_bytes

        mail = message_from_bytes(data)
        try:
            message_id: int | None = int(mail.get("X-Channels-Message-Id", ""))
        except ValueError:
            message_id = None
        return _delivery_id(mail.get("Message-ID")), message_id

    def _unfinished(self, rcpts: list[str], data: bytes) -> None:
        dlv, message_id = self._ids(data)
        with self._lock:
            self.receipts.append(Receipt("smtp", dlv, message_id, rcpts[0], False, time.time()))

    async def _data(self, rcpts: list[str], data: bytes) -> bool:
        dlv, message_id = self._ids(data)
        address = rcpts[0]
        with self._lock:
            self._tries[f"data:{address}:{dlv}"] += 1
            drop = address.startswith("drop-") and self._tries[f"data:{address}:{dlv}"] <= 1
            self.receipts.append(Receipt("smtp", dlv, message_id, address, not drop, time.time()))
        return not drop

    def start(self) -> FaultySmtp:
        self._loop = LoopThread("faulty-smtp")

        async def serve() -> asyncio.AbstractServer:
            return await asyncio.start_server(self._session, HOST, self.port, backlog=512)

        self._server = self._loop.run(serve())
        return self

    def stop(self) -> None:
        if self._loop is None or self._server is None:
            return
        server = self._server

        async def close() -> None:
            server.close()

        with contextlib.suppress(Exception):
            self._loop.run(close(), timeout=10)
        self._loop.stop()
        self._loop = None


def queue_receipts(envelopes: list[tuple[str, dict[str, Any]]]) -> list[Receipt]:
    """Receipts from ``channels_cli.devservers.QueueConsumer`` envelopes (acked on receipt)."""
    out = []
    for _queue, env in envelopes:
        data = env.get("data") or {}
        out.append(
            Receipt(
                "queue",
                env.get("delivery_id"),
                data.get("message_id"),
                str(env.get("subscriber_id")),
                True,
                time.time(),
            )
        )
    return out
