"""A fast SMTP sink for benchmarks: raw asyncio, accepts everything, counts mails.

``python -m bench.smtpsink PORT`` speaks just enough SMTP (EHLO/HELO, MAIL,
RCPT, DATA, RSET, NOOP, QUIT) for smtplib and aiosmtplib, and prints the
mail count on SIGTERM. Like Postfix, Exim and the big providers it offers
ESMTP PIPELINING (RFC 2920), which it gets for free: every command in the
buffer is answered in order. smtplib ignores it, so the naive loop is
unaffected; ``--no-pipelining`` (or ``BENCH_SMTP_PIPELINING=0``) offers no
extension, for clients that then send one command at a time. Listens on
127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys


class SmtpSink(asyncio.Protocol):
    mails = 0
    ehlo = b"250-127.0.0.1\r\n250 PIPELINING\r\n"

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.in_data = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(b"220 127.0.0.1 bench sink ready\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    return
                del self.buffer[: end + 5]
                self.in_data = False
                SmtpSink.mails += 1
                self.transport.write(b"250 accepted\r\n")
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 2]
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.transport.write(self.ehlo)
            elif verb == b"DATA":
                self.in_data = True
                self.transport.write(b"354 end with <CRLF>.<CRLF>\r\n")
            elif verb == b"QUIT":
                self.transport.write(b"221 bye\r\n")
                self.transport.close()
                return
            else:  # HELO, MAIL, RCPT, RSET, NOOP: all fine
                self.transport.write(b"250 OK\r\n")


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(SmtpSink, "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"smtp sink listening on 127.0.0.1:{port}", flush=True)
    async with server:
        await stop.wait()
    print(f"mails={SmtpSink.mails}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument(
        "--no-pipelining",
        action="store_true",
        default=os.environ.get("BENCH_SMTP_PIPELINING", "1") == "0",
        help="offer no ESMTP extension",
    )
    args = parser.parse_args()
    if args.no_pipelining:
        SmtpSink.ehlo = b"250 127.0.0.1\r\n"
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.port))
    sys.exit(0)


if __name__ == "__main__":
    main()
