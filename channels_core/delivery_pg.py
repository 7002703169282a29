"""The delivery engine's statements on PostgreSQL: a batch in three round trips.

``channels_core.delivery`` runs every batch through these when the database
is PostgreSQL (SQLite keeps the portable statements there):

- ``route_page``: a page of a channel's subscribers turned into delivery
  rows, and the ids of those not final, in one statement;
- ``claim``: the UPDATE that claims the batch's deliveries, in a CTE joined
  to ``principals``, so the subscribers come back with the claim;
- ``load``: the message with its references, and the channel;
- ``record``: the deliveries' new states and the attempt rows, numbered by
  the count the UPDATE leaves, one statement, so an attempt and its outcome
  land together.

Each is built once per process with named parameters and runs in autocommit
on a Core connection: no BEGIN/COMMIT round trips, no per-call statement
construction or cache-key walk, no ORM objects. Rows travel as column
arrays (``unnest``, ``= ANY``), so the text never changes with the batch
size and psycopg prepares each statement once.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import cache
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import (
    Executable,
    Update,
    any_,
    bindparam,
    case,
    func,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.exc import DBAPIError

from channels_core import db
from channels_core.models import (
    AttemptRow,
    ChannelRow,
    DeliveryRow,
    DeliveryStatus,
    MessageReferenceRow,
    MessageRow,
    PrincipalRow,
    SubscriptionRow,
    UTCDateTime,
)
from channels_core.primitives import Channel, Message, Principal

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "route_page",
    "claim",
    "claim_update",
    "load",
    "record",
    "record_params",
    "ATTEMPT_ARRAYS",
    "STATE_ARRAYS",
]

# Columns that differ per delivery, sent as one array each. An attempt's
# number is not among them: the record statement counts it.
ATTEMPT_ARRAYS = ("delivery_id", "status", "status_code", "error", "latency_ms")
STATE_ARRAYS = (
    *("id", "status", "last_status_code", "last_error"),
    *("next_attempt_at", "queued_until"),
)
_PRINCIPAL = PrincipalRow.__table__.c
_DELIVERY = DeliveryRow.__table__.c
_NOT_FINAL = (DeliveryStatus.PENDING, DeliveryStatus.RETRYING)


def _stamp(name: str) -> Any:
    return bindparam(name, type_=UTCDateTime())


@cache
def _route_page_statement(size: int, columns: tuple[str, ...]) -> Executable:
    # Every row of a page has the same values but its subscriber.
    same = {c: bindparam(f"row_{c}", type_=_DELIVERY[c].type) for c in columns}
    page = (
        select(SubscriptionRow.id, SubscriptionRow.subscriber_id, PrincipalRow.active)
        .join(PrincipalRow, PrincipalRow.id == SubscriptionRow.subscriber_id)
        .where(
            SubscriptionRow.channel_id == same["channel_id"],
            SubscriptionRow.id > bindparam("after", type_=SubscriptionRow.id.type),
        )
        .order_by(SubscriptionRow.id)
        .limit(size)
        .cte("page")
    )
    # Inactive subscribers are skipped: no delivery row, nothing owed.
    fresh = (
        postgresql.insert(DeliveryRow)
        .from_select(
            ["subscriber_id", *same],
            select(page.c.subscriber_id, *same.values()).where(page.c.active).order_by(page.c.id),
        )
        .on_conflict_do_nothing()
        .returning(DeliveryRow.id, DeliveryRow.status)
        .cte("fresh")
    )
    # Rows an earlier run of this routing made. The statement's snapshot does
    # not hold the rows "fresh" inserts, so the two never overlap.
    # The page's subscribers as one array: as an IN (subquery) the planner
    # chose to read every pending delivery of the table (a second per page
    # of 5,000). It may still take the channel's index, hence the gate below.
    # (Cast, so ANY reads it as one array, not as a subquery of arrays.)
    page_subscribers = sql_cast(
        select(func.array_agg(page.c.subscriber_id)).where(page.c.active).scalar_subquery(),
        postgresql.ARRAY(DeliveryRow.subscriber_id.type),
    )
    active = select(func.count()).select_from(page).where(page.c.active).scalar_subquery()
    known = select(DeliveryRow.id).where(
        # Only when some active subscriber got no new row: on a first
        # routing, the usual case, the lookup is skipped (a one-time
        # filter). Run every time, it cost a millisecond per message on a
        # channel of 200 earlier messages, and grew with the channel's history
        # wherever the planner took the channel's index.
        select(func.count()).select_from(fresh).scalar_subquery() < active,
        DeliveryRow.message_id == same["message_id"],
        DeliveryRow.channel_id == same["channel_id"],
        DeliveryRow.subscriber_id == any_(page_subscribers),
        DeliveryRow.status.in_(_NOT_FINAL),
    )
    ids = union_all(select(fresh.c.id).where(fresh.c.status.in_(_NOT_FINAL)), known).subquery()
    return select(
        select(func.max(page.c.id)).scalar_subquery().label("last"),
        select(func.count()).select_from(page).scalar_subquery().label("seen"),
        active,
        func.coalesce(
            select(func.array_agg(aggregate_order_by(ids.c.id, ids.c.id))).scalar_subquery(),
            postgresql.array([], type_=DeliveryRow.id.type),
        ),
    )


async def route_page(
    values: dict[str, Any], after: int, size: int
) -> tuple[int | None, int, int, list[int]]:
    """Up to ``size`` subscriptions of ``values["channel_id"]`` after
    subscription ``after`` become delivery rows of ``values`` (ON CONFLICT DO
    NOTHING: routing twice is harmless). Returns the page's last subscription
    id, how many subscriptions it held and of active subscribers, and the
    ids of their deliveries that are not final, new or made before."""
    params = {f"row_{c}": v for c, v in values.items()}
    params["after"] = after
    async with db.autocommit() as conn:
        row = (await conn.execute(_route_page_statement(size, tuple(values)), params)).one()
    return row[0], row[1], row[2], list(row[3])


# A claim and a record, or two records, can lock the same delivery rows in
# opposite orders: a record locks the rows its batch holds, then those another
# worker took over (their tries are counted too), while a claim of a batch the
# sweeper re-enqueued locks them in id order. PostgreSQL breaks the cycle by
# aborting one statement, whose effects go with it; that one runs again.
_DEADLOCK = "40P01"
_DEADLOCK_TRIES = 3


async def _locking(statement: Executable, params: dict[str, Any]) -> list[Any]:
    """Run a statement that locks delivery rows, again if a deadlock aborted it;
    its rows, if it returns any."""
    for tries_left in reversed(range(_DEADLOCK_TRIES)):
        try:
            async with db.autocommit() as conn:
                result = await conn.execute(statement, params)
                return list(result.all()) if result.returns_rows else []
        except DBAPIError as exc:
            if not tries_left or getattr(exc.orig, "sqlstate", None) != _DEADLOCK:
                raise
    raise AssertionError("unreachable")


def claim_update(ids: Any, claimant: Any, now: Any, due: Any, until: Any) -> Update:
    """The UPDATE that claims deliveries matched by ``ids`` (a where-clause)
    that are not final, due by ``due``, and free or already ``claimant``'s.

    The one claim rule for both backends: SQLite runs it with plain values,
    PostgreSQL with bind parameters inside ``_claim_statement``.
    """
    return (
        update(DeliveryRow)
        .where(
            ids,
            DeliveryRow.status.in_((DeliveryStatus.PENDING, DeliveryStatus.RETRYING)),
            or_(DeliveryRow.next_attempt_at.is_(None), DeliveryRow.next_attempt_at <= due),
            or_(
                DeliveryRow.claimed_until.is_(None),
                DeliveryRow.claimed_until < now,
                DeliveryRow.claimed_by == claimant,
            ),
        )
        .values(
            claimed_by=claimant,
            claimed_until=until,
            queued_until=until,
            claims=DeliveryRow.claims + 1,
        )
        .returning(
            DeliveryRow.id.label("delivery_id"),
            DeliveryRow.subscriber_id,
            DeliveryRow.attempts,
            DeliveryRow.retry_base,
            DeliveryRow.claims,
            DeliveryRow.transport,
        )
    )


# The subscriber's columns a claim returns, in ``Principal._from_values`` order.
_PRINCIPAL_COLUMNS = ("id", "kind", "username", "email", "aliases", "active", "created_at")


@cache
def _claim_statement() -> Executable:
    claimed = claim_update(
        DeliveryRow.id == any_(db.array_bind("ids", DeliveryRow.id.type)),
        bindparam("claimant", type_=DeliveryRow.claimed_by.type),
        _stamp("now"),
        _stamp("due"),
        _stamp("until"),
    ).cte("claimed")
    # Positional, read back by position: the claimed row's six, then these.
    return select(claimed, *(_PRINCIPAL[name] for name in _PRINCIPAL_COLUMNS)).outerjoin(
        PrincipalRow.__table__, _PRINCIPAL.id == claimed.c.subscriber_id
    )


async def claim(
    ids: Sequence[int], claimant: str, now: datetime, lease: float
) -> tuple[list[tuple[int, int, int, int, int, str]], dict[int, Principal]]:
    """Claim what of ``ids`` is claimable; the claimed rows and their subscribers."""
    until = now + timedelta(seconds=lease)
    params = {
        "ids": db.array_value(DeliveryRow.id.type, ids),
        "claimant": claimant,
        "now": now,
        "due": now + timedelta(seconds=1),
        "until": until,
    }
    rows = await _locking(_claim_statement(), params)
    claimed = []
    principals: dict[int, Principal] = {}
    # As plain tuples: reading a result row's columns by name took 13 µs a
    # row here, most of a 500-delivery claim's Python time.
    for row in rows:
        values = tuple(row)
        claimed.append(cast(tuple[int, int, int, int, int, str], values[:6]))
        if values[6] is not None:  # the subscriber still exists
            principals[values[6]] = Principal._from_values(*values[6:])
    return claimed, principals


@cache
def _load_statement() -> Executable:
    references = (
        select(
            func.array_agg(
                aggregate_order_by(MessageReferenceRow.referenced_id, MessageReferenceRow.position)
            )
        )
        .where(MessageReferenceRow.message_id == MessageRow.id)
        .scalar_subquery()
    )
    messages, channels = MessageRow.__table__, ChannelRow.__table__
    # Core columns, not ORM entities: the batch reads them once, and an ORM
    # session's checkout and identity map made this read outlast the claim
    # it runs beside, which the batch then waited for.
    return (
        select(
            *messages.c,
            *(column.label(f"channel_{column.key}") for column in channels.c),
            references.label("references"),
        )
        .select_from(
            messages.join(
                channels, channels.c.id == bindparam("channel_id", type_=ChannelRow.id.type)
            )
        )
        .where(messages.c.id == bindparam("message_id", type_=MessageRow.id.type))
    )


async def load(message_id: int, channel_id: int) -> tuple[Message, Channel] | None:
    """The message with its references, and the channel; None if either is gone."""
    params = {"message_id": message_id, "channel_id": channel_id}
    async with db.autocommit() as conn:
        found = (await conn.execute(_load_statement(), params)).first()
    if found is None:
        return None
    columns = found._mapping
    channel = SimpleNamespace(
        **{column.key: columns[f"channel_{column.key}"] for column in ChannelRow.__table__.c}
    )
    # The row carries the message's columns under their own names.
    return (
        Message._from_row(cast(MessageRow, found), found.references or ()),
        Channel._from_row(cast(ChannelRow, channel)),
    )


@cache
def _record_statement(resolved: bool) -> Executable:
    finished_at = _stamp("batch_finished_at")
    claimant = bindparam("claimant", type_=DeliveryRow.claimed_by.type)
    u = db.unnest(DeliveryRow, "u", STATE_ARRAYS)
    values: dict[str, Any] = {column.key: column for column in u.c if column.key != "id"}
    values.update(
        attempts=DeliveryRow.attempts + 1,
        delivered_at=case(
            (u.c.status == DeliveryStatus.DELIVERED, finished_at), else_=DeliveryRow.delivered_at
        ),
        claimed_by=None,
        claimed_until=None,
        claims=0,
        updated_at=finished_at,
    )
    if resolved:
        values["transport"] = bindparam("resolved", type_=DeliveryRow.transport.type)
    held = (
        update(DeliveryRow)
        .where(DeliveryRow.id == u.c.id, DeliveryRow.claimed_by == claimant)
        .values(values)
        .returning(DeliveryRow.id, DeliveryRow.attempts)
        .cte("held")
    )
    a = db.unnest(AttemptRow, "a", ATTEMPT_ARRAYS)
    # Deliveries this batch no longer holds: it outlived its lease and
    # another worker took them over. Their tries happened all the same, so
    # each is counted and numbered on the row, like the new holder's will
    # be, and both attempts keep their rows. (Rows "held" just updated are
    # left out: a statement must not update a row twice.) Usually empty.
    taken = func.array(select(a.c.delivery_id).except_(select(held.c.id)).scalar_subquery())
    stale = (
        update(DeliveryRow)
        # As one array, so the primary key's index is used whatever the
        # planner guesses of the set (as a join it chose to scan the table).
        .where(DeliveryRow.id == any_(taken))
        .values(attempts=DeliveryRow.attempts + 1)
        .returning(DeliveryRow.id, DeliveryRow.attempts)
        .cte("stale")
    )
    numbered = union_all(
        select(held.c.id, held.c.attempts), select(stale.c.id, stale.c.attempts)
    ).subquery("numbered")
    # Named apart from the columns: SQLAlchemy reserves a column's own name.
    same = {
        "transport": bindparam("batch_transport", type_=AttemptRow.transport.type),
        "started_at": _stamp("batch_started_at"),
        "finished_at": finished_at,
    }
    tried = (
        select(numbered.c.attempts, *a.c, *same.values())
        .select_from(a)
        .join(numbered, numbered.c.id == a.c.delivery_id)
    )
    return (
        postgresql.insert(AttemptRow)
        .from_select(["attempt", *ATTEMPT_ARRAYS, *same], tried)
        .on_conflict_do_nothing()
    )


def record_params(
    attempts: Sequence[dict[str, Any]],
    states: Sequence[dict[str, Any]],
    transport: str,
    resolved: str | None,
    started_at: datetime,
    finished_at: datetime,
    claimant: str,
) -> dict[str, Any]:
    """The parameters of ``record`` for a batch's attempts and new states."""
    params: dict[str, Any] = {
        "claimant": claimant,
        "batch_transport": transport,
        "batch_started_at": started_at,
        "batch_finished_at": finished_at,
        **db.arrays(AttemptRow, "a", ATTEMPT_ARRAYS, attempts),
        **db.arrays(DeliveryRow, "u", STATE_ARRAYS, states),
    }
    if resolved:
        params["resolved"] = resolved
    return params


async def record(params: dict[str, Any]) -> None:
    """Write the new states of the deliveries the claimant still holds, count
    every try on its delivery, and write the attempt rows, in one statement
    (``record_params`` makes ``params``)."""
    await _locking(_record_statement("resolved" in params), params)
