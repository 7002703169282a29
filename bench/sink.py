"""A fast HTTP sink for benchmarks: raw asyncio, keep-alive, counts requests.

``python -m bench.sink PORT [--delay SECONDS]`` answers every request with
200 (after ``delay`` when set) and prints the request count on SIGTERM.
It parses only what it must (headers end, Content-Length), so the system
under test, not the sink, sets the pace. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


class SinkProtocol(asyncio.Protocol):
    count = 0

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                line_end = head.find(b"\r\n", at)
                length = int(head[at + 15 : line_end if line_end >= 0 else None].strip() or 0)
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            del self.buffer[:total]
            SinkProtocol.count += 1
            if self.delay:
                asyncio.get_running_loop().call_later(self.delay, self._answer)
            else:
                self._answer()

    def _answer(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(RESPONSE)


async def serve(port: int, delay: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SinkProtocol(delay), "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"sink listening on 127.0.0.1:{port} delay={delay}", flush=True)
    async with server:
        await stop.wait()
    print(f"requests={SinkProtocol.count}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.port, args.delay))
    sys.exit(0)


if __name__ == "__main__":
    main()
