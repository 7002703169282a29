"""Metrics that move with real deliveries: the ingress's exposition and the worker exporter."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
import pytest
from _support import override_settings
from e2e.conftest import Stack
from e2e.helpers import author, channel, subscribers, tag

from channels_cli.devservers import free_port
from channels_core.metrics import exposition
from channels_core.models import AttemptStatus
from channels_core.primitives import Manifest, Message

from .conftest import Observed
from .promtext import Samples, samples, value

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


async def _deliver(live: Stack, n: int, *, failing: int = 0) -> Message:
    """Send one message to ``n`` http subscribers (``failing`` of them answer 410); wait."""
    t = tag()
    sender, ch = await author(), await channel("http")
    for i in range(failing):
        live.http.script(f"/{t}/{i}", [410])
    await subscribers(ch, [{"endpoint": live.http.url(f"/{t}/{i}")} for i in range(n)])
    msg = Message().set_content(f"metrics {t}").set_author_id(sender.id)  # type: ignore[arg-type]
    [result] = await (await msg.send(Manifest([ch]))).wait(timeout=60)
    assert (result.delivered_count, result.failed_count) == (n - failing, failing)
    return msg


async def test_exposition_counts_attempts_made_by_the_worker(live: Stack) -> None:
    body, content_type = await exposition()
    assert content_type.startswith("text/plain")
    before = samples(body.decode())
    assert value(before, "channels_metrics_source_up", source="database") == 1
    assert value(before, "channels_metrics_source_up", source="broker") == 1

    await _deliver(live, 3, failing=1)

    after = samples((await exposition())[0].decode())
    attempts = "channels_attempts_total"
    delivered = dict(transport="http", status=AttemptStatus.DELIVERED)
    permanent = dict(transport="http", status=AttemptStatus.PERMANENT)
    # At least: the beat of this module may also retry deliveries left by earlier modules.
    assert value(after, attempts, **delivered) >= value(before, attempts, **delivered) + 2
    assert value(after, attempts, **permanent) >= value(before, attempts, **permanent) + 1
    count = "channels_attempt_latency_seconds_count"
    assert value(after, count, transport="http") >= value(before, count, transport="http") + 3
    assert value(after, "channels_dead_letters") >= value(before, "channels_dead_letters") + 1
    assert value(after, "channels_deliveries", status="dead") == value(
        after, "channels_dead_letters"
    )
    for queue in ("channels.route", "channels.deliver", "channels.sweep"):
        assert ("channels_queue_depth", (("queue", queue),)) in after


def _scrape(port: int) -> Samples:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10.0)
    response.raise_for_status()
    return samples(response.text)


async def test_worker_exporter_serves_latency_from_the_pool_children(
    live: Stack, observed: Observed
) -> None:
    port = observed.metrics_port
    latency = "channels_worker_attempt_latency_seconds_count"
    before = await asyncio.to_thread(_scrape, port)

    await _deliver(live, 2)

    # The exporter adds up files the children write as they go: no delay
    # beyond the batch itself, but the scrape may race the last write.
    deadline = time.monotonic() + 10
    while True:
        after = await asyncio.to_thread(_scrape, port)
        if value(after, latency, transport="http") >= value(before, latency, transport="http") + 2:
            break
        assert time.monotonic() < deadline, f"latency histogram did not move: {after}"
        await asyncio.sleep(0.2)
    assert (
        value(after, "channels_worker_attempts_total", transport="http", status="delivered")
        >= value(before, "channels_worker_attempts_total", transport="http", status="delivered") + 2
    )
    buckets = {
        dict(labels)["le"]: v
        for (name, labels), v in after.items()
        if name == "channels_worker_attempt_latency_seconds_bucket"
        and dict(labels)["transport"] == "http"
    }
    assert buckets["+Inf"] == value(after, latency, transport="http")
    assert value(after, "channels_worker_attempt_latency_seconds_sum", transport="http") > 0


def test_worker_exporter_listens_on_loopback_only(live: Stack, observed: Observed) -> None:
    import psutil

    listening = [
        c.laddr
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == observed.metrics_port
    ]
    assert [a.ip for a in listening] == ["127.0.0.1"]


def test_exporter_directory_is_fresh_per_worker_and_removed_at_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prometheus_client import values

    from workers.metrics import Exporter

    monkeypatch.setattr(values, "ValueClass", values.ValueClass)  # restored afterwards
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    root = tmp_path / "prometheus"
    dead = root / "worker-999999999"  # no such process: left by a SIGKILLed worker
    alive = root / "worker-1"  # a running process's: not ours to remove
    mine = root / f"worker-{os.getpid()}"
    for path in (dead, alive, mine):
        path.mkdir(parents=True)
        (path / "counter_1.db").write_bytes(b"stale")

    exporter = Exporter()
    with override_settings(home=tmp_path, metrics_port=free_port()):
        exporter.prepare()
        try:
            assert exporter.directory == mine.resolve()
            assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(mine.resolve())
            assert list(mine.iterdir()) == []  # a previous run's counts are gone
            assert not dead.exists() and alive.exists()
        finally:
            exporter.stop()
    assert not mine.exists() and "PROMETHEUS_MULTIPROC_DIR" not in os.environ


def test_exporter_is_off_without_a_port(tmp_path: Path) -> None:
    from workers.metrics import Exporter

    exporter = Exporter()
    with override_settings(home=tmp_path, metrics_port=0):
        exporter.prepare()
        exporter.start()
    assert exporter.directory is None and exporter.port is None
    assert not (tmp_path / "prometheus").exists()
