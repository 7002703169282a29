"""End-to-end fixtures: real worker and beat processes started as users start
them (``celery -A workers worker``), the embedded PostgreSQL and Valkey, and
real receivers (HTTP, SMTP, kombu consumer) on 127.0.0.1.

Tests share one worker and one beat per module and isolate themselves by
creating their own channels, principals and receiver paths.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from channels_cli.devservers import QueueConsumer, SmtpReceiver, WebhookReceiver
from channels_cli.processes import Process, start_beat, start_worker
from channels_core import db, migrate
from channels_core.dispatch import set_dispatcher
from channels_core.settings import configure

pytestmark = pytest.mark.e2e

QUEUES = ("e2e.inbox.a", "e2e.inbox.b", "e2e.inbox.c")

# Fast schedules so retries, relays and lost-task recovery happen in seconds.
TUNING = {
    "retry_schedule": "0,0.3,0.3",
    "retry_jitter": "0",
    "sweep_interval": "0.5",
    "queue_lease": "4",
    "claim_lease": "10",
    "outbox_relay_after": "2",
    "egress_allow_cidrs": "127.0.0.0/8",
}


@pytest.fixture(scope="session")
def e2e_database_url(postgres_url: str) -> str:
    """A database of its own on the embedded PostgreSQL, migrated."""
    url = make_url(postgres_url)
    with psycopg.connect(
        host=url.host, port=url.port, user=url.username, dbname="postgres", autocommit=True
    ) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'channels_e2e'").fetchone():
            conn.execute('CREATE DATABASE "channels_e2e"')
    e2e = url.set(database="channels_e2e").render_as_string(hide_password=False)
    configure(database_url=e2e)
    migrate.upgrade()
    return e2e


@dataclass
class Stack:
    env: dict[str, str]
    http: WebhookReceiver
    smtp: SmtpReceiver
    queues: QueueConsumer
    worker: Process
    beat: Process
    logs: Path
    broker_url: str
    database_url: str
    started: list[Process]
    tuning: dict[str, str]

    def start_worker(self, name: str = "worker", **kwargs: object) -> Process:
        process = start_worker(self.env, self.logs / f"{name}.log", name=name, **kwargs)  # type: ignore[arg-type]
        self.started.append(process)
        return process


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest,
    e2e_database_url: str,
    broker_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    # A module may tune its own stack (STACK_TUNING), e.g. a breaker's cool-down.
    tuning = {**TUNING, **getattr(request.module, "STACK_TUNING", {})}
    logs = tmp_path_factory.mktemp("logs")
    http = WebhookReceiver().start()
    smtp = SmtpReceiver().start()
    queues = QueueConsumer(broker_url, QUEUES).start()
    env = {
        "CHANNELS_HOME": os.environ["CHANNELS_HOME"],
        "CHANNELS_DATABASE_URL": e2e_database_url,
        "CHANNELS_BROKER_URL": broker_url,
        "CHANNELS_QUEUE_URL": broker_url,
        "CHANNELS_SMTP_HOST": "127.0.0.1",
        "CHANNELS_SMTP_PORT": str(smtp.port),
        **{f"CHANNELS_{k.upper()}": v for k, v in tuning.items()},
    }
    worker = start_worker(env, logs / "worker.log")
    beat = start_beat(env, logs / "beat.log", logs / "beat-schedule")
    stack = Stack(
        env,
        http,
        smtp,
        queues,
        worker,
        beat,
        logs,
        broker_url,
        e2e_database_url,
        [worker, beat],
        tuning,
    )
    yield stack
    for process in reversed(stack.started):
        process.stop()
    queues.stop()
    smtp.stop()
    http.stop()


@pytest.fixture
async def live(stack: Stack) -> AsyncIterator[Stack]:
    """In-process settings matching the workers', and the real broker dispatcher."""
    configure(
        database_url=stack.database_url,
        broker_url=stack.broker_url,
        queue_url=stack.broker_url,
        smtp_host="127.0.0.1",
        smtp_port=stack.smtp.port,
        **stack.tuning,
    )
    set_dispatcher(None)  # the default: producer.broker:BrokerDispatcher
    yield stack
    await db.dispose()
    for process in (stack.worker, stack.beat):
        assert process.alive(), f"{process.name} died:\n{process.log()[-3000:]}"
