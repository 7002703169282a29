"""WebSocket egress: deliveries to subscribers' live gateway connections.

The gateway (``channels gateway``) holds the sockets; this transport hands
each delivery to the gateway that holds the subscriber, found through
presence keys in Redis. It is available only while at least one gateway is
registered, so until a gateway runs, resolution falls back to the next
transport and nothing waits on a socket that does not exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from channels_core.transports.base import EgressTransport, TransportResult

if TYPE_CHECKING:
    from channels_core.primitives import Channel, Message, Principal

__all__ = ["WebSocketEgress"]


class WebSocketEgress(EgressTransport):
    name = "websocket"

    def is_available(self) -> bool:
        # No gateway registers itself yet, so there is nobody to hand a
        # delivery to: report unavailable and let resolution fall through.
        return False

    async def send(
        self, message: Message, channel: Channel, subscribers: Sequence[Principal]
    ) -> list[TransportResult]:
        return [
            TransportResult.failed(s.id, f"subscriber {s.id} is not connected", permanent=True)
            for s in subscribers
        ]
