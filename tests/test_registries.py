"""Registries: threads, conversations, subscriptions, channels, principals,
and the transport registry's names, resolution and registration."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from _support import override_settings, registry_state
from sqlalchemy import update

from channels_core import db
from channels_core.errors import ConfigurationError, NotFoundError, ValidationError
from channels_core.models import MessageRow
from channels_core.primitives import Channel, Conversation, Manifest, Message, Principal
from channels_core.registries import (
    ChannelRegistry,
    MessageRegistry,
    PrincipalRegistry,
    SubscriptionRegistry,
)
from channels_core.transports import (
    EgressTransport,
    MemoryEgress,
    TransportResult,
    egress_registry,
    egress_transport,
)
from channels_core.transports import registry as registry_module
from channels_core.transports.registry import TransportRegistry

# -- threads -------------------------------------------------------------------------


async def _chain(n: int) -> list[Message]:
    """n messages, each replying to the one before."""
    chain = [await Message("m0").save()]
    for i in range(1, n):
        chain.append(await Message(f"m{i}").set_reply_to_id(chain[-1].id).save())
    return chain


async def _set_reply_to(message_id: int, reply_to_id: int | None) -> None:
    """Write around the API, as a bad migration or a manual fix might."""
    async with db.session() as s, s.begin():
        await s.execute(
            update(MessageRow).where(MessageRow.id == message_id).values(reply_to_id=reply_to_id)
        )


async def test_thread_is_root_first_and_ignores_siblings(database: str) -> None:
    root, middle, leaf = await _chain(3)
    sibling = await Message("sibling").set_reply_to_id(root.id).save()
    other = await Message("other").save()
    await leaf.add_reference(other.id).save()  # type: ignore[arg-type]

    thread = await MessageRegistry().get_thread(leaf.id)  # type: ignore[arg-type]

    assert isinstance(thread, Manifest)
    assert thread.ids() == [root.id, middle.id, leaf.id]
    assert thread[-1].references == [other.id]
    assert (await MessageRegistry().get_thread(sibling.id)).ids() == [root.id, sibling.id]  # type: ignore[arg-type]
    assert (await MessageRegistry().get_thread(root.id)).ids() == [root.id]  # type: ignore[arg-type]


async def test_deep_thread_is_complete(database: str) -> None:
    chain = await _chain(50)
    thread = await MessageRegistry().get_thread(chain[-1].id)  # type: ignore[arg-type]
    assert thread.ids() == [m.id for m in chain]


async def test_thread_is_bounded_by_thread_depth_limit(database: str) -> None:
    chain = await _chain(12)
    with override_settings(thread_depth_limit=5):
        thread = await MessageRegistry().get_thread(chain[-1].id)  # type: ignore[arg-type]
    # The nearest five, still in root-first order, ending at the message asked for.
    assert thread.ids() == [m.id for m in chain[-5:]]
    full = await MessageRegistry().get_thread(chain[-1].id)  # type: ignore[arg-type]
    assert len(full) == 12


@pytest.mark.timeout(20)
async def test_thread_walk_terminates_on_a_cycle_in_the_table(database: str) -> None:
    a, b, c = await _chain(3)
    await _set_reply_to(a.id, c.id)  # type: ignore[arg-type]  # a -> c -> b -> a

    thread = await MessageRegistry().get_thread(c.id)  # type: ignore[arg-type]

    assert sorted(thread.ids()) == sorted([a.id, b.id, c.id])  # type: ignore[type-var]
    assert thread.ids()[-1] == c.id
    assert len(set(thread.ids())) == 3


async def test_thread_of_a_missing_message_is_not_found(database: str) -> None:
    with pytest.raises(NotFoundError, match="message 9999 not found"):
        await MessageRegistry().get_thread(9999)
    with pytest.raises(NotFoundError):
        await MessageRegistry().require(9999)


async def test_cycle_check_holds_beyond_the_depth_limit(database: str) -> None:
    chain = await _chain(8)
    with override_settings(thread_depth_limit=5):
        chain[0].set_reply_to_id(chain[-1].id)
        with pytest.raises(ValidationError, match="cycle|deep"):
            await chain[0].save()
    stored = await Message.get(chain[0].id)  # type: ignore[arg-type]
    assert stored is not None and stored.reply_to_id is None


# -- conversations -------------------------------------------------------------------


async def test_conversation_messages_in_time_order(database: str) -> None:
    planning = await Conversation("Planning").save()
    retro = await Conversation("Retro").save()
    first, second, third = [
        await Message(f"p{i}").set_conversation_id(planning.id).save() for i in range(3)
    ]
    await Message("elsewhere").set_conversation_id(retro.id).save()
    await Message("nowhere").save()
    # Ids and times disagree: the order must follow created_at, not the id.
    base = datetime(2030, 1, 1, tzinfo=UTC)
    async with db.session() as s, s.begin():
        for message, offset in ((first, 3), (second, 1), (third, 2)):
            await s.execute(
                update(MessageRow)
                .where(MessageRow.id == message.id)
                .values(created_at=base + timedelta(seconds=offset))
            )

    messages = await MessageRegistry().get_for_conversation(planning.id)  # type: ignore[arg-type]

    assert messages.ids() == [second.id, third.id, first.id]
    assert [m.content for m in messages] == ["p1", "p2", "p0"]
    assert len(await MessageRegistry().get_for_conversation(retro.id)) == 1  # type: ignore[arg-type]
    assert list(await MessageRegistry().get_for_conversation(9999)) == []


async def test_message_filter_and_since(database: str) -> None:
    old = await Message("old").save()
    new = await Message("new").save()
    async with db.session() as s, s.begin():
        await s.execute(
            update(MessageRow)
            .where(MessageRow.id == old.id)
            .values(created_at=datetime(2000, 1, 1, tzinfo=UTC))
        )
    registry = MessageRegistry()
    assert (await registry.filter(lambda m: m.content == "new")).ids() == [new.id]
    since = datetime(2020, 1, 1, tzinfo=UTC)
    assert (await registry.filter(lambda m: True, since=since)).ids() == [new.id]


# -- subscriptions, channels, principals -----------------------------------------------


async def test_subscription_registry_filters(database: str) -> None:
    general = await Channel("General").save()
    support = await Channel("Support").save()
    alice = await Principal("user", username="alice").save()
    bot = await Principal("bot", username="bot").save()
    s1 = await general.subscribe(alice.id)  # type: ignore[arg-type]
    s2 = await support.subscribe(alice.id)  # type: ignore[arg-type]
    s3 = await general.subscribe(bot.id)  # type: ignore[arg-type]
    registry = SubscriptionRegistry()

    assert (await registry.filter(subscriber_id=alice.id)).ids() == [s1.id, s2.id]
    assert (await registry.filter(channel_id=general.id)).ids() == [s1.id, s3.id]
    assert (await registry.filter(subscriber_id=bot.id, channel_id=general.id)).ids() == [s3.id]
    assert list(await registry.filter(subscriber_id=bot.id, channel_id=support.id)) == []
    assert (await registry.for_subscriber(bot.id)).ids() == [s3.id]  # type: ignore[arg-type]
    assert (await registry.for_channel(support.id)).ids() == [s2.id]  # type: ignore[arg-type]
    assert (await registry.get_channels(alice.id)).ids() == [general.id, support.id]  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="subscriber_id, channel_id"):
        await registry.filter()


async def test_channel_registry(database: str) -> None:
    registry = ChannelRegistry()
    assert await registry.get(9999) is None
    with pytest.raises(NotFoundError, match="channel 9999 not found"):
        await registry.require(9999)

    a = await Channel("Alpha").set_alias("egress_transport", "http").save()
    b = await Channel("Beta").save()
    found = await registry.get(a.id)  # type: ignore[arg-type]
    assert found is not None and (found.id, found.title, found.aliases) == (
        a.id,
        "Alpha",
        {"egress_transport": "http"},
    )
    assert (await registry.all()).ids() == [a.id, b.id]
    assert (await registry.get_by_title("Beta")).id == b.id  # type: ignore[union-attr]
    assert await registry.get_by_title("Gamma") is None
    assert (await registry.filter(lambda c: "egress_transport" in c.aliases)).ids() == [a.id]


async def test_principal_registry(database: str) -> None:
    registry = PrincipalRegistry()
    alice = await Principal("user", username="alice").save()
    bot = await Principal("bot", username="helper").save()
    assert (await registry.get_by_username("helper")).id == bot.id  # type: ignore[union-attr]
    assert await registry.get_by_username("nobody") is None
    assert (await registry.all()).ids() == [alice.id, bot.id]
    assert (await registry.all(kind="bot")).ids() == [bot.id]
    assert await registry.get(9999) is None
    with pytest.raises(NotFoundError, match="principal 9999"):
        await registry.require(9999)


# -- transport resolution ---------------------------------------------------------------


@pytest.fixture
def egress() -> Iterator[TransportRegistry]:
    with registry_state(egress_registry) as registry:
        yield registry


def _all_unavailable(registry: TransportRegistry) -> dict[str, MemoryEgress]:
    """Replace every registered transport with an unavailable memory double."""
    doubles = {}
    for name in registry.names():
        doubles[name] = MemoryEgress()
        doubles[name].available = False
        registry.set_instance(name, doubles[name])
    return doubles


def test_resolution_prefers_the_channels_transport_when_available(
    egress: TransportRegistry,
) -> None:
    memory = MemoryEgress()
    egress.set_instance("memory", memory)
    channel = Channel("General").set_alias("egress_transport", "memory")

    repo = channel.get_egress_repository()

    assert repo.resolve() is memory
    assert repo.resolve_name() == "memory"


def test_resolution_falls_back_to_the_first_available(egress: TransportRegistry) -> None:
    doubles = _all_unavailable(egress)
    names = egress.names()
    assert names.index("email") < names.index("queue")
    repo = Channel("General").set_alias("egress_transport", "memory").get_egress_repository()

    doubles["queue"].available = True
    assert repo.resolve() is doubles["queue"]

    doubles["email"].available = True
    assert repo.resolve_name() == "email"  # registration order decides

    doubles["memory"].available = True
    assert repo.resolve_name() == "memory"  # the preferred one wins once it is back

    # No preference: simply the first available.
    assert Channel("x").get_egress_repository().resolve_name() == "email"


def test_resolution_with_nothing_available_names_what_it_tried(egress: TransportRegistry) -> None:
    _all_unavailable(egress)
    with pytest.raises(ConfigurationError, match="no egress transport is available") as raised:
        Channel("x").set_alias("egress_transport", "memory").get_egress_repository().resolve()
    for name in egress.names():
        assert name in str(raised.value)


def test_resolution_skips_a_transport_that_cannot_load(egress: TransportRegistry) -> None:
    doubles = _all_unavailable(egress)
    doubles["memory"].available = True
    egress.register("broken", "no_such_module_for_channels_tests:Nope")

    with pytest.raises(ImportError, match="cannot load transport"):
        egress.get("broken")
    repo = Channel("x").set_alias("egress_transport", "broken").get_egress_repository()
    assert repo.resolve() is doubles["memory"]


def test_unknown_transport_name_lists_the_known_ones(egress: TransportRegistry) -> None:
    with pytest.raises(ValidationError) as raised:
        Channel("x").set_alias("egress_transport", "carrier-pigeon")
    message = str(raised.value)
    assert "unknown egress transport 'carrier-pigeon'" in message
    for name in ("http", "email", "queue", "websocket", "memory"):
        assert name in message

    with pytest.raises(ValidationError, match="did you mean 'http'"):
        egress.get("htpp")
    with pytest.raises(ValidationError, match="unknown ingress transport 'smoke'"):
        Channel("x").set_alias("ingress_transport", "smoke")


# -- registration -------------------------------------------------------------------------


def test_decorator_registers_a_user_transport(egress: TransportRegistry) -> None:
    @egress_transport("sms")
    class SmsEgress(EgressTransport):
        async def send(self, message, channel, subscribers):  # type: ignore[no-untyped-def]
            return [TransportResult.delivered(s.id) for s in subscribers]

    assert "sms" in egress.names()
    channel = Channel("Alerts").set_alias("egress_transport", "sms")
    transport = channel.get_egress_repository().resolve()
    assert isinstance(transport, SmsEgress)
    assert transport.name == "sms"  # the registry names an unnamed class
    assert egress.get("sms") is transport  # one instance per name


async def test_a_registered_transport_sends(egress: TransportRegistry) -> None:
    @egress_transport("duck")
    class DuckTyped:  # no base class: send + is_available is the whole contract
        async def send(self, message, channel, subscribers):  # type: ignore[no-untyped-def]
            return [TransportResult.delivered(s.id, transport="duck") for s in subscribers]

        def is_available(self) -> bool:
            return True

    transport = egress.get("duck")
    a, b = Principal(), Principal()
    a.id, b.id = 1, 2
    results = await transport.send(Message("hi"), Channel("c"), [a, b])  # type: ignore[attr-defined]
    assert [(r.subscriber_id, r.success, r.delivered_count) for r in results] == [
        (1, True, 1),
        (2, True, 1),
    ]


def test_decorator_refuses_a_class_without_the_contract(egress: TransportRegistry) -> None:
    with pytest.raises(TypeError, match="send"):

        @egress_transport("half")
        class Half:
            async def send(self, message, channel, subscribers):  # type: ignore[no-untyped-def]
                return []

    assert "half" not in egress.names()


def test_lazy_import_string_loads_on_first_use(
    egress: TransportRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = "channels_tests_lazy_transport"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            """
            from channels_core.transports import EgressTransport

            class LazyEgress(EgressTransport):
                async def send(self, message, channel, subscribers):
                    return []
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)

    egress.register("lazy", f"{module}:LazyEgress")
    Channel("x").set_alias("egress_transport", "lazy")  # the name checks without importing
    assert module not in sys.modules

    transport = egress.get("lazy")
    assert module in sys.modules
    assert type(transport).__name__ == "LazyEgress"
    assert transport.name == "lazy"  # type: ignore[attr-defined]
    sys.modules.pop(module, None)


def test_entry_points_register_lazily_and_never_shadow_builtins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    group = "channels.egress_transports"
    points = [
        EntryPoint("pigeon", "channels_core.transports.memory:MemoryEgress", group),
        EntryPoint("http", "somebody_else:HttpEgress", group),
    ]
    asked: list[str] = []

    def fake_entry_points(*, group: str) -> list[EntryPoint]:
        asked.append(group)
        return points

    monkeypatch.setattr(registry_module, "entry_points", fake_entry_points)
    registry = TransportRegistry(
        "egress", {"http": "channels_core.transports.http:HttpEgress"}, group
    )
    assert asked == []  # nothing is read before a name is needed

    assert registry.names() == ["http", "pigeon"]
    assert asked == [group]
    assert type(registry.get("pigeon")).__name__ == "MemoryEgress"
    assert type(registry.get("http")).__module__ == "channels_core.transports.http"
    registry.names()
    assert asked == [group]  # read once
