"""Secret rotation: during the overlap both secrets verify, after it only the new one."""

from __future__ import annotations

import asyncio
import time

import pytest
from standardwebhooks.webhooks import WebhookVerificationError

from channels_cli.devservers import WebhookReceiver
from channels_core.errors import NotFoundError, ValidationError
from channels_core.primitives import Channel, Message, Principal
from channels_core.secrets import PREVIOUS, rotate_secret, signing_secrets
from channels_core.signing import new_secret
from channels_core.transports.http import HttpEgress


@pytest.fixture
def receiver():  # type: ignore[no-untyped-def]
    server = WebhookReceiver().start()
    yield server
    server.stop()


async def _deliver(receiver: WebhookReceiver, principal_id: int, path: str) -> None:
    subscriber = await Principal.get(principal_id)
    assert subscriber is not None
    subscriber.delivery_id = 1
    message = Message("rotate me", author_id=principal_id)
    message.id = 1
    channel = Channel("Rotation")
    channel.id = 1
    transport = HttpEgress()
    try:
        [result] = await transport.send(message, channel, [subscriber])
    finally:
        await transport.aclose()
    assert result.success, result.errors


async def test_both_secrets_verify_during_the_overlap_and_only_the_new_after(
    database: str, receiver: WebhookReceiver
) -> None:
    old = new_secret()
    sub = (
        Principal("bot").set_alias("endpoint", receiver.url("/r")).set_alias("webhook_secret", old)
    )
    await sub.save()

    fresh = await rotate_secret(sub.id, overlap=1.5)  # type: ignore[arg-type]
    assert fresh != old and fresh.startswith("whsec_")
    stored = await Principal.get(sub.id)  # type: ignore[arg-type]
    assert stored is not None and stored.get_alias("webhook_secret") == fresh
    assert signing_secrets(stored.aliases) == [fresh, old]

    await _deliver(receiver, sub.id, "/r")  # type: ignore[arg-type]
    during = receiver.for_path("/r")[-1]
    assert len(during.headers["webhook-signature"].split()) == 2
    receiver.verify(during, old)  # a receiver still holding the old secret
    receiver.verify(during, fresh)  # and one that switched already

    await asyncio.sleep(2.1)  # past the 1.5 s overlap
    await _deliver(receiver, sub.id, "/r")  # type: ignore[arg-type]
    after = receiver.for_path("/r")[-1]
    assert len(after.headers["webhook-signature"].split()) == 1
    receiver.verify(after, fresh)
    with pytest.raises(WebhookVerificationError):
        receiver.verify(after, old)


async def test_rotating_twice_keeps_both_unexpired_secrets(database: str) -> None:
    first = new_secret()
    sub = await Principal("bot").set_alias("webhook_secret", first).save()
    second = await rotate_secret(sub.id, overlap=60)  # type: ignore[arg-type]
    third = await rotate_secret(sub.id, overlap=60)  # type: ignore[arg-type]
    stored = await Principal.get(sub.id)  # type: ignore[arg-type]
    assert stored is not None
    assert signing_secrets(stored.aliases) == [third, first, second]
    # Expired entries are dropped at the next rotation.
    later = signing_secrets(stored.aliases, now=time.time() + 120)
    assert later == [third]
    assert PREVIOUS in stored.aliases


async def test_rotation_refuses_bad_input(database: str) -> None:
    with pytest.raises(NotFoundError):
        await rotate_secret(9999)
    sub = await Principal("bot").save()
    with pytest.raises(ValidationError):
        await rotate_secret(sub.id, overlap=-1)  # type: ignore[arg-type]
    stored = await Principal.get(sub.id)  # type: ignore[arg-type]
    assert stored is not None and "webhook_secret" not in stored.aliases
