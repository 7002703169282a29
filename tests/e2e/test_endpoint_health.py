"""Endpoint health end to end: real workers, the embedded Valkey and PostgreSQL,
a real HTTP server that fails and recovers, answers 410, or is rate limited.

The stack here has a short breaker cool-down and a long retry schedule, so a
delivery that meets a down endpoint survives the outage and the test shows
what the breaker saves: requests bounded by its probe schedule, not by the
number of deliveries.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from sqlalchemy import func, select

from channels_core import db, endpoints
from channels_core.models import DeliveryRow
from channels_core.primitives import Message
from tests.e2e.conftest import Stack
from tests.e2e.helpers import author, channel, subscribers, tag

THRESHOLD = 3
COOLDOWN = 0.5
COOLDOWN_MAX = 2.0
STACK_TUNING = {
    "breaker_threshold": str(THRESHOLD),
    "breaker_cooldown": str(COOLDOWN),
    "breaker_cooldown_max": str(COOLDOWN_MAX),
    "retry_schedule": ",".join(["0"] + ["0.3"] * 14),
    "endpoint_cache_ttl": "0.5",
}


async def _statuses(message_id: int) -> Counter[str]:
    async with db.session() as s:
        rows = await s.execute(
            select(DeliveryRow.status, func.count())
            .where(DeliveryRow.message_id == message_id)
            .group_by(DeliveryRow.status)
        )
        return Counter({status: count for status, count in rows})


async def _settled(message_id: int, total: int, *, timeout: float) -> Counter[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = await _statuses(message_id)
        if found["delivered"] + found["dead"] == total or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.2)


async def _send(sender_id: int, ch_id: int, content: str) -> int:
    from channels_core.registries import ChannelRegistry

    ch = await ChannelRegistry().get(ch_id)
    assert ch is not None
    message = Message().set_content(content).set_author_id(sender_id)
    await message.send(ch)
    assert message.id is not None
    return message.id


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "channels"), *args],
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _probe_schedule(seconds: float) -> int:
    """Cool-downs that end within ``seconds`` of opening: 0.5, 1, 2, 2, ... doubling to the max."""
    count, at, cool = 0, 0.0, COOLDOWN
    while at + cool <= seconds:
        at += cool
        count += 1
        cool = min(cool * 2, COOLDOWN_MAX)
    return count


async def test_a_down_endpoint_costs_probes_not_one_request_per_delivery(live: Stack) -> None:
    n, down_for = 300, 8.0
    path = f"/down-{tag()}"
    url = live.http.url(path)
    live.http.script(path, [503] * 100_000)
    sender, ch = await author(), await channel("http")
    await subscribers(ch, [{"endpoint": url}] * n)
    message_id = await _send(sender.id, ch.id, "to a down endpoint")  # type: ignore[arg-type]

    await asyncio.sleep(down_for)
    while_down = len(live.http.for_path(path))
    live.http.script(path, [])  # recovered: 200 from now on
    found = await _settled(message_id, n, timeout=90)

    # Before it opens: the canary and the suspect's one-at-a-time requests,
    # at most one per concurrently running batch beyond the threshold; then
    # one probe per cool-down.
    bound = THRESHOLD + 2 + _probe_schedule(down_for)
    print(
        f"\nbreaker: {n} deliveries to an endpoint down for {down_for:g}s; "
        f"it received {while_down} requests (probe-schedule bound {bound})"
    )
    assert 1 <= while_down <= bound
    assert found == Counter({"delivered": n}), found
    async with db.session() as s:
        attempts = await s.scalar(
            select(func.sum(DeliveryRow.attempts)).where(DeliveryRow.message_id == message_id)
        )
    # Every request the server saw is an attempt row, and no attempt was
    # spent without a request: deferred deliveries kept theirs.
    assert attempts == len(live.http.for_path(path))
    ids = Counter(r.webhook_id for r in live.http.for_path(path) if r.status == 200)
    assert len(ids) == n
    history = [e.event for e in reversed(await endpoints.events(url))]
    assert history[0] == "opened" and history[-1] == "closed" and "half_open" in history


async def test_410_disables_the_endpoint_until_it_is_enabled_again(live: Stack) -> None:
    path = f"/gone-{tag()}"
    url = live.http.url(path)
    live.http.script(path, [410])
    sender, ch = await author(), await channel("http")
    await subscribers(ch, [{"endpoint": url}])

    first = await _send(sender.id, ch.id, "one")  # type: ignore[arg-type]
    assert await _settled(first, 1, timeout=30) == Counter({"dead": 1})
    second = await _send(sender.id, ch.id, "two")  # type: ignore[arg-type]
    assert await _settled(second, 1, timeout=30) == Counter({"dead": 1})
    async with db.session() as s:
        errors = list(
            await s.scalars(
                select(DeliveryRow.last_error)
                .where(DeliveryRow.message_id.in_([first, second]))
                .order_by(DeliveryRow.id)
            )
        )
    assert errors == ["HTTP 410", "endpoint disabled: answered 410 Gone"]
    assert len(live.http.for_path(path)) == 1  # the disabled endpoint was not dialled again

    listed = _cli(live, "endpoints", "--disabled", "--json")
    assert listed.returncode == 0, listed.stderr
    [shown] = [e for e in json.loads(listed.stdout) if e["url"] == url]
    assert (shown["enabled"], shown["disabled_reason"]) == (False, "answered 410 Gone")

    enabled = _cli(live, "endpoints", "enable", url)
    assert enabled.returncode == 0, enabled.stderr
    assert f"enabled: {url}" in enabled.stdout
    await asyncio.sleep(1)  # workers reload switches within endpoint_cache_ttl
    third = await _send(sender.id, ch.id, "three")  # type: ignore[arg-type]
    assert await _settled(third, 1, timeout=30) == Counter({"delivered": 1})
    events = json.loads(_cli(live, "endpoints", "show", url, "--json").stdout)["events"]
    assert [e["event"] for e in events][:2] == ["enabled", "disabled"]


async def test_a_rate_limit_holds_across_two_worker_processes_and_loses_nothing(
    live: Stack,
) -> None:
    rate, n, window = 50.0, 700, 10.0
    second = live.start_worker("worker-rate")
    path = f"/limited-{tag()}"
    url = live.http.url(path)
    await endpoints.set_rate_limit(url, rate)
    sender, ch = await author(), await channel("http")
    await subscribers(ch, [{"endpoint": url}] * n)
    await asyncio.sleep(1)  # both workers see the limit (endpoint_cache_ttl)
    try:
        message_id = await _send(sender.id, ch.id, "paced")  # type: ignore[arg-type]
        found = await _settled(message_id, n, timeout=n / rate + 60)
    finally:
        second.stop()

    times = sorted(r.at for r in live.http.for_path(path))
    start = times[0] + 1.0  # past the first burst
    in_window = sum(1 for t in times if start <= t < start + window)
    observed = in_window / window
    print(
        f"\nrate limit {rate:g}/s, two worker processes: {observed:.1f}/s over {window:g}s; "
        f"{len(times)} requests for {n} deliveries; per second: "
        f"{[sum(1 for t in times if times[0] + i <= t < times[0] + i + 1) for i in range(16)]}"
    )
    assert math.isclose(observed, rate, rel_tol=0.10), observed
    assert found == Counter({"delivered": n}), found
    ids = Counter(r.webhook_id for r in live.http.for_path(path))
    assert len(ids) == n
