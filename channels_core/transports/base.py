"""The transport boundary: one small class per direction, one method each.

An egress transport takes a message, its channel and a list of subscribers
and returns one ``TransportResult`` per subscriber. It never touches the
database, the broker's task queues or retries: the worker records each
result as an attempt row and schedules what comes next from it. Keeping the
boundary this small is what lets a user write a transport in ten lines::

    from channels_core.transports import EgressTransport, TransportResult, egress_transport

    @egress_transport("sms")
    class SmsEgress(EgressTransport):
        async def send(self, message, channel, subscribers):
            results = []
            for subscriber in subscribers:
                await my_sms_api(subscriber.get_alias("phone"), message.content)
                results.append(TransportResult.delivered(subscriber.id))
            return results

        def is_available(self) -> bool:
            return True

Subscribers handed over by the worker carry ``delivery_id`` and ``attempt``
so a transport can give receivers a stable id to deduplicate on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from channels_core.primitives import Channel, Message, Principal

__all__ = ["EgressTransport", "IngressTransport", "TransportResult", "event_data"]


def event_data(message: Message, channel: Channel) -> dict[str, Any]:
    """The ``data`` of a ``message.created`` event, as webhooks and queue
    envelopes carry it: one shape, so a receiver can read either."""
    return {
        "message_id": message.id,
        "channel_id": channel.id,
        "channel": channel.title,
        "author_id": message.author_id,
        "content": message.content,
        "content_type": message.content_type,
        "reply_to_id": message.reply_to_id,
        "conversation_id": message.conversation_id,
        "references": message.references,
    }


@dataclass
class TransportResult:
    """What happened to a delivery, or to a channel's share of a send.

    Built-in transports return one per subscriber (``subscriber_id`` set).
    ``Message.send`` returns one per channel, with the counts summed.
    A failure is transient unless ``permanent`` is set; ``retry_after`` is
    the receiver's requested delay in seconds.
    """

    success: bool
    delivered_count: int = 0
    failed_count: int = 0
    pending_count: int = 0
    errors: list[str] = field(default_factory=list)
    channel_id: int | None = None
    message_id: int | None = None
    subscriber_id: int | None = None
    delivery_id: int | None = None
    status_code: int | None = None
    permanent: bool = False
    retry_after: float | None = None
    latency_ms: float | None = None
    transport: str | None = None

    @classmethod
    def delivered(
        cls, subscriber_id: int | None, *, status_code: int | None = None, **extra: Any
    ) -> TransportResult:
        return cls(
            success=True,
            delivered_count=1,
            subscriber_id=subscriber_id,
            status_code=status_code,
            **extra,
        )

    @classmethod
    def failed(
        cls,
        subscriber_id: int | None,
        error: str,
        *,
        permanent: bool = False,
        status_code: int | None = None,
        retry_after: float | None = None,
        **extra: Any,
    ) -> TransportResult:
        return cls(
            success=False,
            failed_count=1,
            errors=[error],
            subscriber_id=subscriber_id,
            status_code=status_code,
            permanent=permanent,
            retry_after=retry_after,
            **extra,
        )

    @property
    def final(self) -> bool:
        """True when nothing is still pending for this result."""
        return self.pending_count == 0


class EgressTransport:
    """Delivers a message to subscribers. Subclass and implement ``send``.

    ``send`` must return one result per subscriber it was given, and must
    not raise for a single subscriber's failure: report it in that
    subscriber's result so the others are unaffected.
    """

    name: str = ""

    async def send(
        self, message: Message, channel: Channel, subscribers: Sequence[Principal]
    ) -> list[TransportResult]:
        raise NotImplementedError

    def is_available(self) -> bool:
        """Whether this transport can deliver now; resolution skips it if not."""
        return True

    def endpoint(self, subscriber: Principal) -> str | None:
        """What this transport dials for ``subscriber`` when a user chose it.

        A transport that returns one gets endpoint health for free: the
        engine checks the breaker, rate limits and the off switch of that
        endpoint before handing the subscriber over (``channels_core.endpoints``).
        """
        return None

    def at_once(self) -> int:
        """The most requests one ``send`` has open at once; 0 if one per subscriber.

        A host's in-flight cap (``channels_core.endpoints``) charges a batch
        this many, not its size: the rest wait in the worker, not at the host.
        """
        return 0

    async def aclose(self) -> None:
        """Release connections held across sends (a worker calls it on exit)."""


class IngressTransport:
    """Accepts messages from outside and hands them to ``Message.send``.

    An ingress transport is a server face (HTTP is the first); ``is_available``
    says whether its dependencies are installed.
    """

    name: str = ""

    def is_available(self) -> bool:
        return True
