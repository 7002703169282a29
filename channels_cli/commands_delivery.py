"""Sending and following deliveries: ``channel send``, ``deliveries``,
``dead-letters``, ``retry``, ``replay``, and the ``worker`` / ``beat`` wrappers.

``worker`` and ``beat`` replace this process with ``celery -A workers ...``
(listening on every queue the system uses), so this module never imports
``workers`` or Celery itself.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from channels_cli.output import note, print_json, print_table, success
from channels_cli.runtime import ID, run
from channels_core.deliveries import (
    DeliveryView,
    dead_letters,
    deliveries_for_message,
    replay,
    retry,
)
from channels_core.errors import DispatchTimeout, PermissionDeniedError
from channels_core.names import ALL_QUEUES
from channels_core.permissions import SUBMIT
from channels_core.primitives import Channel, Message
from channels_core.registries import ChannelRegistry, PrincipalRegistry
from channels_core.sending import Dispatch
from channels_core.transports.base import TransportResult

__all__ = [
    "send",
    "deliveries",
    "dead_letters_command",
    "retry_command",
    "replay_command",
    "worker",
    "beat",
]


async def _wait_with_progress(dispatch: Dispatch, timeout: float) -> list[TransportResult]:
    """Poll until final, with a progress bar on stderr when it is a terminal."""
    progress = Progress(
        TextColumn("delivering"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not sys.stderr.isatty(),
    )
    deadline = time.monotonic() + timeout
    with progress:
        task = progress.add_task("deliveries", total=None)
        while True:
            [result] = await dispatch.refresh()
            done = result.delivered_count + result.failed_count
            progress.update(task, completed=done, total=done + result.pending_count)
            if result.final:
                return [result]
            if time.monotonic() >= deadline:
                raise DispatchTimeout(
                    f"message {dispatch.message_id}: {result.pending_count} deliveries "
                    f"still pending after {timeout:g}s"
                )
            await asyncio.sleep(0.1)


def _result_line(result: TransportResult) -> str:
    line = (
        f"channel {result.channel_id}: delivered {result.delivered_count}, "
        f"failed {result.failed_count}, pending {result.pending_count}"
    )
    if result.errors:
        line += f" ({result.errors[0]}{' ...' if len(result.errors) > 1 else ''})"
    return line


async def _send(
    channel_id: int,
    content: str,
    author_id: int,
    content_type: str,
    reply_to: int | None,
    conversation: int | None,
    wait: bool,
    timeout: float,
) -> tuple[Message, Dispatch, list[TransportResult]]:
    target: Channel = await ChannelRegistry().require(channel_id)
    # Refuse before anything is written: a refused send changes nothing.
    await PrincipalRegistry().require(author_id)
    if not await target.can_submit(author_id):
        raise PermissionDeniedError(author_id, SUBMIT, channel_id)
    message = Message().set_content(content).set_author_id(author_id)
    message.set_content_type(content_type)
    message.set_reply_to_id(reply_to).set_conversation_id(conversation)
    dispatch = await message.send(target)
    results = dispatch.results
    if wait and dispatch.accepted:
        results = await _wait_with_progress(dispatch, timeout)
    return message, dispatch, results


@click.command("send")
@click.argument("channel_id", metavar="CHANNEL", type=ID)
@click.argument("content")
@click.option(
    "--author-id", type=ID, required=True, help="The sending principal (needs channel.submit)."
)
@click.option("--content-type", default="text/plain", show_default=True)
@click.option("--reply-to", type=ID, help="The message this one replies to.")
@click.option("--conversation", type=ID, help="The conversation it belongs to.")
@click.option("--wait", is_flag=True, help="Wait until every delivery is final.")
@click.option(
    "--timeout", type=float, default=60.0, show_default=True, help="Seconds --wait waits."
)
def send(
    channel_id: int,
    content: str,
    author_id: int,
    content_type: str,
    reply_to: int | None,
    conversation: int | None,
    wait: bool,
    timeout: float,
) -> None:
    """Send CONTENT to CHANNEL as --author-id."""
    message, dispatch, results = run(
        _send(channel_id, content, author_id, content_type, reply_to, conversation, wait, timeout)
    )
    [result] = results
    if not dispatch.accepted:
        raise click.ClickException(result.errors[0] if result.errors else "message refused")
    success(f"Message sent (ID: {message.id})")
    note(_result_line(result))
    if wait and not result.success:
        sys.exit(1)


def _delivery_rows(views: list[DeliveryView]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for d in views:
        rows.append(
            [
                d.id,
                d.message_id,
                d.channel_id,
                d.subscriber_id,
                d.transport,
                d.status,
                d.attempts,
                d.last_status_code,
                d.last_error or "",
                d.next_attempt_at,
            ]
        )
        for a in d.attempt_log:
            latency = f"{a.latency_ms:.1f} ms" if a.latency_ms is not None else ""
            rows.append(
                [
                    "",
                    "",
                    "",
                    "",
                    f"  #{a.attempt}",
                    a.status,
                    latency,
                    a.status_code,
                    a.error or "",
                    a.finished_at,
                ]
            )
    return rows


_COLUMNS = [
    "Delivery",
    "Message",
    "Channel",
    "Subscriber",
    "Transport",
    "Status",
    "Attempts",
    "Code",
    "Error",
    "Next / at",
]


@click.command("deliveries")
@click.argument("message_id", metavar="MESSAGE_ID", type=ID)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def deliveries(message_id: int, as_json: bool) -> None:
    """One row per delivery of MESSAGE_ID, with its attempts under it."""
    views = run(deliveries_for_message(message_id))
    if as_json:
        print_json([v.to_dict() for v in views])
        return
    print_table(
        _COLUMNS, _delivery_rows(views), empty=f"Message {message_id} has no deliveries yet."
    )


@click.command("dead-letters")
@click.option("--channel", "channel_id", type=ID, help="Only this channel's.")
@click.option("--limit", type=click.IntRange(1, 10000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def dead_letters_command(channel_id: int | None, limit: int, as_json: bool) -> None:
    """Deliveries that ended without success, newest first."""
    views = run(dead_letters(channel_id=channel_id, limit=limit))
    if as_json:
        print_json([v.to_dict() for v in views])
        return
    print_table(_COLUMNS, _delivery_rows(views), empty="No dead letters.")


@click.command("retry")
@click.argument("delivery_id", metavar="DELIVERY_ID", type=ID)
def retry_command(delivery_id: int) -> None:
    """Attempt one delivery again now, with a fresh retry schedule."""
    view = run(retry(delivery_id))
    success(
        f"Delivery {view.id} queued again "
        f"(message {view.message_id}, subscriber {view.subscriber_id})"
    )


@click.command("replay")
@click.argument("message_id", metavar="MESSAGE_ID", type=ID)
@click.option("--subscriber", "subscriber_id", type=ID, help="Only this subscriber's dead letter.")
def replay_command(message_id: int, subscriber_id: int | None) -> None:
    """Replay the dead letters of MESSAGE_ID."""
    views = run(replay(message_id, subscriber_id=subscriber_id))
    if not views:
        note(f"Message {message_id} has no dead letters to replay.")
        return
    success(f"Replaying {len(views)} dead letter(s) of message {message_id}")


def _exec_celery(args: list[str]) -> None:
    os.execv(sys.executable, [sys.executable, "-m", "celery", "-A", "workers", *args])


@click.command(
    "worker", context_settings={"ignore_unknown_options": True, "allow_extra_args": True}
)
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Run a worker on every channels queue (``celery -A workers worker``)."""
    extra = list(ctx.args)
    queues = (
        []
        if any(a in ("-Q", "--queues") or a.startswith("--queues=") for a in extra)
        else ["-Q", ",".join(ALL_QUEUES)]
    )
    _exec_celery(["worker", "--loglevel", "INFO", *queues, *extra])


@click.command("beat", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def beat(ctx: click.Context) -> None:
    """Run the sweeper's scheduler (``celery -A workers beat``); run exactly one."""
    _exec_celery(["beat", "--loglevel", "INFO", *ctx.args])
