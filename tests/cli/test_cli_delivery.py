"""The delivery commands: send, deliveries, dead-letters, retry, replay.

In-process with a recording dispatcher (no broker): routing and delivery
are driven through the engine directly where a test needs rows to exist.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from channels_core import db
from channels_core.dispatch import Batch, MemoryDispatcher, RouteJob, get_dispatcher
from channels_core.transports import MemoryEgress, TransportResult, egress_registry

if TYPE_CHECKING:
    from tests.cli.conftest import Cli, State


@pytest.fixture
def world(cli_db: str, run_cli: Cli) -> None:
    """Channel 1 (memory egress); principal 1 alice may submit; 2 bob may not;
    bob subscribes to channel 1."""
    run_cli.ok("channel", "create", "General", "--egress", "memory")
    run_cli.ok("role", "create", "member", "--permission", "channel.submit")
    run_cli.ok("principal", "create", "--username", "alice", "--role", "member")
    run_cli.ok("principal", "create", "--username", "bob")
    run_cli.ok("channel", "subscribe", "1", "2")


def _route_and_deliver(memory: MemoryEgress) -> None:
    """Run the engine on what the recording dispatcher holds, as a worker would."""
    from channels_core import delivery

    async def drive() -> None:
        dispatcher = get_dispatcher()
        assert isinstance(dispatcher, MemoryDispatcher)
        for job in list(dispatcher.jobs):
            await delivery.route(RouteJob(job.outbox_id, job.message_id, job.channel_id))
        dispatcher.jobs.clear()
        while dispatcher.batches:
            batch, _ = dispatcher.batches.pop(0)
            await delivery.deliver(
                Batch(batch.message_id, batch.channel_id, batch.delivery_ids), "cli"
            )
        await db.dispose()

    egress_registry.set_instance("memory", memory)
    try:
        asyncio.run(drive())
    finally:
        egress_registry._instances.pop("memory", None)


def test_send_deliveries_dead_letters_retry_and_replay(world: None, run_cli: Cli) -> None:
    out = run_cli.ok("channel", "send", "1", "Hello!", "--author-id", "1")
    assert out.lines[0] == "✓ Message sent (ID: 1)"
    assert "pending 1" in out.lines[1]

    refuse = MemoryEgress(fail_with={2: TransportResult.failed(2, "HTTP 410", permanent=True)})
    _route_and_deliver(refuse)
    [row] = run_cli.json("deliveries", "1", "--json")
    assert (row["status"], row["attempts"], row["last_error"]) == ("dead", 1, "HTTP 410")
    assert [a["status"] for a in row["attempt_log"]] == ["permanent"]
    assert [d["id"] for d in run_cli.json("dead-letters", "--json")] == [row["id"]]
    table = run_cli.ok("deliveries", "1").stdout
    assert "dead" in table and "#1" in table and "HTTP 410" in table

    assert run_cli.ok("replay", "1").lines == ["✓ Replaying 1 dead letter(s) of message 1"]
    _route_and_deliver(MemoryEgress())
    [row] = run_cli.json("deliveries", "1", "--json")
    assert (row["status"], row["attempts"]) == ("delivered", 2)
    assert run_cli.json("dead-letters", "--json") == []
    assert "no dead letters" in run_cli.ok("replay", "1").stdout.lower()
    # A delivered delivery cannot be retried.
    run_cli.refused(run_cli("retry", str(row["id"])), f"delivery {row['id']} is already delivered")


BAD_SENDS: list[tuple[list[str], int, str]] = [
    (["channel", "send", "99", "hi", "--author-id", "1"], 1, "channel 99 not found"),
    (["channel", "send", "1", "hi", "--author-id", "99"], 1, "principal 99 not found"),
    (
        ["channel", "send", "1", "hi", "--author-id", "2"],
        1,
        "principal 2 lacks permission 'channel.submit' on channel 1",
    ),
    (["channel", "send", "1", "", "--author-id", "1"], 1, "content must not be empty"),
    (
        ["channel", "send", "1", "hi", "--author-id", "1", "--content-type", "text/evil\r\nX: y"],
        1,
        "content_type",
    ),
    (
        ["channel", "send", "1", "hi", "--author-id", "1", "--content-type", "video/mp4"],
        1,
        "content_type 'video/mp4' is not supported",
    ),
    (
        ["channel", "send", "1", "hi", "--author-id", "1", "--reply-to", "42"],
        1,
        "message 42 not found",
    ),
    (
        ["channel", "send", "1", "hi", "--author-id", "1", "--conversation", "7"],
        1,
        "conversation 7 not found",
    ),
    (["channel", "send", "1", "hi"], 2, "--author-id"),
    (["deliveries", "77"], 1, "message 77 not found"),
    (["retry", "5"], 1, "delivery 5 not found"),
    (["replay", "5"], 1, "message 5 not found"),
    (["deliveries", "x"], 2, "is not an id"),
]


@pytest.mark.parametrize(
    ("args", "code", "message"), BAD_SENDS, ids=[" ".join(a[0]) for a in BAD_SENDS]
)
def test_bad_delivery_commands_are_refused_and_change_nothing(
    world: None,
    run_cli: Cli,
    db_state: Callable[[], State],
    args: list[str],
    code: int,
    message: str,
) -> None:
    before = db_state()
    run_cli.refused(run_cli(*args), message, exit_code=code)
    assert db_state() == before
    dispatcher = get_dispatcher()
    assert isinstance(dispatcher, MemoryDispatcher) and dispatcher.jobs == []


def test_oversized_content_is_refused(
    world: None, run_cli: Cli, db_state: Callable[[], State]
) -> None:
    from channels_core.settings import configure, get_settings

    previous = get_settings()
    configure(previous, max_content_bytes=10)
    try:
        before = db_state()
        run_cli.refused(
            run_cli("channel", "send", "1", "x" * 11, "--author-id", "1"),
            "content is 11 bytes, over the limit of 10 bytes",
        )
        assert db_state() == before
    finally:
        configure(previous)
