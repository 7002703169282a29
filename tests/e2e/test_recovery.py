"""Nothing accepted is lost: a SIGKILLed worker, a broker down at send time."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter

import pytest
from sqlalchemy import func, select

from channels_core import db, embedded
from channels_core.models import DeliveryRow, DeliveryStatus, OutboxRow
from channels_core.primitives import Message

from .conftest import Stack
from .helpers import author, channel, deliveries, subscribers, tag

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


async def _delivered(message_id: int) -> int:
    async with db.session() as s:
        return int(
            await s.scalar(
                select(func.count()).where(
                    DeliveryRow.message_id == message_id,
                    DeliveryRow.status == DeliveryStatus.DELIVERED,
                )
            )
            or 0
        )


async def test_worker_sigkilled_mid_fanout_loses_nothing(live: Stack) -> None:
    n = 2000
    t = tag()
    sender, ch = await author(), await channel("http")
    await subscribers(ch, [{"endpoint": live.http.url(f"/{t}/{i}")} for i in range(n)])
    msg = await Message().set_content("fan out").set_author_id(sender.id).save()  # type: ignore[arg-type]
    dispatch = await msg.send(ch)

    deadline = time.monotonic() + 60
    while await _delivered(msg.id) < 200:  # type: ignore[arg-type]
        assert time.monotonic() < deadline, "fan-out never started"
        await asyncio.sleep(0.05)
    live.worker.kill(signal.SIGKILL)  # the main process and its pool children at once
    live.worker.popen.wait(10)
    at_kill = await _delivered(msg.id)  # type: ignore[arg-type]
    assert at_kill < n, "the fan-out finished before the kill; nothing was tested"

    live.worker = live.start_worker("worker-after-kill")
    [result] = await dispatch.wait(timeout=180)
    assert (result.delivered_count, result.failed_count, result.pending_count) == (n, 0, 0)

    rows = await deliveries(msg.id)  # type: ignore[arg-type]
    assert len(rows) == n and {r.status for r in rows} == {DeliveryStatus.DELIVERED}
    seen = Counter(r.webhook_id for r in live.http.received if r.path.startswith(f"/{t}/"))
    # Deduplicated by webhook-id, the receiver saw every delivery exactly once.
    assert set(seen) == {f"dlv_{r.id}" for r in rows}
    duplicates = sum(c - 1 for c in seen.values())
    print(f"killed at {at_kill}/{n} delivered; raw repeat receipts: {duplicates}")


async def test_broker_down_at_send_time_is_relayed_by_the_sweeper(live: Stack) -> None:
    t = tag()
    sender, ch = await author(), await channel("http")
    await subscribers(ch, [{"endpoint": live.http.url(f"/{t}/{i}")} for i in range(3)])
    [valkey] = embedded.stop(names=("valkey",))
    try:
        msg = Message().set_content("while the broker sleeps").set_author_id(sender.id)  # type: ignore[arg-type]
        started = time.monotonic()
        dispatch = await msg.send(ch)
        assert time.monotonic() - started < 15, "send must not hang on a dead broker"
        [accepted] = list(dispatch)
        assert accepted.success and accepted.pending_count == 3
        async with db.session() as s:
            entry = await s.scalar(select(OutboxRow).where(OutboxRow.message_id == msg.id))
        assert entry is not None and entry.routed_at is None  # committed, not routed
        await asyncio.sleep(1)
        assert not any(r.path.startswith(f"/{t}/") for r in live.http.received)
    finally:
        restarted = embedded.ensure_valkey()
    assert restarted.port == valkey.port  # same URL: workers and beat reconnect
    [result] = await dispatch.wait(timeout=120)
    assert (result.delivered_count, result.failed_count) == (3, 0)
    got = Counter(r.webhook_id for r in live.http.received if r.path.startswith(f"/{t}/"))
    assert len(got) == 3 and set(got.values()) == {1}  # nothing sent twice
    async with db.session() as s:
        entry = await s.scalar(select(OutboxRow).where(OutboxRow.message_id == msg.id))
    assert entry is not None and entry.routed_at is not None and entry.relays >= 1
