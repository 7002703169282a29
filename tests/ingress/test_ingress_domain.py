"""``HttpIngress`` without HTTP, on SQLite and PostgreSQL: what a submit writes,
what a refusal leaves alone, and idempotency keys under concurrency.

Routing jobs go to the ``database`` fixture's ``MemoryDispatcher``, so
"nothing enqueued" is a list that stays empty.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from _support import principal_with, unchanged
from sqlalchemy import select

from channels_core import db
from channels_core.dispatch import MemoryDispatcher
from channels_core.errors import (
    ConflictError,
    ContentTooLargeError,
    NotFoundError,
    PermissionDeniedError,
    ValidationError,
)
from channels_core.models import ChannelRow, IdempotencyRow, MessageRow, OutboxRow
from channels_core.permissions import SUBMIT
from channels_core.primitives import Channel, Principal
from channels_core.transports.ingress_http import (
    HttpIngress,
    IngressRefusedError,
    InvalidBodyError,
    SubmitBody,
    UnsupportedContentTypeError,
    request_hash,
)
from channels_core.transports.registry import ingress_registry

pytestmark = pytest.mark.timeout(60)


async def _sender_and_channel() -> tuple[Principal, Channel]:
    return await principal_with(SUBMIT), await Channel("ingress").save()


async def _rows(model: Any) -> list[Any]:
    async with db.session() as s:
        return list(await s.scalars(select(model)))


def test_http_is_the_registered_ingress_and_available() -> None:
    transport = ingress_registry.get("http")
    assert isinstance(transport, HttpIngress)
    assert transport.name == "http" and transport.is_available()


async def test_submit_writes_message_outbox_and_key_together(
    database: str, dispatcher: MemoryDispatcher
) -> None:
    sender, channel = await _sender_and_channel()
    assert sender.id is not None and channel.id is not None
    body = {"content": "hello", "idempotency_key": "k-1", "author_id": sender.id}

    done = await HttpIngress().submit(sender.id, channel.id, body)

    assert done.created and [r.channel_id for r in done.results] == [channel.id]
    [message] = await _rows(MessageRow)
    assert (message.id, message.author_id, message.content) == (done.message_id, sender.id, "hello")
    [outbox] = await _rows(OutboxRow)
    assert (outbox.message_id, outbox.channel_id) == (message.id, channel.id)
    [key] = await _rows(IdempotencyRow)
    assert (key.principal_id, key.key, key.message_id) == (sender.id, "k-1", message.id)
    assert key.request_hash == request_hash(channel.id, SubmitBody.model_validate(body))
    assert [(j.message_id, j.channel_id) for j in dispatcher.jobs] == [(message.id, channel.id)]


REFUSED: dict[str, tuple[type[Exception], dict[str, Any]]] = {
    "unknown field": (InvalidBodyError, {"content": "x", "colour": "red"}),
    "content not a string": (InvalidBodyError, {"content": ["x"]}),
    "id as a string": (InvalidBodyError, {"content": "x", "reply_to_id": "3"}),
    "id as a boolean": (InvalidBodyError, {"content": "x", "references": [True]}),
    "id as a fraction": (InvalidBodyError, {"content": "x", "conversation_id": 1.5}),
    "forged author": (IngressRefusedError, {"content": "x", "author_id": 10**9}),
    "content too large": (ContentTooLargeError, {"content": "é" * 200_000}),
    "unsupported content type": (
        UnsupportedContentTypeError,
        {"content": "x", "content_type": "video/mp4"},
    ),
    "reply to nothing": (NotFoundError, {"content": "x", "reply_to_id": 10**9}),
    "reference to nothing": (NotFoundError, {"content": "x", "references": [10**9]}),
    "unknown conversation": (NotFoundError, {"content": "x", "conversation_id": 10**9}),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_refused_submit_changes_nothing(
    case: str, database: str, dispatcher: MemoryDispatcher
) -> None:
    error, body = REFUSED[case]
    sender, channel = await _sender_and_channel()
    assert sender.id is not None and channel.id is not None
    async with unchanged():
        with pytest.raises(error):
            await HttpIngress().submit(
                sender.id, channel.id, {**body, "idempotency_key": case.replace(" ", "-")}
            )
    assert dispatcher.jobs == []


async def test_permission_and_channel_refusals_change_nothing(
    database: str, dispatcher: MemoryDispatcher
) -> None:
    sender, channel = await _sender_and_channel()
    outsider = await principal_with()
    assert outsider.id and channel.id and sender.id
    ingress = HttpIngress()
    async with unchanged():
        with pytest.raises(PermissionDeniedError, match="channel.submit"):
            await ingress.submit(outsider.id, channel.id, {"content": "x"})
        with pytest.raises(NotFoundError, match="channel"):
            await ingress.submit(sender.id, 10**9, {"content": "x"})
        with pytest.raises(ValidationError):
            await ingress.submit(sender.id, 2**63, {"content": "x"})
    assert dispatcher.jobs == []


async def test_channel_taking_another_ingress_refuses_http(
    database: str, dispatcher: MemoryDispatcher
) -> None:
    sender, channel = await _sender_and_channel()
    assert sender.id is not None and channel.id is not None
    # Stored as a plugin's channel would be; this process need not know the name.
    async with db.session() as s, s.begin():
        row = await s.get(ChannelRow, channel.id)
        assert row is not None
        row.aliases = {"ingress_transport": "inbound-mail"}
    async with unchanged():
        with pytest.raises(IngressRefusedError, match="does not accept http ingress"):
            await HttpIngress().submit(sender.id, channel.id, {"content": "x"})
    assert dispatcher.jobs == []


async def test_same_key_same_request_is_one_message_another_body_conflicts(
    database: str, dispatcher: MemoryDispatcher
) -> None:
    sender, channel = await _sender_and_channel()
    assert sender.id is not None and channel.id is not None
    ingress = HttpIngress()
    first = await ingress.submit(sender.id, channel.id, {"content": "a", "idempotency_key": "k"})
    again = await ingress.submit(
        sender.id,
        channel.id,
        {"idempotency_key": "k", "content_type": "text/plain", "content": "a", "references": []},
    )
    assert (first.created, again.created) == (True, False)
    assert again.message_id == first.message_id
    async with unchanged():
        with pytest.raises(ConflictError, match="different request"):
            await ingress.submit(sender.id, channel.id, {"content": "b", "idempotency_key": "k"})
    assert len(await _rows(MessageRow)) == 1 and len(dispatcher.jobs) == 1


async def test_concurrent_identical_submits_make_one_message(
    database: str, dispatcher: MemoryDispatcher
) -> None:
    sender, channel = await _sender_and_channel()
    assert sender.id is not None and channel.id is not None
    ingress = HttpIngress()
    body = {"content": "once", "idempotency_key": "race"}
    done = await asyncio.gather(*(ingress.submit(sender.id, channel.id, body) for _ in range(6)))
    assert len({d.message_id for d in done}) == 1
    assert sorted(d.created for d in done) == [False] * 5 + [True]
    assert len(await _rows(MessageRow)) == 1
    assert len(await _rows(OutboxRow)) == 1
    assert len(await _rows(IdempotencyRow)) == 1
    assert len(dispatcher.jobs) == 1


def test_request_hash_is_the_request_not_its_spelling() -> None:
    short = SubmitBody.model_validate({"content": "x", "idempotency_key": "a"})
    spelled = SubmitBody.model_validate(
        {"content": "x", "content_type": "text/plain", "references": [], "author_id": 7}
    )
    assert request_hash(1, short) == request_hash(1, spelled)
    assert request_hash(1, short) != request_hash(2, short)
    other = SubmitBody.model_validate({"content": "y"})
    assert request_hash(1, short) != request_hash(1, other)


async def test_endpoints_are_listed_and_enabled_by_their_owner_or_a_manager(
    database: str, broker_url: str
) -> None:
    from channels_core import endpoints
    from channels_core.permissions import MANAGE
    from channels_core.settings import configure, get_settings

    configure(get_settings().model_copy(update={"broker_url": broker_url}))
    owner = await principal_with()
    url = "http://127.0.0.1:9/owned"
    await owner.set_alias("endpoint", url).save()
    stranger, manager = await principal_with(), await principal_with(MANAGE)
    disabled = await endpoints.disable(url, "answered 410 Gone")
    ingress = HttpIngress()

    assert [v.url for v in await ingress.endpoints(owner.id)] == [url]  # type: ignore[arg-type]
    assert await ingress.endpoints(stranger.id) == []  # type: ignore[arg-type]
    assert [v.id for v in await ingress.endpoints(manager.id)] == [disabled.id]  # type: ignore[arg-type]
    with pytest.raises(NotFoundError):  # someone else's endpoint does not exist for you
        await ingress.enable_endpoint(stranger.id, disabled.id)  # type: ignore[arg-type]
    assert not (await endpoints.get_endpoint(disabled.id)).enabled
    assert (await ingress.enable_endpoint(owner.id, disabled.id)).enabled  # type: ignore[arg-type]
    await endpoints.disable(disabled.id, "maintenance")
    assert (await ingress.enable_endpoint(manager.id, disabled.id)).enabled  # type: ignore[arg-type]
