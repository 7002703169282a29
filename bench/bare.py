"""The bare-client reference: one process, the HTTP transport's engine
(``channels_core.transports.http_client.HttpClient`` on uvloop), 64
connections, the same payload to the same sink.

``python -m bench.bare URL COUNT`` prints ``requests=N seconds=S cpu=C rate=R``.
``--engine aiohttp`` runs the same loop on aiohttp (the engine before it), for
comparison only; the report's reference is the default.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

PAYLOAD = b'{"type":"message.created","data":{"content":"' + b"benchmark payload " * 8 + b'"}}'
HEADERS = {"Content-Type": "application/json"}

Post = Callable[[], Awaitable[int]]


async def _drive(post: Post, count: int, concurrency: int) -> tuple[int, float]:
    done = 0

    async def worker(n: int) -> None:
        nonlocal done
        for _ in range(n):
            status = await post()  # not inside +=, which reads ``done`` before awaiting
            done += status == 200

    started = time.perf_counter()
    share = [
        count // concurrency + (1 if i < count % concurrency else 0) for i in range(concurrency)
    ]
    await asyncio.gather(*(worker(n) for n in share))
    return done, time.perf_counter() - started


async def transport_engine(url: str, count: int, concurrency: int) -> tuple[int, float]:
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
        return await _drive(post, count, concurrency)
    finally:
        await client.aclose()


async def aiohttp_engine(url: str, count: int, concurrency: int) -> tuple[int, float]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post() -> int:
            async with session.post(url, data=PAYLOAD, headers=HEADERS) as response:
                await response.read()
                return response.status

        return await _drive(post, count, concurrency)


async def main(url: str, count: int, engine: str, concurrency: int = 64) -> None:
    run = aiohttp_engine if engine == "aiohttp" else transport_engine
    done, elapsed = await run(url, count, concurrency)
    print(
        f"requests={done} seconds={elapsed:.3f} cpu={time.process_time():.3f}"
        f" rate={done / elapsed:.0f}",
        flush=True,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("url")
    parser.add_argument("count", type=int)
    parser.add_argument("--engine", choices=("transport", "aiohttp"), default="transport")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(args.url, args.count, args.engine))
