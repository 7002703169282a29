"""The examples of the seed guide (winterforge-channels-getting_started.md).

Not covered here: "Installation" (pip commands), "CLI Tools" (the CLI
suite's), "Storage Configuration" (WinterForge storage managers; here the
database is ``CHANNELS_DATABASE_URL``, exercised by every test),
"WebSocket Server Setup" and the ``transport.register_connection(...)`` line
of "Subscriber Requirements" (the WebSocket transport has no connection
registry yet: ``channels_core/transports/websocket.py`` defines no
``register_connection``; the gateway (``channels gateway``) holds the sockets).
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from _support import principal_with, registry_state, table_counts

from channels_core.dispatch import MemoryDispatcher
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
from channels_core.registries import ChannelRegistry, MessageRegistry, PrincipalRegistry
from channels_core.transports import egress_registry


async def _member_setup() -> tuple[dict[str, Permission], Role, Role]:
    """Section "Setting Up Permissions", shared by the sections after it."""
    permissions = {}
    for perm_name in ["channel.submit", "channel.subscribe", "channel.manage"]:
        perm = Permission()
        perm.set_title(perm_name)
        await perm.save()
        permissions[perm_name] = perm

    member_role = Role()
    member_role.set_title("member")
    member_role.add_permission(permissions["channel.submit"].id)  # type: ignore[arg-type]
    member_role.add_permission(permissions["channel.subscribe"].id)  # type: ignore[arg-type]
    await member_role.save()

    admin_role = Role()
    admin_role.set_title("admin")
    admin_role.add_permission(permissions["channel.submit"].id)  # type: ignore[arg-type]
    admin_role.add_permission(permissions["channel.subscribe"].id)  # type: ignore[arg-type]
    admin_role.add_permission(permissions["channel.manage"].id)  # type: ignore[arg-type]
    await admin_role.save()
    return permissions, member_role, admin_role


async def _alice(role: Role) -> Principal:
    alice = Principal(kind="user")
    alice.set_username("alice")
    alice.set_email("alice@example.com")
    alice.add_role(role.id)  # type: ignore[arg-type]
    return await alice.save()


async def test_getting_started_verify_installation() -> None:
    channel = Channel()
    channel.set_title("Test Channel")
    assert f"installed: {channel.title}" == "installed: Test Channel"
    assert channel.id is None  # nothing saved: no database needed


async def test_getting_started_step_1_create_channel(database: str) -> None:
    channel = Channel()
    channel.set_title("General Chat")
    await channel.save()

    assert isinstance(channel.id, int) and channel.id > 0
    assert [c.title for c in await ChannelRegistry().all()] == ["General Chat"]


async def test_getting_started_step_2_create_user_with_permissions(database: str) -> None:
    # Create permission
    perm = Permission()
    perm.set_title("channel.submit")
    await perm.save()

    # Create role with permission
    role = Role()
    role.set_title("member")
    role.add_permission(perm.id)  # type: ignore[arg-type]
    await role.save()

    # Create user with role
    alice = await _alice(role)

    loaded = await PrincipalRegistry().get_by_username("alice")
    assert loaded is not None and loaded.id == alice.id
    assert (loaded.kind, loaded.email, loaded.roles) == ("user", "alice@example.com", [role.id])
    assert await loaded.has_role("member") is True
    assert await loaded.has_permission("channel.submit") is True
    assert await loaded.has_permission("channel.manage") is False


async def test_getting_started_step_3_subscribe_to_channel(database: str) -> None:
    channel = await Channel("General Chat").save()
    alice = await Principal(kind="user", username="alice").save()

    # Subscribe alice to channel
    subscription = await channel.subscribe(alice.id)  # type: ignore[arg-type]

    assert (subscription.channel_id, subscription.subscriber_id) == (channel.id, alice.id)
    assert subscription.id is not None
    # Verify subscription
    subscribers = await channel.get_subscribers()
    assert f"Subscribers: {len(subscribers)}" == "Subscribers: 1"
    assert subscribers.ids() == [alice.id]


async def test_getting_started_step_4_send_message(
    database: str, dispatcher: MemoryDispatcher
) -> None:
    _, member, _ = await _member_setup()
    alice = await _alice(member)
    channel = await Channel("General Chat").save()
    await channel.subscribe(alice.id)  # type: ignore[arg-type]

    # Create message
    message = Message()
    message.set_content("Hello everyone!")
    message.set_author_id(alice.id)  # type: ignore[arg-type]
    await message.save()

    # Send via channel
    results = await message.send(Manifest([channel]))

    lines = []
    for result in results:
        lines.append(f"Delivered: {result.delivered_count}")
        lines.append(f"Failed: {result.failed_count}")
        assert result.success is True
        assert result.pending_count == 1  # alice; workers deliver it later
    assert lines == ["Delivered: 0", "Failed: 0"]
    assert [(j.message_id, j.channel_id) for j in dispatcher.jobs] == [(message.id, channel.id)]


async def test_getting_started_setting_up_permissions(database: str) -> None:
    permissions, member_role, admin_role = await _member_setup()

    ids = {name: perm.id for name, perm in permissions.items()}
    assert sorted(ids) == ["channel.manage", "channel.submit", "channel.subscribe"]
    member = await Role.get(member_role.id)  # type: ignore[arg-type]
    admin = await Role.get(admin_role.id)  # type: ignore[arg-type]
    assert member is not None and admin is not None
    assert sorted(member.permissions) == sorted([ids["channel.submit"], ids["channel.subscribe"]])
    assert sorted(admin.permissions) == sorted(ids.values())

    channel = await Channel("General").save()
    m = await Principal(kind="user").add_role(member_role.id).save()  # type: ignore[arg-type]
    a = await Principal(kind="user").add_role(admin_role.id).save()  # type: ignore[arg-type]
    assert [await channel.can_submit(m.id), await channel.can_manage(m.id)] == [True, False]
    assert [await channel.can_submit(a.id), await channel.can_manage(a.id)] == [True, True]


async def test_getting_started_checking_permissions(
    database: str, dispatcher: MemoryDispatcher
) -> None:
    _, member, _ = await _member_setup()
    alice = await _alice(member)
    bob = await Principal(kind="user", username="bob").save()
    channel = await Channel("General").save()
    message = await Message("Hello everyone!", author_id=alice.id).save()
    denied = []

    # Check if user can submit
    can_submit = await channel.can_submit(alice.id)
    if can_submit:
        await message.send(Manifest([channel]))
    else:
        denied.append("Permission denied: cannot submit to channel")

    # Check if user can subscribe
    can_subscribe = await channel.can_subscribe(bob.id)
    if can_subscribe:
        await channel.subscribe(bob.id)  # type: ignore[arg-type]

    # Check if user can manage
    can_manage = await channel.can_manage(alice.id)
    if can_manage:
        channel.set_alias("egress_transport", "websocket")
        await channel.save()

    assert (can_submit, can_subscribe, can_manage) == (True, False, False)
    assert denied == []
    assert len(dispatcher.jobs) == 1
    assert await channel.count_subscribers() == 0
    reloaded = await ChannelRegistry().get(channel.id)  # type: ignore[arg-type]
    assert reloaded is not None and reloaded.aliases == {}


async def test_getting_started_permission_enforcement(
    database: str, dispatcher: MemoryDispatcher
) -> None:
    """SPEC, not the seed: a refused channel gets a failed result naming the
    permission (the seed says the result list is empty)."""
    _, member, _ = await _member_setup()
    alice = await _alice(member)
    channel = await Channel("General").save()
    await channel.subscribe(alice.id)  # type: ignore[arg-type]
    message = await Message("Hello everyone!", author_id=alice.id).save()

    # User WITH permission
    alice_can_submit = await channel.can_submit(alice.id)
    assert alice_can_submit is True

    # User WITHOUT permission
    mallory = Principal(kind="user")
    await mallory.save()

    mallory_can_submit = await channel.can_submit(mallory.id)
    assert mallory_can_submit is False

    # Attempting to send without permission
    message.set_author_id(mallory.id)  # type: ignore[arg-type]
    results = await message.send(Manifest([channel]))

    assert len(results) == 1
    [result] = results
    assert result.success is False
    assert result.channel_id == channel.id
    assert (result.delivered_count, result.pending_count) == (0, 0)
    assert len(result.errors) == 1 and "channel.submit" in result.errors[0]
    assert dispatcher.jobs == []
    assert results.accepted is False
    assert (await table_counts())["outbox"] == 0


async def test_getting_started_available_transports(database: str) -> None:
    channel = await Channel("General").save()

    # HTTP Ingress
    channel.set_alias("ingress_transport", "http")
    assert channel.get_alias("ingress_transport") == "http"
    # HTTP Egress
    channel.set_alias("egress_transport", "http")
    assert channel.get_alias("egress_transport") == "http"
    # WebSocket Egress
    channel.set_alias("egress_transport", "websocket")
    await channel.save()

    loaded = await ChannelRegistry().get(channel.id)  # type: ignore[arg-type]
    assert loaded is not None
    assert loaded.aliases == {"ingress_transport": "http", "egress_transport": "websocket"}


async def test_getting_started_configuring_transports(database: str) -> None:
    channel = await Channel("General").save()
    registry = ChannelRegistry()

    # HTTP for both
    channel.set_alias("ingress_transport", "http")
    channel.set_alias("egress_transport", "http")
    await channel.save()
    first = await registry.get(channel.id)  # type: ignore[arg-type]
    assert first is not None
    assert first.aliases == {"ingress_transport": "http", "egress_transport": "http"}

    # HTTP ingress, WebSocket egress (common pattern)
    channel.set_alias("ingress_transport", "http")
    channel.set_alias("egress_transport", "websocket")
    await channel.save()
    second = await registry.get(channel.id)  # type: ignore[arg-type]
    assert second is not None
    assert second.aliases == {"ingress_transport": "http", "egress_transport": "websocket"}


async def test_getting_started_transport_resolution(database: str) -> None:
    channel = Channel("General").set_alias("egress_transport", "websocket")
    await channel.save()

    with registry_state(egress_registry):
        # Get egress repository for channel
        egress_repo = channel.get_egress_repository()

        # Resolve transport
        transport: Any = egress_repo.resolve()
        # Uses channel's preferred transport, or first available

        assert callable(transport.is_available)
        assert transport.is_available() is True
        assert callable(transport.send)
        name = egress_repo.resolve_name()
        preferred = egress_registry.get("websocket")
        if preferred.is_available():  # type: ignore[attr-defined]
            assert name == "websocket"
        else:
            assert name != "websocket"
            assert name in egress_repo.names()


async def test_getting_started_subscriber_requirements_http(database: str) -> None:
    subscriber = Principal(kind="user")
    subscriber.set_alias("endpoint", "https://api.example.com/webhooks/user")
    await subscriber.save()

    loaded = await PrincipalRegistry().get(subscriber.id)  # type: ignore[arg-type]
    assert loaded is not None
    assert loaded.get_alias("endpoint") == "https://api.example.com/webhooks/user"


async def test_getting_started_subscriber_requirements_websocket(database: str) -> None:
    subscriber = await Principal(kind="user").save()

    subscriber.set_alias("websocket_id", "ws_abc123")
    await subscriber.save()

    loaded = await PrincipalRegistry().get(subscriber.id)  # type: ignore[arg-type]
    assert loaded is not None
    assert loaded.aliases == {"websocket_id": "ws_abc123"}


async def test_getting_started_reply_to(database: str) -> None:
    alice = await Principal(kind="user", username="alice").save()
    bob = await Principal(kind="user", username="bob").save()

    # Original message
    msg1 = Message()
    msg1.set_content("What's the project status?")
    msg1.set_author_id(alice.id)  # type: ignore[arg-type]
    await msg1.save()

    # Reply
    msg2 = Message()
    msg2.set_content("We're on track for Q2 release")
    msg2.set_author_id(bob.id)  # type: ignore[arg-type]
    msg2.set_reply_to_id(msg1.id)
    await msg2.save()

    # Get parent
    parent = await msg2.get_reply_to()
    assert parent is not None
    assert parent.content == "What's the project status?"
    assert (parent.id, parent.author_id) == (msg1.id, alice.id)


async def test_getting_started_thread_traversal(database: str) -> None:
    alice = await Principal(kind="user", username="alice").save()
    bob = await Principal(kind="user", username="bob").save()
    msg1 = await Message("What's the project status?", author_id=alice.id).save()
    msg2 = Message("We're on track for Q2 release", author_id=bob.id)
    await msg2.set_reply_to_id(msg1.id).save()

    registry = MessageRegistry()

    # Get complete thread (follows reply_to chain backward)
    thread = await registry.get_thread(msg2.id)  # type: ignore[arg-type]

    # thread is a Manifest containing [msg1, msg2]
    assert isinstance(thread, Manifest)
    lines = [f"{msg.author_id}: {msg.content}" for msg in thread]
    assert lines == [
        f"{alice.id}: What's the project status?",
        f"{bob.id}: We're on track for Q2 release",
    ]
    assert thread.ids() == [msg1.id, msg2.id]


async def test_getting_started_references(database: str) -> None:
    # Bug report
    bug = Message()
    bug.set_content("Users can't login")
    await bug.save()

    # Related messages
    msg1 = Message()
    msg1.set_content("Same issue here")
    msg1.add_reference(bug.id)  # type: ignore[arg-type]
    await msg1.save()

    msg2 = Message()
    msg2.set_content("Fixed in PR #123")
    msg2.add_reference(bug.id)  # type: ignore[arg-type]
    msg2.add_reference(msg1.id)  # type: ignore[arg-type]
    await msg2.save()

    # Get all references
    refs = await msg2.get_references()
    # Returns: [bug, msg1]
    assert [m.id for m in refs] == [bug.id, msg1.id]
    assert [m.content for m in refs] == ["Users can't login", "Same issue here"]
    assert [m.id for m in await msg1.get_references()] == [bug.id]


async def test_getting_started_conversation_tracking(database: str) -> None:
    msg1 = await Message("Sprint goal?").save()
    msg2 = await Message("Ship the outbox").save()
    msg3 = await Message("Agreed").save()
    await Message("unrelated").save()

    # Create conversation
    conversation = Conversation()
    conversation.set_title("Sprint Planning")
    await conversation.save()

    # Link messages to conversation
    msg1.set_conversation_id(conversation.id)
    msg2.set_conversation_id(conversation.id)
    msg3.set_conversation_id(conversation.id)
    await msg1.save()
    await msg2.save()
    await msg3.save()

    # Query all messages in conversation
    registry = MessageRegistry()
    messages = await registry.get_for_conversation(conversation.id)  # type: ignore[arg-type]

    assert messages.ids() == [msg1.id, msg2.id, msg3.id]
    assert all(m.conversation_id == conversation.id for m in messages)
    assert (await conversation.get_messages()).ids() == messages.ids()


async def test_getting_started_multi_channel_broadcasting(
    database: str, dispatcher: MemoryDispatcher
) -> None:
    author = await principal_with(SUBMIT)
    message = await Message("Release 1.0 is out", author_id=author.id).save()

    # Create multiple channels
    general = Channel()
    general.set_title("General")
    await general.save()

    announcements = Channel()
    announcements.set_title("Announcements")
    await announcements.save()

    support = Channel()
    support.set_title("Support")
    await support.save()

    for channel, n in ((general, 3), (announcements, 1), (support, 2)):
        for _ in range(n):
            await channel.subscribe((await Principal(kind="user").save()).id)  # type: ignore[arg-type]

    # Send to all channels at once
    channels = Manifest([general, announcements, support])
    results = await message.send(channels)

    lines = [
        f"Channel {i + 1}: {result.delivered_count} delivered" for i, result in enumerate(results)
    ]
    assert lines == [f"Channel {i}: 0 delivered" for i in (1, 2, 3)]
    assert [r.pending_count for r in results] == [3, 1, 2]
    assert all(r.success for r in results)
    assert [r.channel_id for r in results] == [general.id, announcements.id, support.id]
    assert sorted(j.channel_id for j in dispatcher.jobs) == sorted(channels.ids())  # type: ignore[type-var]


async def test_getting_started_subscriber_filtering_by_role(database: str) -> None:
    _, member, admin = await _member_setup()
    channel = await Channel("General").save()
    admins_expected = []
    for i in range(4):
        role = admin if i % 2 else member
        p = await Principal(kind="user", username=f"u{i}").add_role(role.id).save()  # type: ignore[arg-type]
        await channel.subscribe(p.id)  # type: ignore[arg-type]
        if role is admin:
            admins_expected.append(p.id)

    # Get all subscribers
    all_subscribers = await channel.get_subscribers()

    # Filter by role
    admins = []
    for subscriber in all_subscribers:
        if hasattr(subscriber, "has_role") and await subscriber.has_role("admin"):
            admins.append(subscriber)

    assert len(all_subscribers) == 4
    assert [a.id for a in admins] == admins_expected


async def test_getting_started_subscriber_filtering_active(database: str) -> None:
    channel = await Channel("General").save()
    for _ in range(2):
        await channel.subscribe((await Principal(kind="user").save()).id)  # type: ignore[arg-type]

    # Get all subscribers
    all_subscribers = await channel.get_subscribers()

    # Filter for active users
    active = [s for s in all_subscribers if s.active]  # type: ignore[attr-defined]
    assert len(active) == 2


def _png(width: int = 2, height: int = 2) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


async def test_getting_started_custom_message_types(database: str) -> None:
    image_data = _png()

    # JSON message
    json_msg = Message()
    json_msg.set_content('{"action": "update", "count": 42}')
    json_msg.set_content_type("application/json")
    await json_msg.save()

    # Markdown message
    md_msg = Message()
    md_msg.set_content("# Important\n\nPlease review **ASAP**")
    md_msg.set_content_type("text/markdown")
    await md_msg.save()

    # Binary data (base64 encoded)
    binary_msg = Message()
    binary_msg.set_content(base64.b64encode(image_data).decode())
    binary_msg.set_content_type("image/png")
    await binary_msg.save()

    loaded = [await Message.get(m.id) for m in (json_msg, md_msg, binary_msg)]  # type: ignore[arg-type]
    assert [m.content_type for m in loaded if m] == [
        "application/json",
        "text/markdown",
        "image/png",
    ]
    assert loaded[0] is not None and loaded[0].content == '{"action": "update", "count": 42}'
    assert loaded[1] is not None and loaded[1].content == "# Important\n\nPlease review **ASAP**"
    assert loaded[2] is not None and base64.b64decode(loaded[2].content or "") == image_data


async def test_getting_started_bot_subscribers(database: str, dispatcher: MemoryDispatcher) -> None:
    channel = await Channel("Alerts").save()

    # Create bot subscriber
    bot = Principal(kind="bot")
    bot.set_alias("name", "Notification Bot")
    bot.set_alias("endpoint", "https://bots.example.com/notify")
    await bot.save()

    # Subscribe bot to channel
    await channel.subscribe(bot.id)  # type: ignore[arg-type]

    [subscriber] = await channel.get_subscribers()
    assert (subscriber.id, subscriber.kind) == (bot.id, "bot")
    assert subscriber.aliases == {
        "name": "Notification Bot",
        "endpoint": "https://bots.example.com/notify",
    }
    # Messages sent to channel will be delivered to bot
    author = await principal_with(SUBMIT)
    [result] = await Message("disk full", author_id=author.id).send(channel)
    assert (result.success, result.pending_count) == (True, 1)
    assert len(dispatcher.jobs) == 1


async def test_getting_started_service_integration(database: str) -> None:
    channel = await Channel("Deploys").save()

    # External service as subscriber
    slack_integration = Principal(kind="integration")
    slack_integration.set_alias("service", "slack")
    slack_integration.set_alias("endpoint", "https://hooks.slack.com/...")
    await slack_integration.save()

    await channel.subscribe(slack_integration.id)  # type: ignore[arg-type]

    [subscriber] = await channel.get_subscribers()
    assert (subscriber.id, subscriber.kind) == (slack_integration.id, "integration")
    assert subscriber.get_alias("service") == "slack"
    assert subscriber.get_alias("endpoint") == "https://hooks.slack.com/..."
    assert (await PrincipalRegistry().all(kind="integration")).ids() == [slack_integration.id]


async def receive_message(channel_id: int, data: dict[str, Any]) -> Any:
    """The guide's FastAPI handler, without FastAPI (channels_core has no web
    framework; the real one is `channels ingress`, producer/ingress.py): the same body."""
    # Load channel
    channels = ChannelRegistry()
    channel = await channels.get(channel_id)

    if not channel:
        return {"error": "Channel not found"}, 404

    # Permission check
    author_id = data.get("author_id")
    if not await channel.can_submit(author_id):
        return {"error": "Permission denied"}, 403

    # Create message
    message = Message()
    message.set_content(data.get("content"))  # type: ignore[arg-type]
    message.set_author_id(author_id)  # type: ignore[arg-type]

    if "conversation_id" in data:
        message.set_conversation_id(data["conversation_id"])

    await message.save()

    return {
        "success": True,
        "message_id": message.id,
    }


async def test_getting_started_http_ingress_setup(database: str) -> None:
    channel = await Channel("Support").save()
    author = await principal_with(SUBMIT)
    outsider = await Principal(kind="user").save()
    conversation = await Conversation("Ticket 7").save()

    assert await receive_message(9999, {"author_id": author.id, "content": "hi"}) == (
        {"error": "Channel not found"},
        404,
    )
    assert await receive_message(channel.id, {"author_id": outsider.id, "content": "hi"}) == (  # type: ignore[arg-type]
        {"error": "Permission denied"},
        403,
    )
    assert await receive_message(channel.id, {"content": "no author"}) == (  # type: ignore[arg-type]
        {"error": "Permission denied"},
        403,
    )
    assert (await table_counts())["messages"] == 0

    reply = await receive_message(
        channel.id,  # type: ignore[arg-type]
        {"author_id": author.id, "content": "printer on fire", "conversation_id": conversation.id},
    )
    assert reply["success"] is True
    saved = await Message.get(reply["message_id"])
    assert saved is not None
    assert (saved.content, saved.author_id, saved.conversation_id) == (
        "printer on fire",
        author.id,
        conversation.id,
    )


async def test_getting_started_monitoring(database: str, request: pytest.FixtureRequest) -> None:
    """The guide compares ``created_at`` with the naive ``datetime.now()``;
    timestamps here are timezone-aware UTC, so the cut-off is
    ``datetime.now(UTC)`` (the seed is wrong for aware timestamps)."""
    planning = await Conversation("Planning").save()
    retro = await Conversation("Retro").save()
    for conversation, n in ((planning, 3), (retro, 1)):
        for i in range(n):
            await Message(f"note {i}").set_conversation_id(conversation.id).save()
    await Message("no conversation").save()

    registry = MessageRegistry()

    # Get recent messages
    recent = await registry.filter(
        lambda m: m.created_at > datetime.now(UTC) - timedelta(hours=1)  # type: ignore[operator]
    )

    # Count by conversation
    conversations = Counter(m.conversation_id for m in recent)

    assert f"Messages last hour: {len(recent)}" == "Messages last hour: 5"
    assert conversations == Counter({planning.id: 3, retro.id: 1, None: 1})
    old = await registry.filter(
        lambda m: m.created_at < datetime.now(UTC) - timedelta(hours=1)  # type: ignore[operator]
    )
    assert list(old) == []
