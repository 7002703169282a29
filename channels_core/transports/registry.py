"""Transport registries: names to lazy import strings, resolved on first use.

A registry holds names, not imports, so an optional dependency (aiosmtplib,
kombu) loads only when its transport is used. Third-party transports
register with ``@egress_transport("name")`` or the entry-point group
``channels.egress_transports``. An unknown name fails with the known ones.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TypeVar

from channels_core.errors import ConfigurationError, ValidationError
from channels_core.transports.base import EgressTransport, IngressTransport

__all__ = [
    "TransportRegistry",
    "egress_registry",
    "ingress_registry",
    "egress_transport",
    "ingress_transport",
    "TransportRepository",
]

T = TypeVar("T")

BUILTIN_EGRESS: dict[str, str] = {
    "http": "channels_core.transports.http:HttpEgress",
    "email": "channels_core.transports.email:EmailEgress",
    "queue": "channels_core.transports.queue:QueueEgress",
    "websocket": "channels_core.transports.websocket:WebSocketEgress",
    "memory": "channels_core.transports.memory:MemoryEgress",
}

BUILTIN_INGRESS: dict[str, str] = {
    "http": "channels_core.transports.ingress_http:HttpIngress",
}


class TransportRegistry:
    """Name -> class (or ``"module:Class"`` string), one instance per name per process."""

    def __init__(self, direction: str, builtins: dict[str, str], group: str) -> None:
        self.direction = direction
        self._targets: dict[str, str | type] = dict(builtins)
        self._instances: dict[str, object] = {}
        self._group = group
        self._entry_points_loaded = False

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self._group):
            self._targets.setdefault(ep.name, ep.value)

    def register(self, name: str, target: str | type) -> None:
        self._targets[name] = target
        self._instances.pop(name, None)

    def unregister(self, name: str) -> None:
        self._targets.pop(name, None)
        self._instances.pop(name, None)

    def names(self) -> list[str]:
        self._load_entry_points()
        return list(self._targets)

    def check_name(self, name: str) -> str:
        known = self.names()
        if name not in known:
            hint = difflib.get_close_matches(name, known, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValidationError(
                f"unknown {self.direction} transport {name!r}{extra}; known: {', '.join(known)}"
            )
        return name

    def get(self, name: str) -> object:
        """The process-wide instance of transport ``name``."""
        self.check_name(name)
        instance = self._instances.get(name)
        if instance is None:
            target = self._targets[name]
            cls = _import(target) if isinstance(target, str) else target
            instance = cls()
            if not getattr(instance, "name", ""):
                instance.name = name
            self._instances[name] = instance
        return instance

    def set_instance(self, name: str, instance: object) -> None:
        """Use this instance for ``name`` (a configured memory transport in tests)."""
        self._targets.setdefault(name, type(instance))
        self._instances[name] = instance

    def resolve(self, preferred: str | None) -> tuple[str, object]:
        """First match: the preferred transport if available, else the first available."""
        candidates = ([preferred] if preferred else []) + [
            n for n in self.names() if n != preferred
        ]
        unavailable: list[str] = []
        for name in candidates:
            try:
                transport = self.get(name)
            except (ImportError, ConfigurationError) as exc:
                unavailable.append(f"{name} ({exc})")
                continue
            if transport.is_available():  # type: ignore[attr-defined]
                return name, transport
            unavailable.append(name)
        raise ConfigurationError(
            f"no {self.direction} transport is available; tried {', '.join(unavailable)}"
        )


def _import(target: str) -> type:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)  # type: ignore[no-any-return]
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"cannot load transport {target!r}: {exc}") from exc


egress_registry = TransportRegistry("egress", BUILTIN_EGRESS, "channels.egress_transports")
ingress_registry = TransportRegistry("ingress", BUILTIN_INGRESS, "channels.ingress_transports")


def egress_transport(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator registering an egress transport under ``name``."""

    def register(cls: type[T]) -> type[T]:
        if not issubclass(cls, EgressTransport) and not (
            hasattr(cls, "send") and hasattr(cls, "is_available")
        ):
            raise TypeError(f"{cls.__name__} needs async send(...) and is_available()")
        egress_registry.register(name, cls)
        return cls

    return register


def ingress_transport(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator registering an ingress transport under ``name``."""

    def register(cls: type[T]) -> type[T]:
        if not issubclass(cls, IngressTransport) and not hasattr(cls, "is_available"):
            raise TypeError(f"{cls.__name__} needs is_available()")
        ingress_registry.register(name, cls)
        return cls

    return register


class TransportRepository:
    """A channel's view of one registry: ``channel.get_egress_repository()``."""

    def __init__(self, registry: TransportRegistry, preferred: str | None) -> None:
        self.registry = registry
        self.preferred = preferred

    def resolve(self) -> object:
        return self.registry.resolve(self.preferred)[1]

    def resolve_name(self) -> str:
        return self.registry.resolve(self.preferred)[0]

    def names(self) -> list[str]:
        return self.registry.names()
