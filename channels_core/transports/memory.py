"""Test doubles shipped with the library, for users' own tests.

``MemoryEgress`` records every send and answers from a script;
``FunctionEgress`` turns a plain async function into a transport. Neither
needs a network, a broker or a database.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from channels_core.transports.base import EgressTransport, TransportResult

if TYPE_CHECKING:
    from channels_core.primitives import Channel, Message, Principal

__all__ = ["MemoryEgress", "FunctionEgress", "Sent"]


@dataclass(frozen=True)
class Sent:
    message_id: int | None
    channel_id: int | None
    subscriber_id: int | None
    delivery_id: int | None
    content: str


class MemoryEgress(EgressTransport):
    """Records what it was given; succeeds unless told otherwise.

    ``fail_with`` maps a subscriber id to the result it should get instead,
    e.g. ``{7: TransportResult.failed(7, "down", permanent=True)}``.
    """

    name = "memory"

    def __init__(self, fail_with: dict[int, TransportResult] | None = None) -> None:
        self.sent: list[Sent] = []
        self.fail_with = dict(fail_with or {})
        self.available = True

    async def send(
        self, message: Message, channel: Channel, subscribers: Sequence[Principal]
    ) -> list[TransportResult]:
        results = []
        for subscriber in subscribers:
            self.sent.append(
                Sent(
                    message.id,
                    channel.id,
                    subscriber.id,
                    subscriber.delivery_id,
                    message.content or "",
                )
            )
            scripted = self.fail_with.get(subscriber.id or -1)
            results.append(scripted or TransportResult.delivered(subscriber.id))
        return results

    def is_available(self) -> bool:
        return self.available


SendOne = Callable[["Message", "Channel", "Principal"], Awaitable[TransportResult | None]]


class FunctionEgress(EgressTransport):
    """A transport from a function called once per subscriber.

    The function returns a ``TransportResult`` or ``None`` (delivered); an
    exception becomes a transient failure carrying its text.
    """

    def __init__(self, func: SendOne, name: str = "function") -> None:
        self.func = func
        self.name = name

    async def send(
        self, message: Message, channel: Channel, subscribers: Sequence[Principal]
    ) -> list[TransportResult]:
        results = []
        for subscriber in subscribers:
            try:
                result = await self.func(message, channel, subscriber)
            except Exception as exc:  # a user's function: report, never lose the batch
                result = TransportResult.failed(subscriber.id, f"{type(exc).__name__}: {exc}")
            results.append(result or TransportResult.delivered(subscriber.id))
        return results
