"""The naive baseline: what a team writes without this project.

A ``route`` task enqueues one ``deliver`` task per subscriber; ``deliver``
POSTs with one shared synchronous ``httpx.Client`` per process and inserts
its result row with a commit of its own. Celery prefork, the same broker and
database as the system under test, so the ratio is measured side by side.

Run as ``celery -A bench.naive worker`` (the benchmark starts it).
"""

from __future__ import annotations

import os
import time
from typing import Any

import httpx
import psycopg
from celery import Celery
from celery.signals import worker_process_init

QUEUE = "naive"

app = Celery("naive", broker=os.environ["NAIVE_BROKER_URL"])
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=4,
)

_client: httpx.Client | None = None
_conn: psycopg.Connection[Any] | None = None

SCHEMA = """
CREATE TABLE IF NOT EXISTS naive_results (
    id BIGSERIAL PRIMARY KEY,
    run TEXT NOT NULL,
    subscriber INTEGER NOT NULL,
    status INTEGER,
    error TEXT,
    latency_ms DOUBLE PRECISION,
    sent_at DOUBLE PRECISION NOT NULL,
    finished_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


@worker_process_init.connect
def _fresh(**_: Any) -> None:
    global _client, _conn
    _client = None
    _conn = None


def _db() -> psycopg.Connection[Any]:
    global _conn
    if _conn is None:
        _conn = psycopg.connect(os.environ["NAIVE_DSN"])
    return _conn


def _http() -> httpx.Client:
    global _client
    if _client is None:
        _client = httpx.Client(timeout=30)
    return _client


@app.task(name="naive.route")
def route(run: str, urls: list[str], sent_at: float) -> None:
    for i, url in enumerate(urls):
        deliver.delay(run, i, url, sent_at)


@app.task(name="naive.deliver")
def deliver(run: str, subscriber: int, url: str, sent_at: float) -> None:
    started = time.perf_counter()
    status, error = None, None
    try:
        status = _http().post(url, json={"run": run, "subscriber": subscriber}).status_code
    except httpx.HTTPError as exc:
        error = str(exc)
    conn = _db()
    conn.execute(
        "INSERT INTO naive_results (run, subscriber, status, error, latency_ms, sent_at)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (run, subscriber, status, error, (time.perf_counter() - started) * 1000, sent_at),
    )
    conn.commit()


@app.task(name="naive.noop")
def noop() -> None:
    """For the producer comparison: Celery's own ``.delay()`` of a no-op."""
