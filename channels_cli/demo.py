"""``make run``: the main job, end to end, on the embedded defaults.

Starts a worker and beat (as users do: ``celery -A workers ...``), a local
webhook receiver that verifies signatures, an SMTP receiver and a kombu
queue consumer; creates a channel per transport with subscribers; sends two
messages (the second a reply, so email threads); waits for every delivery
to be final; prints the deliveries and what each receiver got; and stops
everything it started, by PID.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from channels_cli.devservers import QueueConsumer, SmtpReceiver, WebhookReceiver
from channels_cli.processes import Process, start_beat, start_worker
from channels_core import db, embedded, migrate
from channels_core.deliveries import deliveries_for_message
from channels_core.permissions import SUBMIT, SUBSCRIBE
from channels_core.primitives import Channel, Manifest, Message, Permission, Principal, Role
from channels_core.settings import configure, get_settings
from channels_core.signing import new_secret

console = Console(width=140)

QUEUES = ("demo.billing", "demo.audit")


async def _setup(http: WebhookReceiver, stamp: str) -> tuple[Principal, list[Channel]]:
    submit = await Permission.get_or_create(SUBMIT)
    subscribe = await Permission.get_or_create(SUBSCRIBE)
    role = Role().set_title(f"member-{stamp}")
    role.add_permission(submit.id).add_permission(subscribe.id)  # type: ignore[arg-type]
    await role.save()
    alice = Principal("user").set_username(f"alice-{stamp}").set_email("alice@example.com")
    await alice.add_role(role.id).save()  # type: ignore[arg-type]

    webhooks = await Channel().set_title("Webhooks").set_alias("egress_transport", "http").save()
    mail = await Channel().set_title("Mail").set_alias("egress_transport", "email").save()
    queue = await Channel().set_title("Queue").set_alias("egress_transport", "queue").save()

    for i, kind in enumerate(("bot", "integration", "service")):
        secret = new_secret()
        sub = Principal(kind).set_alias("endpoint", http.url(f"/hooks/{stamp}/{kind}"))
        sub.set_alias("webhook_secret", secret)
        await sub.save()
        http.secrets[f"/hooks/{stamp}/{kind}"] = secret
        await webhooks.subscribe(sub.id)  # type: ignore[arg-type]
        _ = i
    for name in ("bob", "carol"):
        person = (
            Principal("user")
            .set_username(f"{name}-{stamp}")
            .set_alias("email", f"{name}@example.com")
        )
        await person.save()
        await mail.subscribe(person.id)  # type: ignore[arg-type]
    for name in QUEUES:
        svc = Principal("service").set_alias("queue", name)
        await svc.save()
        await queue.subscribe(svc.id)  # type: ignore[arg-type]
    return alice, [webhooks, mail, queue]


async def _send(alice: Principal, channels: list[Channel]) -> list[int]:
    first = Message().set_content("Deploy 42 is live.").set_author_id(alice.id)  # type: ignore[arg-type]
    await first.save()
    reply = Message().set_content("Rolled back: error rate up.").set_author_id(alice.id)  # type: ignore[arg-type]
    reply.set_reply_to_id(first.id)  # type: ignore[arg-type]
    await reply.save()
    started = time.perf_counter()
    first_dispatch = await first.send(Manifest(channels))
    for result, channel in zip(first_dispatch, channels, strict=True):
        console.print(
            f"  sent message {first.id} to {channel.title}: {result.pending_count} pending"
        )
    await first_dispatch.wait(timeout=60)
    # The reply goes out once the first is delivered, so the mail can thread.
    reply_dispatch = await reply.send(Manifest(channels))
    results = await reply_dispatch.wait(timeout=60)
    elapsed = time.perf_counter() - started
    for result, channel in zip(results, channels, strict=True):
        console.print(
            f"  message {reply.id} on {channel.title}: delivered {result.delivered_count}, "
            f"failed {result.failed_count}"
        )
    console.print(f"  both messages final in {elapsed:.2f}s")
    return [first.id, reply.id]  # type: ignore[list-item]


async def _report(message_ids: list[int], names: dict[int, str]) -> int:
    table = Table(title="Deliveries and attempts")
    for column in (
        "delivery",
        "message",
        "channel",
        "transport",
        "subscriber",
        "status",
        "attempts",
        "code",
        "latency ms",
    ):
        table.add_column(column)
    failures = 0
    for message_id in message_ids:
        for d in await deliveries_for_message(message_id):
            last = d.attempt_log[-1] if d.attempt_log else None
            failures += d.status != "delivered"
            table.add_row(
                str(d.id),
                str(d.message_id),
                names.get(d.channel_id, str(d.channel_id)),
                d.transport,
                str(d.subscriber_id),
                d.status,
                str(len(d.attempt_log)),
                str(last.status_code if last else ""),
                f"{last.latency_ms:.1f}" if last and last.latency_ms is not None else "",
            )
    console.print(table)
    return failures


def _receivers_report(
    http: WebhookReceiver, smtp: SmtpReceiver, queues: QueueConsumer, stamp: str
) -> int:
    problems = 0
    verified = 0
    for received in http.received:
        secret = http.secrets.get(received.path)
        if secret is None:
            continue
        try:
            http.verify(received, secret)
            verified += 1
        except Exception as exc:  # the demo reports, the tests assert
            problems += 1
            console.print(f"[red]signature did not verify for {received.path}: {exc}[/red]")
    console.print(
        f"HTTP receiver: {http.count()} POSTs, {verified} signatures verified (standardwebhooks)"
    )
    for mail in smtp.mails:
        m = mail.message
        threading = f", In-Reply-To {m['In-Reply-To']}" if m["In-Reply-To"] else ""
        console.print(
            f"SMTP receiver: to {', '.join(mail.rcpt_tos)} — {m['Subject']!r}, "
            f"Message-ID {m['Message-ID']}{threading}"
        )
    for name in QUEUES:
        ids = [e["id"] for e in queues.for_queue(name)]
        console.print(f"Queue {name}: {len(ids)} envelopes {ids}")
    return problems


def main() -> int:
    settings = get_settings()
    # Loopback is allowed explicitly for the local receivers; the SSRF guard
    # blocks it otherwise.
    allow = settings.egress_allow_cidrs or "127.0.0.0/8"
    before = {s.name for s in embedded.status() if s.running}
    console.print(
        "[bold]channels: make run[/bold] — embedded PostgreSQL and Valkey under", str(settings.home)
    )
    database_url, broker_url = embedded.database_url(), embedded.broker_url()
    console.print(f"  database {database_url}\n  broker   {broker_url}")
    migrate.upgrade()

    http = WebhookReceiver().start()
    smtp = SmtpReceiver().start()
    queues = QueueConsumer(settings.queue_url or broker_url, QUEUES).start()
    logs = Path(tempfile.mkdtemp(prefix="channels-run-"))
    env = {
        "CHANNELS_DATABASE_URL": database_url,
        "CHANNELS_BROKER_URL": broker_url,
        "CHANNELS_EGRESS_ALLOW_CIDRS": allow,
        "CHANNELS_SMTP_HOST": "127.0.0.1",
        "CHANNELS_SMTP_PORT": str(smtp.port),
        "CHANNELS_SWEEP_INTERVAL": "1",
        "CHANNELS_HOME": str(settings.home),
    }
    configure(
        database_url=database_url,
        broker_url=broker_url,
        egress_allow_cidrs=allow,
        smtp_host="127.0.0.1",
        smtp_port=smtp.port,
    )
    processes: list[Process] = []
    status = 1
    try:
        console.print("Starting a worker and beat (celery -A workers ...); logs in", str(logs))
        processes.append(start_worker(env, logs / "worker.log"))
        processes.append(start_beat(env, logs / "beat.log", logs / "beat-schedule"))
        status = asyncio.run(_run(http, smtp, queues))
    finally:
        for process in reversed(processes):
            process.stop()
        queues.stop()
        smtp.stop()
        http.stop()
        started_here = tuple(
            s.name for s in embedded.status() if s.running and s.name not in before
        )
        if started_here:
            embedded.stop(names=started_here)
            console.print(f"Stopped what this run started: {', '.join(started_here)}")
    return status


async def _run(http: WebhookReceiver, smtp: SmtpReceiver, queues: QueueConsumer) -> int:
    try:
        stamp = str(int(time.time()))
        alice, channels = await _setup(http, stamp)
        console.print(f"Created channels {', '.join(f'{c.title} ({c.id})' for c in channels)}")
        message_ids = await _send(alice, channels)
        failures = await _report(message_ids, {c.id: c.title for c in channels if c.id})
        problems = _receivers_report(http, smtp, queues, stamp)
        ok = failures == 0 and problems == 0
        console.print(
            "[green]All deliveries final and delivered.[/green]"
            if ok
            else "[red]Some deliveries failed.[/red]"
        )
        return 0 if ok else 1
    finally:
        await db.dispose()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
