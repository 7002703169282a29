"""``send_many``'s bulk path on both backends: messages, references and outbox
entries written in a few statements (``unnest`` arrays on PostgreSQL, the
portable multi-row forms on SQLite) land on the right ids, in order, and a
missing link anywhere in a batch is refused by name with nothing written."""

from __future__ import annotations

import pytest
from _support import new_principals, principal_with, unchanged
from sqlalchemy import select, text

from channels_core import db
from channels_core.dispatch import MemoryDispatcher, RouteJob
from channels_core.errors import NotFoundError
from channels_core.models import (
    ChannelRow,
    MessageReferenceRow,
    MessageRow,
    OutboxRow,
    PrincipalRow,
)
from channels_core.permissions import SUBMIT
from channels_core.primitives import Channel, Conversation, Message
from producer import AsyncProducer

pytestmark = pytest.mark.timeout(60)


async def test_a_batch_lands_on_the_right_ids_with_its_links_and_outbox(
    database: str, dispatcher: MemoryDispatcher
) -> None:
    author = await principal_with(SUBMIT)
    a = await Channel("a").save()
    b = await Channel("b").save()
    conversation = await Conversation().set_title("Planning").save()
    root = await Message("root", author_id=author.id).save()
    other = await Message("other", author_id=author.id).save()
    assert root.id is not None and other.id is not None
    specs = [
        {
            "content": f"m{i}",
            "author_id": author.id,
            "content_type": "text/markdown" if i % 2 else "text/plain",
            "reply_to_id": root.id if i % 3 == 0 else None,
            "conversation_id": conversation.id if i % 4 == 0 else None,
            "references": [other.id, root.id] if i % 5 == 0 else [],
        }
        for i in range(250)
    ]

    dispatches = await AsyncProducer().send_many(specs, [a, b], chunk=100)

    ids = [d.message_id for d in dispatches]
    assert len(ids) == 250 and len(set(ids)) == 250 and None not in ids
    async with db.session() as s:
        rows = {r.id: r for r in await s.scalars(select(MessageRow).where(MessageRow.id.in_(ids)))}
        references = (
            await s.execute(
                select(
                    MessageReferenceRow.message_id,
                    MessageReferenceRow.referenced_id,
                    MessageReferenceRow.position,
                ).where(MessageReferenceRow.message_id.in_(ids))
            )
        ).all()
        outbox = (
            await s.execute(
                select(OutboxRow.id, OutboxRow.message_id, OutboxRow.channel_id)
                .where(OutboxRow.message_id.in_(ids))
                .order_by(OutboxRow.id)
            )
        ).all()
    for spec, message_id in zip(specs, ids, strict=True):
        row = rows[message_id]  # type: ignore[index]
        assert (
            row.content,
            row.content_type,
            row.author_id,
            row.reply_to_id,
            row.conversation_id,
        ) == (
            spec["content"],
            spec["content_type"],
            spec["author_id"],
            spec["reply_to_id"],
            spec["conversation_id"],
        )
        assert row.created_at is not None
    assert sorted(references) == sorted(
        (message_id, ref, position)
        for spec, message_id in zip(specs, ids, strict=True)
        for position, ref in enumerate(spec["references"])  # type: ignore[arg-type]
    )
    assert sorted((m, c) for _, m, c in outbox) == sorted((m, c) for m in ids for c in (a.id, b.id))
    assert sorted(dispatcher.jobs, key=lambda j: j.outbox_id) == [
        RouteJob(o, m, c) for o, m, c in outbox
    ]
    for d, message_id in zip(dispatches, ids, strict=True):
        assert [(r.channel_id, r.success, r.message_id) for r in d] == [
            (a.id, True, message_id),
            (b.id, True, message_id),
        ]
    fetched = await Message.get(ids[5])  # type: ignore[arg-type]
    assert fetched is not None and fetched.references == [other.id, root.id]
    assert fetched.created_at is not None


async def test_created_at_follows_the_order_sent(database: str) -> None:
    author = await principal_with(SUBMIT)
    channel = await Channel("General").save()
    dispatches = await AsyncProducer().send_many(
        [{"content": f"m{i}", "author_id": author.id} for i in range(50)], channel
    )
    messages = [await Message.get(d.message_id) for d in dispatches]  # type: ignore[arg-type]
    assert [m.content for m in messages if m is not None] == [f"m{i}" for i in range(50)]
    stamps = [m.created_at for m in messages if m is not None]
    assert stamps == sorted(stamps)


@pytest.mark.parametrize(
    ("second", "named"),
    [
        # _check_links' order within a message: author, conversation, reply, references.
        ({"author_id": 990, "conversation_id": 991}, ("principal", 990)),
        ({"conversation_id": 991, "reply_to_id": 992}, ("conversation", 991)),
        ({"reply_to_id": 992, "references": [993]}, ("message", 992)),
        ({"references": [994, 993]}, ("message", 994)),
        ({"conversation_id": 2**63}, ("conversation", 2**63)),
        ({"references": [2**64]}, ("message", 2**64)),
    ],
)
async def test_a_missing_link_anywhere_refuses_the_whole_batch(
    database: str,
    dispatcher: MemoryDispatcher,
    second: dict[str, object],
    named: tuple[str, int],
) -> None:
    author = await principal_with(SUBMIT)
    channel = await Channel("General").save()
    good = {"content": "fine", "author_id": author.id}
    batch = [good, {**good, "content": "bad", **second}, {**good, "reply_to_id": 999}]

    async with unchanged():
        with pytest.raises(NotFoundError) as refused:
            await AsyncProducer().send_many(batch, channel)

    kind, ident = named
    assert str(refused.value) == str(NotFoundError(kind, ident))
    assert dispatcher.jobs == []


async def test_an_earlier_message_missing_a_link_is_named_first(
    database: str, dispatcher: MemoryDispatcher
) -> None:
    author = await principal_with(SUBMIT)
    channel = await Channel("General").save()
    batch = [
        {"content": "first", "author_id": author.id, "references": [995]},
        {"content": "second", "author_id": author.id, "conversation_id": 996},
    ]
    async with unchanged():
        with pytest.raises(NotFoundError) as refused:
            await AsyncProducer().send_many(batch, channel)
    assert str(refused.value) == str(NotFoundError("message", 995))


async def test_new_messages_are_written_by_the_one_statement_path(
    database: str, dispatcher: MemoryDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL, new messages without references skip the transaction:
    one look-up, then messages and outbox entries in one statement. The
    fallback to the checked path on IntegrityError must not be what serves
    them (it would hide a statement that always fails)."""
    if not db.is_postgres():
        pytest.skip("the one-statement path is PostgreSQL's")
    from channels_core import sending

    outcomes: list[str] = []
    fast = sending._send_new

    async def watched(*args: object) -> object:
        try:
            result = await fast(*args)  # type: ignore[arg-type]
        except Exception as exc:
            outcomes.append(type(exc).__name__)
            raise
        outcomes.append("written")
        return result

    monkeypatch.setattr(sending, "_send_new", watched)
    author = await principal_with(SUBMIT)
    a = await Channel("a").save()
    b = await Channel("b").save()

    one = await AsyncProducer().send([a, b], "one", author_id=author.id)
    many = await AsyncProducer().send_many(
        [{"content": f"m{i}", "author_id": author.id} for i in range(3)], [a, b]
    )

    assert outcomes == ["written", "written"]
    ids = [one.message_id, *(d.message_id for d in many)]
    async with db.session() as s:
        found = await s.execute(
            select(MessageRow.id, MessageRow.content).where(MessageRow.id.in_(ids))
        )
        contents = {message_id: content for message_id, content in found}
        outbox = (
            await s.execute(
                select(OutboxRow.message_id, OutboxRow.channel_id, OutboxRow.relays).where(
                    OutboxRow.message_id.in_(ids)
                )
            )
        ).all()
    assert [contents[i] for i in ids] == ["one", "m0", "m1", "m2"]  # type: ignore[index]
    assert sorted(outbox) == sorted((i, c, 0) for i in ids for c in (a.id, b.id))
    assert sorted((j.message_id, j.channel_id) for j in dispatcher.jobs) == sorted(
        (i, c) for i in ids for c in (a.id, b.id)
    )


async def test_a_send_to_one_channel_by_one_author_is_planned_once_per_connection(
    database: str, dispatcher: MemoryDispatcher
) -> None:
    """With one channel and one author the statement compares plain ids, so
    PostgreSQL keeps one generic plan for it instead of planning every send
    afresh (as it did for the arrays, thinking them ten ids long)."""
    if not db.is_postgres():
        pytest.skip("prepared statements and their plans are PostgreSQL's")
    author = await principal_with(SUBMIT)
    channel = await Channel("one").save()
    producer = AsyncProducer()
    sent = [await producer.send(channel, f"m{i}", author_id=author.id) for i in range(12)]
    assert all(d.accepted for d in sent)
    # The connection the sends ran on: kept, and handed out again first.
    async with db.autocommit() as conn:
        plans = (
            await conn.exec_driver_sql(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
                " WHERE position('new_messages' in statement) > 0"
            )
        ).all()
    assert len(plans) == 1
    # psycopg prepares it after a few executes; PostgreSQL plans the first
    # five runs of a prepared statement for their values, then chooses.
    generic, custom = plans[0]
    assert custom == 5 and generic >= 1, f"{generic} generic plans, {custom} custom"


async def test_a_small_channel_is_counted_by_its_index_beside_a_large_one(database: str) -> None:
    """The look-up counts each channel's subscriptions by the ids given: with
    a channel of 20,000 subscribers in the statistics, a channel of three is
    still counted through the index, not by a scan of every subscription
    (correlated to the channel row, every channel was estimated at the
    table's average)."""
    if not db.is_postgres():
        pytest.skip("the plan is PostgreSQL's")
    from channels_core import sending

    author = await principal_with(SUBMIT)
    large = await Channel("large").save()
    small = await Channel("small").save()
    async with db.session() as s, s.begin():
        await s.execute(
            text(
                new_principals(20003)
                + " INSERT INTO subscriptions (channel_id, subscriber_id, created_at)"
                " SELECT CASE WHEN row_number() OVER () <= 3 THEN :small ELSE :large END,"
                " id, now() FROM p"
            ),
            {"small": small.id, "large": large.id},
        )
    async with db.autocommit() as conn:
        await conn.exec_driver_sql("ANALYZE subscriptions")
        for single in (True, False):
            statement = sending._look_up_statement(True, single)
            compiled = statement.compile(dialect=conn.dialect)
            params = {
                "channels": small.id
                if single
                else db.one_of_value(ChannelRow.id, [small.id], True),
                "authors": author.id
                if single
                else db.one_of_value(PrincipalRow.id, [author.id], True),
                **{k: v for k, v in compiled.params.items() if k not in ("channels", "authors")},
            }
            plan = "\n".join(
                row[0] for row in await conn.exec_driver_sql(f"EXPLAIN {compiled}", params)
            )
            assert "Seq Scan on subscriptions" not in plan, plan
            found = dict(
                (ident, value)
                for kind, ident, value in await conn.execute(statement, params)
                if kind == 0
            )
            assert found == {small.id: 3}
