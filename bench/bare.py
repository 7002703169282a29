"""The bare-client reference: one process, the HTTP transport's engine
(aiohttp on uvloop), 64 connections, the same payload to the same sink.

``python -m bench.bare URL COUNT`` prints ``requests=N seconds=S cpu=C rate=R``.
"""

from __future__ import annotations

import asyncio
import sys
import time

import aiohttp

PAYLOAD = b'{"type":"message.created","data":{"content":"' + b"benchmark payload " * 8 + b'"}}'


async def main(url: str, count: int, concurrency: int = 64) -> None:
    connector = aiohttp.TCPConnector(limit=concurrency)
    done = 0
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(n: int) -> None:
            nonlocal done
            for _ in range(n):
                async with session.post(
                    url, data=PAYLOAD, headers={"Content-Type": "application/json"}
                ) as response:
                    await response.read()
                    done += response.status == 200

        started = time.perf_counter()
        share = [
            count // concurrency + (1 if i < count % concurrency else 0) for i in range(concurrency)
        ]
        await asyncio.gather(*(worker(n) for n in share))
        elapsed = time.perf_counter() - started
    print(
        f"requests={done} seconds={elapsed:.3f} cpu={time.process_time():.3f}"
        f" rate={done / elapsed:.0f}",
        flush=True,
    )


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
