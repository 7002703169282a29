"""Structured logs: the formatter, and a real worker writing JSON lines with ids."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from typing import Any

import pytest
from e2e.conftest import Stack
from e2e.helpers import author, channel, deliveries, subscribers, tag

from channels_core.logs import JsonFormatter, use_json, wants_json
from channels_core.primitives import Manifest, Message

pytestmark = pytest.mark.timeout(120)


def _record(msg: str, *args: Any, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("channels.delivery", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_a_record_is_one_json_object_with_its_ids() -> None:
    line = JsonFormatter().format(
        _record("batch of message %s:\nline two", 7, message_id=7, delivery_ids=[1, 2])
    )
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["msg"] == "batch of message 7:\nline two"
    assert (entry["level"], entry["logger"]) == ("INFO", "channels.delivery")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", entry["ts"])
    assert (entry["message_id"], entry["delivery_ids"]) == (7, [1, 2])
    assert "args" not in entry and "levelno" not in entry  # LogRecord internals stay out


def test_context_extras_and_exceptions() -> None:
    formatter = JsonFormatter(context=lambda: {"task_id": "t-1", "message_id": "from context"})
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed", message_id=3, when=object())
        record.exc_info = sys.exc_info()
    entry = json.loads(formatter.format(record))
    assert entry["task_id"] == "t-1"
    assert entry["message_id"] == 3  # what the call site says wins over the context
    assert "ValueError: boom" in entry["exc"]
    assert entry["when"].startswith("<object object")  # not JSON: its str()


def test_use_json_switches_every_handler_of_the_loggers() -> None:
    logger = logging.getLogger("channels.test.logs")
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    try:
        use_json([logger])
        assert isinstance(handler.formatter, JsonFormatter)
    finally:
        logger.removeHandler(handler)
    assert [wants_json(v) for v in ("json", " JSON ", "text", "")] == [True, True, False, False]


# -- a real worker ---------------------------------------------------------------------

# Celery's own text format, which JSON mode must replace on every log line.
_TEXT_LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}: [A-Z]+/")


def _json_lines(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


@pytest.mark.e2e
async def test_worker_writes_json_lines_with_message_and_delivery_ids(live: Stack) -> None:
    t = tag()
    sender, ch = await author(), await channel("http")
    live.http.script(f"/{t}/0", [410])  # gone: a dead letter
    await subscribers(ch, [{"endpoint": live.http.url(f"/{t}/{i}")} for i in range(3)])
    msg = Message().set_content(f"logs {t}").set_author_id(sender.id)  # type: ignore[arg-type]
    [result] = await (await msg.send(Manifest([ch]))).wait(timeout=60)
    assert (result.delivered_count, result.failed_count) == (2, 1)
    rows = await deliveries(msg.id)  # type: ignore[arg-type]
    dead = next(r.id for r in rows if r.status == "dead")

    def ours() -> list[dict[str, Any]]:
        return [e for e in _json_lines(live.worker.log()) if e.get("message_id") == msg.id]

    deadline = time.monotonic() + 10  # the child's write may trail the database by a moment
    while not any("delivery_id" in e for e in ours()) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    entries = ours()

    routed = [e for e in entries if e["logger"] == "channels.workers"]
    assert routed and routed[0]["channel_id"] == ch.id
    [batch] = [e for e in entries if "delivery_ids" in e]
    assert sorted(batch["delivery_ids"]) == sorted(r.id for r in rows)
    assert (batch["delivered"], batch["dead"], batch["transport"]) == (2, 1, "http")
    assert batch["task_name"] == "channels.deliver_batch" and batch["task_id"]
    [letter] = [e for e in entries if "delivery_id" in e]
    assert (letter["delivery_id"], letter["level"], letter["status_code"]) == (dead, "WARNING", 410)
    assert "410" in letter["reason"]
    for entry in entries:
        assert {"ts", "level", "logger", "msg", "message_id"} <= entry.keys()

    log = live.worker.log()
    assert not [line for line in log.splitlines() if _TEXT_LOG_LINE.match(line)]
    assert len(_json_lines(log)) > 5  # and every one of them parsed
