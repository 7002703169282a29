"""The examples of the seed README (winterforge-channels-README.txt).

Not covered here: "CLI Usage" (the CLI suite's), "Testing" (pytest
commands), "Installation" (pip commands).
"""

from __future__ import annotations

from _support import principal_with, registry_state, table_counts

from channels_core.dispatch import MemoryDispatcher, RouteJob
from channels_core.permissions import SUBMIT
from channels_core.primitives import (
    Channel,
    Conversation,
    Manifest,
    Message,
    Permission,
    Principal,
    Role,
)
from channels_core.registries import ChannelRegistry, MessageRegistry
from channels_core.transports import TransportResult, egress_registry, egress_transport


async def test_readme_quick_start_create_channel(database: str) -> None:
    channel = Channel()
    channel.set_title("General Chat")
    channel.set_alias("egress_transport", "websocket")
    await channel.save()

    assert isinstance(channel.id, int)
    loaded = await ChannelRegistry().get(channel.id)
    assert loaded is not None
    assert loaded.title == "General Chat"
    assert loaded.aliases == {"egress_transport": "websocket"}


async def test_readme_quick_start_send_message(database: str, dispatcher: MemoryDispatcher) -> None:
    user = await principal_with(SUBMIT)
    channel = await Channel("General Chat").save()
    for _ in range(2):
        await channel.subscribe((await Principal(kind="user").save()).id)  # type: ignore[arg-type]

    message = Message()
    message.set_content("Hello, world!")
    message.set_author_id(user.id)  # type: ignore[arg-type]
    await message.save()

    # Send via channel
    results = await message.send(Manifest([channel]))

    assert len(results) == 1
    [result] = results
    assert result.success is True
    assert result.channel_id == channel.id
    assert result.message_id == message.id
    assert result.pending_count == 2
    assert (result.delivered_count, result.failed_count, result.errors) == (0, 0, [])
    assert [(j.message_id, j.channel_id) for j in dispatcher.jobs] == [(message.id, channel.id)]
    assert (await table_counts())["outbox"] == 1


async def test_readme_quick_start_subscribe_to_channel(database: str) -> None:
    channel = await Channel("General Chat").save()
    user = await Principal(kind="user").save()

    # Subscribe user to channel (the README's 42 is a user's id)
    await channel.subscribe(user_id=user.id)

    # Get all subscribers
    subscribers = await channel.get_subscribers()
    assert [s.id for s in subscribers] == [user.id]


async def test_readme_quick_start_thread_messages(database: str) -> None:
    alice = await Principal(kind="user", username="alice").save()
    bob = await Principal(kind="user", username="bob").save()

    # Create original message
    msg1 = Message()
    msg1.set_content("What's the status?")
    msg1.set_author_id(alice.id)  # type: ignore[arg-type]
    await msg1.save()

    # Reply to message
    msg2 = Message()
    msg2.set_content("All systems operational")
    msg2.set_author_id(bob.id)  # type: ignore[arg-type]
    msg2.set_reply_to_id(msg1.id)
    await msg2.save()

    registry = MessageRegistry()
    thread = await registry.get_thread(msg2.id)  # type: ignore[arg-type]

    # Returns: [msg1, msg2]
    assert [m.id for m in thread] == [msg1.id, msg2.id]
    assert [m.author_id for m in thread] == [alice.id, bob.id]
    assert [m.content for m in thread] == ["What's the status?", "All systems operational"]


async def test_readme_permission_setup(database: str) -> None:
    user = await Principal(kind="user").save()
    channel = await Channel("General Chat").save()
    assert await channel.can_submit(user.id) is False

    # Create permission
    perm = Permission()
    perm.set_title("channel.submit")
    await perm.save()

    # Create role with permission
    role = Role()
    role.set_title("sender")
    role.add_permission(perm.id)  # type: ignore[arg-type]
    await role.save()

    # Assign role to user
    user.add_role(role.id)  # type: ignore[arg-type]
    await user.save()

    # Permission check
    can_submit = await channel.can_submit(user.id)
    assert can_submit is True
    assert await channel.can_subscribe(user.id) is False
    assert await channel.can_manage(user.id) is False


async def test_readme_transport_configuration(database: str) -> None:
    channel = await Channel("General Chat").save()

    channel.set_alias("ingress_transport", "http")
    channel.set_alias("egress_transport", "websocket")
    await channel.save()

    loaded = await ChannelRegistry().get(channel.id)  # type: ignore[arg-type]
    assert loaded is not None
    assert loaded.aliases == {"ingress_transport": "http", "egress_transport": "websocket"}
    assert loaded.get_ingress_repository().preferred == "http"
    assert loaded.get_egress_repository().preferred == "websocket"


async def test_readme_message_threading(database: str) -> None:
    msg1 = await Message("root").save()
    msg2 = Message("reply")

    # reply_to - Direct thread parent
    msg2.set_reply_to_id(msg1.id)
    await msg2.save()
    parent = await msg2.get_reply_to()
    assert parent is not None and parent.id == msg1.id

    # references - Semantic links
    msg3 = Message("see above")
    msg3.add_reference(msg1.id)  # type: ignore[arg-type]
    msg3.add_reference(msg2.id)  # type: ignore[arg-type]
    await msg3.save()
    refs = await msg3.get_references()
    assert [m.id for m in refs] == [msg1.id, msg2.id]

    # Thread Traversal
    registry = MessageRegistry()
    thread = await registry.get_thread(msg2.id)  # type: ignore[arg-type]
    # Returns Manifest with [root, ..., message]
    assert isinstance(thread, Manifest)
    assert thread.ids() == [msg1.id, msg2.id]


async def test_readme_complete_workflow(database: str, dispatcher: MemoryDispatcher) -> None:
    # Create permission
    perm = Permission()
    perm.set_title("channel.submit")
    await perm.save()

    # Create role
    role = Role()
    role.set_title("member")
    role.add_permission(perm.id)  # type: ignore[arg-type]
    await role.save()

    # Create user
    alice = Principal(kind="user")
    alice.set_username("alice")
    alice.set_email("alice@example.com")
    alice.add_role(role.id)  # type: ignore[arg-type]
    await alice.save()

    # Create channel
    general = Channel()
    general.set_title("General Chat")
    general.set_alias("egress_transport", "websocket")
    await general.save()

    # Subscribe
    await general.subscribe(alice.id)  # type: ignore[arg-type]

    # Send message
    msg = Message()
    msg.set_content("Hello everyone!")
    msg.set_author_id(alice.id)  # type: ignore[arg-type]
    await msg.save()

    results = await msg.send(Manifest([general]))

    assert [(r.channel_id, r.success, r.pending_count) for r in results] == [(general.id, True, 1)]
    counts = await table_counts()
    assert counts["outbox"] == 1
    assert counts["messages"] == 1
    [job] = dispatcher.jobs
    assert isinstance(job, RouteJob)
    assert (job.message_id, job.channel_id) == (msg.id, general.id)


async def test_readme_multi_channel_broadcasting(
    database: str, dispatcher: MemoryDispatcher
) -> None:
    author = await principal_with(SUBMIT)
    general = await Channel("General").save()
    support = await Channel("Support").save()
    announcements = await Channel("Announcements").save()
    for channel, n in ((general, 1), (support, 2), (announcements, 3)):
        for _ in range(n):
            await channel.subscribe((await Principal(kind="user").save()).id)  # type: ignore[arg-type]
    message = await Message("Hello everyone!", author_id=author.id).save()

    # Send to multiple channels at once
    channels = Manifest([general, support, announcements])
    results = await message.send(channels)

    seen = []
    for result in results:
        assert result.delivered_count == 0  # delivery is the workers' job
        assert result.failed_count == 0
        seen.append((result.channel_id, result.success, result.pending_count))
    assert seen == [(general.id, True, 1), (support.id, True, 2), (announcements.id, True, 3)]
    assert [j.channel_id for j in dispatcher.jobs] == [general.id, support.id, announcements.id]


async def test_readme_conversation_tracking(database: str) -> None:
    """The README sets conversation ids without saving: the query sees them
    only once the messages are saved, as with every setter."""
    msg1 = await Message("first").save()
    msg2 = await Message("second").save()

    # Create conversation
    conversation = Conversation()
    conversation.set_title("Project Planning")
    await conversation.save()

    # Link messages to conversation
    msg1.set_conversation_id(conversation.id)
    msg2.set_conversation_id(conversation.id)

    # Query conversation messages
    registry = MessageRegistry()
    messages = await registry.get_for_conversation(conversation.id)  # type: ignore[arg-type]

    assert list(messages) == []
    linked = await msg1.get_conversation()
    assert linked is not None and linked.title == "Project Planning"
    await msg1.save()
    await msg2.save()
    messages = await registry.get_for_conversation(conversation.id)  # type: ignore[arg-type]
    assert messages.ids() == [msg1.id, msg2.id]


async def test_readme_creating_custom_transports(database: str) -> None:
    outbox: list[dict[str, str]] = []

    async def send_email(to: str, subject: str, body: str) -> None:
        if to.startswith("bounce"):
            raise ConnectionError(f"{to}: mailbox unavailable")
        outbox.append({"to": to, "subject": subject, "body": body})

    with registry_state(egress_registry):

        @egress_transport("email")
        class EmailEgressTransport:
            """Send messages via email."""

            async def send(self, message, channel, subscribers):  # type: ignore[no-untyped-def]
                """Send email to subscribers."""
                delivered = 0
                failed = 0
                errors = []

                for subscriber in subscribers:
                    try:
                        await send_email(
                            to=subscriber.email,
                            subject=f"New message in {channel.title}",
                            body=message.content,
                        )
                        delivered += 1
                    except Exception as e:
                        errors.append(str(e))
                        failed += 1

                return [
                    TransportResult(
                        success=(failed == 0),
                        delivered_count=delivered,
                        failed_count=failed,
                        errors=errors,
                    )
                ]

            def is_available(self) -> bool:
                """Check if email transport is available."""
                return True

        channel = Channel("Support")
        channel.set_alias("egress_transport", "email")
        await channel.save()
        transport = channel.get_egress_repository().resolve()
        assert isinstance(transport, EmailEgressTransport)

        ann = await Principal(kind="user", email="ann@example.com").save()
        bounce = await Principal(kind="user", email="bounce@example.com").save()
        message = await Message("Server is back").save()

        [ok] = await transport.send(message, channel, [ann])
        assert (ok.success, ok.delivered_count, ok.failed_count) == (True, 1, 0)
        assert outbox == [
            {"to": "ann@example.com", "subject": "New message in Support", "body": "Server is back"}
        ]
        [mixed] = await transport.send(message, channel, [ann, bounce])
        assert (mixed.success, mixed.delivered_count, mixed.failed_count) == (False, 1, 1)
        assert mixed.errors == ["bounce@example.com: mailbox unavailable"]

    # The registration is undone with the block: "email" is the built-in again.
    assert type(egress_registry.get("email")).__module__ == "channels_core.transports.email"
