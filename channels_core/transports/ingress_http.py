"""The HTTP ingress, without HTTP: what ``POST /channels/{id}/messages`` means.

``producer.ingress`` is the FastAPI face; everything it decides lives here,
so the rules can be read (and tested) without a web framework:

- the body is a closed set of fields (``SubmitBody``), strictly typed; an
  unknown field is refused, not ignored;
- the author is the token's principal: an ``author_id`` in the body that
  names anyone else is refused, never trusted;
- the principal needs ``channel.submit``, checked before anything is
  written, and a channel whose ``ingress_transport`` alias names another
  transport does not accept HTTP submissions;
- an ``idempotency_key`` is stored with a hash of the request *in the same
  transaction* as the message and its outbox entry, so the same key and body
  give the same message however many times (or however concurrently) they
  are sent, and the same key with another body is a conflict.

Reads follow one rule: delivery state is for the sender and operators
(``channel.manage``); content is also for the recipients (subscribers of a
channel the message was accepted on).

This module never imports a web framework: ``is_available`` only asks
whether FastAPI and uvicorn are installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import pydantic
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from sqlalchemy import exists, or_, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from channels_core import db, endpoints
from channels_core.deliveries import DeliveryView, deliveries_for_channel, deliveries_for_message
from channels_core.endpoints import EndpointView
from channels_core.errors import (
    ChannelsError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    ValidationError,
)
from channels_core.models import (
    ConversationRow,
    IdempotencyRow,
    MessageReferenceRow,
    MessageRow,
    OutboxRow,
    PrincipalRow,
    SubscriptionRow,
)
from channels_core.permissions import MANAGE, SUBMIT, permissions_of
from channels_core.primitives import Channel, Message, Subscription
from channels_core.registries import MessageRegistry
from channels_core.sending import Dispatch, send_messages
from channels_core.settings import get_settings
from channels_core.tokens import authenticate
from channels_core.transports.base import IngressTransport, TransportResult

__all__ = [
    "HttpIngress",
    "Submission",
    "MessageStatus",
    "SubmitBody",
    "SubscribeBody",
    "MessageView",
    "InvalidBodyError",
    "UnsupportedContentTypeError",
    "IngressRefusedError",
    "MAX_ID",
    "request_hash",
]

log = logging.getLogger("channels.ingress")

# Ids are BIGINT (SQLite INTEGER): a larger number is refused as input, not
# left for the database to fail on.
MAX_ID = 2**63 - 1
# A MIME type as ``check_content_type`` accepts it; which ones are supported
# is the settings' call (``CHANNELS_CONTENT_TYPES``).
MIME_PATTERN = r"^[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+$"


def _integral(value: object) -> object:
    """JSON Schema counts 7.0 as an integer; so does this API (bools and strings stay refused)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Field before the validator, so the bounds reach the JSON schema as minimum/maximum.
Id = Annotated[int, Field(ge=1, le=MAX_ID), BeforeValidator(_integral)]


# -- errors ------------------------------------------------------------------------------
# Subclasses of channels_core.errors types, so ``except ValidationError`` and
# ``except PermissionDeniedError`` still catch them; the HTTP face maps each
# to its own status.


class InvalidBodyError(ValidationError):
    """A request body of the wrong shape; ``problems`` names each field and why."""

    def __init__(self, problems: Sequence[Mapping[str, str]]) -> None:
        self.problems = [dict(p) for p in problems]
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in self.problems)
        super().__init__(f"invalid request body: {summary}")


class UnsupportedContentTypeError(ValidationError):
    """A well-formed content type this deployment does not accept (HTTP 415)."""

    def __init__(self, content_type: str, allowed: frozenset[str]) -> None:
        self.content_type = content_type
        self.allowed = allowed
        super().__init__(
            f"content_type {content_type!r} is not supported; "
            f"use one of {', '.join(sorted(allowed))}"
        )


class IngressRefusedError(PermissionDeniedError):
    """Refused for a reason other than a missing permission title.

    A forged author, a channel that takes no HTTP submissions, a deactivated
    principal, a message the caller may not read.
    """

    def __init__(
        self,
        reason: str,
        *,
        principal_id: int | None,
        channel_id: int | None = None,
        permission: str = SUBMIT,
    ) -> None:
        self.principal_id = principal_id
        self.permission = permission
        self.channel_id = channel_id
        # Skip PermissionDeniedError's fixed wording: the reason is the message.
        ChannelsError.__init__(self, reason)


# -- bodies ------------------------------------------------------------------------------


class SubmitBody(BaseModel):
    """A message to submit to a channel; its author is the bearer token's principal.

    (Also the request body's schema in the ingress's OpenAPI document.)
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    content: Annotated[
        str,
        Field(
            min_length=1,
            # PostgreSQL text cannot hold NUL; refuse it here rather than fail there.
            pattern=r"^[^\x00]+$",
            description=(
                "The message. At most CHANNELS_MAX_CONTENT_BYTES bytes of UTF-8 "
                "(262144 by default); more is refused with 413. No NUL characters."
            ),
        ),
    ]
    content_type: Annotated[
        str,
        Field(
            pattern=MIME_PATTERN,
            description="A MIME type from CHANNELS_CONTENT_TYPES; another one is refused with 415.",
        ),
    ] = "text/plain"
    reply_to_id: Annotated[
        Id | None, Field(description="The message this one replies to; it must exist.")
    ] = None
    conversation_id: Annotated[
        Id | None, Field(description="The conversation it belongs to; it must exist.")
    ] = None
    references: Annotated[
        list[Id],
        Field(max_length=100, description="Ids of messages it refers to; each must exist."),
    ] = []
    idempotency_key: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=255,
            pattern=r"^[!-~]+$",
            description=(
                "Printable ASCII without spaces. The same key and body give the same "
                "message; the same key with another body is refused with 409."
            ),
        ),
    ] = None
    author_id: Annotated[
        Id | None,
        Field(
            description=(
                "Optional; if given it must be the token's principal (403 otherwise). "
                "The author is always the token's principal."
            )
        ),
    ] = None


class SubscribeBody(BaseModel):
    """Whom to subscribe to a channel."""

    model_config = ConfigDict(extra="forbid", strict=True)

    subscriber_id: Annotated[
        Id | None,
        Field(
            description=(
                "Who to subscribe; the token's principal when omitted. Subscribing "
                "oneself needs channel.subscribe, anyone else channel.manage."
            )
        ),
    ] = None


def _validated(model: type[BaseModel], body: Mapping[str, Any]) -> Any:
    if not isinstance(body, Mapping):
        raise InvalidBodyError([{"field": "(body)", "message": "must be a JSON object"}])
    try:
        return model.model_validate(dict(body))
    except pydantic.ValidationError as exc:
        raise InvalidBodyError(
            [
                {
                    "field": _field_name(err["loc"]) or "(body)",
                    "message": err["msg"],
                }
                for err in exc.errors(include_input=False, include_url=False)
            ]
        ) from exc


def _field_name(loc: Sequence[str | int]) -> str:
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else part)
    return name


def request_hash(channel_id: int, body: SubmitBody) -> str:
    """SHA-256 of the request as understood, key and author left out.

    Hashing the validated fields (defaults filled in) rather than the raw
    bytes means ``{"content": "x"}`` and ``{"content": "x", "content_type":
    "text/plain"}`` are the same request; the channel is part of it, so one
    key cannot name submissions to two channels. ``author_id`` is either
    absent or the token's principal, so it changes nothing either.
    """
    canonical = json.dumps(
        {"channel_id": channel_id, **body.model_dump(exclude={"idempotency_key", "author_id"})},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


# -- results -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Submission:
    """What a submit did: the message, whether this call created it, its results."""

    message_id: int
    created: bool  # False: an idempotent replay of an earlier submission
    dispatch: Dispatch

    @property
    def results(self) -> list[TransportResult]:
        return self.dispatch.results


@dataclass(frozen=True)
class MessageView:
    id: int
    author_id: int | None
    content: str
    content_type: str
    reply_to_id: int | None
    conversation_id: int | None
    created_at: datetime
    references: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, message: Message) -> MessageView:
        assert message.id is not None and message.created_at is not None
        return cls(
            id=message.id,
            author_id=message.author_id,
            content=message.content or "",
            content_type=message.content_type,
            reply_to_id=message.reply_to_id,
            conversation_id=message.conversation_id,
            created_at=message.created_at,
            references=message.references,
        )


@dataclass(frozen=True)
class MessageStatus:
    """``GET /messages/{id}``: the message, per-channel results and its deliveries."""

    message: MessageView
    results: list[TransportResult]
    deliveries: list[DeliveryView]


@dataclass(frozen=True)
class _Claim:
    principal_id: int
    key: str
    request_hash: str


# -- the transport -----------------------------------------------------------------------


class HttpIngress(IngressTransport):
    """Messages submitted over HTTP, by the principal a bearer token names.

    The HTTP face calls these methods with the authenticated principal and
    turns their errors into status codes::

        ingress = HttpIngress()
        principal_id = await ingress.authenticate(bearer_token)
        submission = await ingress.submit(principal_id, channel_id, {"content": "hi"})
        submission.message_id, submission.created, submission.results
    """

    name = "http"

    def is_available(self) -> bool:
        # find_spec, not import: the domain never loads a web framework.
        return all(importlib.util.find_spec(m) is not None for m in ("fastapi", "uvicorn"))

    # -- who ------------------------------------------------------------------

    async def authenticate(self, token: str | None) -> int:
        """The active principal a bearer token names.

        ``AuthenticationError`` for a missing, unknown or revoked token;
        ``IngressRefusedError`` for a deactivated principal.
        """
        principal_id = await authenticate(token)
        async with db.session() as s:
            active = await s.scalar(
                select(PrincipalRow.active).where(PrincipalRow.id == principal_id)
            )
        if not active:
            raise IngressRefusedError(
                f"principal {principal_id} is deactivated", principal_id=principal_id
            )
        return principal_id

    # -- submit ---------------------------------------------------------------

    async def submit(
        self, principal_id: int, channel_id: int, body: Mapping[str, Any]
    ) -> Submission:
        """Accept a message for a channel, or refuse it having written nothing."""
        parsed: SubmitBody = _validated(SubmitBody, body)
        if parsed.author_id is not None and parsed.author_id != principal_id:
            raise IngressRefusedError(
                f"author_id {parsed.author_id} is not allowed: the author is the token's "
                f"principal ({principal_id})",
                principal_id=principal_id,
                channel_id=channel_id,
            )
        message = self._message(principal_id, parsed)
        channel = await self._channel(channel_id)
        wanted = channel.get_alias("ingress_transport")
        if wanted is not None and wanted != self.name:
            raise IngressRefusedError(
                f"channel {channel_id} does not accept {self.name} ingress (it takes {wanted})",
                principal_id=principal_id,
                channel_id=channel_id,
            )
        if not await channel.can_submit(principal_id):
            raise PermissionDeniedError(principal_id, SUBMIT, channel_id)

        claim = None
        if parsed.idempotency_key is not None:
            claim = _Claim(principal_id, parsed.idempotency_key, request_hash(channel_id, parsed))
            earlier = await self._replay(claim)
            if earlier is not None:
                return earlier
        try:
            dispatch = await _send_claimed(message, channel, claim)
        except IntegrityError as exc:
            # A concurrent request with the same key committed first (the
            # unique constraint on (principal_id, key) said so): this
            # transaction rolled back, and the winner's message is the answer.
            if claim is not None:
                earlier = await self._replay(claim)
                if earlier is not None:
                    return earlier
            raise ConflictError(
                "the submission conflicted with a concurrent change; send it again"
            ) from exc
        assert message.id is not None
        return Submission(message.id, True, dispatch)

    def _message(self, principal_id: int, parsed: SubmitBody) -> Message:
        allowed = get_settings().allowed_content_types
        message = Message(author_id=principal_id).set_content(parsed.content)
        if parsed.content_type not in allowed:
            raise UnsupportedContentTypeError(parsed.content_type, allowed)
        message.set_content_type(parsed.content_type)
        message.set_reply_to_id(parsed.reply_to_id).set_conversation_id(parsed.conversation_id)
        for ref in parsed.references:
            message.add_reference(ref)
        return message

    async def _channel(self, channel_id: int) -> Channel:
        channel = await Channel.get(_check_id(channel_id, "channel_id"))
        if channel is None:
            raise NotFoundError("channel", channel_id)
        return channel

    async def _replay(self, claim: _Claim) -> Submission | None:
        async with db.session() as s:
            row = await s.scalar(
                select(IdempotencyRow).where(
                    IdempotencyRow.principal_id == claim.principal_id,
                    IdempotencyRow.key == claim.key,
                )
            )
        if row is None:
            return None
        if row.request_hash != claim.request_hash:
            raise ConflictError(
                f"idempotency key {claim.key!r} was used for a different request "
                f"(message {row.message_id}); use a new key for a new message"
            )
        return Submission(row.message_id, False, await Dispatch.track(row.message_id))

    # -- reads ----------------------------------------------------------------

    async def message_status(
        self, principal_id: int, message_id: int, *, limit: int = 100
    ) -> MessageStatus:
        message = await self._message_for_sender(principal_id, message_id)
        dispatch = await Dispatch.track(message_id)
        deliveries = await deliveries_for_message(message_id, limit=limit)
        return MessageStatus(MessageView.of(message), dispatch.results, deliveries)

    async def message_deliveries(
        self, principal_id: int, message_id: int, *, limit: int = 100
    ) -> list[DeliveryView]:
        await self._message_for_sender(principal_id, message_id)
        return await deliveries_for_message(message_id, limit=limit)

    async def channel_deliveries(
        self,
        principal_id: int,
        channel_id: int,
        *,
        status: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[DeliveryView]:
        channel = await self._channel(channel_id)
        if not await channel.can_manage(principal_id):
            raise PermissionDeniedError(principal_id, MANAGE, channel_id)
        return await deliveries_for_channel(
            channel_id, status=status, since=_utc(since), limit=limit
        )

    async def thread(self, principal_id: int, message_id: int) -> list[MessageView]:
        """The reply chain ending at ``message_id``, root first, as far as the caller may read."""
        await self._readable_message(principal_id, message_id)
        chain = await MessageRegistry().get_thread(message_id)
        ids = [m.id for m in chain if m.id is not None]
        async with db.session() as s:
            readable = await _readable(s, principal_id, ids)
        return [MessageView.of(m) for m in chain if m.id in readable]

    async def conversation_messages(
        self, principal_id: int, conversation_id: int, *, after: int = 0, limit: int = 100
    ) -> list[MessageView]:
        """Messages of a conversation the caller may read, by id, ``after`` a cursor."""
        _check_id(conversation_id, "conversation_id")
        async with db.session() as s:
            if await s.get(ConversationRow, conversation_id) is None:
                raise NotFoundError("conversation", conversation_id)
            query = (
                select(MessageRow)
                .where(MessageRow.conversation_id == conversation_id, MessageRow.id > after)
                .order_by(MessageRow.id)
                .limit(limit)
            )
            if MANAGE not in await permissions_of(s, principal_id):
                query = query.where(_may_read(principal_id))
            rows = list(await s.scalars(query))
            refs = await _references(s, [r.id for r in rows])
        return [
            MessageView(
                id=r.id,
                author_id=r.author_id,
                content=r.content,
                content_type=r.content_type,
                reply_to_id=r.reply_to_id,
                conversation_id=r.conversation_id,
                created_at=r.created_at,
                references=refs.get(r.id, []),
            )
            for r in rows
        ]

    async def subscribe(
        self, principal_id: int, channel_id: int, body: Mapping[str, Any]
    ) -> Subscription:
        """Subscribe ``subscriber_id`` (default: the caller), checked as the caller."""
        parsed: SubscribeBody = _validated(SubscribeBody, body)
        channel = await self._channel(channel_id)
        subscriber = parsed.subscriber_id if parsed.subscriber_id is not None else principal_id
        return await channel.subscribe(subscriber, by=principal_id)

    async def endpoints(self, principal_id: int) -> list[EndpointView]:
        """Endpoints the caller may see: every one with channel.manage, else its own."""
        views = await endpoints.list_endpoints()
        if await self._manages(principal_id):
            return views
        own = await self._own_endpoint(principal_id)
        return [v for v in views if v.url == own]

    async def enable_endpoint(self, principal_id: int, endpoint_id: int) -> EndpointView:
        """Switch an endpoint back on: the caller's own, or any with channel.manage."""
        view = await endpoints.get_endpoint(_check_id(endpoint_id, "endpoint_id"))
        if not await self._manages(principal_id) and view.url != await self._own_endpoint(
            principal_id
        ):
            # Someone else's endpoint is not even acknowledged to exist.
            raise NotFoundError("endpoint", endpoint_id)
        return await endpoints.enable(view.id)

    async def _manages(self, principal_id: int) -> bool:
        async with db.session() as s:
            return MANAGE in await permissions_of(s, principal_id)

    async def _own_endpoint(self, principal_id: int) -> str | None:
        async with db.session() as s:
            row = await s.get(PrincipalRow, principal_id)
        url = (row.aliases or {}).get("endpoint") if row is not None else None
        return url.strip() if isinstance(url, str) else None

    async def check_database(self) -> None:
        """Raise if the database cannot answer a query (``GET /healthz``)."""
        async with db.session() as s:
            await s.execute(text("SELECT 1"))

    # -- read rules -----------------------------------------------------------

    async def _message_for_sender(self, principal_id: int, message_id: int) -> Message:
        """The message, if the caller sent it or holds channel.manage."""
        message = await Message.get(_check_id(message_id, "message_id"))
        if message is None:
            raise NotFoundError("message", message_id)
        if message.author_id != principal_id:
            async with db.session() as s:
                manager = MANAGE in await permissions_of(s, principal_id)
            if not manager:
                raise IngressRefusedError(
                    f"principal {principal_id} may not read the delivery state of message "
                    f"{message_id}: only its author and holders of {MANAGE!r} may",
                    principal_id=principal_id,
                    permission=MANAGE,
                )
        return message

    async def _readable_message(self, principal_id: int, message_id: int) -> None:
        _check_id(message_id, "message_id")
        async with db.session() as s:
            if await s.get(MessageRow, message_id) is None:
                raise NotFoundError("message", message_id)
            if message_id not in await _readable(s, principal_id, [message_id]):
                raise IngressRefusedError(
                    f"principal {principal_id} may not read message {message_id}: it is not "
                    "its author, not subscribed to a channel it was sent on, and does not "
                    f"hold {MANAGE!r}",
                    principal_id=principal_id,
                    permission=MANAGE,
                )


def _check_id(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ID:
        raise ValidationError(f"{what} must be an id between 1 and {MAX_ID}, not {value!r}")
    return value


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        # 0001-01-01T00:00:00+01:00 is before the first UTC datetime, and the
        # last day of 9999 behind UTC after the last one: clamp, as "since"
        # the beginning (or the end) of time means.
        edge = datetime.min if value.year == datetime.min.year else datetime.max
        return edge.replace(tzinfo=UTC)


def _may_read(principal_id: int) -> Any:
    """SQL condition: the caller wrote the message or subscribes to a channel it went to."""
    received = exists(
        select(OutboxRow.id)
        .join(SubscriptionRow, SubscriptionRow.channel_id == OutboxRow.channel_id)
        .where(OutboxRow.message_id == MessageRow.id, SubscriptionRow.subscriber_id == principal_id)
    )
    return or_(MessageRow.author_id == principal_id, received)


async def _readable(s: AsyncSession, principal_id: int, ids: Sequence[int]) -> set[int]:
    if not ids:
        return set()
    if MANAGE in await permissions_of(s, principal_id):
        return set(ids)
    return set(
        await s.scalars(
            select(MessageRow.id).where(MessageRow.id.in_(list(ids)), _may_read(principal_id))
        )
    )


async def _references(s: AsyncSession, ids: Sequence[int]) -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    if ids:
        rows = await s.execute(
            select(MessageReferenceRow.message_id, MessageReferenceRow.referenced_id)
            .where(MessageReferenceRow.message_id.in_(list(ids)))
            .order_by(MessageReferenceRow.message_id, MessageReferenceRow.position)
        )
        for message_id, ref in rows:
            found.setdefault(message_id, []).append(ref)
    return found


async def _send_claimed(message: Message, channel: Channel, claim: _Claim | None) -> Dispatch:
    """``send_messages([message], [channel])`` that also stores the idempotency claim.

    The claim row is written in the transaction that writes the message and
    its outbox entry, so a committed message always has its key and a key
    never names a message that was rolled back. A concurrent twin fails on
    the unique (principal_id, key) constraint with ``IntegrityError`` and its
    transaction writes nothing.
    """

    async def store_claim(s: AsyncSession, messages: Sequence[Message]) -> None:
        if claim is not None and message.id is not None:
            s.add(
                IdempotencyRow(
                    principal_id=claim.principal_id,
                    key=claim.key,
                    request_hash=claim.request_hash,
                    message_id=message.id,
                )
            )
            await s.flush()

    [dispatch] = await send_messages([message], [channel], before_commit=store_claim)
    if not dispatch.accepted:  # channel.submit was revoked since the check: nothing written
        raise PermissionDeniedError(message.author_id, SUBMIT, channel.id)
    return dispatch
