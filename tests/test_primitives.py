"""The primitives' Python API: fluent setters, save/update, roles and
permissions, subscriptions with ``by=`` checks, threads and sending."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from _support import principal_with, table_counts
from sqlalchemy import select

from channels_core import db
from channels_core.dispatch import MemoryDispatcher, RouteJob, set_dispatcher
from channels_core.errors import NotFoundError, PermissionDeniedError
from channels_core.models import OutboxRow
from channels_core.permissions import MANAGE, SUBMIT, SUBSCRIBE
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
from channels_core.registries import ChannelRegistry, PrincipalRegistry
from channels_core.sending import Dispatch

# -- fluent setters ---------------------------------------------------------------


def test_every_setter_returns_self() -> None:
    channel = Channel()
    message = Message()
    principal = Principal()
    role = Role()
    permission = Permission()
    conversation = Conversation()
    calls = [
        (channel, channel.set_title("General")),
        (channel, channel.set_alias("egress_transport", "http")),
        (channel, channel.set_alias("ingress_transport", "http")),
        (channel, channel.remove_alias("ingress_transport")),
        (message, message.set_content("hello")),
        (message, message.set_content_type("text/markdown")),
        (message, message.set_author_id(1)),
        (message, message.set_reply_to_id(2)),
        (message, message.set_reply_to_id(None)),
        (message, message.set_conversation_id(3)),
        (message, message.add_reference(4)),
        (principal, principal.set_kind("bot")),
        (principal, principal.set_username("robo")),
        (principal, principal.set_email("robo@example.com")),
        (principal, principal.set_alias("endpoint", "https://example.com/hook")),
        (principal, principal.remove_alias("endpoint")),
        (principal, principal.add_role(5)),
        (principal, principal.remove_role(5)),
        (role, role.set_title("member")),
        (role, role.add_permission(6)),
        (role, role.remove_permission(6)),
        (permission, permission.set_title("channel.submit")),
        (conversation, conversation.set_title("Planning")),
    ]
    for obj, returned in calls:
        assert returned is obj
    assert (channel.title, channel.aliases) == ("General", {"egress_transport": "http"})
    assert (message.content, message.content_type, message.author_id) == (
        "hello",
        "text/markdown",
        1,
    )
    assert (message.reply_to_id, message.conversation_id, message.references) == (None, 3, [4])
    assert (principal.kind, principal.username, principal.email) == (
        "bot",
        "robo",
        "robo@example.com",
    )
    assert (principal.aliases, principal.roles, role.permissions) == ({}, [], [])


def test_chained_construction_reads_like_the_seed() -> None:
    channel = Channel().set_title("General").set_alias("egress_transport", "websocket")
    assert (channel.title, channel.get_alias("egress_transport")) == ("General", "websocket")
    assert channel.get_alias("missing", "fallback") == "fallback"


def test_adding_the_same_role_permission_or_reference_twice_keeps_one() -> None:
    assert Principal().add_role(3).add_role(3).roles == [3]
    assert Role("r").add_permission(3).add_permission(3).permissions == [3]
    assert Message("m").add_reference(3).add_reference(3).references == [3]


def test_manifest_is_a_list_with_ids() -> None:
    a, b = Channel("a"), Channel("b")
    a.id, b.id = 1, 2
    manifest = Manifest([a, b])
    assert isinstance(manifest, list)
    assert manifest.ids() == [1, 2]
    assert repr(manifest).startswith("Manifest([")


# -- save and update ---------------------------------------------------------------


async def test_save_returns_self_and_assigns_ids(database: str) -> None:
    permission = Permission("channel.submit")
    role = Role("member")
    conversation = Conversation("Planning")
    channel = Channel("General")
    principal = Principal("service", username="billing")
    for obj in (permission, role, conversation, channel, principal):
        assert await obj.save() is obj  # type: ignore[attr-defined]
        assert isinstance(obj.id, int) and obj.id > 0
    message = Message("hello", author_id=principal.id)
    assert await message.save() is message
    assert isinstance(message.id, int)
    for obj in (conversation, channel, principal, message):
        assert obj.created_at is not None  # type: ignore[attr-defined]
    counts = await table_counts()
    assert {k: counts[k] for k in ("permissions", "roles", "conversations", "channels")} == {
        "permissions": 1,
        "roles": 1,
        "conversations": 1,
        "channels": 1,
    }
    assert (counts["principals"], counts["messages"]) == (1, 1)


async def test_saving_again_updates_in_place(database: str) -> None:
    channel = await Channel("General").save()
    principal = await Principal("user", username="alice").save()
    message = await Message("draft", author_id=principal.id).save()
    conversation = await Conversation("Planning").save()
    role = await Role("member").save()
    permission = await Permission("custom.permission").save()
    before = await table_counts()

    await channel.set_title("General Chat").set_alias("egress_transport", "http").save()
    await principal.set_kind("bot").set_email("bot@example.com").set_username("robo").save()
    await message.set_content("final").set_content_type("text/markdown").save()
    await conversation.set_title("Sprint Planning").save()
    await role.set_title("members").save()
    await permission.set_title("custom.renamed").save()

    assert await table_counts() == before
    c = await Channel.get(channel.id)  # type: ignore[arg-type]
    assert c is not None and (c.title, c.aliases) == ("General Chat", {"egress_transport": "http"})
    p = await Principal.get(principal.id)  # type: ignore[arg-type]
    assert p is not None and (p.kind, p.email, p.username) == ("bot", "bot@example.com", "robo")
    m = await Message.get(message.id)  # type: ignore[arg-type]
    assert m is not None and (m.content, m.content_type) == ("final", "text/markdown")
    conv = await Conversation.get(conversation.id)  # type: ignore[arg-type]
    assert conv is not None and conv.title == "Sprint Planning"
    r = await Role.get(role.id)  # type: ignore[arg-type]
    assert r is not None and r.title == "members"
    assert (await Permission.get_or_create("custom.renamed")).id == permission.id


async def test_principal_aliases_round_trip_and_removal(database: str) -> None:
    principal = Principal(
        "integration",
        aliases={"endpoint": "https://hooks.example.com/x", "queue": "orders.created"},
    )
    principal.set_alias("email", "ops@example.com")
    await principal.save()
    loaded = await PrincipalRegistry().require(principal.id)  # type: ignore[arg-type]
    assert loaded.aliases == {
        "endpoint": "https://hooks.example.com/x",
        "queue": "orders.created",
        "email": "ops@example.com",
    }
    await loaded.remove_alias("queue").save()
    again = await PrincipalRegistry().require(principal.id)  # type: ignore[arg-type]
    assert again.aliases == {"endpoint": "https://hooks.example.com/x", "email": "ops@example.com"}


async def test_get_or_create_permission_is_idempotent(database: str) -> None:
    first = await Permission.get_or_create(SUBMIT)
    second = await Permission.get_or_create(SUBMIT)
    assert first.id == second.id
    assert (await table_counts())["permissions"] == 1


# -- roles and permissions -----------------------------------------------------------


async def _can(channel: Channel, principal_id: int | None) -> tuple[bool, bool, bool]:
    return (
        await channel.can_submit(principal_id),
        await channel.can_subscribe(principal_id),
        await channel.can_manage(principal_id),
    )


async def test_permissions_come_through_roles(database: str) -> None:
    channel = await Channel("General").save()
    submit = await Permission.get_or_create(SUBMIT)
    subscribe = await Permission.get_or_create(SUBSCRIBE)
    manage = await Permission.get_or_create(MANAGE)
    sender = await Role("sender").add_permission(submit.id).save()  # type: ignore[arg-type]
    keeper = (
        await Role("keeper").add_permission(subscribe.id).add_permission(manage.id).save()  # type: ignore[arg-type]
    )
    user = await Principal("user").save()
    assert await _can(channel, user.id) == (False, False, False)

    await user.add_role(sender.id).save()  # type: ignore[arg-type]
    assert await _can(channel, user.id) == (True, False, False)

    await user.add_role(keeper.id).save()  # type: ignore[arg-type]
    assert await _can(channel, user.id) == (True, True, True)

    await user.remove_role(sender.id).save()  # type: ignore[arg-type]
    assert await _can(channel, user.id) == (False, True, True)

    # Taking a permission away from a role takes it from every holder.
    other = await Principal("bot").add_role(keeper.id).save()  # type: ignore[arg-type]
    await keeper.remove_permission(manage.id).save()  # type: ignore[arg-type]
    assert await _can(channel, user.id) == (False, True, False)
    assert await _can(channel, other.id) == (False, True, False)
    assert (await Role.get(keeper.id)).permissions == [subscribe.id]  # type: ignore[arg-type,union-attr]


async def test_permission_checks_for_nobody_are_false(database: str) -> None:
    channel = await Channel("General").save()
    await principal_with(SUBMIT, SUBSCRIBE, MANAGE)
    assert await _can(channel, None) == (False, False, False)
    assert await _can(channel, 9999) == (False, False, False)
    assert await Principal().has_permission(SUBMIT) is False


async def test_has_role_by_id_and_by_title(database: str) -> None:
    member = await Role("member").save()
    admin = await Role("admin").save()
    alice = await Principal("user").add_role(member.id).save()  # type: ignore[arg-type]

    assert await alice.has_role(member.id) is True  # type: ignore[arg-type]
    assert await alice.has_role("member") is True
    assert await alice.has_role(admin.id) is False  # type: ignore[arg-type]
    assert await alice.has_role("admin") is False
    assert await alice.has_role("nobody") is False
    assert await Principal().has_role("member") is False  # unsaved
    loaded = await Principal.get(alice.id)  # type: ignore[arg-type]
    assert loaded is not None and loaded.roles == [member.id]


# -- subscriptions -----------------------------------------------------------------


async def test_subscribing_oneself_needs_channel_subscribe(database: str) -> None:
    channel = await Channel("General").save()
    member = await principal_with(SUBSCRIBE)
    stranger = await principal_with(SUBMIT)

    sub = await channel.subscribe(member.id, by=member.id)  # type: ignore[arg-type]
    assert (sub.channel_id, sub.subscriber_id) == (channel.id, member.id)

    with pytest.raises(PermissionDeniedError, match="channel.subscribe") as raised:
        await channel.subscribe(stranger.id, by=stranger.id)  # type: ignore[arg-type]
    assert (raised.value.principal_id, raised.value.permission) == (stranger.id, SUBSCRIBE)
    assert raised.value.channel_id == channel.id
    assert (await channel.get_subscribers()).ids() == [member.id]


async def test_subscribing_someone_else_needs_channel_manage(database: str) -> None:
    channel = await Channel("General").save()
    member = await principal_with(SUBSCRIBE)
    admin = await principal_with(SUBSCRIBE, MANAGE)
    target = await Principal("bot").save()

    with pytest.raises(PermissionDeniedError, match="channel.manage"):
        await channel.subscribe(target.id, by=member.id)  # type: ignore[arg-type]
    assert await channel.count_subscribers() == 0

    await channel.subscribe(target.id, by=admin.id)  # type: ignore[arg-type]
    assert (await channel.get_subscribers()).ids() == [target.id]

    with pytest.raises(NotFoundError, match="principal 9999"):
        await channel.subscribe(target.id, by=9999)  # type: ignore[arg-type]


async def test_unsubscribe_checks_by_like_subscribe(database: str) -> None:
    channel = await Channel("General").save()
    member = await principal_with(SUBSCRIBE)
    admin = await principal_with(MANAGE)
    target = await Principal("bot").save()
    for p in (member, target):
        await channel.subscribe(p.id)  # type: ignore[arg-type]

    with pytest.raises(PermissionDeniedError, match="channel.manage"):
        await channel.unsubscribe(target.id, by=member.id)  # type: ignore[arg-type]
    assert await channel.count_subscribers() == 2

    await channel.unsubscribe(member.id, by=member.id)  # type: ignore[arg-type]
    await channel.unsubscribe(target.id, by=admin.id)  # type: ignore[arg-type]
    assert await channel.count_subscribers() == 0


async def test_subscribers_in_subscription_order(database: str) -> None:
    channel = await Channel("General").save()
    people = [await Principal("user", username=f"u{i}").save() for i in range(3)]
    for p in reversed(people):
        await channel.subscribe(p.id)  # type: ignore[arg-type]

    subscribers = await channel.get_subscribers()
    assert isinstance(subscribers, Manifest)
    assert subscribers.ids() == [p.id for p in reversed(people)]
    assert await channel.count_subscribers() == 3

    await channel.unsubscribe(people[1].id)  # type: ignore[arg-type]
    assert (await channel.get_subscribers()).ids() == [people[2].id, people[0].id]


async def test_subscription_delete(database: str) -> None:
    channel = await Channel("General").save()
    p = await Principal("user").save()
    sub = await Subscription(channel.id, p.id).save()
    assert await sub.save() is sub  # nothing to update
    await sub.delete()
    assert sub.id is None
    assert await channel.count_subscribers() == 0


# -- messages ------------------------------------------------------------------------


async def test_reply_reference_and_conversation_links(database: str) -> None:
    conversation = await Conversation("Planning").save()
    root = await Message("root").save()
    other = await Message("other").save()
    reply = Message("reply").set_reply_to_id(root.id).set_conversation_id(conversation.id)
    reply.add_reference(other.id).add_reference(root.id)  # type: ignore[arg-type]
    await reply.save()

    loaded = await Message.get(reply.id)  # type: ignore[arg-type]
    assert loaded is not None
    assert (loaded.reply_to_id, loaded.conversation_id) == (root.id, conversation.id)
    assert loaded.references == [other.id, root.id]  # insertion order, not id order
    parent = await loaded.get_reply_to()
    assert parent is not None and parent.content == "root"
    assert [m.id for m in await loaded.get_references()] == [other.id, root.id]
    conv = await loaded.get_conversation()
    assert conv is not None and conv.title == "Planning"
    assert await root.get_reply_to() is None
    assert await root.get_conversation() is None


async def test_unsaved_message_resolves_references_in_memory(database: str) -> None:
    a = await Message("a").save()
    draft = Message("draft").add_reference(a.id)  # type: ignore[arg-type]
    assert [m.id for m in await draft.get_references()] == [a.id]


async def test_message_defaults(database: str) -> None:
    message = await Message("hello").save()
    loaded = await Message.get(message.id)  # type: ignore[arg-type]
    assert loaded is not None
    assert (loaded.content_type, loaded.author_id, loaded.reply_to_id) == ("text/plain", None, None)
    assert await Message.get(9999) is None
    assert await ChannelRegistry().get(9999) is None


# -- sending ---------------------------------------------------------------------------


async def _outbox() -> list[tuple[int, int, int]]:
    async with db.session() as s:
        rows = await s.execute(
            select(OutboxRow.id, OutboxRow.message_id, OutboxRow.channel_id).order_by(OutboxRow.id)
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


async def test_send_commits_outbox_and_enqueues_one_job_per_channel(
    database: str, dispatcher: MemoryDispatcher
) -> None:
    author = await principal_with(SUBMIT)
    a = await Channel("a").save()
    b = await Channel("b").save()
    for channel, n in ((a, 2), (b, 1)):
        for _ in range(n):
            await channel.subscribe((await Principal().save()).id)  # type: ignore[arg-type]
    message = Message("hello", author_id=author.id)  # unsaved: send saves it

    dispatch = await message.send([a, b])

    assert isinstance(dispatch, Dispatch)
    assert message.id is not None and dispatch.message_id == message.id
    assert len(dispatch) == 2 and dispatch.accepted is True
    assert [(r.channel_id, r.success, r.pending_count) for r in dispatch] == [
        (a.id, True, 2),
        (b.id, True, 1),
    ]
    assert dispatch[1].channel_id == b.id
    assert all(not r.final for r in dispatch.results)
    outbox = await _outbox()
    assert [(m, c) for _, m, c in outbox] == [(message.id, a.id), (message.id, b.id)]
    assert dispatcher.jobs == [RouteJob(o, m, c) for o, m, c in outbox]
    assert (await Message.get(message.id)) is not None


async def test_send_takes_a_single_channel_and_dedupes(
    database: str, dispatcher: MemoryDispatcher
) -> None:
    author = await principal_with(SUBMIT)
    channel = await Channel("General").save()

    single = await Message("one", author_id=author.id).send(channel)
    doubled = await Message("two", author_id=author.id).send(Manifest([channel, channel]))

    assert [r.channel_id for r in single] == [channel.id]
    assert [r.channel_id for r in doubled] == [channel.id]
    assert len(dispatcher.jobs) == 2
    assert len(await _outbox()) == 2


class _BrokenDispatcher:
    def __init__(self) -> None:
        self.calls = 0

    async def enqueue_routes(self, jobs: Sequence[RouteJob]) -> None:
        self.calls += 1
        raise ConnectionError("broker down")


async def test_send_survives_a_broker_outage(database: str) -> None:
    """Committed is accepted: the outbox row waits for the sweeper's relay."""
    author = await principal_with(SUBMIT)
    channel = await Channel("General").save()
    broken = _BrokenDispatcher()
    set_dispatcher(broken)  # the database fixture resets it afterwards

    [result] = await Message("hello", author_id=author.id).send(channel)

    assert broken.calls == 1
    assert result.success is True
    [(_, message_id, channel_id)] = await _outbox()
    assert (message_id, channel_id) == (result.message_id, channel.id)
