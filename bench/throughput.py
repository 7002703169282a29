"""Throughput scenarios: S1 (fast sink), S2 (100 ms endpoints), S3 (100,000
subscribers: memory and database round trips) and S7 (S2 at 1, 2, 4
worker processes), each beside its references where it has one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg

from bench.common import Countdown, CpuMeter, Figure, Machine, RssSampler
from bench.fanout import run_once
from channels_cli.processes import Process

__all__ = ["channels_fanout", "naive_fanout", "bare", "memory_and_round_trips", "scaling"]


def channels_fanout(
    machine: Machine,
    scenario: str,
    n: int,
    port: int,
    runs: int,
    concurrency: int,
    *,
    system: str = "channels",
    profile: Path | None = None,
) -> Figure:
    """One message to ``n`` subscribers on ``port``, ``runs`` times, one worker."""
    figure = Figure(scenario, system, notes=f"n={n}, pool={concurrency}")
    with machine.worker(f"{scenario}-{concurrency}", concurrency) as worker:
        for run in range(runs):
            meter = machine.cpu_meter(worker=[worker.pid])
            spies: list[subprocess.Popen[bytes]] = []
            spy_out = profile if run == 0 else None

            def before(
                meter: CpuMeter = meter,
                spy_out: Path | None = spy_out,
                spies: list[subprocess.Popen[bytes]] = spies,
            ) -> None:
                meter.start()
                if spy_out is not None:
                    spies.extend(_py_spy(worker.pid, spy_out))

            elapsed, written = asyncio.run(
                run_once(n, port, timeout=600, observer_dsn=machine.observer_dsn, before=before)
            )
            meter.stop()
            for spy in spies:
                spy.send_signal(2)  # SIGINT: py-spy writes what it has and exits
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy.wait(30)
                if spy.poll() is None:
                    spy.kill()
            figure.runs.append(written / elapsed)
            figure.cpu_s_per_item = meter.per(written)
            if written < n:
                figure.notes += f"; run {run + 1} wrote {written}/{n} in the time limit"
    return figure


def _py_spy(pid: int, out: Path) -> list[subprocess.Popen[bytes]]:
    """py-spy on a worker and its pool processes, raw (collapsed) stacks to ``out``."""
    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists():
        return []
    return [
        subprocess.Popen(
            [
                str(exe),
                "record",
                "--pid",
                str(pid),
                "--subprocesses",
                "--format",
                "raw",
                "--rate",
                "200",
                "--output",
                str(out),
                "--duration",
                "600",
                "--nonblocking",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    ]


@contextlib.contextmanager
def naive_worker(machine: Machine, name: str, concurrency: int) -> Iterator[Process]:
    """The naive baseline's Celery worker (``bench.naive``) on the same broker."""
    os.environ["NAIVE_BROKER_URL"] = machine.broker_url
    os.environ["NAIVE_DSN"] = machine.dsn
    from bench.naive import SCHEMA

    with psycopg.connect(machine.dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute("GRANT SELECT ON naive_results TO bench_observer")
    env = {**machine.env, "NAIVE_BROKER_URL": machine.broker_url, "NAIVE_DSN": machine.dsn}
    args = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "bench.naive",
        "worker",
        "-Q",
        "naive",
        "--concurrency",
        str(concurrency),
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
        "--hostname",
        f"naive-{uuid.uuid4().hex[:6]}@%h",
    ]
    process = Process(f"naive-{name}", args, env, machine.logs / f"naive-{name}.log")
    try:
        process.wait_for_log("ready.")
        yield process
    finally:
        process.stop()


def naive_fanout(
    machine: Machine, scenario: str, n: int, port: int, runs: int, concurrency: int
) -> Figure:
    """The naive baseline: one route task enqueueing one task per subscriber."""
    figure = Figure(scenario, "naive Celery", notes=f"n={n}, pool={concurrency}")
    urls = [f"http://127.0.0.1:{port}/naive/{i}" for i in range(n)]
    with naive_worker(machine, scenario, concurrency) as worker:
        from bench.naive import app

        for _ in range(runs):
            run = uuid.uuid4().hex
            meter = machine.cpu_meter(worker=[worker.pid])
            meter.start()
            started = time.perf_counter()
            app.send_task("naive.route", args=[run, urls, time.time()], queue="naive")
            done = 0
            countdown = Countdown(n)
            with psycopg.connect(machine.observer_dsn, autocommit=True) as conn:
                deadline = started + 900
                while time.perf_counter() < deadline:
                    asked = time.perf_counter()
                    row = conn.execute(
                        "SELECT count(*) FROM naive_results WHERE run = %s", (run,)
                    ).fetchone()
                    done = int(row[0]) if row else 0
                    if done >= n:
                        break
                    now = time.perf_counter()
                    time.sleep(countdown.sleep(done, now, now - asked))
            elapsed = time.perf_counter() - started
            meter.stop()
            figure.runs.append(done / elapsed)
            figure.cpu_s_per_item = meter.per(done)
    return figure


def bare(machine: Machine, n: int, port: int, runs: int, *, record: bool = False) -> Figure:
    """The bare client: the ceiling for HTTP on this machine. With ``record``,
    each answer is also written as a row (``bench.bare --record``): the floor
    of any design that records every attempt."""
    system, args = "bare client", [f"http://127.0.0.1:{port}/bare", str(n)]
    if record:
        system, args = "bare client + rows", [*args, "--record", machine.dsn]
    figure = Figure("S1", system, notes=f"n={n}, 1 process, 64 connections")
    for run in range(runs):
        out = machine.start(
            f"{system.replace(' ', '-')}-{run}", [sys.executable, "-m", "bench.bare", *args]
        )
        meter = machine.cpu_meter()  # the database's; the client counts its own
        meter.start()
        out.popen.wait(600)
        meter.stop()
        line = [ln for ln in out.log().splitlines() if ln.startswith("requests=")][-1]
        fields = dict(part.split("=", 1) for part in line.split())
        requests = max(1, int(fields["requests"]))
        figure.runs.append(float(fields["rate"]))
        figure.cpu_s_per_item = {
            "client": float(fields["cpu"]) / requests,
            **({"database": meter.per(requests)["database"]} if record else {}),
        }
    return figure


def memory_and_round_trips(
    machine: Machine, small: int, large: int, port: int, runs: int, concurrency: int
) -> list[Figure]:
    """S3: one message to ``large`` subscribers. Each run starts a fresh worker
    for ``small`` and another for ``large`` and samples their peak RSS; the
    database's statement counter gives round trips per delivery."""
    rate = Figure("S3", "channels", notes=f"n={large}, pool={concurrency}")
    rss = Figure(
        "S3",
        "channels",
        metric=f"peak RSS {large // 1000}k / {small // 1000}k",
        unit="ratio",
        higher_is_better=False,
    )
    trips = Figure(
        "S3",
        "channels",
        metric="deliveries per DB round trip",
        unit="deliveries/statement",
    )
    peaks: dict[int, list[int]] = {small: [], large: []}
    for _ in range(runs):
        for n in (small, large):
            with machine.worker(f"S3-{n}", concurrency) as worker:
                meter = machine.cpu_meter(worker=[worker.pid])
                counters: dict[str, int] = {}

                def before(meter=meter, counters=counters) -> None:  # type: ignore[no-untyped-def]
                    counters.update(machine.db_counters())
                    meter.start()

                with RssSampler(worker.pid) as sampler:
                    elapsed, written = asyncio.run(
                        run_once(
                            n, port, timeout=900, observer_dsn=machine.observer_dsn, before=before
                        )
                    )
                meter.stop()
                after = machine.db_counters()
                peaks[n].append(sampler.peak_total)
            if n == large:
                rate.runs.append(written / elapsed)
                rate.cpu_s_per_item = meter.per(written)
                statements = after.get("statements", 0) - counters.get("statements", 0)
                transactions = after["transactions"] - counters["transactions"]
                trips.runs.append(written / max(1, statements or transactions))
                trips.extra = {
                    "statements": statements,
                    "transactions": transactions,
                    "written": written,
                    "counted_by": "pg_stat_statements calls (every statement incl. BEGIN/COMMIT)"
                    if statements
                    else "pg_stat_database xact_commit + xact_rollback (a lower bound)",
                }
                if written < n:
                    rate.notes += f"; wrote {written}/{n} in the time limit"
    rss.runs = [b / a for a, b in zip(peaks[small], peaks[large], strict=True)]
    rss.extra = {
        f"peak_rss_mb_{small}": [round(p / 2**20, 1) for p in peaks[small]],
        f"peak_rss_mb_{large}": [round(p / 2**20, 1) for p in peaks[large]],
        "what": "sum of RSS over the worker process tree (main + pool), sampled every 0.1 s",
    }
    rss.notes = (
        f"peak MB at {small // 1000}k {[round(p / 2**20) for p in peaks[small]]},"
        f" at {large // 1000}k {[round(p / 2**20) for p in peaks[large]]}"
    )
    trips.notes = (
        f"{trips.extra.get('statements')} statements,"
        f" {trips.extra.get('transactions')} transactions (last run)"
    )
    return [rate, rss, trips]


def scaling(machine: Machine, n: int, port: int, runs: int, pools: list[int]) -> list[Figure]:
    """S7: S2 with 1, 2 and 4 worker processes."""
    figures = []
    for pool in pools:
        figures.append(
            channels_fanout(machine, "S7", n, port, runs, pool, system=f"channels, {pool} proc")
        )
    return figures
