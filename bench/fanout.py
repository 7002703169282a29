"""One message to N HTTP subscribers, timed until every attempt row is written.

``python -m bench.fanout --subscribers 5000 [--workers 1] [--concurrency 2]``
runs on the embedded default (or the configured URLs), with its own fast
sink and its own worker processes, and prints deliveries per second. The
full benchmark suite (``make bench``) builds on the same pieces.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import func, insert, select

from bench.common import Countdown
from channels_cli.devservers import free_port
from channels_cli.processes import Process, start_worker
from channels_core import db, embedded, migrate
from channels_core.models import AttemptRow, DeliveryRow, PrincipalRow, SubscriptionRow
from channels_core.permissions import SUBMIT
from channels_core.primitives import Channel, Message, Permission, Principal, Role
from channels_core.settings import configure


def http_aliases(sink_port: int) -> Callable[[int], dict[str, Any]]:
    """Subscriber ``i`` of a webhook fan-out: an endpoint on the sink, a secret set up front."""
    from channels_core.signing import new_secret

    secret = new_secret()

    def aliases(i: int) -> dict[str, Any]:
        return {"endpoint": f"http://127.0.0.1:{sink_port}/hook/{i}", "webhook_secret": secret}

    return aliases


def email_aliases(i: int) -> dict[str, Any]:
    return {"email": f"subscriber{i}@example.com"}


async def setup(
    n: int, aliases: Callable[[int], dict[str, Any]], transport: str = "http"
) -> tuple[int, Channel]:
    """A channel with ``n`` subscribers, written in bulk (the benchmark measures
    delivery, not subscribing), and an author allowed to send to it."""
    stamp = f"{time.time_ns()}"
    perm = await Permission.get_or_create(SUBMIT)
    role = await Role().set_title(f"bench-{stamp}").add_permission(perm.id).save()  # type: ignore[arg-type]
    author = await Principal("service").add_role(role.id).save()  # type: ignore[arg-type]
    channel = (
        await Channel().set_title(f"bench {stamp}").set_alias("egress_transport", transport).save()
    )
    for start in range(0, n, 5000):
        async with db.session() as s, s.begin():
            ids = list(
                await s.scalars(
                    insert(PrincipalRow).returning(PrincipalRow.id),
                    [
                        {
                            "kind": "bot",
                            "aliases": aliases(i),
                        }
                        for i in range(start, min(n, start + 5000))
                    ],
                )
            )
            # One multi-row VALUES statement, not an executemany of one per row.
            await s.execute(
                insert(SubscriptionRow).values(
                    [{"channel_id": channel.id, "subscriber_id": i} for i in ids]
                )
            )
    return author.id, channel  # type: ignore[return-value]


async def attempts_written(message_id: int) -> int:
    async with db.session() as s:
        return int(
            await s.scalar(
                select(func.count())
                .select_from(AttemptRow)
                .join(DeliveryRow, DeliveryRow.id == AttemptRow.delivery_id)
                .where(DeliveryRow.message_id == message_id)
            )
            or 0
        )


ATTEMPTS_OF_MESSAGE = (
    "SELECT count(*) FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id"
    " WHERE d.message_id = %s"
)


async def run_once(
    n: int,
    sink_port: int | None,
    timeout: float,
    *,
    aliases: Callable[[int], dict[str, Any]] | None = None,
    transport: str = "http",
    observer_dsn: str | None = None,
    before: Callable[[], None] | None = None,
) -> tuple[float, int]:
    """Send one message to ``n`` new subscribers; time it until every attempt
    row is written. ``before`` runs just before the send (to start meters);
    with ``observer_dsn`` the progress is polled under that role, so the
    system's own statement counters stay its own."""
    if aliases is None:
        assert sink_port is not None
        aliases = http_aliases(sink_port)
    author_id, channel = await setup(n, aliases, transport)
    message = await Message().set_content("benchmark payload " * 8).set_author_id(author_id).save()
    observer = (
        await psycopg.AsyncConnection.connect(observer_dsn, autocommit=True)
        if observer_dsn
        else None
    )
    try:
        if before is not None:
            before()
        started = time.perf_counter()
        await message.send(channel)
        deadline = started + timeout
        written = 0
        countdown = Countdown(n)
        while time.perf_counter() < deadline:
            asked = time.perf_counter()
            if observer is not None:
                cursor = await observer.execute(ATTEMPTS_OF_MESSAGE, (message.id,))
                row = await cursor.fetchone()
                written = int(row[0]) if row else 0
            else:
                written = await attempts_written(message.id)  # type: ignore[arg-type]
            if written >= n:
                break
            now = time.perf_counter()
            await asyncio.sleep(countdown.sleep(written, now, now - asked))
        elapsed = time.perf_counter() - started
    finally:
        if observer is not None:
            await observer.close()
        await db.dispose()
    return elapsed, written


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subscribers", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()

    database_url, broker_url = embedded.database_url(), embedded.broker_url()
    configure(database_url=database_url, broker_url=broker_url)
    migrate.upgrade()
    logs = Path(tempfile.mkdtemp(prefix="channels-bench-"))
    sink_port = free_port()
    sink = Process(
        "sink", [sys.executable, "-m", "bench.sink", str(sink_port)], {}, logs / "sink.log"
    )
    env = {
        "CHANNELS_DATABASE_URL": database_url,
        "CHANNELS_BROKER_URL": broker_url,
        "CHANNELS_EGRESS_ALLOW_CIDRS": "127.0.0.0/8",
        "CHANNELS_HOME": os.environ.get("CHANNELS_HOME", ".channels"),
    }
    workers: list[Process] = []
    try:
        sink.wait_for_log("sink listening")
        for i in range(args.workers):
            workers.append(
                start_worker(
                    env, logs / f"worker{i}.log", concurrency=args.concurrency, name=f"bench{i}"
                )
            )
        for run in range(args.runs):
            elapsed, written = asyncio.run(run_once(args.subscribers, sink_port, args.timeout))
            rate = written / elapsed if elapsed else 0.0
            print(
                f"fanout run={run + 1} subscribers={args.subscribers} attempts_written={written} "
                f"seconds={elapsed:.2f} deliveries_per_s={rate:.0f} "
                f"workers={args.workers}x{args.concurrency}",
                flush=True,
            )
    finally:
        for process in workers:
            process.stop()
        sink.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
