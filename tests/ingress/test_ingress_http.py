"""The HTTP ingress over real HTTP: ``channels ingress`` in its own process,
a real worker delivering to a real webhook receiver, PostgreSQL and Valkey.

Every refusal is a real request that gets a problem document and changes
nothing: no row in messages, outbox, deliveries or idempotency_keys, and no
routing task received by the worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from e2e.conftest import Stack
from e2e.helpers import subscribers
from sqlalchemy import func, select

from channels_core import db, tokens
from channels_core.models import DeliveryRow, IdempotencyRow, MessageRow
from channels_core.permissions import SUBSCRIBE
from channels_core.primitives import Conversation, Principal
from channels_core.settings import get_settings
from channels_core.transports.base import IngressTransport
from channels_core.transports.registry import ingress_registry, ingress_transport

from .conftest import (
    Caller,
    Ingress,
    caller,
    counts,
    http_channel,
    manager,
    routes_received,
    settle,
    submitter,
    tag,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

PROBLEM = "application/problem+json"


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status
    assert isinstance(body["type"], str) and body["type"]
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    return body  # type: ignore[no-any-return]


async def wait_for(
    check: Callable[[], Awaitable[bool]], timeout: float = 60.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def delivered(api: httpx.AsyncClient, who: Caller, message_id: int) -> dict[str, Any]:
    """GET the message until every delivery is final; return the last answer."""
    last: dict[str, Any] = {}

    async def done() -> bool:
        nonlocal last
        response = await api.get(f"/messages/{message_id}", headers=who.headers)
        assert response.status_code == 200, response.text
        last = response.json()
        return all(r["pending_count"] == 0 for r in last["results"])

    await wait_for(done, what=f"message {message_id} to be delivered")
    return last


# -- accepted -------------------------------------------------------------------------------


async def test_submitted_message_is_delivered_to_the_webhook(
    api: httpx.AsyncClient, live: Stack
) -> None:
    t = tag()
    sender, channel = await submitter(), await http_channel()
    path = f"/{t}/hook"
    [subscriber_id] = await subscribers(channel, [{"endpoint": live.http.url(path)}])
    assert channel.id is not None
    await settle()
    routes_before, rows_before = routes_received(live), await counts(channel.id)

    response = await api.post(
        f"/channels/{channel.id}/messages",
        headers=sender.headers,
        json={"content": f"hello {t}", "content_type": "text/markdown"},
    )

    assert response.status_code == 201, response.text
    body = response.json()
    message_id = body["message_id"]
    assert response.headers["location"] == body["status_url"] == f"/messages/{message_id}"
    assert body["replayed"] is False
    assert (
        body["results"]
        == [
            {
                "channel_id": channel.id,
                "success": True,
                "delivered_count": 0,
                "failed_count": 0,
                "pending_count": 1,
                "errors": [],
            }
        ]
        or body["results"][0]["delivered_count"] == 1
    )  # the worker may already be done

    async def received() -> bool:
        return len(live.http.for_path(path)) == 1

    await wait_for(received, what="the webhook")
    [hook] = live.http.for_path(path)
    secret = (await Principal.get(subscriber_id)).get_alias("webhook_secret")  # type: ignore[union-attr]
    assert secret is not None
    payload = live.http.verify(hook, secret)
    assert payload["data"]["content"] == f"hello {t}"
    assert payload["data"]["message_id"] == message_id

    state = await delivered(api, sender, message_id)
    assert state["author_id"] == sender.id
    assert state["content_type"] == "text/markdown"
    assert [(r["delivered_count"], r["failed_count"]) for r in state["results"]] == [(1, 0)]
    [delivery] = state["deliveries"]
    assert (delivery["subscriber_id"], delivery["status"]) == (subscriber_id, "delivered")
    assert hook.webhook_id == f"dlv_{delivery['id']}"

    listed = await api.get(f"/messages/{message_id}/deliveries", headers=sender.headers)
    assert listed.status_code == 200
    [row] = listed.json()
    assert [(a["attempt"], a["status"], a["status_code"]) for a in row["attempt_log"]] == [
        (1, "delivered", 200)
    ]
    # The positive controls for "nothing changed" below: an accepted submit is seen.
    assert routes_received(live) > routes_before
    assert await counts(channel.id) == {
        "messages": rows_before["messages"] + 1,
        "outbox": rows_before["outbox"] + 1,
        "idempotency_keys": rows_before["idempotency_keys"],
        "deliveries": rows_before["deliveries"] + 1,
    }


async def test_reads_follow_who_sent_and_who_receives(api: httpx.AsyncClient, live: Stack) -> None:
    boss, channel = await manager(), await http_channel()
    conversation = await Conversation().set_title(f"talk {tag()}").save()
    root = await api.post(
        f"/channels/{channel.id}/messages",
        headers=boss.headers,
        json={"content": "root", "conversation_id": conversation.id},
    )
    assert root.status_code == 201, root.text
    root_id = root.json()["message_id"]
    reply = await api.post(
        f"/channels/{channel.id}/messages",
        headers=boss.headers,
        json={
            "content": "reply",
            "reply_to_id": root_id,
            "conversation_id": conversation.id,
            "references": [root_id],
        },
    )
    assert reply.status_code == 201, reply.text
    reply_id = reply.json()["message_id"]

    thread = await api.get(f"/messages/{reply_id}/thread", headers=boss.headers)
    assert [(m["id"], m["references"]) for m in thread.json()] == [
        (root_id, []),
        (reply_id, [root_id]),
    ]
    talk = await api.get(f"/conversations/{conversation.id}/messages", headers=boss.headers)
    assert [m["id"] for m in talk.json()] == [root_id, reply_id]
    page = await api.get(
        f"/conversations/{conversation.id}/messages",
        headers=boss.headers,
        params={"after": root_id, "limit": 1},
    )
    assert [m["id"] for m in page.json()] == [reply_id]

    # Someone else: no delivery state, no content, an empty conversation.
    outsider = await caller()
    assert_problem(await api.get(f"/messages/{root_id}", headers=outsider.headers), 403)
    assert_problem(await api.get(f"/messages/{reply_id}/thread", headers=outsider.headers), 403)
    listing = await api.get(f"/conversations/{conversation.id}/messages", headers=outsider.headers)
    assert listing.status_code == 200 and listing.json() == []
    assert_problem(
        await api.post(f"/channels/{channel.id}/subscriptions", headers=outsider.headers), 403
    )

    # A subscriber reads the content it receives, not the sender's delivery state.
    reader = await caller(SUBSCRIBE)
    subscribe = f"/channels/{channel.id}/subscriptions"
    plain = {**reader.headers, "Content-Type": "text/plain"}
    assert_problem(await api.post(subscribe, headers=plain, content=b"me"), 415)
    bad_id = await api.post(subscribe, headers=reader.headers, json={"subscriber_id": "7"})
    assert assert_problem(bad_id, 422)["errors"][0]["field"] == "subscriber_id"
    joined = await api.post(f"/channels/{channel.id}/subscriptions", headers=reader.headers)
    assert joined.status_code == 201, joined.text
    assert (joined.json()["channel_id"], joined.json()["subscriber_id"]) == (channel.id, reader.id)
    again = await api.post(f"/channels/{channel.id}/subscriptions", headers=reader.headers, json={})
    assert_problem(again, 409)
    thread = await api.get(f"/messages/{reply_id}/thread", headers=reader.headers)
    assert [m["id"] for m in thread.json()] == [root_id, reply_id]
    assert_problem(await api.get(f"/messages/{root_id}", headers=reader.headers), 403)

    # Subscribing someone else takes channel.manage.
    other = await caller()
    refused = await api.post(
        f"/channels/{channel.id}/subscriptions",
        headers=reader.headers,
        json={"subscriber_id": other.id},
    )
    assert_problem(refused, 403)
    added = await api.post(
        f"/channels/{channel.id}/subscriptions",
        headers=boss.headers,
        json={"subscriber_id": other.id},
    )
    assert added.status_code == 201 and added.json()["subscriber_id"] == other.id

    # A channel's deliveries are for holders of channel.manage.
    await delivered(api, boss, reply_id)
    assert_problem(await api.get(f"/channels/{channel.id}/deliveries", headers=reader.headers), 403)
    rows = await api.get(
        f"/channels/{channel.id}/deliveries",
        headers=boss.headers,
        params={"status": "delivered", "since": "2000-01-01T00:00:00Z", "limit": 10},
    )
    assert rows.status_code == 200
    assert all(d["channel_id"] == channel.id for d in rows.json())


async def test_health_and_metrics_need_no_token(api: httpx.AsyncClient) -> None:
    health = await api.get("/healthz")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    metrics = await api.get("/metrics")
    assert metrics.status_code == 200, metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "# TYPE" in metrics.text
    spec = await api.get("/openapi.json")
    assert spec.status_code == 200 and "/channels/{channel_id}/messages" in spec.json()["paths"]


# -- refused, changing nothing ------------------------------------------------------------------


@dataclass
class World:
    sender: Caller
    revoked: Caller
    outsider: Caller
    channel_id: int
    elsewhere_id: int  # a channel taking another ingress transport
    hook_path: str
    used_key: str
    limit: int


async def _build_world(live: Stack, ingress: Ingress) -> World:
    t = tag()
    sender, revoked, outsider = await submitter(), await submitter(), await caller()
    await tokens.revoke(revoked.token_id)
    channel = await http_channel()
    hook_path = f"/{t}/refused"
    await subscribers(channel, [{"endpoint": live.http.url(hook_path)}])

    @ingress_transport("inbound-mail")
    class InboundMail(IngressTransport):
        pass

    try:
        elsewhere = await http_channel(ingress_transport="inbound-mail")
    finally:
        ingress_registry.unregister("inbound-mail")
    await subscribers(elsewhere, [{"endpoint": live.http.url(hook_path)}])

    # One accepted submission with a key, so reusing it can be refused.
    used_key = f"key-{t}"
    async with httpx.AsyncClient(base_url=ingress.base_url) as client:
        first = await client.post(
            f"/channels/{channel.id}/messages",
            headers=sender.headers,
            json={"content": "first", "idempotency_key": used_key},
        )
        assert first.status_code == 201, first.text

    async def arrived() -> bool:
        return len(live.http.for_path(hook_path)) == 1

    await wait_for(arrived, what="the first webhook")
    assert channel.id is not None and elsewhere.id is not None
    return World(
        sender,
        revoked,
        outsider,
        channel.id,
        elsewhere.id,
        hook_path,
        used_key,
        get_settings().max_content_bytes,
    )


_worlds: dict[int, World] = {}  # by ingress PID


@pytest.fixture
async def world(live: Stack, ingress: Ingress) -> World:
    """Built once per ingress process (per module); ``live`` is per test, so no module scope."""
    pid = ingress.process.pid
    if pid not in _worlds:
        _worlds[pid] = await _build_world(live, ingress)
    return _worlds[pid]


Request = tuple[str, dict[str, Any]]  # url, httpx keyword arguments


def _messages(w: World, channel_id: int | None = None) -> str:
    return f"/channels/{channel_id or w.channel_id}/messages"


def _as(who: Caller, body: Any = None, **extra: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"headers": who.headers}
    if body is not None:
        kwargs["json"] = body
    kwargs.update(extra)
    if "headers" in extra:
        kwargs["headers"] = {**who.headers, **extra["headers"]}
    return kwargs


async def _chunks(chunk: bytes, count: int) -> AsyncIterator[bytes]:
    """A body without Content-Length: the limit must hold while streaming."""
    yield b'{"content": "'
    for _ in range(count):
        yield chunk
    yield b'"}'


def _raw(
    who: Caller, raw: bytes | AsyncIterator[bytes], content_type: str | None = "application/json"
) -> dict[str, Any]:
    headers = dict(who.headers)
    if content_type is not None:
        headers["Content-Type"] = content_type
    return {"headers": headers, "content": raw}


BAD: dict[str, tuple[int, Callable[[World], Request]]] = {
    "401 no token": (401, lambda w: (_messages(w), {"json": {"content": "x"}})),
    "401 not a bearer token": (
        401,
        lambda w: (
            _messages(w),
            {"headers": {"Authorization": "Basic dXNlcjpwYXNz"}, "json": {"content": "x"}},
        ),
    ),
    "401 bearer without a token": (
        401,
        lambda w: (
            _messages(w),
            {"headers": {"Authorization": "Bearer"}, "json": {"content": "x"}},
        ),
    ),
    "401 malformed token": (
        401,
        lambda w: (
            _messages(w),
            {"headers": {"Authorization": "Bearer not a token"}, "json": {"content": "x"}},
        ),
    ),
    "401 unknown token": (
        401,
        lambda w: (
            _messages(w),
            {"headers": {"Authorization": f"Bearer chn_{tag()}{tag()}"}, "json": {"content": "x"}},
        ),
    ),
    "401 revoked token": (401, lambda w: (_messages(w), _as(w.revoked, {"content": "x"}))),
    "403 no channel.submit": (403, lambda w: (_messages(w), _as(w.outsider, {"content": "x"}))),
    "403 forged author_id": (
        403,
        lambda w: (_messages(w), _as(w.sender, {"content": "x", "author_id": w.outsider.id})),
    ),
    "403 channel takes another ingress": (
        403,
        lambda w: (_messages(w, w.elsewhere_id), _as(w.sender, {"content": "x"})),
    ),
    "404 unknown channel": (
        404,
        lambda w: (_messages(w, 2**62), _as(w.sender, {"content": "x"})),
    ),
    "404 reply to a message that does not exist": (
        404,
        lambda w: (_messages(w), _as(w.sender, {"content": "x", "reply_to_id": 2**62})),
    ),
    "409 idempotency key reused with another body": (
        409,
        lambda w: (
            _messages(w),
            _as(w.sender, {"content": "not the first", "idempotency_key": w.used_key}),
        ),
    ),
    "413 content over the limit": (
        413,
        lambda w: (_messages(w), _as(w.sender, {"content": "x" * (w.limit + 1)})),
    ),
    "413 request body over the limit": (
        413,
        lambda w: (_messages(w), _raw(w.sender, b'{"content": "' + b"x" * (3 * w.limit) + b'"}')),
    ),
    "413 chunked request body over the limit": (
        413,
        lambda w: (_messages(w), _raw(w.sender, _chunks(b"x" * 65536, 3 * w.limit // 65536))),
    ),
    "415 request is text/plain": (
        415,
        lambda w: (_messages(w), _raw(w.sender, b'{"content": "x"}', "text/plain")),
    ),
    "415 request has no content type": (
        415,
        lambda w: (_messages(w), _raw(w.sender, b'{"content": "x"}', None)),
    ),
    "415 unsupported message content_type": (
        415,
        lambda w: (
            _messages(w),
            _as(w.sender, {"content": "x", "content_type": "application/x-unheard-of"}),
        ),
    ),
    "422 malformed JSON": (422, lambda w: (_messages(w), _raw(w.sender, b'{"content": "x"'))),
    "422 not UTF-8": (422, lambda w: (_messages(w), _raw(w.sender, b'{"content": "\xff"}'))),
    "422 NaN": (422, lambda w: (_messages(w), _raw(w.sender, b'{"content": "x", "n": NaN}'))),
    "422 not an object": (422, lambda w: (_messages(w), _as(w.sender, ["content", "x"]))),
    "422 empty body": (422, lambda w: (_messages(w), _raw(w.sender, b""))),
    "422 content is a number": (422, lambda w: (_messages(w), _as(w.sender, {"content": 5}))),
    "422 reference is a string": (
        422,
        lambda w: (_messages(w), _as(w.sender, {"content": "x", "references": ["1"]})),
    ),
    "422 reply_to_id is a boolean": (
        422,
        lambda w: (_messages(w), _as(w.sender, {"content": "x", "reply_to_id": True})),
    ),
    "422 id beyond BIGINT": (
        422,
        lambda w: (_messages(w), _as(w.sender, {"content": "x", "conversation_id": 2**63})),
    ),
    "422 missing content": (
        422,
        lambda w: (_messages(w), _as(w.sender, {"content_type": "text/plain"})),
    ),
    "422 empty content": (422, lambda w: (_messages(w), _as(w.sender, {"content": ""}))),
    "422 NUL in content": (422, lambda w: (_messages(w), _as(w.sender, {"content": "a\x00b"}))),
    "422 lone surrogate in content": (
        422,
        lambda w: (_messages(w), _raw(w.sender, b'{"content": "\\ud800"}')),
    ),
    "422 unknown field": (
        422,
        lambda w: (_messages(w), _as(w.sender, {"content": "x", "priority": "high"})),
    ),
    "422 malformed content_type": (
        422,
        lambda w: (
            _messages(w),
            _as(w.sender, {"content": "x", "content_type": "text/plain\r\nX: y"}),
        ),
    ),
    "422 idempotency key with spaces": (
        422,
        lambda w: (_messages(w), _as(w.sender, {"content": "x", "idempotency_key": "a b"})),
    ),
    "422 channel id is not a number": (
        422,
        lambda w: ("/channels/seven/messages", _as(w.sender, {"content": "x"})),
    ),
    "422 channel id beyond BIGINT": (
        422,
        lambda w: (f"/channels/{2**63}/messages", _as(w.sender, {"content": "x"})),
    ),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_refused_submission_changes_nothing(
    case: str, api: httpx.AsyncClient, live: Stack, world: World
) -> None:
    status, build = BAD[case]
    url, kwargs = build(world)
    await settle()
    before, routes, hooks = (
        await counts(world.channel_id, world.elsewhere_id),
        routes_received(live),
        live.http.count(),
    )

    response = await api.post(url, **kwargs)

    body = assert_problem(response, status)
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")
    if status == 422:
        assert body["errors"] and all({"field", "message"} <= set(e) for e in body["errors"])
    await asyncio.sleep(0.3)  # an enqueue, had there been one, reaches the worker by now
    assert await counts(world.channel_id, world.elsewhere_id) == before
    assert routes_received(live) == routes
    assert live.http.count() == hooks


async def test_refusals_name_the_reason(api: httpx.AsyncClient, world: World) -> None:
    """The details say what is wrong, so a client can fix it."""
    forged = await api.post(
        _messages(world), **_as(world.sender, {"content": "x", "author_id": world.outsider.id})
    )
    assert "the author is the token's principal" in assert_problem(forged, 403)["detail"]
    elsewhere = await api.post(
        _messages(world, world.elsewhere_id), **_as(world.sender, {"content": "x"})
    )
    assert "does not accept http ingress" in assert_problem(elsewhere, 403)["detail"]
    missing = await api.post(_messages(world), **_as(world.outsider, {"content": "x"}))
    assert "channel.submit" in assert_problem(missing, 403)["detail"]
    unknown = await api.post(
        _messages(world), **_as(world.sender, {"content": "x", "priority": "high"})
    )
    assert assert_problem(unknown, 422)["errors"] == [
        {"field": "priority", "message": "Extra inputs are not permitted"}
    ]


async def test_unknown_routes_and_methods_are_problems_too(api: httpx.AsyncClient) -> None:
    assert_problem(await api.get("/nowhere"), 404)
    wrong = await api.delete("/healthz")
    assert_problem(wrong, 405)
    assert wrong.headers["allow"] == "GET"


# -- idempotency ----------------------------------------------------------------------------


async def _one_message(content: str) -> list[int]:
    async with db.session() as s:
        return list(await s.scalars(select(MessageRow.id).where(MessageRow.content == content)))


async def test_idempotent_replay_returns_the_same_message(
    api: httpx.AsyncClient, live: Stack
) -> None:
    t = tag()
    sender, channel = await submitter(), await http_channel()
    path = f"/{t}/once"
    await subscribers(channel, [{"endpoint": live.http.url(path)}])
    url = f"/channels/{channel.id}/messages"
    content = f"exactly once {t}"

    first = await api.post(
        url, headers=sender.headers, json={"content": content, "idempotency_key": t}
    )
    again = await api.post(
        url, headers=sender.headers, json={"idempotency_key": t, "content": content}
    )
    # The same request spelled out: the default content_type and the author named.
    spelled = await api.post(
        url,
        headers=sender.headers,
        json={
            "content": content,
            "content_type": "text/plain",
            "author_id": sender.id,
            "references": [],
            "idempotency_key": t,
        },
    )

    assert first.status_code == 201, first.text
    message_id = first.json()["message_id"]
    for replay in (again, spelled):
        assert replay.status_code == 200, replay.text
        assert replay.json()["message_id"] == message_id and replay.json()["replayed"] is True
        assert replay.headers["location"] == f"/messages/{message_id}"
    assert await _one_message(content) == [message_id]

    await delivered(api, sender, message_id)
    await asyncio.sleep(0.5)  # a second delivery, had there been one, arrives by now
    assert len(live.http.for_path(path)) == 1
    async with db.session() as s:
        assert await s.scalar(select(func.count()).where(DeliveryRow.message_id == message_id)) == 1
        [key_row] = list(
            await s.scalars(select(IdempotencyRow).where(IdempotencyRow.principal_id == sender.id))
        )
    assert (key_row.key, key_row.message_id) == (t, message_id)

    # Keys are per principal: another principal's identical key is its own.
    other = await submitter()
    theirs = await api.post(
        url, headers=other.headers, json={"content": content, "idempotency_key": t}
    )
    assert theirs.status_code == 201 and theirs.json()["message_id"] != message_id
    # And per request: the same key on another channel is another request.
    second = await http_channel()
    moved = await api.post(
        f"/channels/{second.id}/messages",
        headers=sender.headers,
        json={"content": content, "idempotency_key": t},
    )
    assert_problem(moved, 409)


async def test_concurrent_identical_submissions_make_one_message(
    api: httpx.AsyncClient, live: Stack
) -> None:
    sender, channel = await submitter(), await http_channel()
    path = f"/{tag()}/race"
    await subscribers(channel, [{"endpoint": live.http.url(path)}])
    url = f"/channels/{channel.id}/messages"
    message_ids = []
    for _ in range(3):
        key = tag()
        body = {"content": f"race {key}", "idempotency_key": key}
        responses = await asyncio.gather(
            *(api.post(url, headers=sender.headers, json=body) for _ in range(8))
        )
        assert sorted(r.status_code for r in responses) == [200] * 7 + [201], [
            r.text for r in responses
        ]
        ids = {r.json()["message_id"] for r in responses}
        assert len(ids) == 1
        [message_id] = ids
        assert await _one_message(body["content"]) == [message_id]
        message_ids.append(message_id)

    for message_id in message_ids:
        await delivered(api, sender, message_id)
    await asyncio.sleep(0.5)
    assert len(live.http.for_path(path)) == 3
    async with db.session() as s:
        per_message = dict(
            (
                await s.execute(
                    select(DeliveryRow.message_id, func.count())
                    .where(DeliveryRow.message_id.in_(message_ids))
                    .group_by(DeliveryRow.message_id)
                )
            ).all()
        )
    assert per_message == {m: 1 for m in message_ids}


def _counter(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name + "{"):
            continue
        sample, _, value = line.rpartition(" ")
        got = ",".join(sorted(sample[len(name) + 1 : -1].split(",")))
        if got == want:
            return float(value)
    return 0.0


async def test_metrics_show_the_attempt_counters_moving_after_a_delivery(
    api: httpx.AsyncClient, live: Stack
) -> None:
    t = tag()
    sender, channel = await submitter(), await http_channel()
    await subscribers(channel, [{"endpoint": live.http.url(f"/{t}/{i}")} for i in range(3)])
    before = await api.get("/metrics")
    assert before.status_code == 200
    start = _counter(before.text, "channels_attempts_total", transport="http", status="delivered")

    response = await api.post(
        f"/channels/{channel.id}/messages", headers=sender.headers, json={"content": t}
    )
    assert response.status_code == 201, response.text
    await delivered(api, sender, response.json()["message_id"])

    after = await api.get("/metrics")
    end = _counter(after.text, "channels_attempts_total", transport="http", status="delivered")
    assert end >= start + 3, (start, end)


async def test_an_endpoint_disabled_by_410_is_listed_and_enabled_over_http(
    api: httpx.AsyncClient, live: Stack
) -> None:
    from channels_core import endpoints

    owner = await caller()
    url = live.http.url(f"/owned-{tag()}")
    await owner.principal.set_alias("endpoint", url).save()
    view = await endpoints.disable(url, "answered 410 Gone")

    listed = await api.get("/endpoints", headers=owner.headers)
    assert listed.status_code == 200, listed.text
    [shown] = listed.json()
    assert (shown["url"], shown["enabled"], shown["disabled_reason"]) == (
        url,
        False,
        "answered 410 Gone",
    )
    assert shown["last_event"]["event"] == "disabled"
    other = await caller()
    refused = await api.post(f"/endpoints/{view.id}/enable", headers=other.headers)
    assert refused.status_code == 404
    assert refused.headers["content-type"].startswith("application/problem+json")
    enabled = await api.post(f"/endpoints/{view.id}/enable", headers=owner.headers)
    assert enabled.status_code == 200, enabled.text
    assert enabled.json()["enabled"] is True and enabled.json()["last_event"]["event"] == "enabled"
    assert (await api.get("/endpoints")).status_code == 401
