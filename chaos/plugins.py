"""A third-party transport that kills its worker: the poison a scenario feeds.

Workers load this module with ``--include chaos.plugins`` the way they
would load any plugin transport. ``chaos-poison`` delivers over HTTP like
the built-in transport, except to a subscriber whose ``chaos_poison`` alias
is set: then it SIGKILLs the process it runs in, every time, as a segfault
in a native library would. Each kill is appended to ``CHAOS_POISON_LOG`` so
the scenario can count redeliveries.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from channels_core.transports.base import EgressTransport, TransportResult
from channels_core.transports.registry import egress_registry, egress_transport

if TYPE_CHECKING:
    from channels_core.primitives import Channel, Message, Principal

__all__ = ["PoisonEgress"]


@egress_transport("chaos-poison")
class PoisonEgress(EgressTransport):
    name = "chaos-poison"

    def is_available(self) -> bool:
        return True

    async def send(
        self, message: Message, channel: Channel, subscribers: Sequence[Principal]
    ) -> list[TransportResult]:
        for subscriber in subscribers:
            if subscriber.get_alias("chaos_poison"):
                path = os.environ.get("CHAOS_POISON_LOG")
                if path:
                    with open(path, "a") as log:
                        log.write(f"{time.time()} {subscriber.delivery_id} {os.getpid()}\n")
                os.kill(os.getpid(), signal.SIGKILL)
        http = egress_registry.get("http")
        return await http.send(message, channel, subscribers)  # type: ignore[attr-defined,no-any-return]
