"""``channels gateway`` end to end: real gateways, a real worker, real clients.

Fan-out across two gateway processes, "not connected" as a final outcome,
resume after a disconnect, refused tokens, and a clean SIGTERM.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio
from e2e.helpers import attempts, author, deliveries, subscribers
from websockets.exceptions import ConnectionClosed

from channels_core.models import AttemptStatus, DeliveryRow, DeliveryStatus
from channels_core.primitives import Channel, Message
from channels_core.sending import Dispatch
from channels_core.tokens import issue, revoke
from channels_core.transports.websocket import GATEWAYS_KEY, gateway_key, presence_key

from .conftest import Gateway, Stack, open_client, start_gateway, token_for, websocket_channel

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

NOT_CONNECTED = "is not connected"


async def send(content: str, channel: Channel, sender_id: int) -> tuple[Message, Dispatch]:
    msg = Message().set_content(content).set_author_id(sender_id)
    dispatch = await msg.send(channel)
    assert dispatch.accepted
    return msg, dispatch


async def rows_of(msg: Message) -> dict[int, DeliveryRow]:
    """The message's delivery rows by subscriber."""
    assert msg.id is not None
    return {row.subscriber_id: row for row in await deliveries(msg.id)}


def expect_delivery(frame: dict[str, Any], msg: Message, row: DeliveryRow) -> None:
    assert frame["type"] == "delivery"
    assert frame["delivery_id"] == row.id
    body = frame["message"]
    assert body["id"] == msg.id
    assert body["channel_id"] == row.channel_id
    assert body["content"] == msg.content
    assert body["author_id"] == msg.author_id
    assert body["content_type"] == "text/plain"
    assert set(body) == {
        "id",
        "channel_id",
        "author_id",
        "content",
        "content_type",
        "reply_to_id",
        "conversation_id",
        "created_at",
    }


async def test_one_message_reaches_every_socket_on_both_gateways_within_a_second(
    live: Stack, gateways: list[Gateway]
) -> None:
    a, b = gateways
    sender = await author()
    assert sender.id is not None
    ch = await websocket_channel()
    only_a, only_a2, only_b, both = await subscribers(ch, [{}, {}, {}, {}])
    toks = {p: await token_for(p) for p in (only_a, only_a2, only_b, both)}
    sockets = [
        (only_a, await open_client(a.url(token=toks[only_a]))),
        # A second socket of the same principal on the same gateway gets it too.
        (only_a, await open_client(a.url(token=toks[only_a]))),
        (only_a2, await open_client(a.url(token=toks[only_a2]))),
        (only_b, await open_client(b.url(token=toks[only_b]))),
        (both, await open_client(a.url(token=toks[both]))),
        (both, await open_client(b.url(token=toks[both]))),
    ]
    for principal, client in sockets:
        assert client.ready["principal_id"] == principal and client.resumed == []
    assert {c.ready["gateway_id"] for _, c in sockets} == {a.id, b.id}

    # A first message warms the worker's processes (imports, Redis
    # connections); the second is the one measured.
    for round_ in ("warm-up", "measured"):
        started = time.perf_counter()
        msg, dispatch = await send(f"fan-out {round_}", ch, sender.id)
        frames = await asyncio.gather(*(c.recv() for _, c in sockets))
        elapsed = time.perf_counter() - started
        print(
            f"\nwebsocket fan-out ({round_}): send -> last of {len(sockets)} sockets "
            f"in {elapsed * 1000:.1f} ms"
        )
        final = await dispatch.wait(timeout=30)
        assert [(r.delivered_count, r.failed_count) for r in final] == [(4, 0)]
        rows = await rows_of(msg)
        for (principal, _), frame in zip(sockets, frames, strict=True):
            expect_delivery(frame, msg, rows[principal])
        for row in rows.values():
            assert row.status == DeliveryStatus.DELIVERED and row.attempts == 1
            tries = await attempts(row.id)
            assert [(t.attempt, t.status, t.transport) for t in tries] == [
                (1, AttemptStatus.DELIVERED, "websocket")
            ]
    assert elapsed < 1.0, f"fan-out took {elapsed:.3f}s"
    for _, client in sockets:
        await client.nothing_more(0.2)
        await client.close()


async def test_a_subscriber_without_a_socket_ends_dead_after_one_attempt(
    live: Stack, gateways: list[Gateway]
) -> None:
    sender = await author()
    assert sender.id is not None
    ch = await websocket_channel()
    online, offline = await subscribers(ch, [{}, {}])
    client = await open_client(gateways[1].url(token=await token_for(online)))

    msg, dispatch = await send("who is there", ch, sender.id)
    frame = await client.recv()
    final = await dispatch.wait(timeout=30)
    assert [(r.delivered_count, r.failed_count) for r in final] == [(1, 1)]
    rows = await rows_of(msg)
    expect_delivery(frame, msg, rows[online])
    dead = rows[offline]
    assert dead.status == DeliveryStatus.DEAD and dead.attempts == 1
    assert dead.last_error == f"subscriber {offline} {NOT_CONNECTED}"
    assert dead.next_attempt_at is None
    tries = await attempts(dead.id)
    assert [(t.attempt, t.status, t.error) for t in tries] == [
        (1, AttemptStatus.PERMANENT, f"subscriber {offline} {NOT_CONNECTED}")
    ]
    # Permanent means no retry is coming: still one attempt after the retry
    # schedule (0.3 s steps here) would have run.
    await asyncio.sleep(1.5)
    assert [r.attempts for r in (await rows_of(msg)).values()] == [1, 1]
    await client.close()


async def test_resume_sends_exactly_what_was_missed_then_live_traffic(
    live: Stack, gateways: list[Gateway]
) -> None:
    a, b = gateways
    sender = await author()
    assert sender.id is not None
    ch = await websocket_channel()
    (principal,) = await subscribers(ch, [{}])
    token = await token_for(principal)

    first = await open_client(a.url(token=token))
    seen, dispatch = await send("seen", ch, sender.id)
    seen_frame = await first.recv()
    await dispatch.wait(timeout=30)
    last_seen = seen_frame["delivery_id"]
    await first.close()

    missed: list[Message] = []
    for n in range(3):
        msg, dispatch = await send(f"missed {n}", ch, sender.id)
        await dispatch.wait(timeout=30)
        (row,) = (await rows_of(msg)).values()
        assert (row.status, row.attempts) == (DeliveryStatus.DEAD, 1)
        missed.append(msg)
    missed_rows = [(await rows_of(m))[principal] for m in missed]

    # Back on the other gateway, from where it left off.
    again = await open_client(b.url(token=token, last_delivery_id=last_seen))
    assert [f["delivery_id"] for f in again.resumed] == [r.id for r in missed_rows]
    for frame, msg, row in zip(again.resumed, missed, missed_rows, strict=True):
        expect_delivery(frame, msg, row)
    assert again.ready["resumed"] == 3

    live_msg, dispatch = await send("live again", ch, sender.id)
    expect_delivery(await again.recv(), live_msg, (await rows_of(live_msg))[principal])
    await dispatch.wait(timeout=30)

    # Resumed dead letters are now delivered, with an attempt row saying how.
    for row in missed_rows:
        (fresh,) = await deliveries(row.message_id)
        assert (fresh.status, fresh.attempts, fresh.last_error) == (
            DeliveryStatus.DELIVERED,
            2,
            None,
        )
        tries = await attempts(row.id)
        assert [(t.attempt, t.status) for t in tries] == [
            (1, AttemptStatus.PERMANENT),
            (2, AttemptStatus.DELIVERED),
        ]
        assert tries[1].error is not None and "delivered on reconnect" in tries[1].error
        assert f"after delivery {last_seen}" in tries[1].error

    # The catch-up pass (gateway_ack_timeout + 1 s after connecting) finds
    # nothing left, so nothing is sent twice.
    await again.nothing_more(2.5)

    # From the beginning: the delivered ones too, in id order, on a second socket.
    live_row = (await rows_of(live_msg))[principal]
    everything = await open_client(a.url(token=token, last_delivery_id=0))
    assert [f["delivery_id"] for f in everything.resumed] == [
        last_seen,
        *(r.id for r in missed_rows),
        live_row.id,
    ]
    for client in (again, everything):
        await client.close()


@pytest.mark.parametrize(
    "how",
    ["missing", "unknown", "revoked", "malformed-last", "header-ok"],
)
async def test_tokens_are_checked_on_connect(
    live: Stack, gateways: list[Gateway], how: str
) -> None:
    ch = await websocket_channel()
    (principal,) = await subscribers(ch, [{}])
    issued = await issue(principal)
    gateway = gateways[0]
    if how == "header-ok":
        client = await open_client(
            gateway.url(), headers={"Authorization": f"Bearer {issued.token}"}
        )
        assert client.ready["principal_id"] == principal
        await client.close()
        return
    if how == "revoked":
        await revoke(issued.id)
    url = {
        "missing": gateway.url(),
        "unknown": gateway.url(token="chn_" + "x" * 43),
        "revoked": gateway.url(token=issued.token),
        "malformed-last": gateway.url(token=issued.token, last_delivery_id="seven"),
    }[how]
    with pytest.raises(ConnectionClosed) as closed:
        await open_client(url)
    assert closed.value.rcvd is not None
    expected = 4400 if how == "malformed-last" else 4401
    assert closed.value.rcvd.code == expected, closed.value.rcvd


async def test_sigterm_removes_the_gateways_presence(live: Stack, gateways: list[Gateway]) -> None:
    sender = await author()
    assert sender.id is not None
    ch = await websocket_channel()
    (principal,) = await subscribers(ch, [{}])
    doomed = start_gateway(live, f"gateway-doomed-{principal}")
    client = await open_client(doomed.url(token=await token_for(principal)))
    r = redis.asyncio.Redis.from_url(live.broker_url, decode_responses=True)
    try:
        assert await r.exists(gateway_key(doomed.id))
        assert await r.sismember(GATEWAYS_KEY, doomed.id)  # type: ignore[misc]
        assert await r.smembers(presence_key(principal)) == {doomed.id}  # type: ignore[misc]

        # Stopped from a thread, so this loop's client can answer the close handshake.
        started = time.monotonic()
        code = await asyncio.to_thread(doomed.process.stop, 20)
        assert code == 0, doomed.process.log()[-3000:]
        assert time.monotonic() - started < 5, "a clean stop should not wait out timeouts"
        with pytest.raises(ConnectionClosed) as closed:
            await client.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert not await r.exists(gateway_key(doomed.id))
        assert not await r.sismember(GATEWAYS_KEY, doomed.id)  # type: ignore[misc]
        assert not await r.exists(presence_key(principal))
        assert "stopped" in doomed.process.log()
    finally:
        await r.aclose()
        doomed.process.stop()

    msg, dispatch = await send("anyone?", ch, sender.id)
    await dispatch.wait(timeout=30)
    (row,) = (await rows_of(msg)).values()
    assert (row.status, row.attempts) == (DeliveryStatus.DEAD, 1)
    assert row.last_error == f"subscriber {principal} {NOT_CONNECTED}"
