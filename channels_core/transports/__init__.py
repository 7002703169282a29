"""Transports: how a message leaves (egress) or arrives (ingress).

Built in: ``http``, ``email``, ``queue``, ``websocket`` and the test double
``memory``. See ``base.py`` for the boundary and ``registry.py`` for how
names resolve.
"""

from __future__ import annotations

from channels_core.transports.base import EgressTransport, IngressTransport, TransportResult
from channels_core.transports.memory import FunctionEgress, MemoryEgress
from channels_core.transports.registry import (
    TransportRepository,
    egress_registry,
    egress_transport,
    ingress_registry,
    ingress_transport,
)

__all__ = [
    "EgressTransport",
    "IngressTransport",
    "TransportResult",
    "TransportRepository",
    "egress_transport",
    "ingress_transport",
    "egress_registry",
    "ingress_registry",
    "MemoryEgress",
    "FunctionEgress",
]
