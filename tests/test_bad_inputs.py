"""Bad input through the Python API: a typed error naming the problem, and
not one row changed (``unchanged()`` compares every table's count and
content before and after)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from _support import override_settings, principal_with, table_counts, unchanged

from channels_core.dispatch import MemoryDispatcher
from channels_core.errors import (
    ChannelsError,
    ConflictError,
    ContentTooLargeError,
    NotFoundError,
    PermissionDeniedError,
    ValidationError,
)
from channels_core.permissions import SUBMIT, SUBSCRIBE
from channels_core.primitives import (
    Channel,
    Conversation,
    Manifest,
    Message,
    Permission,
    Principal,
    Role,
    Subscription,
)
from channels_core.registries import ChannelRegistry

MISSING = 9999


@dataclass
class World:
    alice: Principal  # holds channel.submit
    mallory: Principal  # holds nothing
    channel: Channel
    root: Message
    reply: Message  # replies to root
    conversation: Conversation


@pytest.fixture
async def world(database: str) -> World:
    alice = await principal_with(SUBMIT, username="alice")
    mallory = await Principal("user", username="mallory").save()
    channel = await Channel("General").save()
    await channel.subscribe(alice.id)  # type: ignore[arg-type]
    root = await Message("root", author_id=alice.id).save()
    reply = await Message("reply", author_id=alice.id).set_reply_to_id(root.id).save()
    conversation = await Conversation("Planning").save()
    return World(alice, mallory, channel, root, reply, conversation)


def _ghost_channel() -> Channel:
    ghost = Channel("ghost")
    ghost.id = MISSING
    return ghost


# -- sending ------------------------------------------------------------------------------


async def test_unknown_channel_in_send(world: World, dispatcher: MemoryDispatcher) -> None:
    message = Message("hello", author_id=world.alice.id)
    async with unchanged():
        with pytest.raises(NotFoundError, match=f"channel {MISSING} not found"):
            await message.send(Manifest([world.channel, _ghost_channel()]))
    assert message.id is None
    assert dispatcher.jobs == []


async def test_unknown_principal_as_author(world: World, dispatcher: MemoryDispatcher) -> None:
    async with unchanged():
        with pytest.raises(NotFoundError, match=f"principal {MISSING} not found"):
            await Message("hello", author_id=MISSING).send(world.channel)
        with pytest.raises(NotFoundError, match=f"principal {MISSING} not found"):
            await Message("hello", author_id=MISSING).save()
    assert dispatcher.jobs == []


async def test_author_without_channel_submit(world: World, dispatcher: MemoryDispatcher) -> None:
    """Not an exception: a failed result naming the permission, nothing enqueued."""
    message = await Message("let me in", author_id=world.mallory.id).save()
    async with unchanged():
        results = await message.send(world.channel)
    [result] = results
    assert result.success is False
    assert result.channel_id == world.channel.id
    mallory, channel = world.mallory.id, world.channel.id
    assert result.errors == [
        f"principal {mallory} lacks permission 'channel.submit' on channel {channel}"
    ]
    assert (result.delivered_count, result.pending_count) == (0, 0)
    assert results.accepted is False
    assert dispatcher.jobs == []
    assert (await table_counts())["outbox"] == 0


async def test_send_without_author(world: World) -> None:
    async with unchanged():
        with pytest.raises(ValidationError, match="author_id"):
            await Message("anonymous").send(world.channel)


async def test_send_to_an_unsaved_channel(world: World) -> None:
    async with unchanged():
        with pytest.raises(ValidationError, match="saved before sending"):
            await Message("hello", author_id=world.alice.id).send(Channel("draft"))


async def test_send_to_no_channel_or_not_a_channel(world: World) -> None:
    message = Message("hello", author_id=world.alice.id)
    async with unchanged():
        with pytest.raises(ValidationError, match="at least one channel"):
            await message.send([])
        with pytest.raises(ValidationError, match="takes channels, not Principal"):
            await message.send([world.alice])  # type: ignore[list-item]


# -- content --------------------------------------------------------------------------------


async def test_empty_content(world: World) -> None:
    async with unchanged():
        with pytest.raises(ValidationError, match="content must not be empty"):
            Message().set_content("")
        with pytest.raises(ValidationError, match="content must not be empty"):
            await Message("").save()
        with pytest.raises(ValidationError, match="content must not be empty"):
            await Message("", author_id=world.alice.id).send(world.channel)
        with pytest.raises(ValidationError, match="content must be a string"):
            await Message(None).save()


async def test_oversized_content(world: World, dispatcher: MemoryDispatcher) -> None:
    with override_settings(max_content_bytes=100):
        async with unchanged():
            with pytest.raises(ContentTooLargeError, match="101 bytes, over the limit of 100") as e:
                Message().set_content("x" * 101)
            assert (e.value.size, e.value.limit) == (101, 100)
            # The limit is in bytes, not characters: 60 x 'é' is 120 bytes.
            with pytest.raises(ContentTooLargeError, match="120 bytes"):
                await Message("é" * 60).save()
            with pytest.raises(ContentTooLargeError):
                await Message("x" * 101, author_id=world.alice.id).send(world.channel)
            # An update over the limit leaves the stored message alone.
            world.root.content = "y" * 200
            with pytest.raises(ContentTooLargeError):
                await world.root.save()
        assert Message().set_content("x" * 100).content == "x" * 100
    assert dispatcher.jobs == []


async def test_unsupported_content_type(world: World) -> None:
    async with unchanged():
        with pytest.raises(ValidationError, match="'application/x-msdownload' is not supported"):
            Message("x").set_content_type("application/x-msdownload")
        with pytest.raises(ValidationError, match="is not supported; use one of"):
            await Message("x", content_type="video/mp4").save()
        with pytest.raises(ValidationError, match="is not a MIME type"):
            await Message("x", content_type="plain text").save()


async def test_content_type_with_crlf(world: World) -> None:
    forged = "text/plain\r\nX-Injected: 1"
    async with unchanged():
        with pytest.raises(ValidationError, match="is not a MIME type"):
            Message("x").set_content_type(forged)
        with pytest.raises(ValidationError, match="is not a MIME type"):
            await Message("x", content_type=forged, author_id=world.alice.id).send(world.channel)


# -- addresses -----------------------------------------------------------------------------


BAD_EMAILS = ["not-an-email", "a@b@example.com", "alice@", "@example.com", "a b@example.com"]


async def test_bad_email(world: World) -> None:
    async with unchanged():
        for address in BAD_EMAILS:
            with pytest.raises(ValidationError, match="is not an email address"):
                Principal().set_email(address)
            with pytest.raises(ValidationError, match="is not an email address"):
                await Principal("user", email=address).save()
            with pytest.raises(ValidationError, match="email .* is not an email address"):
                world.alice.set_alias("email", address)
            # The save path refuses what was assigned around the setter, too.
            world.alice.email = address
            with pytest.raises(ValidationError, match="is not an email address"):
                await world.alice.save()


BAD_ENDPOINTS = [
    ("ftp://files.example.com/drop", "must use http or https"),
    ("https://", "has no host"),
    ("https:///path-only", "has no host"),
    ("https://user:secret@example.com/hook", "must not carry credentials"),
    ("https://example.com/hook\r\nX-Injected: 1", "must not contain CR, LF"),
    ("https://example.com:0/hook", "port 0"),
    ("https://example.com:99999/hook", "not a valid URL"),
    ("example.com/hook", "must use http or https"),
]


async def test_bad_endpoint_url(world: World) -> None:
    subscriber = await Principal("bot").save()
    async with unchanged():
        for url, problem in BAD_ENDPOINTS:
            with pytest.raises(ValidationError, match=problem) as raised:
                subscriber.set_alias("endpoint", url)
            assert "endpoint" in str(raised.value)
            with pytest.raises(ValidationError, match=problem):
                await Principal("bot", aliases={"endpoint": url}).save()
            # Assigned around the setter, the save still refuses it.
            subscriber.aliases = {"endpoint": url}
            with pytest.raises(ValidationError, match=problem):
                await subscriber.save()


async def test_bad_queue_name(world: World) -> None:
    async with unchanged():
        for name in ["bad queue", "", "orders/created", "x" * 201, "émoji"]:
            with pytest.raises(ValidationError, match="queue .* must be 1-200 characters"):
                Principal("service").set_alias("queue", name)
            with pytest.raises(ValidationError, match="queue"):
                await Principal("service", aliases={"queue": name}).save()


async def test_bad_alias_keys_and_values(world: World) -> None:
    async with unchanged():
        with pytest.raises(ValidationError, match="alias key 'Bad-Key'"):
            world.channel.set_alias("Bad-Key", "x")
        with pytest.raises(ValidationError, match="must be a string, not int"):
            world.alice.set_alias("name", 7)  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match="must not contain CR, LF"):
            world.alice.set_alias("name", "Bot\r\nBcc: all@example.com")


async def test_unknown_transport_name_on_a_channel(world: World) -> None:
    async with unchanged():
        with pytest.raises(ValidationError, match="unknown egress transport 'pigeon'.*known: http"):
            world.channel.set_alias("egress_transport", "pigeon")
        world.channel.aliases = {"egress_transport": "pigeon"}  # around the setter
        with pytest.raises(ValidationError, match="unknown egress transport 'pigeon'"):
            await world.channel.save()


async def test_bad_titles(world: World) -> None:
    async with unchanged():
        for title in ["", "   ", "x" * 256, "General\r\nChat"]:
            for obj in (Channel(), Role(), Permission(), Conversation()):
                with pytest.raises(ValidationError, match="title"):
                    obj.set_title(title)
                obj.title = title
                with pytest.raises(ValidationError, match="title"):
                    await obj.save()  # type: ignore[attr-defined]


# -- links to rows that do not exist -------------------------------------------------------


async def test_reply_to_a_missing_message(world: World) -> None:
    async with unchanged():
        with pytest.raises(NotFoundError, match=f"message {MISSING} not found"):
            await Message("orphan").set_reply_to_id(MISSING).save()
        with pytest.raises(NotFoundError, match=f"message {MISSING} not found"):
            await world.reply.set_reply_to_id(MISSING).save()


async def test_reference_to_a_missing_message(world: World) -> None:
    async with unchanged():
        message = Message("see").add_reference(world.root.id).add_reference(MISSING)  # type: ignore[arg-type]
        with pytest.raises(NotFoundError, match=f"message {MISSING} not found"):
            await message.save()
        assert message.id is None


async def test_conversation_that_does_not_exist(world: World, dispatcher: MemoryDispatcher) -> None:
    async with unchanged():
        with pytest.raises(NotFoundError, match=f"conversation {MISSING} not found"):
            await Message("x").set_conversation_id(MISSING).save()
        message = Message("x", author_id=world.alice.id).set_conversation_id(MISSING)
        with pytest.raises(NotFoundError, match=f"conversation {MISSING} not found"):
            await message.send(world.channel)
    assert dispatcher.jobs == []


async def test_updating_a_row_that_is_gone(world: World) -> None:
    async with unchanged():
        for obj, kind in (
            (_ghost_channel(), "channel"),
            (Principal("user"), "principal"),
            (Conversation("c"), "conversation"),
            (Role("r"), "role"),
            (Permission("p"), "permission"),
            (Message("m"), "message"),
        ):
            obj.id = MISSING
            with pytest.raises(NotFoundError, match=f"{kind} {MISSING} not found"):
                await obj.save()  # type: ignore[attr-defined]


# -- subscriptions -----------------------------------------------------------------------------


async def test_duplicate_subscription(world: World) -> None:
    async with unchanged():
        with pytest.raises(ConflictError, match="already subscribed"):
            await world.channel.subscribe(world.alice.id)  # type: ignore[arg-type]
        with pytest.raises(ConflictError, match="already subscribed"):
            await Subscription(world.channel.id, world.alice.id).save()


async def test_subscribing_an_unknown_principal_or_to_an_unknown_channel(world: World) -> None:
    async with unchanged():
        with pytest.raises(NotFoundError, match=f"principal {MISSING} not found"):
            await world.channel.subscribe(MISSING)
        with pytest.raises(NotFoundError, match=f"channel {MISSING} not found"):
            await _ghost_channel().subscribe(world.mallory.id)  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match="must be saved"):
            await Channel("draft").subscribe(world.mallory.id)  # type: ignore[arg-type]


async def test_subscribing_someone_without_permission(world: World) -> None:
    async with unchanged():
        with pytest.raises(PermissionDeniedError, match="'channel.subscribe'"):
            await world.channel.subscribe(world.mallory.id, by=world.mallory.id)  # type: ignore[arg-type]
        with pytest.raises(PermissionDeniedError, match="'channel.manage'"):
            await world.channel.subscribe(world.mallory.id, by=world.alice.id)  # type: ignore[arg-type]


async def test_unsubscribing_what_is_not_subscribed(world: World) -> None:
    async with unchanged():
        with pytest.raises(NotFoundError, match="subscription"):
            await world.channel.unsubscribe(world.mallory.id)  # type: ignore[arg-type]


# -- threads -------------------------------------------------------------------------------------


async def test_thread_cycle_via_update(world: World) -> None:
    # root <- reply; making root reply to reply would close a loop.
    async with unchanged():
        world.root.set_reply_to_id(world.reply.id)
        with pytest.raises(ValidationError, match="thread cycle"):
            await world.root.save()
    stored = await Message.get(world.root.id)  # type: ignore[arg-type]
    assert stored is not None and stored.reply_to_id is None


async def test_replying_to_or_referencing_itself(world: World) -> None:
    async with unchanged():
        with pytest.raises(ValidationError, match="cannot reply to or reference itself"):
            await world.root.set_reply_to_id(world.root.id).save()
        world.root.set_reply_to_id(None)
        with pytest.raises(ValidationError, match="cannot reply to or reference itself"):
            await world.root.add_reference(world.root.id).save()  # type: ignore[arg-type]


# -- principals, roles, permissions ---------------------------------------------------------


async def test_duplicate_username(world: World) -> None:
    async with unchanged():
        with pytest.raises(ConflictError, match="username 'alice' is taken"):
            await Principal("user", username="alice").save()
        with pytest.raises(ConflictError, match="username 'alice' is taken"):
            await world.mallory.set_username("alice").save()


async def test_duplicate_role_and_permission_titles(world: World) -> None:
    await Role("member").save()
    async with unchanged():
        with pytest.raises(ConflictError, match="role 'member' already exists"):
            await Role("member").save()
        with pytest.raises(ConflictError, match="permission 'channel.submit' already exists"):
            await Permission("channel.submit").save()


async def test_role_with_an_unknown_permission(world: World) -> None:
    async with unchanged():
        with pytest.raises(NotFoundError, match=f"permission {MISSING} not found"):
            await Role("ghosts").add_permission(MISSING).save()


async def test_principal_with_an_unknown_role(world: World) -> None:
    async with unchanged():
        with pytest.raises(NotFoundError, match=f"role {MISSING} not found"):
            await Principal("user", username="newcomer").add_role(MISSING).save()
        with pytest.raises(NotFoundError, match=f"role {MISSING} not found"):
            await world.mallory.add_role(MISSING).save()
    assert await world.mallory.has_permission(SUBSCRIBE) is False


async def test_bad_kind(world: World) -> None:
    async with unchanged():
        for kind in ("", "k" * 65, "bot\nuser"):
            with pytest.raises(ValidationError, match="kind"):
                await Principal(kind).save()


# -- ids ----------------------------------------------------------------------------------


async def test_non_integer_ids(world: World) -> None:
    async with unchanged():
        for bad in ["1", 1.0, True, 0, -3, None]:
            setters: list[Callable[[Any], object]] = [
                Message("x").add_reference,
                Principal().add_role,
                Role("r").add_permission,
            ]
            if bad is not None:  # None clears a reply or conversation: not an id for the rest
                message = Message("x")
                setters += [
                    message.set_author_id,
                    message.set_reply_to_id,
                    message.set_conversation_id,
                ]
            for setter in setters:
                with pytest.raises(ValidationError, match="must be a positive integer id"):
                    setter(bad)
            with pytest.raises(ValidationError, match="subscriber_id must be a positive integer"):
                await world.channel.subscribe(bad)  # type: ignore[arg-type]
            with pytest.raises(ValidationError, match="positive integer id"):
                await Subscription(world.channel.id, bad).save()  # type: ignore[arg-type]


async def test_author_id_assigned_around_the_setter(world: World) -> None:
    message = Message("x")
    message.author_id = "1"  # type: ignore[assignment]
    async with unchanged():
        with pytest.raises(ValidationError, match="author_id must be a positive"):
            await message.save()


async def test_link_ids_assigned_around_the_setters(world: World) -> None:
    for attr in ("reply_to_id", "conversation_id"):
        message = Message("x")
        setattr(message, attr, "1")
        async with unchanged():
            with pytest.raises(ValidationError, match=attr):
                await message.save()


async def test_registry_get_with_a_non_integer_id(world: World) -> None:
    async with unchanged():
        with pytest.raises(ValidationError, match="positive integer id"):
            await ChannelRegistry().get("abc")  # type: ignore[arg-type]


async def test_every_error_is_a_channels_error() -> None:
    for error in (NotFoundError("x", 1), ConflictError("x"), ContentTooLargeError(2, 1)):
        assert isinstance(error, ChannelsError)
    assert issubclass(ContentTooLargeError, ValidationError)
    assert issubclass(PermissionDeniedError, ChannelsError)
