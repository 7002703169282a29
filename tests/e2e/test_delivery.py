"""Every transport delivers through real workers; retries, dead letters, replay."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from channels_core.deliveries import dead_letters
from channels_core.models import AttemptStatus, DeliveryStatus
from channels_core.primitives import Manifest, Message, Principal
from channels_core.sending import Dispatch
from channels_core.signing import new_secret

from .conftest import QUEUES, Stack
from .helpers import attempts, author, channel, deliveries, subscribers, tag

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


async def test_every_transport_delivers_and_receivers_get_exactly_it(live: Stack) -> None:
    t = tag()
    sender = await author()
    http_ch, email_ch, queue_ch = (
        await channel("http"),
        await channel("email"),
        await channel("queue"),
    )
    secrets = [new_secret(), new_secret()]
    http_subs = await subscribers(
        http_ch,
        [
            {"endpoint": live.http.url(f"/{t}/0"), "webhook_secret": secrets[0]},
            {"endpoint": live.http.url(f"/{t}/1"), "webhook_secret": secrets[1]},
            {"endpoint": live.http.url(f"/{t}/2")},  # secret generated on first use
        ],
    )
    await subscribers(
        email_ch, [{"email": f"a-{t}@example.test"}, {"email": f"b-{t}@example.test"}]
    )
    await subscribers(queue_ch, [{"queue": QUEUES[0]}, {"queue": QUEUES[1]}])

    msg = Message().set_content(f"hello {t}").set_author_id(sender.id)  # type: ignore[arg-type]
    dispatch = await msg.send(Manifest([http_ch, email_ch, queue_ch]))
    assert [r.pending_count for r in dispatch] == [3, 2, 2]
    results = await dispatch.wait(timeout=60)

    assert [(r.delivered_count, r.failed_count, r.success) for r in results] == [
        (3, 0, True),
        (2, 0, True),
        (2, 0, True),
    ]
    rows = await deliveries(msg.id)  # type: ignore[arg-type]
    assert len(rows) == 7 and {r.status for r in rows} == {DeliveryStatus.DELIVERED}
    for row in rows:
        tries = await attempts(row.id)
        assert [(a.attempt, a.status) for a in tries] == [(1, AttemptStatus.DELIVERED)]
        assert tries[0].latency_ms is not None and tries[0].finished_at >= tries[0].started_at

    # HTTP: one signed POST per subscriber, verified by the standardwebhooks package.
    by_path = {p: live.http.for_path(f"/{t}/{p}") for p in range(3)}
    assert all(len(v) == 1 for v in by_path.values())
    generated = (await Principal.get(http_subs[2])).get_alias("webhook_secret")  # type: ignore[union-attr]
    assert generated and generated.startswith("whsec_")
    for p, secret in enumerate([*secrets, generated]):
        payload = live.http.verify(by_path[p][0], secret)
        assert payload["data"]["content"] == f"hello {t}"
        assert payload["data"]["message_id"] == msg.id
    http_rows = [r for r in rows if r.channel_id == http_ch.id]
    assert sorted(r[0].webhook_id for r in by_path.values()) == sorted(
        f"dlv_{r.id}" for r in http_rows
    )
    from standardwebhooks.webhooks import WebhookVerificationError

    with pytest.raises(WebhookVerificationError):
        live.http.verify(by_path[0][0], secrets[1])  # another endpoint's secret must not verify

    # Email: one mail each, Message-ID from the delivery id, subject the channel title.
    email_rows = {r.id for r in rows if r.channel_id == email_ch.id}
    for who in ("a", "b"):
        [mail] = live.smtp.to(f"{who}-{t}@example.test")
        assert mail.message["Subject"] == email_ch.title
        assert f"hello {t}" in mail.message.get_payload()
        ident = mail.message["Message-ID"]
        assert ident.startswith("<dlv-") and int(ident[5 : ident.index("@")]) in email_rows

    # Queue: one envelope per subscriber queue, carrying the delivery id.
    queue_rows = {f"dlv_{r.id}" for r in rows if r.channel_id == queue_ch.id}
    got = [
        e for q in QUEUES[:2] for e in live.queues.for_queue(q) if e["data"]["message_id"] == msg.id
    ]
    assert sorted(e["id"] for e in got) == sorted(queue_rows)
    assert {e["data"]["content"] for e in got} == {f"hello {t}"}


async def test_http_500_500_200_is_delivered_after_three_attempts(live: Stack) -> None:
    t = tag()
    sender, ch = await author(), await channel("http")
    path = f"/{t}/flaky"
    live.http.script(path, [500, 500, 200])
    await subscribers(ch, [{"endpoint": live.http.url(path)}])
    msg = await Message().set_content("retry me").set_author_id(sender.id).save()  # type: ignore[arg-type]
    [result] = await (await msg.send(ch)).wait(timeout=60)
    assert (result.delivered_count, result.failed_count) == (1, 0)
    [row] = await deliveries(msg.id)  # type: ignore[arg-type]
    tries = await attempts(row.id)
    assert [(a.status, a.status_code) for a in tries] == [
        (AttemptStatus.TRANSIENT, 500),
        (AttemptStatus.TRANSIENT, 500),
        (AttemptStatus.DELIVERED, 200),
    ]
    assert [r.status for r in live.http.for_path(path)] == [500, 500, 200]
    assert len({r.webhook_id for r in live.http.for_path(path)}) == 1  # one id across retries


@pytest.mark.parametrize("status", [400, 404, 410])
async def test_http_4xx_is_permanent(live: Stack, status: int) -> None:
    t = tag()
    sender, ch = await author(), await channel("http")
    path = f"/{t}/gone"
    live.http.script(path, [status, 200, 200])
    await subscribers(ch, [{"endpoint": live.http.url(path)}])
    msg = await Message().set_content("once").set_author_id(sender.id).save()  # type: ignore[arg-type]
    [result] = await (await msg.send(ch)).wait(timeout=60)
    assert (result.delivered_count, result.failed_count, result.success) == (0, 1, False)
    assert f"HTTP {status}" in result.errors[0]
    [row] = await deliveries(msg.id)  # type: ignore[arg-type]
    assert row.status == DeliveryStatus.DEAD and row.attempts == 1
    assert [a.status for a in await attempts(row.id)] == [AttemptStatus.PERMANENT]
    assert len(live.http.for_path(path)) == 1


async def test_http_429_retry_after_is_honoured(live: Stack) -> None:
    t = tag()
    sender, ch = await author(), await channel("http")
    path = f"/{t}/busy"
    live.http.script(path, [(429, {"Retry-After": "2"}), 200])
    await subscribers(ch, [{"endpoint": live.http.url(path)}])
    msg = await Message().set_content("later").set_author_id(sender.id).save()  # type: ignore[arg-type]
    [result] = await (await msg.send(ch)).wait(timeout=60)
    assert result.delivered_count == 1
    first, second = live.http.for_path(path)
    # The schedule says 0.3 s; the receiver asked for 2 s and got at least that.
    assert second.at - first.at >= 1.9
    [row] = await deliveries(msg.id)  # type: ignore[arg-type]
    assert [a.status_code for a in await attempts(row.id)] == [429, 200]


async def test_smtp_451_retries_and_550_does_not(live: Stack) -> None:
    t = tag()
    sender, ch = await author(), await channel("email")
    later, never = f"later-{t}@example.test", f"never-{t}@example.test"
    live.smtp.refuse(later, ["451 4.7.1 Try again later"])
    live.smtp.refuse(never, ["550 5.1.1 No such user"])
    await subscribers(ch, [{"email": later}, {"email": never}])
    msg = await Message().set_content("mail").set_author_id(sender.id).save()  # type: ignore[arg-type]
    [result] = await (await msg.send(ch)).wait(timeout=60)
    assert (result.delivered_count, result.failed_count) == (1, 1)
    rows = {r.subscriber_id: r for r in await deliveries(msg.id)}  # type: ignore[arg-type]
    by_status = {r.status: r for r in rows.values()}
    assert [a.status_code for a in await attempts(by_status[DeliveryStatus.DELIVERED].id)] == [
        451,
        250,
    ]
    dead = by_status[DeliveryStatus.DEAD]
    assert [a.status_code for a in await attempts(dead.id)] == [550]
    assert "550" in (dead.last_error or "")
    assert len(live.smtp.to(later)) == 1 and live.smtp.to(never) == []


async def test_exhausted_delivery_is_a_dead_letter_and_replay_delivers_it(live: Stack) -> None:
    t = tag()
    sender, ch = await author(), await channel("http")
    path = f"/{t}/down"
    live.http.script(path, [503, 503, 503])
    await subscribers(ch, [{"endpoint": live.http.url(path)}])
    msg = await Message().set_content("persist").set_author_id(sender.id).save()  # type: ignore[arg-type]
    [result] = await (await msg.send(ch)).wait(timeout=60)
    assert result.failed_count == 1
    [row] = await deliveries(msg.id)  # type: ignore[arg-type]
    assert row.status == DeliveryStatus.DEAD and row.attempts == 3
    assert "gave up after 3 attempts" in (row.last_error or "")
    assert row.id in [d.id for d in await dead_letters(channel_id=ch.id)]

    # The endpoint is back (its script is spent): replay from the CLI.
    replay = subprocess.run(
        [sys.executable, "-m", "channels_cli.main", "replay", str(msg.id)],
        env={**os.environ, **live.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert replay.returncode == 0, replay.stderr
    [result] = await (await Dispatch.track(msg.id)).wait(timeout=60)  # type: ignore[arg-type]
    assert (result.delivered_count, result.failed_count) == (1, 0)
    [row] = await deliveries(msg.id)  # type: ignore[arg-type]
    assert row.status == DeliveryStatus.DELIVERED and row.attempts == 4
    assert [r.status for r in live.http.for_path(path)] == [503, 503, 503, 200]


async def test_seed_flow_reports_delivered_count_and_refuses_without_permission(
    live: Stack,
) -> None:
    t = tag()
    alice = await author()
    general = await channel("http")
    ids = await subscribers(general, [{"endpoint": live.http.url(f"/{t}/{i}")} for i in range(4)])
    msg = Message().set_content("Hello everyone!").set_author_id(alice.id)  # type: ignore[arg-type]
    await msg.save()
    results = await (await msg.send(Manifest([general]))).wait()
    assert [r.delivered_count for r in results] == [len(ids)]

    mallory = await author(submit=False)
    denied = Message().set_content("let me in").set_author_id(mallory.id)  # type: ignore[arg-type]
    dispatch = await denied.send(Manifest([general]))
    [result] = list(dispatch)
    assert result.success is False and result.delivered_count == 0
    assert "channel.submit" in result.errors[0]
    assert await dispatch.wait(timeout=5) == [result]  # final at once: nothing pending
    assert await deliveries(denied.id) == []  # type: ignore[arg-type]
    from sqlalchemy import func, select

    from channels_core import db
    from channels_core.models import OutboxRow

    async with db.session() as s:
        queued = await s.scalar(select(func.count()).where(OutboxRow.message_id == denied.id))
    assert queued == 0
    assert sum(1 for r in live.http.received if r.json()["data"]["message_id"] == denied.id) == 0


async def test_cli_send_wait_reports_final_results(live: Stack) -> None:
    t = tag()
    sender, ch = await author(), await channel("http")
    await subscribers(ch, [{"endpoint": live.http.url(f"/{t}/{i}")} for i in range(2)])
    sent = subprocess.run(
        [
            sys.executable,
            "-m",
            "channels_cli.main",
            "channel",
            "send",
            str(ch.id),
            f"from the CLI {t}",
            "--author-id",
            str(sender.id),
            "--wait",
            "--timeout",
            "60",
        ],
        env={**os.environ, **live.env},
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert sent.returncode == 0, sent.stderr
    assert "Message sent (ID:" in sent.stdout
    assert f"channel {ch.id}: delivered 2, failed 0, pending 0" in sent.stdout
    assert len([r for r in live.http.received if r.path.startswith(f"/{t}/")]) == 2
