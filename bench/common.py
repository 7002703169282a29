"""The pieces every scenario shares: the machine, its meters, one figure.

``Machine`` gives the benchmark a home of its own (``.channels/bench``, or
``CHANNELS_BENCH_HOME``): an embedded PostgreSQL with ``pg_stat_statements``
preloaded, an embedded Valkey, and a fresh database per invocation, dropped
at the end. Nothing else on the machine shares them, so the database
counters count the system under test and nothing else. Every process it
starts, it stops by PID.

The meters read what the operating system and PostgreSQL already count:
CPU seconds of process trees (psutil), resident memory sampled on a thread,
and statements per database and role (``pg_stat_statements``).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
from sqlalchemy.engine import make_url

from channels_cli.devservers import free_port
from channels_cli.processes import Process, start_worker
from channels_core import db, embedded, migrate
from channels_core.settings import configure

__all__ = [
    "Figure",
    "Machine",
    "CpuMeter",
    "Countdown",
    "RssSampler",
    "tree_cpu",
    "tree_rss",
]

OBSERVER = "bench_observer"


@dataclass
class Figure:
    """One measured quantity of one system in one scenario, over several runs."""

    scenario: str
    system: str
    metric: str = "throughput"
    unit: str = "deliveries/s"
    runs: list[float] = field(default_factory=list)
    # CPU seconds per delivery (or per message), by process tree, last run.
    cpu_s_per_item: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    higher_is_better: bool = True

    @property
    def median(self) -> float:
        return statistics.median(self.runs) if self.runs else float("nan")

    @property
    def low(self) -> float:
        return min(self.runs) if self.runs else float("nan")

    @property
    def high(self) -> float:
        return max(self.runs) if self.runs else float("nan")


def _procs(pid: int) -> list[psutil.Process]:
    try:
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


def tree_cpu(pids: list[int]) -> float:
    """CPU seconds of these processes, their live descendants and reaped children."""
    total = 0.0
    for pid in pids:
        for p in _procs(pid):
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
    return total


def tree_rss(pid: int) -> tuple[int, int]:
    """(sum, largest) resident set size of a process tree, in bytes."""
    sizes = []
    for p in _procs(pid):
        with contextlib.suppress(psutil.Error):
            sizes.append(p.memory_info().rss)
    return sum(sizes), max(sizes, default=0)


class RssSampler:
    """Peak resident memory of a process tree, sampled every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_total = 0
        self.peak_single = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total, single = tree_rss(self.pid)
            self.peak_total = max(self.peak_total, total)
            self.peak_single = max(self.peak_single, single)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


class CpuMeter:
    """CPU seconds spent by named process trees between ``start`` and ``stop``."""

    def __init__(self, trees: Mapping[str, list[int]]) -> None:
        self.trees = dict(trees)
        self._start: dict[str, float] = {}
        self.spent: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: tree_cpu(pids) for name, pids in self.trees.items()}

    def stop(self) -> dict[str, float]:
        self.spent = {
            name: tree_cpu(pids) - self._start.get(name, 0.0) for name, pids in self.trees.items()
        }
        return self.spent

    def per(self, items: int) -> dict[str, float]:
        return {name: spent / max(1, items) for name, spent in self.spent.items()}


class Countdown:
    """When to count again while waiting for ``n`` rows: few counts, most near the end.

    Each count costs the database that the system measured shares its cores
    with: at 100k rows a poll every 50 ms kept two parallel workers busy,
    and at 10k 50 polls took a tenth of a core. So a waiter spends at most a
    sixth of the time asking, and sleeps half the time the rate since the
    first rows says is left: the sleeps halve towards the end, down to 10 ms,
    so the figure is set to within about 10 ms (a fixed 50 ms poll
    overstated a one-second run by 2.5% on average). No sleep is longer than
    a second, so a slow start does not make a long guess.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self._first: tuple[int, float] | None = None
        self._last: tuple[int, float] = (0, 0.0)  # the latest count that moved

    def sleep(self, written: int, now: float, cost: float) -> float:
        """Seconds to wait after a count that found ``written`` at ``now`` and took ``cost``."""
        floor = max(0.01, 5 * cost)
        if not written:
            return max(0.05, floor)  # nothing yet: the first rows are not close
        if written != self._last[0]:
            self._last = (written, now)
        if self._first is None:
            self._first = (written, now)
            return floor
        (first_written, first_at), (last_written, last_at) = self._first, self._last
        if last_written <= first_written:
            return floor
        # Rows land a batch at a time: the end is predicted from when the
        # count last moved, not from now.
        rate = (last_written - first_written) / (last_at - first_at)
        end = last_at + (self.n - last_written) / rate
        return max(floor, min(1.0, (end - now) / 2))


class Machine:
    """The benchmark's own database and broker, sinks, workers and log folder."""

    def __init__(self) -> None:
        home = Path(os.environ.get("CHANNELS_BENCH_HOME", ".channels/bench"))
        os.environ["CHANNELS_HOME"] = str(home)
        configure(home=home)
        self.logs = Path(tempfile.mkdtemp(prefix="channels-bench-"))
        self.processes: list[Process] = []
        base_url = embedded.database_url()
        self.broker_url = embedded.broker_url()
        url = make_url(base_url)
        self.admin_dsn = f"host={url.host} port={url.port} user={url.username} dbname=postgres"
        self.statements = self._enable_pg_stat_statements()
        self.database = f"bench_{time.strftime('%Y%m%d%H%M%S')}_{uuid.uuid4().hex[:4]}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.database}"')
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (OBSERVER,))
            if exists.fetchone() is None:
                conn.execute(f"CREATE ROLE {OBSERVER} LOGIN")
            conn.execute(f"GRANT pg_read_all_stats TO {OBSERVER}")
        self.database_url = url.set(database=self.database).render_as_string(hide_password=False)
        self.dsn = f"host={url.host} port={url.port} user={url.username} dbname={self.database}"
        self.observer_dsn = (
            f"host={url.host} port={url.port} user={OBSERVER} dbname={self.database}"
        )
        configure(home=home, database_url=self.database_url, broker_url=self.broker_url)
        migrate.upgrade()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            if self.statements:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {OBSERVER}")
            conn.execute(
                f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {OBSERVER}"
            )
        self.flush_broker()
        self.env = {
            "CHANNELS_DATABASE_URL": self.database_url,
            "CHANNELS_BROKER_URL": self.broker_url,
            "CHANNELS_EGRESS_ALLOW_CIDRS": "127.0.0.0/8",
            "CHANNELS_HOME": str(home),
        }
        servers = {s.name: s.pid for s in embedded.status() if s.running}
        self.db_pids = [servers["postgres"]] if "postgres" in servers else []
        self.broker_pids = [servers["valkey"]] if "valkey" in servers else []

    # -- database --------------------------------------------------------------

    def _enable_pg_stat_statements(self) -> bool:
        """Preload pg_stat_statements (one restart of the bench's own server)."""
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            row = conn.execute("SHOW shared_preload_libraries").fetchone()
            if row and "pg_stat_statements" in str(row[0]):
                return True
            available = conn.execute(
                "SELECT 1 FROM pg_available_extensions WHERE name = 'pg_stat_statements'"
            ).fetchone()
            if available is None or os.environ.get("CHANNELS_DATABASE_URL"):
                return False
            conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        embedded.stop(names=("postgres",))
        embedded.ensure_postgres()
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            row = conn.execute("SHOW shared_preload_libraries").fetchone()
            return bool(row and "pg_stat_statements" in str(row[0]))

    def db_counters(self) -> dict[str, int]:
        """Statements the system ran in the bench database (its role only), and
        the database's transactions (every role): the round-trip meters."""
        out: dict[str, int] = {}
        with psycopg.connect(self.observer_dsn, autocommit=True) as conn:
            if self.statements:
                row = conn.execute(
                    "SELECT coalesce(sum(s.calls), 0) FROM pg_stat_statements s"
                    " JOIN pg_database d ON d.oid = s.dbid"
                    " JOIN pg_roles r ON r.oid = s.userid"
                    " WHERE d.datname = %s AND r.rolname <> %s",
                    (self.database, OBSERVER),
                ).fetchone()
                out["statements"] = int(row[0]) if row else 0
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
                (self.database,),
            ).fetchone()
            out["transactions"] = int(row[0]) if row else 0
        return out

    def settle(self) -> None:
        """VACUUM and ANALYZE the bench database before a system takes its turn.

        A scenario leaves dead row versions and stale statistics behind (S3
        writes 100,000 deliveries three times over); autovacuum cleans them up
        a minute later, on the same two cores, during whichever system runs
        then. In one ``make bench`` S4's p50 went from 23 to 45 ms that way.
        pgbench vacuums before each run for the same reason.
        """
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE)")

    def server_versions(self) -> dict[str, str]:
        found: dict[str, str] = {}
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            found["postgresql"] = str(row[0]) if row else "?"
        with contextlib.suppress(Exception):
            import redis

            info = redis.Redis.from_url(self.broker_url).info("server")
            found["valkey"] = str(info.get("valkey_version") or info.get("redis_version"))
        return found

    def flush_broker(self) -> None:
        """Empty the bench's own broker: no queue left over from a previous scenario."""
        import redis

        client = redis.Redis.from_url(self.broker_url)
        try:
            client.flushdb()
        finally:
            client.close()

    # -- processes -------------------------------------------------------------

    def start(self, name: str, args: list[str], env: Mapping[str, str] | None = None) -> Process:
        process = Process(name, args, env or {}, self.logs / f"{name}.log")
        self.processes.append(process)
        return process

    def sink(self, delay: float = 0.0) -> int:
        port = free_port()
        args = [sys.executable, "-m", "bench.sink", str(port), "--delay", str(delay)]
        self.start(f"sink-{port}", args).wait_for_log("sink listening")
        return port

    def smtp_sink(self) -> int:
        port = free_port()
        args = [sys.executable, "-m", "bench.smtpsink", str(port)]
        self.start(f"smtp-{port}", args).wait_for_log("smtp sink listening")
        return port

    @contextlib.contextmanager
    def worker(
        self, name: str, concurrency: int, env: Mapping[str, str] | None = None
    ) -> Iterator[Process]:
        process = start_worker(
            {**self.env, **(env or {})},
            self.logs / f"worker-{name}.log",
            concurrency=concurrency,
            name=f"bench-{name}",
        )
        try:
            yield process
        finally:
            process.stop()

    def cpu_meter(self, **trees: list[int]) -> CpuMeter:
        return CpuMeter({**trees, "database": self.db_pids, "broker": self.broker_pids})

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
        with contextlib.suppress(Exception):
            import asyncio

            asyncio.run(db.dispose())
        with (
            contextlib.suppress(Exception),
            psycopg.connect(self.admin_dsn, autocommit=True) as conn,
        ):
            conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        # The bench home's servers are the benchmark's own: stop them by PID.
        embedded.stop()
