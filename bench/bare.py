"""The bare-client reference: one process, the HTTP transport's engine
(``channels_core.transports.http_client.HttpClient`` on uvloop), 64
connections, the same payload to the same sink.

``python -m bench.bare URL COUNT`` prints ``requests=N rows=W seconds=S cpu=C rate=R``.

``--record DSN`` adds the least that any design recording every attempt must
do: each answer becomes a row (a primary key, the status, the latency, the
time), written with COPY in batches of ``RECORD_BATCH`` on one connection
while the requests go on; the rate counts until the last row is committed.
It is the floor under S1's "until every attempt row is written", not a
delivery system: nothing is claimed, signed, retried or routed.

``--engine aiohttp`` runs the same loop on aiohttp (the engine before it), for
comparison only; the report's reference is the default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

PAYLOAD = b'{"type":"message.created","data":{"content":"' + b"benchmark payload " * 8 + b'"}}'
HEADERS = {"Content-Type": "application/json"}
RECORD_BATCH = 500
RECORD_SCHEMA = """
CREATE TABLE IF NOT EXISTS bare_attempts (
    id BIGINT PRIMARY KEY,
    status_code INTEGER NOT NULL,
    latency_ms DOUBLE PRECISION NOT NULL,
    finished_at TIMESTAMPTZ NOT NULL
)
"""

Post = Callable[[], Awaitable[int]]


async def _drive(post: Post, count: int, concurrency: int) -> int:
    done = 0

    async def worker(n: int) -> None:
        nonlocal done
        for _ in range(n):
            status = await post()  # not inside +=, which reads ``done`` before awaiting
            done += status == 200

    share = [
        count // concurrency + (1 if i < count % concurrency else 0) for i in range(concurrency)
    ]
    await asyncio.gather(*(worker(n) for n in share))
    return done


@contextlib.asynccontextmanager
async def transport_engine(url: str, concurrency: int) -> AsyncIterator[Post]:
    from channels_core.settings import configure, get_settings
    from channels_core.transports.http_client import HttpClient

    if not get_settings().egress_allow_cidrs:
        # The sink is on loopback, which the SSRF guard refuses unless allowed.
        configure(egress_allow_cidrs="127.0.0.0/8")
    settings = get_settings()
    client = HttpClient(pool_size=concurrency)

    async def post() -> int:
        response = await client.post(
            url,
            HEADERS,
            PAYLOAD,
            connect_timeout=settings.http_connect_timeout,
            read_timeout=settings.http_read_timeout,
            deadline=settings.http_deadline,
            max_body=settings.http_max_response_bytes,
        )
        return response.status

    try:
        yield post
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def aiohttp_engine(url: str, concurrency: int) -> AsyncIterator[Post]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post() -> int:
            async with session.post(url, data=PAYLOAD, headers=HEADERS) as response:
                await response.read()
                return response.status

        yield post


class Recorder:
    """Every answer as a row, copied in batches while the requests go on."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._rows: list[tuple[int, int, float, datetime]] = []
        self._batches: asyncio.Queue[list[tuple[int, int, float, datetime]] | None]
        self._batches = asyncio.Queue()
        self._writer = asyncio.create_task(self._write())
        self._numbered = 0  # ids given to rows already handed to the writer

    @classmethod
    async def open(cls, dsn: str) -> Recorder:
        import psycopg

        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        await conn.execute(RECORD_SCHEMA)
        await conn.execute("TRUNCATE bare_attempts")
        return cls(conn)

    def wrap(self, post: Post) -> Post:
        async def post_and_keep() -> int:
            started = time.perf_counter()
            status = await post()
            latency = (time.perf_counter() - started) * 1000
            self._rows.append(
                (self._numbered + len(self._rows), status, latency, datetime.now(UTC))
            )
            if len(self._rows) >= RECORD_BATCH:
                self._flush()
            return status

        return post_and_keep

    def _flush(self) -> None:
        rows, self._rows = self._rows, []
        self._numbered += len(rows)
        self._batches.put_nowait(rows)

    async def _write(self) -> None:
        while (rows := await self._batches.get()) is not None:
            async with self._conn.cursor().copy(
                "COPY bare_attempts (id, status_code, latency_ms, finished_at) FROM STDIN"
            ) as copy:
                for row in rows:
                    await copy.write_row(row)

    async def close(self) -> int:
        """Copy what is left; the rows the table holds once all are committed."""
        if self._rows:
            self._flush()
        self._batches.put_nowait(None)
        await self._writer
        async with self._conn:
            row = await (await self._conn.execute("SELECT count(*) FROM bare_attempts")).fetchone()
        return int(row[0]) if row else 0


async def main(url: str, count: int, engine: str, dsn: str | None, concurrency: int = 64) -> None:
    run = aiohttp_engine if engine == "aiohttp" else transport_engine
    rows = 0
    async with run(url, concurrency) as post:
        recorder = await Recorder.open(dsn) if dsn else None
        started = time.perf_counter()
        done = await _drive(recorder.wrap(post) if recorder else post, count, concurrency)
        if recorder is not None:
            rows = await recorder.close()
        elapsed = time.perf_counter() - started
    if recorder is not None and rows != count:
        raise SystemExit(f"{rows} rows written for {count} requests")
    print(
        f"requests={done} rows={rows} seconds={elapsed:.3f} cpu={time.process_time():.3f}"
        f" rate={done / elapsed:.0f}",
        flush=True,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("url")
    parser.add_argument("count", type=int)
    parser.add_argument("--engine", choices=("transport", "aiohttp"), default="transport")
    parser.add_argument("--record", metavar="DSN", help="write each answer as a row")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(args.url, args.count, args.engine, args.record))
